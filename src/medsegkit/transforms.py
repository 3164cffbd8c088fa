"""Preprocessing presets (MONAI dictionary transforms) and their inverse.

A *preprocessing spec* is a JSON-able dict — the same dict a checkpoint records under
``metadata["preprocessing"]``::

    {"orientation": "RAS",                 # axis codes, or None to keep the voxel order
     "spacing": [1.5, 1.5, 1.5],           # target mm per axis (one number = isotropic), or None
     "intensity": {"name": "zscore", "nonzero": True, "channel_wise": True}}   # or None

Intensity steps (``"name"``):

* ``"zscore"`` — MONAI ``NormalizeIntensityd`` (``nonzero``: statistics over nonzero voxels only,
  zeros stay 0; ``channel_wise``).
* ``"range"`` — MONAI ``ScaleIntensityRanged``: ``[a_min, a_max] → [b_min, b_max]``, ``clip``.
* ``"percentile"`` — MONAI ``ScaleIntensityRangePercentilesd``: the ``lower``..``upper`` percentiles
  (1..99) → ``[b_min, b_max]`` (0..1), ``clip``, ``channel_wise``.
* ``"scale"`` — ``(x - subtrahend) / divisor`` (``NormalizeIntensityd`` with fixed numbers), e.g.
  ``{"name": "scale", "divisor": 255}``.

Presets (:data:`PRESETS`) expand to such dicts: ``"mr"`` (RAS, z-score over nonzero voxels),
``"mr_robust"`` (RAS, 1st..99th percentile → [0, 1], clipped; the bundle writer's preset), ``"ct"``
(RAS, HU window [-1000, 1000] → [0, 1], clipped), ``"none"`` (nothing).

Functions:

* :func:`resolve_preprocessing` ``(preset_or_spec, *, target_spacing=None, orientation=None) -> dict``:
  a checked, complete spec.
* :func:`build_preprocessing` ``(preset_or_spec, *, target_spacing=None, orientation=None,
  keys=("image",), label_keys=()) -> monai.transforms.Compose`` for MONAI dictionary data
  (``label_keys`` are resampled with nearest neighbours and get no intensity step).
* :func:`image_to_metatensor` / :func:`metatensor_to_image`: :class:`medsegkit.io.Image` ↔ MONAI
  ``MetaTensor`` ``(C, *spatial)`` with the affine (no file round trip).
* :func:`preprocess` ``(image, spec) -> (tensor (C, *spatial), PreprocessState)`` and
  :func:`restore` ``(prediction, state, *, is_label=True) -> np.ndarray`` — the pair the inference
  engine uses: ``restore`` puts a prediction computed on the preprocessed grid back on the input grid
  through MONAI's ``Invertd`` (nearest neighbours for labels, linear for probabilities/logits).

Example::

    tensor, state = preprocess(image, {"orientation": "RAS", "spacing": 1.5, "intensity": None})
    labels = model_output.argmax(0)                       # (*tensor.shape[1:])
    labels_on_input_grid = restore(labels, state)         # (*image.spatial_shape)
    result = image.with_array(labels_on_input_grid)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from medsegkit._values import is_finite_number
from medsegkit.io.image import Image

__all__ = [
    "PRESETS",
    "NearestVoxelMap",
    "PreprocessState",
    "augmentation_configs",
    "build_preprocessing",
    "image_to_metatensor",
    "instantiate_configs",
    "metatensor_to_image",
    "preprocess",
    "preprocessing_configs",
    "resolve_preprocessing",
    "restore",
]

PRESETS: dict[str, dict[str, Any]] = {
    "mr": {
        "orientation": "RAS",
        "spacing": None,
        "intensity": {"name": "zscore", "nonzero": True, "channel_wise": True},
    },
    "mr_robust": {
        "orientation": "RAS",
        "spacing": None,
        "intensity": {
            "name": "percentile",
            "lower": 1.0,
            "upper": 99.0,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
    },
    "ct": {
        "orientation": "RAS",
        "spacing": None,
        "intensity": {
            "name": "range",
            "a_min": -1000.0,
            "a_max": 1000.0,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
    },
    "none": {"orientation": None, "spacing": None, "intensity": None},
}

SPEC_KEYS = ("orientation", "spacing", "crop_foreground", "intensity")
#: margin (voxels of the preprocessed grid) kept around the image's foreground by ``crop_foreground: True``
DEFAULT_CROP_MARGIN = 4
# intensity name -> (required fields, optional fields with defaults)
INTENSITY_FIELDS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "zscore": ((), {"nonzero": False, "channel_wise": True}),
    "range": (("a_min", "a_max"), {"b_min": 0.0, "b_max": 1.0, "clip": True}),
    "scale": (("divisor",), {"subtrahend": 0.0}),
    "percentile": (
        (),
        {"lower": 1.0, "upper": 99.0, "b_min": 0.0, "b_max": 1.0, "clip": True, "channel_wise": True},
    ),
}


def _check_orientation(value: Any) -> str | None:
    if value is None:
        return None
    codes = str(value).upper()
    axis_of = {c: axis for axis, pair in enumerate(("LR", "PA", "IS")) for c in pair}
    if (
        len(codes) not in (2, 3)
        or any(c not in axis_of for c in codes)
        or len({axis_of[c] for c in codes}) != len(codes)
    ):
        raise ValueError(
            f"orientation {value!r} is not a set of axis codes; use one letter of each pair L/R, P/A, I/S "
            "such as 'RAS' or 'LPS' (or None to keep the voxel order)"
        )
    return codes


def _check_spacing(value: Any) -> list[float] | None:
    if value is None:
        return None
    values = [value] if np.isscalar(value) or not isinstance(value, (list, tuple, np.ndarray)) else list(value)
    if not values or len(values) > 3 or not all(is_finite_number(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be a positive number or 2-3 positive numbers (mm), got {value!r}")
    return [float(v) for v in values]


def _check_crop(value: Any) -> dict[str, Any] | None:
    if value is None or value is False:
        return None
    if value is True:
        return {"margin": DEFAULT_CROP_MARGIN}
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = {"margin": int(value)}
    if not isinstance(value, Mapping) or set(value) - {"margin"}:
        raise ValueError(
            f"crop_foreground must be true/false, a margin in voxels, or {{'margin': n}}; got {value!r}"
        )
    margin = value.get("margin", DEFAULT_CROP_MARGIN)
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"crop_foreground margin must be a whole number of voxels >= 0; got {margin!r}")
    return {"margin": int(margin)}


def _check_intensity(value: Any) -> dict[str, Any] | None:
    if value is None or value == "none" or (isinstance(value, Mapping) and value.get("name") == "none"):
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or "name" not in value:
        raise ValueError(
            f"intensity must be a dict with a 'name' ({', '.join(INTENSITY_FIELDS)}) or None, got {value!r}"
        )
    name = value["name"]
    if not isinstance(name, str) or name not in INTENSITY_FIELDS:
        raise ValueError(f"unknown intensity step {name!r}; accepted: {', '.join(INTENSITY_FIELDS)}, none")
    required, optional = INTENSITY_FIELDS[name]
    unknown = set(value) - {"name", *required, *optional}
    if unknown:
        raise ValueError(
            f"intensity {name!r} does not take {sorted(unknown)}; it takes {list(required) + list(optional)}"
        )
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(f"intensity {name!r} needs {missing} (got {dict(value)})")
    spec = {"name": name, **optional, **{k: v for k, v in value.items() if k != "name"}}
    for key, field in spec.items():  # the optional fields' defaults say their kind; required fields are numbers
        if key == "name":
            continue
        if isinstance(optional.get(key), bool):
            if not isinstance(field, (bool, np.bool_)):
                raise ValueError(f"intensity {name!r} {key} must be true or false, got {field!r}")
        elif not is_finite_number(field):
            raise ValueError(f"intensity {name!r} {key} must be a finite number, got {field!r}")
    if name == "range" and not float(spec["a_max"]) > float(spec["a_min"]):
        raise ValueError(
            f"intensity 'range' needs a_max > a_min, got a_min={spec['a_min']}, a_max={spec['a_max']}"
        )
    if name == "percentile" and not 0 <= float(spec["lower"]) < float(spec["upper"]) <= 100:
        raise ValueError(
            f"intensity 'percentile' needs 0 <= lower < upper <= 100, got lower={spec['lower']}, upper={spec['upper']}"
        )
    if name == "scale" and float(spec["divisor"]) == 0:
        raise ValueError("intensity 'scale' needs a nonzero divisor")
    return spec


def resolve_preprocessing(
    preset_or_spec: str | Mapping[str, Any] | None,
    *,
    target_spacing: float | Sequence[float] | None = None,
    orientation: str | None = None,
) -> dict[str, Any]:
    """Expand a preset name (``"mr"``, ``"ct"``, ``"none"``) or check a spec dict; return a complete spec.

    ``target_spacing`` / ``orientation``, when given, replace the spec's values. A spec may start from a
    preset with ``{"preset": "mr", "spacing": [2, 2, 2]}``.
    """
    if preset_or_spec is None:
        preset_or_spec = "none"
    if isinstance(preset_or_spec, str):
        if preset_or_spec.lower() not in PRESETS:
            raise ValueError(
                f"unknown preprocessing preset {preset_or_spec!r}; accepted: {', '.join(PRESETS)}"
            )
        spec: dict[str, Any] = copy.deepcopy(PRESETS[preset_or_spec.lower()])
    elif isinstance(preset_or_spec, Mapping):
        given = dict(preset_or_spec)
        unknown = set(given) - set(SPEC_KEYS) - {"preset"}
        if unknown:
            raise ValueError(
                f"unknown preprocessing keys {sorted(unknown)}; accepted: {', '.join(SPEC_KEYS)}, preset"
            )
        base = resolve_preprocessing(given.pop("preset", "none"))
        spec = {**base, **given}
    else:
        raise TypeError(
            f"preprocessing must be a preset name ({', '.join(PRESETS)}) or a dict, got {type(preset_or_spec).__name__}"
        )
    if target_spacing is not None:
        spec["spacing"] = target_spacing
    if orientation is not None:
        spec["orientation"] = orientation
    resolved = {
        "orientation": _check_orientation(spec.get("orientation")),
        "spacing": _check_spacing(spec.get("spacing")),
        "intensity": _check_intensity(spec.get("intensity")),
    }
    crop = _check_crop(spec.get("crop_foreground"))
    if crop is not None:  # absent when off, so specs recorded before this key existed compare equal
        resolved["crop_foreground"] = crop
    return resolved


def _spatial_fit(spec: dict[str, Any], spatial_ndim: int) -> tuple[str | None, list[float] | None]:
    orientation, spacing = spec["orientation"], spec["spacing"]
    if orientation is not None:
        orientation = orientation[:spatial_ndim]
    if spacing is not None:
        if len(spacing) == 1:
            spacing = spacing * spatial_ndim
        elif len(spacing) != spatial_ndim:
            raise ValueError(f"spacing {spacing} has {len(spacing)} values but the image is {spatial_ndim}D")
    return orientation, spacing


_INTENSITY_TARGETS = {
    "zscore": "NormalizeIntensityd",
    "range": "ScaleIntensityRanged",
    "percentile": "ScaleIntensityRangePercentilesd",
    "scale": "NormalizeIntensityd",
}


def _intensity_config(intensity: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """The MONAI transform config of one resolved intensity step."""
    name = intensity["name"]
    config: dict[str, Any] = {"_target_": _INTENSITY_TARGETS[name], "keys": keys}
    if name == "zscore":
        config.update(nonzero=bool(intensity["nonzero"]), channel_wise=bool(intensity["channel_wise"]))
    elif name == "scale":
        config.update(subtrahend=float(intensity["subtrahend"]), divisor=float(intensity["divisor"]))
    else:  # range / percentile: every field is a keyword of the MONAI transform
        config.update({k: v for k, v in intensity.items() if k != "name"})
    return config


def preprocessing_configs(
    preset_or_spec: str | Mapping[str, Any] | None,
    *,
    target_spacing: float | Sequence[float] | None = None,
    orientation: str | None = None,
    keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
    spatial_ndim: int = 3,
) -> list[dict[str, Any]]:
    """The one definition of a preset: its MONAI dictionary transforms as bundle configs.

    Every consumer runs exactly these: :func:`build_preprocessing` (hence ``segment``, ``predict`` on
    images, the interactive session and napari) instantiates them, the bundle writer dumps them into
    ``inference.json`` / ``train.json``, and training applies them before its random transforms.

    Returns:
        ``[{"_target_": "Orientationd", ...}, {"_target_": "Spacingd", ...}, {"_target_": "CropForegroundd",
        ...}, {"_target_": <intensity transform>, ...}]`` (steps the spec leaves out are absent): plain
        JSON, instantiable by ``monai.bundle.ConfigParser``. Orientation, spacing and the crop act on
        ``keys`` and ``label_keys`` (labels resampled with nearest neighbours), the intensity step on
        ``keys`` only.
    """
    spec = resolve_preprocessing(preset_or_spec, target_spacing=target_spacing, orientation=orientation)
    axcodes, pixdim = _spatial_fit(spec, spatial_ndim)
    keys, label_keys = list(keys), list(label_keys)
    all_keys = keys + label_keys
    configs: list[dict[str, Any]] = []
    if axcodes is not None:
        # explicit labels: the plain L/R, P/A, I/S meaning (and no MONAI default-change warning)
        configs.append({"_target_": "Orientationd", "keys": all_keys, "axcodes": axcodes,
                        "labels": [["L", "R"], ["P", "A"], ["I", "S"]]})
    if pixdim is not None:
        configs.append({"_target_": "Spacingd", "keys": all_keys, "pixdim": pixdim,
                        "mode": ["bilinear"] * len(keys) + ["nearest"] * len(label_keys), "padding_mode": "border"})
    crop = spec.get("crop_foreground")
    if crop is not None and keys:
        # the bounding box of the image's nonzero voxels plus a margin: the same field of view whatever
        # the scanner put around the subject (inverted by zero padding when a prediction is restored)
        configs.append({"_target_": "CropForegroundd", "keys": all_keys, "source_key": keys[0],
                        "margin": crop["margin"], "allow_smaller": True})
    if spec["intensity"] is not None and keys:
        configs.append(_intensity_config(spec["intensity"], keys))
    return configs


def instantiate_configs(configs: Sequence[Mapping[str, Any]]) -> list[Any]:
    """MONAI transform configs (``{"_target_": ...}`` dicts) → transform objects, through
    ``monai.bundle.ConfigParser`` exactly as a bundle instantiates them."""
    from monai.bundle import ConfigParser

    return list(ConfigParser({"transforms": copy.deepcopy(list(configs))}).get_parsed_content("transforms"))


def build_preprocessing(
    preset_or_spec: str | Mapping[str, Any] | None,
    *,
    target_spacing: float | Sequence[float] | None = None,
    orientation: str | None = None,
    keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
    spatial_ndim: int = 3,
) -> Compose:
    """A MONAI ``Compose`` of dictionary transforms: orientation → spacing → foreground crop → intensity.

    Args:
        preset_or_spec: ``"mr"``, ``"mr_robust"``, ``"ct"``, ``"none"`` or a spec dict (module docstring).
        target_spacing: overrides the spec's spacing (mm; one number = isotropic).
        orientation: overrides the spec's orientation (axis codes such as ``"RAS"``).
        keys: image keys; resampled linearly and given the intensity step. Their values must be
            ``MetaTensor``s ``(C, *spatial)`` carrying the affine (see :func:`image_to_metatensor`).
        label_keys: label keys; same orientation/spacing/crop with nearest neighbours, no intensity step.
        spatial_ndim: 2 or 3 (orientation codes and isotropic spacing are cut/broadcast to it).

    The transforms are those of :func:`preprocessing_configs`, instantiated by MONAI's ``ConfigParser``.
    The spatial steps are invertible (``Compose.inverse`` / ``Invertd``); the intensity step is not
    (it is not needed to put a prediction back on the input grid).
    """
    configs = preprocessing_configs(preset_or_spec, target_spacing=target_spacing, orientation=orientation,
                                    keys=keys, label_keys=label_keys, spatial_ndim=spatial_ndim)
    return Compose(instantiate_configs(configs))


def _spatial_affine(affine: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """The ``(n+1, n+1)`` affine MONAI uses for an n-D image, from our 4×4."""
    index = list(range(spatial_ndim)) + [3]
    return affine[np.ix_(index, index)]


def image_to_metatensor(image: Image, *, dtype: torch.dtype = torch.float32) -> MetaTensor:
    """``image`` as a MONAI ``MetaTensor`` ``(C, *spatial)`` (a channel axis is added when absent) whose
    ``affine`` is the image's RAS affine (``(n+1, n+1)`` for an n-D image, as MONAI's readers give).

    The tensor is always a copy: MONAI's ``NormalizeIntensity`` (the ``zscore`` preset) writes into its
    input, and a tensor sharing the caller's float32 array would normalise the caller's image in place."""
    array = image.array if image.channel_axis == 0 else image.array[None]
    n = image.spatial_ndim
    affine = torch.as_tensor(_spatial_affine(image.affine, n), dtype=torch.float64)
    meta = {
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(image.spatial_shape),
        "space": "RAS",
    }
    return MetaTensor(torch.tensor(np.asarray(array), dtype=dtype), affine=affine, meta=meta)


def metatensor_to_image(tensor: torch.Tensor, *, meta: dict[str, Any] | None = None) -> Image:
    """A ``MetaTensor`` ``(C, *spatial)`` back to an :class:`Image` (channels kept only when C > 1)."""
    if not isinstance(tensor, MetaTensor):
        raise TypeError(f"expected a MONAI MetaTensor carrying an affine, got {type(tensor).__name__}")
    array = tensor.detach().cpu().numpy()
    n = array.ndim - 1
    small = tensor.affine.detach().cpu().numpy().astype(np.float64)
    affine = np.eye(4)
    index = list(range(n)) + [3]
    affine[np.ix_(index, index)] = small
    if array.shape[0] == 1:
        return Image(array[0], affine, dict(meta or {}), None)
    return Image(array, affine, dict(meta or {}), 0)


@dataclass
class PreprocessState:
    """What :func:`restore` needs to put a prediction back on the input grid.

    Attributes:
        spec: the resolved preprocessing spec.
        transform: the MONAI ``Compose`` that was applied (under the key ``"image"``).
        trace: a one-voxel ``MetaTensor`` carrying the applied operations and meta (no image data).
        input_shape: the input's spatial shape ``(i, j, k)``.
        input_affine: the input's 4×4 RAS affine.
        output_shape: the preprocessed spatial shape.
        output_affine: the preprocessed 4×4 RAS affine.
    """

    spec: dict[str, Any]
    transform: Compose
    trace: MetaTensor
    input_shape: tuple[int, ...]
    input_affine: np.ndarray
    output_shape: tuple[int, ...]
    output_affine: np.ndarray


def preprocess(image: Image, spec: str | Mapping[str, Any] | None) -> tuple[MetaTensor, PreprocessState]:
    """Apply ``spec`` (preset name or dict) to ``image``.

    Returns:
        ``(tensor, state)``: ``tensor`` is a float32 ``MetaTensor`` ``(C, *spatial)`` on the
        preprocessed grid (its ``affine`` says where); ``state`` goes to :func:`restore`.
    """
    if not isinstance(image, Image):
        raise TypeError(f"preprocess expects a medsegkit.io.Image, got {type(image).__name__}")
    resolved = resolve_preprocessing(spec)
    transform = build_preprocessing(resolved, spatial_ndim=image.spatial_ndim)
    out = transform({"image": image_to_metatensor(image)})["image"]
    if not isinstance(out, MetaTensor):  # pragma: no cover - MONAI keeps MetaTensors when track_meta is on
        raise RuntimeError("MONAI returned a plain tensor; enable monai.data.set_track_meta(True)")
    out = out.to(torch.float32)
    trace = MetaTensor(
        torch.zeros(1), meta=copy.deepcopy(out.meta), applied_operations=copy.deepcopy(out.applied_operations)
    )
    out_image_affine = metatensor_to_image(out[:1]).affine
    state = PreprocessState(
        spec=resolved,
        transform=transform,
        trace=trace,
        input_shape=image.spatial_shape,
        input_affine=image.affine.copy(),
        output_shape=tuple(int(s) for s in out.shape[1:]),
        output_affine=out_image_affine,
    )
    return out, state


def restore(
    prediction: np.ndarray | torch.Tensor, state: PreprocessState, *, is_label: bool = True
) -> np.ndarray:
    """Put ``prediction`` (computed on the preprocessed grid) back on the input image's grid.

    Args:
        prediction: ``(*spatial)`` (e.g. labels) or ``(C, *spatial)`` (e.g. probabilities) on the grid
            :func:`preprocess` returned (``state.output_shape``).
        state: from :func:`preprocess`.
        is_label: ``True`` resamples with nearest neighbours and keeps the integer dtype; ``False``
            resamples linearly (probabilities, logits) and returns float32.

    Returns:
        A numpy array ``(*state.input_shape)`` or ``(C, *state.input_shape)``, voxel-aligned with the input.
    """
    if isinstance(prediction, torch.Tensor):
        values = prediction.detach().cpu()
        if isinstance(values, MetaTensor):
            values = values.as_tensor()
        # bfloat16 has no numpy dtype; a float prediction comes back as float32 anyway
        dtype = np.dtype(np.float32) if values.is_floating_point() else values[:0].numpy().dtype
    else:
        values = torch.as_tensor(np.asarray(prediction))
        dtype = np.asarray(prediction).dtype
    has_channels = values.ndim == len(state.output_shape) + 1
    spatial = tuple(values.shape[1:] if has_channels else values.shape)
    if spatial != state.output_shape or values.ndim not in (
        len(state.output_shape),
        len(state.output_shape) + 1,
    ):
        raise ValueError(
            f"prediction of shape {tuple(values.shape)} is not on the preprocessed grid: expected "
            f"{state.output_shape} or (C, *{state.output_shape})"
        )
    if not has_channels:
        values = values[None]
    work = values.to(torch.float32)
    if state.trace.applied_operations:
        pred = MetaTensor(
            work, affine=torch.as_tensor(_spatial_affine(state.output_affine, len(state.output_shape)))
        )
        data = {"image": state.trace, "pred": pred}
        inverted = Invertd(
            keys="pred", transform=state.transform, orig_keys="image", nearest_interp=is_label
        )(data)["pred"]
        work = inverted.as_tensor() if isinstance(inverted, MetaTensor) else torch.as_tensor(inverted)
    result = work.numpy()
    if tuple(result.shape[1:]) != state.input_shape:  # pragma: no cover - guards a MONAI behaviour change
        raise RuntimeError(f"inverse produced shape {result.shape[1:]}, expected {state.input_shape}")
    if not has_channels:
        result = result[0]
    if is_label:
        if dtype.kind == "b":
            return result > 0.5
        if dtype.kind in "iu":  # result is a float32 copy here (work = values.to(float32) of integers)
            return np.rint(result, out=result).astype(dtype)
        return result.astype(dtype, copy=False)
    return result.astype(np.float32, copy=False)


FLAT_INDEX_LIMIT = 2**24  # voxel indices below this are exact in float32 (the inverse resamples in float32)
# the ops a separable map lets MONAI invert on the (small) preprocessed-grid probe: crops and pads only
_PROBE_INVERTIBLE = frozenset({"CropForeground", "SpatialCrop", "CenterSpatialCrop", "SpatialPad", "BorderPad",
                               "DivisiblePad", "Pad", "Crop"})


class NearestVoxelMap:
    """Each input voxel's nearest preprocessed voxel: where :func:`restore` ``(labels, state, is_label=True)``
    reads each input voxel's label, so that ``map.gather(labels)`` equals that inverse exactly.

    Where the preprocessing only reorients, resamples by a per-axis scale and crops or pads (every preset),
    the map is separable: input axis ``a`` reads preprocessed axis ``axes[a]`` at ``lines[a][i]`` (``-1``:
    outside the preprocessed grid, label 0). The lines come from MONAI's own inverses run on probes, so
    they carry its rounding: the crops and pads on a one-channel index probe of the preprocessed grid, the
    resampling one axis at a time on one-voxel-thick probes (each output coordinate of MONAI's resampling
    depends on its own axis only when the voxel-to-voxel transform is diagonal, and its border padding
    keeps the thin probe's other axes on their one voxel), the reorientation on a tiny probe whose
    permutation and flips are read back. Tested equal to the whole inverse over random geometries. It
    costs a few 1-D arrays instead of MONAI's inverse of an index map of the input's size (0.44-0.87 s
    and ~250 MB of fresh arrays for a 1 mm head). Other geometries (oblique resampling, zero padding,
    grids of 2**24 voxels or more) take that inverse once, as a flat index map.

    Attributes:
        input_shape / pre_shape: the input's and the preprocessed spatial shapes.
        separable: whether the map is the per-axis lines (else one flat index per input voxel).
    """

    def __init__(self, state: PreprocessState) -> None:
        self.input_shape = tuple(int(n) for n in state.input_shape)
        self.pre_shape = tuple(int(n) for n in state.output_shape)
        separable = _separable_lines(state)
        self.separable = separable is not None
        self._inside: np.ndarray | None = None
        if separable is not None:
            self._axes, self._lines = separable
        else:
            self._flat, self._inside = _flat_nearest_index(state)

    @property
    def inside(self) -> np.ndarray:
        """``(*input_shape)`` bool: the input voxels inside the preprocessed grid (the others' labels are 0)."""
        if self._inside is None:
            inside = np.ones(self.input_shape, dtype=bool)
            for a, line in enumerate(self._lines):
                inside[(slice(None),) * a + (line < 0,)] = False
            self._inside = inside
        return self._inside

    def pre_coordinates(self, where: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """The preprocessed coordinates (one index array per preprocessed axis) of the voxels of ``where``
        (bool, the input grid) in ``np.nonzero`` order, the outside ones at 0, and which of them are inside."""
        if not self.separable:
            return np.unravel_index(self._flat[where], self.pre_shape), self._inside[where]
        coords: list[np.ndarray] = [np.empty(0, np.int64)] * len(self.pre_shape)
        inside = np.ones(int(np.count_nonzero(where)), dtype=bool)
        for a, index in enumerate(np.nonzero(where)):
            values = self._lines[a][index]
            inside &= values >= 0
            coords[self._axes[a]] = np.maximum(values, 0)
        return tuple(coords), inside

    def gather(self, values: np.ndarray, where: np.ndarray | None = None, outside: Any = 0) -> np.ndarray:
        """``values`` ``(*pre_shape)`` read at each input voxel's nearest preprocessed voxel, ``outside`` at
        the input voxels outside the preprocessed grid: ``(*input_shape)``, or with ``where`` (bool, the
        input grid) only those voxels, as ``gather(values)[where]``."""
        if where is not None and np.count_nonzero(where) * 8 < where.size:  # few voxels: one by one
            coords, inside = self.pre_coordinates(where)
            picked = values[coords]
            picked[~inside] = outside
            return picked
        if self.separable:
            gathered = values
            order = np.argsort(self._axes)  # the input axis read along each preprocessed axis
            for k, a in enumerate(order):
                gathered = np.take(gathered, np.maximum(self._lines[a], 0), axis=k)
            gathered = np.ascontiguousarray(gathered.transpose(np.argsort(order)))
            for a, line in enumerate(self._lines):
                gathered[(slice(None),) * a + (line < 0,)] = outside
        else:
            gathered = values.reshape(-1)[self._flat]
            gathered[~self._inside] = outside
        return gathered if where is None else gathered[where]

    def pre_box(self, region: Sequence[slice]) -> tuple[slice, ...]:
        """The box on the preprocessed grid that the input voxels of ``region`` (a box of slices) read: of
        its voxels inside the preprocessed grid, or of all of them when none is (they then read index 0)."""
        if not self.separable:
            sources, inside = self._flat[tuple(region)].reshape(-1), self._inside[tuple(region)].reshape(-1)
            coords = np.unravel_index(sources[inside] if inside.any() else sources, self.pre_shape)
            return tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
        parts = [self._lines[a][s] for a, s in enumerate(region)]
        any_inside = all((p >= 0).any() for p in parts)
        box: list[slice] = [slice(0, 0)] * len(self.pre_shape)
        for a, part in enumerate(parts):
            part = part[part >= 0] if any_inside else np.maximum(part, 0)
            box[self._axes[a]] = slice(int(part.min()), int(part.max()) + 1)
        return tuple(box)


def _flat_nearest_index(state: PreprocessState) -> tuple[np.ndarray, np.ndarray]:
    """``(flat, inside)``, both ``(*input_shape)``: the flat preprocessed index each input voxel reads (0
    outside) from MONAI's inverse of the index map itself (index + 1, so that the 0 the crop's inverse
    pads with marks the outside); one channel when exact in float32, else one channel per axis."""
    pre_shape = tuple(state.output_shape)
    size = int(np.prod(pre_shape))
    if size < FLAT_INDEX_LIMIT:
        flat = restore(np.arange(1, size + 1, dtype=np.int32).reshape(pre_shape), state, is_label=True)
        inside = flat > 0
        # flat - 1 is in [-1, size - 1]: only the -1 (outside) needs raising to 0, in place (np.clip on int64
        # took 1.1 s for a 1 mm head here, np.maximum 0.02 s)
        source = flat.astype(np.int64)
        source -= 1
        return np.maximum(source, 0, out=source), inside
    coords = np.stack(np.meshgrid(*[np.arange(1, n + 1, dtype=np.int32) for n in pre_shape], indexing="ij"))
    per_axis = restore(coords, state, is_label=True).astype(np.int64) - 1  # (d, *input_shape)
    return np.ravel_multi_index(tuple(per_axis), pre_shape, mode="clip"), (per_axis >= 0).all(axis=0)


def _separable_lines(state: PreprocessState) -> tuple[list[int], list[np.ndarray]] | None:
    """``(axes, lines)`` of :class:`NearestVoxelMap` through MONAI's inverses on probes, or None when the
    preprocessing is not [orientation] → one diagonal resampling with border padding → crops / pads."""
    from monai.transforms import InvertibleTransform
    from monai.transforms.utils import allow_missing_keys_mode, convert_applied_interp_mode

    ops = state.trace.applied_operations
    names = [op["class"] for op in ops]
    pre_shape = tuple(int(n) for n in state.output_shape)
    d = len(pre_shape)
    if names.count("SpatialResample") != 1 or int(np.prod(pre_shape)) >= FLAT_INDEX_LIMIT:
        return None
    r = names.index("SpatialResample")
    if names[:r] not in ([], ["Orientation"]) or not set(names[r + 1:]) <= _PROBE_INVERTIBLE:
        return None
    if ops[r]["extra_info"].get("padding_mode") not in ("border", "reflection"):
        return None  # zero padding would blank the thin probes' other axes
    pending = [t for t in reversed(state.transform.flatten().transforms) if isinstance(t, InvertibleTransform)]

    def probe_of(array: torch.Tensor, like: MetaTensor | None, applied: list[Any]) -> dict[str, MetaTensor]:
        probe = MetaTensor(array)
        probe.applied_operations = applied
        probe.meta = copy.deepcopy(state.trace.meta if like is None else like.meta)
        return {"image": probe}

    def invert(data: dict[str, MetaTensor], until: int) -> MetaTensor:
        """Undo the probe's operations with the Compose's own inverses until ``until`` remain."""
        while len(data["image"].applied_operations) > until:
            if not pending:  # pragma: no cover - a trace the Compose did not write
                raise RuntimeError("preprocessing trace and transforms disagree")
            data = pending.pop(0).inverse(data)
        return data["image"]

    applied = convert_applied_interp_mode(trans_info=copy.deepcopy(ops), mode="nearest", align_corners=None)
    index = torch.arange(1, int(np.prod(pre_shape)) + 1, dtype=torch.float32).reshape(1, *pre_shape)
    with allow_missing_keys_mode(state.transform):
        # 1. the crops / pads, on the index map of the preprocessed grid (small: after the resampling)
        probe = invert(probe_of(index, None, applied), r + 1)
        flat = probe.as_tensor()[0].numpy()
        inside = np.argwhere(flat > 0)
        if len(inside) == 0:  # pragma: no cover - the preprocessed grid is never empty
            return None
        centre = inside[0]
        # 2. the resampling, one axis at a time on a one-voxel-thick probe through an inside voxel, when its
        # voxel-to-voxel transform (MONAI's: solve(current affine, the affine before it)) is exactly diagonal
        xform = np.linalg.solve(np.asarray(probe.affine, dtype=np.float64),
                                np.asarray(ops[r]["extra_info"]["src_affine"], dtype=np.float64))
        if np.count_nonzero(xform[:d, :d] - np.diag(np.diag(xform[:d, :d]))):
            return None
        spacing = pending.pop(0)
        lines: list[np.ndarray] = []
        resampled = probe
        for i in range(d):
            through = tuple(slice(None) if j == i else int(centre[j]) for j in range(d))
            values = flat[through]
            coordinate = np.where(values > 0, np.unravel_index(np.maximum(values.astype(np.int64) - 1, 0),
                                                               pre_shape)[i] + 1, 0)
            thin_shape = tuple(n if j == i else 1 for j, n in enumerate(probe.shape[1:]))
            thin_ops = copy.deepcopy(probe.applied_operations)
            thin_ops[-1]["orig_size"] = tuple(int(n) if j == i else 1 for j, n in enumerate(thin_ops[-1]["orig_size"]))
            data = probe_of(torch.as_tensor(coordinate, dtype=torch.float32).reshape(1, *thin_shape), probe, thin_ops)
            data["image"].affine = probe.affine
            resampled = spacing.inverse(data)["image"]
            lines.append(resampled.as_tensor().reshape(-1).numpy().astype(np.int64) - 1)
        # 3. the reorientation: a tiny coordinate probe shows which axis goes where, flipped or not
        axes = list(range(d))
        if r == 1:
            sizes = [2 + j for j in range(d)]
            grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in sizes], indexing="ij"))
            data = probe_of(grid, resampled, copy.deepcopy(resampled.applied_operations))
            data["image"].affine = resampled.affine
            oriented = invert(data, 0).as_tensor().numpy()
            axes, flipped = [], []
            for a in range(d):
                along = np.moveaxis(oriented, a + 1, 1)[(slice(None), slice(None)) + (0,) * (d - 1)]  # (d, n_a)
                varying = [c for c in range(d) if along[c, 0] != along[c, 1]]
                if len(varying) != 1:  # pragma: no cover - a reorientation is a permutation with flips
                    return None
                axes.append(varying[0])
                flipped.append(bool(along[varying[0], 1] < along[varying[0], 0]))
            lines = [lines[c][::-1].copy() if flip else lines[c] for c, flip in zip(axes, flipped)]
    if tuple(len(line) for line in lines) != tuple(state.input_shape) or sorted(axes) != list(range(d)):
        return None  # pragma: no cover - guards a MONAI behaviour change
    return axes, lines


