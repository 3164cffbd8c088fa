"""Weights interop: convert other libraries' models and checkpoints, save and load our own.

``convert(obj, source=...)`` dispatches to one module per library, each with an explicit,
parity-tested key map:

- ``"monai"``: :mod:`medsegkit.weights.from_monai` (``UNet``, ``AttentionUnet``)
- ``"torchvision"``: :mod:`medsegkit.weights.from_torchvision` (FCN, Mask R-CNN, ResNet)
- ``"transformers"``: :mod:`medsegkit.weights.from_transformers` (MaskFormer, Mask2Former)

Each of those modules exposes ``convert(obj, target=None) -> nn.Module``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from medsegkit.weights.checkpoint import (
    atomic_write,
    load_checkpoint,
    load_model,
    read_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:
    from torch import nn

    from medsegkit.registry import ModelSpec

__all__ = [
    "SOURCES",
    "atomic_write",
    "convert",
    "load_checkpoint",
    "load_model",
    "load_registered_weights",
    "read_checkpoint",
    "save_checkpoint",
]

SOURCES = {
    "monai": "medsegkit.weights.from_monai",
    "torchvision": "medsegkit.weights.from_torchvision",
    "transformers": "medsegkit.weights.from_transformers",
}


def convert(obj: Any, *, source: str, target: str | nn.Module | None = None) -> nn.Module:
    """Turn a model (or bare state dict) of another library into the equivalent medsegkit model.

    Args:
        obj: a model of the ``source`` library (its configuration is read from it), or a bare state dict.
        source: ``"monai"``, ``"torchvision"`` or ``"transformers"``.
        target: a registry name or an already built medsegkit model; required for a bare state dict.

    Returns:
        A medsegkit model whose outputs equal the source model's (max |Δ| ≤ 1e-5 fp32; 1e-4 for the
        transformer models).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; accepted: {', '.join(SOURCES)}")
    if isinstance(obj, dict) and target is None:
        raise ValueError(
            "a bare state dict does not say which architecture it fills: pass target= a registry name "
            "or a built medsegkit model"
        )
    module = importlib.import_module(SOURCES[source])
    return module.convert(obj, target=target)


def load_registered_weights(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Download (once) and load the weights registered for ``spec`` into ``model``."""
    from medsegkit.weights.hub import download

    assert spec.weights is not None
    path = download(spec.weights.url, sha256=spec.weights.sha256)
    if spec.weights.source == "medsegkit":
        return load_checkpoint(model, path)
    state, _ = read_checkpoint(path)
    convert(state, source=spec.weights.source, target=model)
    model.medsegkit_metadata = dict(spec.weights.meta)
    return model
