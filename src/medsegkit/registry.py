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

Layering: model code registers through :mod:`medsegkit._specs` (``register_model`` and the specs,
re-exported here); this module resolves names (``create_model``, ``convert`` with a name as
``target``, and ``load_model`` / ``model_from_record`` for checkpoints) and calls
:mod:`medsegkit.weights` to convert and load tensors into the models it built. The arrows
point one way: ``registry → weights → nets → _specs``; weights never imports the registry.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medsegkit._serialize import jsonable
from medsegkit._specs import _REGISTRY, TASKS, ModelSpec, WeightsSpec, register_model

__all__ = [
    "ModelInfo",
    "ModelSpec",
    "WeightsSpec",
    "convert",
    "create_model",
    "get_model_spec",
    "list_models",
    "load_model",
    "model_from_record",
    "model_info",
    "register_model",
]

NETS_PACKAGE = "medsegkit.nets."  # the package whose network classes a checkpoint record may name as "target"

# Modules whose import registers builders. Listed here (not discovered) so that registration order,
# and therefore `list_models()` before sorting, is stable and import errors are loud.
FAMILY_MODULES = (
    "medsegkit.nets.unet",
    "medsegkit.nets.fcn",
    "medsegkit.nets.mask_rcnn",
    "medsegkit.nets.maskformer",
    "medsegkit.nets.mask2former",
)


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


_families_loaded = False


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
    model.medsegkit_config = {"name": spec.name, "overrides": jsonable(overrides)}
    if pretrained is True:
        from medsegkit.weights import load_registered_weights

        load_registered_weights(model, spec)
    elif isinstance(pretrained, str) and pretrained:
        from medsegkit.weights import load_checkpoint

        load_checkpoint(model, pretrained)
    return model


def model_from_record(record: Mapping[str, Any], *, source: str = "checkpoint"):
    """Build the model a checkpoint record names (untrained weights; the caller loads the state).

    ``record`` is the ``"model"`` entry :func:`medsegkit.weights.save_checkpoint` writes: either
    ``{"name": registry name, "overrides": {...}}`` or ``{"target": "medsegkit.<dotted class>",
    "args": {...}}`` (models built from a class that records its ``init_args``). ``source`` names the
    file in error messages.

    Raises:
        CheckpointError: the record names no model, or a class outside medsegkit (never imported).
    """
    from medsegkit.errors import CheckpointError

    output_map = record.get("output_map")
    if output_map is not None:  # a model with an appended map of its logits (interactive refine)
        import torch

        from medsegkit.nets.layers.output_map import MappedOutput

        classes = output_map.get("classes") if isinstance(output_map, Mapping) else None
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
            raise CheckpointError(f"{source} records an output map with classes={classes!r}; expected an int >= 1")
        inner = {key: value for key, value in record.items() if key != "output_map"}
        return MappedOutput(model_from_record(inner, source=source), torch.eye(classes), None)
    if "name" in record:
        return create_model(record["name"], **record.get("overrides", {}))
    if "target" in record:
        target = record["target"]
        if not target.startswith("medsegkit."):
            raise CheckpointError(f"{source} names class {target!r}; only medsegkit classes are rebuilt")
        return _network_class(target, source)(**record.get("args", {}))
    raise CheckpointError(
        f"{source} does not record which model it belongs to (not written by "
        f"medsegkit.save_checkpoint); build the model yourself and call load_checkpoint(model, path)"
    )


def _network_class(target: str, source: str):
    """The network class a record's ``target`` names: a ``torch.nn.Module`` subclass in ``medsegkit.nets``.

    Anything else is refused before it is called (a record naming ``medsegkit.weights.save_checkpoint``
    with ``args`` would otherwise write a file wherever ``args`` says).
    """
    from torch import nn

    from medsegkit.errors import CheckpointError

    found = None
    if target.startswith(NETS_PACKAGE):
        try:
            found = _resolve_dotted(target)
        except (ImportError, AttributeError, ValueError):
            found = None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise CheckpointError(f"{source} names {target!r}, which is not a network class of {NETS_PACKAGE[:-1]}; "
                              "only its torch.nn.Module classes are rebuilt")
    return found


