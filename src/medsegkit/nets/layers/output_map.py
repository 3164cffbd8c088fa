"""An affine map of a network's output channels, appended to the network (plain model code)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MappedOutput"]


class MappedOutput(nn.Module):
    """``model`` followed by an affine map of its output channels, ``z -> matrix @ z + offset`` (channel axis
    1): what :meth:`medsegkit.interactive.Session.refine` makes of a model whose output layer cannot absorb
    the map (a residual unit after it, as in MONAI's ``UNet`` with ``num_res_units > 0`` and medsegkit's
    ``ResUNet``).

    Its state dict is the model's under ``model.`` plus the ``matrix`` ``(K, K)`` and ``offset`` ``(K,)``
    buffers. A checkpoint of it records the model's own record plus ``"output_map": {"classes": K}``
    (:func:`medsegkit.weights.checkpoint_record`), so :func:`medsegkit.load_model` rebuilds the pair. The
    model's ``medsegkit_config`` and ``medsegkit_metadata`` are kept on the wrapper, so that ``segment``
    finds its window and preprocessing.

    Args:
        model: a network returning ``(B, K, *spatial)`` logits.
        matrix: ``(K, K)``; offset: ``(K,)`` or ``None`` (zeros).
    """

    def __init__(self, model: nn.Module, matrix: torch.Tensor, offset: torch.Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("matrix", matrix.detach().clone())
        self.register_buffer("offset", torch.zeros(len(matrix)) if offset is None else offset.detach().clone())
        for name in ("medsegkit_config", "medsegkit_metadata"):
            value = getattr(model, name, None)
            if value is not None:
                setattr(self, name, value)

    @property
    def classes(self) -> int:
        return int(self.matrix.shape[0])

    @staticmethod
    def map_logits(z: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """``(B, K, ...)`` logits mapped: ``matrix @ z + offset`` over the channel axis."""
        mapped = torch.einsum("kj,bj...->bk...", matrix.to(z), z)
        if offset is not None:
            mapped = mapped + offset.to(z).reshape(1, -1, *([1] * (z.ndim - 2)))
        return mapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, K, *spatial)`` mapped logits."""
        return self.map_logits(self.model(x), self.matrix, self.offset)
