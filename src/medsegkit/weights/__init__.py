"""Weights interop: convert other libraries' models and checkpoints, save and load our own.

:func:`convert_weights` dispatches to one module per library, each with an explicit, parity-tested
key map:

- ``"monai"``: :mod:`medsegkit.weights.from_monai` (``UNet``, ``AttentionUnet``)
- ``"torchvision"``: :mod:`medsegkit.weights.from_torchvision` (FCN, Mask R-CNN, ResNet)
- ``"transformers"``: :mod:`medsegkit.weights.from_transformers` (MaskFormer, Mask2Former)

Each of those modules exposes ``convert(obj, target=None) -> nn.Module`` (``target`` a *built*
medsegkit model, or ``None`` to build the model from ``obj``'s configuration) and
``target_arguments(obj) -> dict`` (the constructor arguments read from a source model).

Layering: this package reads, writes, downloads and converts tensors into *built* modules; it never
imports :mod:`medsegkit.registry` (an import-linter contract). The two public functions that resolve
registry names live in the registry and are re-exported here on first access:
``medsegkit.weights.convert`` is :func:`medsegkit.registry.convert` (``target=`` may be a registry
name: the registry builds it from the source's architecture, then calls :func:`convert_weights`), and
``medsegkit.weights.load_model`` is :func:`medsegkit.registry.load_model` (rebuild a model from a
checkpoint's recorded name). Both are also ``medsegkit.convert`` / ``medsegkit.load_model``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medsegkit._lazy import lazy_exports
from medsegkit.weights.checkpoint import (
    atomic_write,
    check_weights,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "SOURCES",
    "atomic_write",
    "convert",
    "convert_weights",
    "load_checkpoint",
    "load_model",
    "load_registered_weights",
    "read_checkpoint",
    "save_checkpoint",
    "target_arguments",
]

SOURCES = {
    "monai": "medsegkit.weights.from_monai",
    "torchvision": "medsegkit.weights.from_torchvision",
    "transformers": "medsegkit.weights.from_transformers",
}


def _converter(source: str):
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; accepted: {', '.join(SOURCES)}")
    return importlib.import_module(SOURCES[source])


def convert_weights(obj: Any, *, source: str, target: nn.Module | None = None) -> nn.Module:
    """Turn a model (or bare state dict) of another library into the equivalent *built* medsegkit model.

    The weights-level half of :func:`medsegkit.weights.convert` (which also accepts a registry name as
    ``target``, resolved by the registry).

    Args:
        obj: a model of the ``source`` library (its configuration is read from it), or a bare state dict.
        source: ``"monai"``, ``"torchvision"`` or ``"transformers"``.
        target: a built medsegkit model to fill; ``None`` builds the model from ``obj``'s configuration
            (required for a bare state dict).

    Returns:
        A medsegkit model whose outputs equal the source model's (max |Δ| ≤ 1e-5 fp32; 1e-4 for the
        transformer models).

    Raises:
        ValueError: unknown ``source``, or a bare state dict without ``target``.
        TypeError: ``target`` is a registry name (use :func:`medsegkit.convert`) or not a model.
    """
    module = _converter(source)
    if isinstance(obj, dict) and target is None:
        raise ValueError(
            "a bare state dict does not say which architecture it fills: pass target= a registry name "
            "or a built medsegkit model"
        )
    if isinstance(target, str):
        raise TypeError(
            f"convert_weights fills built models; target={target!r} is a registry name: call "
            f"medsegkit.convert(obj, source={source!r}, target={target!r}), which builds it"
        )
    return module.convert(obj, target=target)


def target_arguments(obj: Any, *, source: str) -> dict[str, Any]:
    """Constructor arguments of the medsegkit model equal to ``obj``, read from the source model.

    What :func:`medsegkit.convert` builds a registry-name ``target`` with (keeping those its builder
    accepts). Empty for a bare state dict (nothing to read) and for a torchvision classification ResNet
    (it fills the backbone of a target built with the name's own defaults).

    Raises:
        ValueError: unknown ``source``.
        TypeError / ValueError: ``obj`` is a model the ``source`` converter does not support.
    """
    module = _converter(source)
    if isinstance(obj, Mapping):
        return {}
    return dict(module.target_arguments(obj))


def load_registered_weights(model: nn.Module, spec: Any) -> nn.Module:
    """Download (once) and load the weights registered for ``spec`` into ``model``.

    ``spec`` is the registry's ``ModelSpec`` (read here only through ``spec.weights``: ``url``,
    ``sha256``, ``source``, ``meta``), passed in by :func:`medsegkit.create_model`.
    """
    from medsegkit.weights.hub import download

    assert spec.weights is not None
    path = download(spec.weights.url, sha256=spec.weights.sha256)
    if spec.weights.source == "medsegkit":
        return load_checkpoint(model, path)
    state, _ = read_checkpoint(path)
    check_weights(model, state, f"registered weights {path}")  # the keys are the source's: NaN / inf only
    convert_weights(state, source=spec.weights.source, target=model)
    model.medsegkit_metadata = dict(spec.weights.meta)
    return model


__getattr__, __dir__ = lazy_exports(
    "medsegkit.weights", {"convert": "medsegkit.registry", "load_model": "medsegkit.registry"}, globals()
)