def load_model(path_or_url, *, map_location="cpu"):
    """Rebuild a model from a medsegkit checkpoint alone (name + arguments recorded inside).

    Name resolution is the registry's part (:func:`model_from_record`); reading the file and loading
    the tensors is :mod:`medsegkit.weights`'. Also importable as ``medsegkit.load_model`` and
    ``medsegkit.weights.load_model``.

    Args:
        path_or_url: a local checkpoint or an ``http(s)://`` URL (downloaded once into the cache).
        map_location: device the tensors are read onto.

    Returns:
        The model in eval mode, ``model.medsegkit_metadata`` holding the checkpoint's metadata (class
        names, preprocessing, metrics).

    Raises:
        CheckpointError: the file records no model, names a class outside medsegkit, or its weights do
            not fit the recorded model.
    """
    from medsegkit.weights.checkpoint import fetch_checkpoint, load_state, read_checkpoint

    path = fetch_checkpoint(path_or_url)
    state, record = read_checkpoint(path, map_location=map_location)
    model_record = record.get("model") or {}
    model = model_from_record(model_record, source=f"checkpoint {path}")
    model = _with_saved_merge_kernel(model, model_record, state, source=f"checkpoint {path}")
    load_state(model, state, source=f"checkpoint {path}")
    model.medsegkit_metadata = record.get("metadata", {})
    return model.eval()


def _with_saved_merge_kernel(model, model_record: Mapping[str, Any], state: Mapping[str, Any], *, source: str):
    """An ``AttentionUNet`` saved before ``merge_kernel_size`` existed merged skips with ``kernel_size``
    (MONAI keeps 3): such a record has no ``merge_kernel_size``, and its weights show the old kernel. Rebuild
    it with ``merge_kernel_size=kernel_size`` so its weights load; any other model is returned as it is."""
    init_args = getattr(model, "init_args", None)
    arguments_key = "args" if "target" in model_record else "overrides"
    saved_arguments = model_record.get(arguments_key, {})
    if (not isinstance(init_args, dict) or "merge_kernel_size" not in init_args
            or "merge_kernel_size" in saved_arguments or init_args.get("kernel_size", 3) == 3):
        return model
    own = model.state_dict()
    if all(tuple(own[key].shape) == tuple(value.shape) for key, value in state.items() if key in own):
        return model
    legacy = {**model_record, arguments_key: {**saved_arguments, "merge_kernel_size": init_args["kernel_size"]}}
    return model_from_record(legacy, source=source)


def convert(obj: Any, *, source: str, target: Any = None):
    """Turn a model (or bare state dict) of another library into the equivalent medsegkit model.

    Also importable as ``medsegkit.convert`` and ``medsegkit.weights.convert``. The registry's part is
    resolving a registry name: it is built with the architecture read from ``obj``
    (:func:`medsegkit.weights.target_arguments`, keeping the arguments the name's builder accepts), so
    that ``model.medsegkit_config`` records it; the weights are then mapped by
    :func:`medsegkit.weights.convert_weights`.

    Args:
        obj: a model of the ``source`` library (its configuration is read from it), or a bare state dict.
        source: ``"monai"``, ``"torchvision"`` or ``"transformers"``.
        target: a registry name, or a built medsegkit model to fill; required for a bare state dict.
            Without it, the model is built from ``obj``'s configuration.

    Returns:
        A medsegkit model whose outputs equal the source model's (max |Δ| ≤ 1e-5 fp32; 1e-4 for the
        transformer models).

    Raises:
        ValueError: unknown ``source``; a bare state dict without ``target``; weights that do not fit.
        KeyError: unknown registry name (the message lists the closest names).
        TypeError: ``obj`` is not a model the ``source`` converter supports, or ``target`` not a model.
    """
    from medsegkit.weights import convert_weights, target_arguments

    if isinstance(target, str):
        spec = get_model_spec(target)
        accepted = set(accepted_arguments(spec.name))
        arguments = target_arguments(obj, source=source)
        target = create_model(spec.name, **{k: v for k, v in arguments.items() if k in accepted})
    return convert_weights(obj, source=source, target=target)


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
