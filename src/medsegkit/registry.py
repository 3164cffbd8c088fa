"""The model registry: one name per builder function, as in timm.

A builder is a small function that assembles a network from its family's class and a few named
defaults. It is registered with :func:`register_model`, which stores the metadata that docs, the CLI,
the napari picker and tests read (family, task, dims, input shape, reference, weights)::

    @register_model(family="unet", task="semantic", spatial_dims=3, input_shape=(1, 1, 96, 96, 96),
                    reference="Ronneberger et al. 2015", dotted_path="medsegkit.nets.UNet")
    def UNet3d(**overrides):
        return UNet(**{**MEDICAL_DEFAULTS, "spatial_dims": 3, **overrides})

``create_model(name, **overrides)`` calls the builder; ``model_info(name, **overrides)`` describes the
configuration that call would build (parameter count included) without allocating real weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ModelInfo",
    "ModelSpec",
    "WeightsSpec",
    "create_model",
    "get_model_spec",
    "list_models",
    "model_info",
    "register_model",
]

TASKS = ("semantic", "instance", "universal")

# Modules whose import registers builders. Listed here (not discovered) so that registration order,
# and therefore `list_models()` before sorting, is stable and import errors are loud.
FAMILY_MODULES = (
    "medsegkit.nets.unet",
    "medsegkit.nets.fcn",
    "medsegkit.nets.mask_rcnn",
    "medsegkit.nets.maskformer",
    "medsegkit.nets.mask2former",
)


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


@dataclass
class ModelInfo:
    """Description of one configuration of a registered model (see :func:`model_info`)."""

    name: str
    family: str
    task: str
    spatial_dims: int
    input_shape: tuple[int, ...]
    in_channels: int | None
    out_channels: int | None
    num_classes: int | None
    num_params: int
    reference: str
    default_roi_size: tuple[int, ...] | None
    default_preprocessing: str | None
    dotted_path: str
    has_weights: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


_REGISTRY: dict[str, ModelSpec] = {}
_families_loaded = False


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


def _load_families() -> None:
    global _families_loaded
    if _families_loaded:
        return
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    _families_loaded = True


def _registry() -> dict[str, ModelSpec]:
    _load_families()
    return _REGISTRY


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; ``KeyError`` listing the closest names if unknown."""
    registry = _registry()
    if name in registry:
        return registry[name]
    lowered = {n.lower(): n for n in registry}
    if name.lower() in lowered:
        return registry[lowered[name.lower()]]
    close = difflib.get_close_matches(name, list(registry), n=5, cutoff=0.4)
    close += [n for n in registry if name.lower() in n.lower() and n not in close][:5]
    hint = f"closest names: {', '.join(close)}" if close else "see medsegkit.list_models()"
    raise KeyError(f"unknown model name {name!r}; {hint}")


