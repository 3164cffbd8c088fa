"""What model code needs to register itself: :func:`register_model`, the specs it records, the table.

The bottom of the registry: it imports nothing from medsegkit, so :mod:`medsegkit.nets` registers its
builders here without depending on :mod:`medsegkit.registry`, which builds models by name and loads
weights (:mod:`medsegkit.weights`, whose converters build ``nets`` classes). Everything here is
re-exported by :mod:`medsegkit.registry`, the public place for these names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TASKS", "ModelSpec", "WeightsSpec", "register_model"]

TASKS = ("semantic", "instance", "universal")

@dataclass(frozen=True)
class WeightsSpec:
    """Registered weights of one model name, described as data (as torchvision does).

    Attributes:
        url: where the file lives (``https://``, ``http://`` or ``file://``).
        sha256: the full sha256 hex digest, or the prefix the publisher gives (torchvision puts the
            first 8 hex digits of the sha256 in the file name).
        source: the library whose key layout the file uses (``"medsegkit"``, ``"torchvision"``,
            ``"monai"``, ``"transformers"``); anything but ``"medsegkit"`` goes through
            :func:`medsegkit.weights.convert`.
        arch: constructor arguments the weights need (e.g. ``{"num_classes": 91}``); an override that
            conflicts with one of them raises ``ValueError``.
        num_params: parameter count of the model these weights fill.
        meta: anything else worth recording: class names, preprocessing, training data, metrics.
    """

    url: str
    sha256: str
    source: str = "medsegkit"
    arch: Mapping[str, Any] = field(default_factory=dict)
    num_params: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one public name."""

    name: str
    builder: Callable[..., Any]
    family: str
    task: str
    spatial_dims: int
    input_shape: tuple[int, ...]
    reference: str
    dotted_path: str
    default_roi_size: tuple[int, ...] | None = None
    default_preprocessing: str | None = None
    weights: WeightsSpec | None = None

    @property
    def has_weights(self) -> bool:
        return self.weights is not None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    fn: Callable[..., Any] | None = None,
    *,
    family: str | None = None,
    task: str = "semantic",
    spatial_dims: int = 2,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    reference: str = "",
    dotted_path: str | None = None,
    default_roi_size: Sequence[int] | None = None,
    default_preprocessing: str | None = None,
    weights: WeightsSpec | None = None,
):
    """Register a builder function under its own ``__name__``.

    Usable bare (``@register_model``) or with metadata (``@register_model(family=..., ...)``).
    ``dotted_path`` is the class a MONAI bundle names as ``_target_``; it defaults to the builder.
    """

    def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
        name = builder.__name__
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"model name {name!r} is registered twice ({_REGISTRY[name].builder.__module__})")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r} for {name!r}")
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            family=family or builder.__module__.rsplit(".", 1)[-1],
            task=task,
            spatial_dims=int(spatial_dims),
            input_shape=tuple(int(s) for s in input_shape),
            reference=reference,
            dotted_path=dotted_path or f"{builder.__module__}.{name}",
            default_roi_size=tuple(default_roi_size) if default_roi_size is not None else None,
            default_preprocessing=default_preprocessing,
            weights=weights,
        )
        return builder

    return decorate(fn) if fn is not None else decorate