AUGMENTATION_LEVELS = ("none", "light", "strong")


def augmentation_configs(
    patch_size: Sequence[int],
    *,
    level: str = "strong",
    num_classes: int = 2,
    class_ratios: Sequence[float] | None = None,
    samples: int = 1,
    slice_volumes: bool = False,
) -> list[dict[str, Any]]:
    """Training-time random transforms (MONAI configs) that follow :func:`preprocessing_configs`.

    Used by ``medsegkit.train`` and dumped into a bundle's ``train.json``; keys ``"image"`` ``(C, *spatial)``
    and ``"label"`` ``(1, *spatial)``.

    Args:
        patch_size: the training patch, ``(H, W, D)`` for a 3D model or ``(H, W)`` for a 2D one.
        level: ``"none"`` (class-balanced crops only), ``"light"`` (+ left/right flips, intensity scale and
            shift) or ``"strong"``, for models that must work on other scanners and subjects: crops 1.25×
            the patch, then a random affine (rotation up to 15° per axis, scale ±15 %) resampled to the
            patch, so the crop has no empty corners; left/right flips; MR bias field, gamma, non-linear
            histogram shift (contrast), simulated low resolution and blur (resolution), Gaussian noise and
            intensity scale/shift.
        num_classes, class_ratios: patch centres are drawn per class in these proportions (MONAI
            ``RandCropByLabelClassesd``; default equal, which oversamples small classes).
        samples: patches drawn per volume each time it is visited.
        slice_volumes: the data are volumes but the model is 2D: crops are one slice thick along the last
            axis and that axis is dropped (a 2D model trains on slices of volumes).
    """
    if level not in AUGMENTATION_LEVELS:
        raise ValueError(f"unknown augmentation level {level!r}; accepted: {', '.join(AUGMENTATION_LEVELS)}")
    patch = [int(s) for s in patch_size]
    if not patch or any(s < 1 for s in patch):
        raise ValueError(f"patch_size must be positive whole numbers, got {list(patch_size)}")
    if class_ratios is not None and len(class_ratios) != num_classes:
        raise ValueError(f"class_ratios needs {num_classes} values (one per class); got {list(class_ratios)}")
    keys = ["image", "label"]
    dims = len(patch)
    crop = [int(round(s * 1.25)) for s in patch] if level == "strong" else list(patch)
    steps: list[dict[str, Any]] = [
        {"_target_": "RandCropByLabelClassesd", "keys": keys, "label_key": "label",
         "spatial_size": crop + ([1] if slice_volumes else []), "num_classes": num_classes,
         "ratios": None if class_ratios is None else [float(r) for r in class_ratios],
         "num_samples": int(samples), "allow_smaller": True, "warn": False},
    ]
    if slice_volumes:
        steps.append({"_target_": "SqueezeDimd", "keys": keys, "dim": -1})
    steps.append({"_target_": "SpatialPadd", "keys": keys, "spatial_size": crop})
    if level == "none":
        return steps
    if level == "light":
        return steps + [
            {"_target_": "RandFlipd", "keys": keys, "spatial_axis": 0, "prob": 0.5},
            {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 0.5},
            {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5},
        ]
    angle = 0.26  # radians, about 15 degrees
    sigma = {f"sigma_{axis}": [0.0, 1.0] for axis in "xyz"[:dims]}
    return steps + [
        {"_target_": "RandAffined", "keys": keys, "spatial_size": patch, "prob": 0.8,
         "rotate_range": [angle] * (1 if dims == 2 else 3), "scale_range": [0.15] * dims,
         "mode": ["bilinear", "nearest"], "padding_mode": "zeros"},
        {"_target_": "CenterSpatialCropd", "keys": keys, "roi_size": patch},  # when the affine was not drawn
        {"_target_": "RandFlipd", "keys": keys, "spatial_axis": 0, "prob": 0.5},
        {"_target_": "RandBiasFieldd", "keys": "image", "coeff_range": [0.0, 0.2], "degree": 3, "prob": 0.3},
        {"_target_": "RandAdjustContrastd", "keys": "image", "gamma": [0.6, 1.7], "prob": 0.4},
        {"_target_": "RandHistogramShiftd", "keys": "image", "num_control_points": [5, 12], "prob": 0.3},
        {"_target_": "RandSimulateLowResolutiond", "keys": "image", "zoom_range": [0.5, 1.0], "prob": 0.15,
         "upsample_mode": "trilinear" if dims == 3 else "bilinear"},
        {"_target_": "RandGaussianSmoothd", "keys": "image", **sigma, "prob": 0.2},
        {"_target_": "RandGaussianNoised", "keys": "image", "std": 0.03, "prob": 0.2},
        {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.25, "prob": 0.5},
        {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5},
    ]
