"""The residual add of a block, as a module, so that inference can swap in an in-place add.

Every network here adds its residual branches through a :class:`Residual` (no parameters, so the
state dict is unchanged). The plain module computes ``x + branch`` and is what training, autograd,
hooks and parity tests see. :func:`medsegkit.inference.fast.prepare_model` swaps it for
:class:`InPlaceResidual` in its inference copy: the same sum, written into ``branch``, one fresh
tensor fewer per block (the same pattern as torchvision's quantizable models, whose adds are
``FloatFunctional`` modules for the same reason).

The contract every caller keeps: ``branch`` is a fresh intermediate that nothing else reads.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["InPlaceResidual", "Residual"]


class Residual(nn.Module):
    """``x + branch``. Shapes: any two broadcastable tensors, ``branch``'s shape out."""

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return x + branch


class InPlaceResidual(Residual):
    """``branch += x``: :class:`Residual`'s sum without a new tensor, for inference copies only.

    ``branch`` must be a fresh tensor of the output's shape that nothing else reads, and no gradient may
    be recorded through it (autograd refuses an in-place add on a tensor that backward needs)."""

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return branch.add_(x)