def list_models(
    pattern: str | None = None,
    *,
    task: str | None = None,
    spatial_dims: int | None = None,
    pretrained: bool | None = None,
) -> list[str]:
    """Sorted registered names, optionally filtered.

    Args:
        pattern: shell wildcard on the name (``"mask2former_*"``), case-sensitive.
        task: ``"semantic"``, ``"instance"`` or ``"universal"``.
        spatial_dims: 2 or 3.
        pretrained: ``True`` keeps only names with registered weights, ``False`` only those without.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    names = []
    for name, spec in _registry().items():
        if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
            continue
        if task is not None and spec.task != task:
            continue
        if spatial_dims is not None and spec.spatial_dims != spatial_dims:
            continue
        if pretrained is not None and spec.has_weights != bool(pretrained):
            continue
        names.append(name)
    return sorted(names)


def _resolve_dotted(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def accepted_arguments(name: str) -> list[str]:
    """Names of the keyword arguments ``create_model(name, ...)`` accepts."""
    spec = get_model_spec(name)
    params = inspect.signature(spec.builder).parameters
    accepted = [p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
    if any(v.kind == v.VAR_KEYWORD for v in params.values()):
        target = _resolve_dotted(spec.dotted_path)
        if target is not spec.builder:
            target_params = inspect.signature(target).parameters
            accepted += [
                p
                for p, v in target_params.items()
                if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL) and p != "self" and p not in accepted
            ]
    return accepted


def _check_overrides(name: str, overrides: Mapping[str, Any]) -> None:
    accepted = accepted_arguments(name)
    unknown = [k for k in overrides if k not in accepted]
    if unknown:
        raise TypeError(
            f"{name}() got unexpected argument(s) {', '.join(map(repr, unknown))}; "
            f"accepted arguments: {', '.join(accepted)}"
        )


def _weights_overrides(spec: ModelSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the architecture the registered weights need into ``overrides``; refuse conflicts."""
    assert spec.weights is not None
    merged = dict(overrides)
    for key, needed in spec.weights.arch.items():
        if key in merged and _normalise(merged[key]) != _normalise(needed):
            raise ValueError(
                f"{spec.name}: the registered weights need {key}={needed!r}, but {key}={merged[key]!r} "
                f"was given; drop the argument or use pretrained=False"
            )
        merged[key] = needed
    return merged


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def create_model(name: str, *, pretrained: bool | str = False, **overrides: Any):
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models` (case-insensitive match is accepted).
        pretrained: ``True`` loads the registered weights (downloaded once into ``$MEDSEGKIT_HOME``)
            and sets the architecture they need; a string is a path or URL of a checkpoint to load.
        **overrides: constructor arguments that replace the builder's defaults.

    Returns:
        A ``torch.nn.Module``; ``model.medsegkit_config`` records ``{"name", "overrides"}`` so that
        :func:`medsegkit.weights.save_checkpoint` can rebuild it.

    Raises:
        KeyError: unknown name (the message lists the closest names).
        TypeError: unknown override (the message lists the accepted arguments).
        ValueError: an override conflicts with the registered weights, or ``pretrained=True`` for a
            name without registered weights.
    """
    spec = get_model_spec(name)
    _check_overrides(spec.name, overrides)
    if pretrained is True:
        if spec.weights is None:
            have = list_models(pretrained=True)
            raise ValueError(
                f"{spec.name} has no registered weights; pass pretrained='path/or/url' to load a "
                f"checkpoint, or pick a name with weights: {', '.join(have) or '(none registered yet)'}"
            )
        overrides = _weights_overrides(spec, overrides)
    elif pretrained not in (False, None) and not isinstance(pretrained, str):
        raise TypeError(f"pretrained must be a bool or a path/URL string, got {type(pretrained).__name__}")
    model = spec.builder(**overrides)
    model.medsegkit_config = {"name": spec.name, "overrides": _jsonable(overrides)}
    if pretrained is True:
        from medsegkit.weights import load_registered_weights

        load_registered_weights(model, spec)
    elif isinstance(pretrained, str) and pretrained:
        from medsegkit.weights import load_checkpoint

        load_checkpoint(model, pretrained)
    return model


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(
        f"override value {value!r} of type {type(value).__name__} cannot be recorded in a checkpoint; "
        "use plain numbers, strings, lists or dicts"
    )


def count_parameters(module) -> int:
    """``sum(p.numel() for p in module.parameters())``."""
    return sum(p.numel() for p in module.parameters())


def model_info(name: str, **overrides: Any) -> ModelInfo:
    """Describe the configuration ``create_model(name, **overrides)`` would build.

    The model is built on PyTorch's ``meta`` device, so even the largest entries are described in
    milliseconds without allocating weights.
    """
    import torch

    spec = get_model_spec(name)
    _check_overrides(spec.name, overrides)
    with torch.device("meta"):
        model = spec.builder(**overrides)
    num_classes = getattr(model, "num_classes", None)
    out_channels = getattr(model, "out_channels", None)
    return ModelInfo(
        name=spec.name,
        family=spec.family,
        task=spec.task,
        spatial_dims=int(getattr(model, "spatial_dims", spec.spatial_dims)),
        input_shape=spec.input_shape,
        in_channels=getattr(model, "in_channels", None),
        out_channels=out_channels,
        num_classes=num_classes,
        num_params=count_parameters(model),
        reference=spec.reference,
        default_roi_size=spec.default_roi_size,
        default_preprocessing=spec.default_preprocessing,
        dotted_path=spec.dotted_path,
        has_weights=spec.has_weights,
    )
