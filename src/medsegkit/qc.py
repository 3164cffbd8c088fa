"""Cheap per-structure quality control for segmentation results.

Four checks, each a boolean ``flag_*`` column of a :func:`medsegkit.stats` / :func:`medsegkit.segment_many`
table (one row per case and class):

* ``flag_volume``: the volume is far from the cohort (robust z-score ``|volume_z| > z_threshold``, with
  ``volume_z = (v - median) / (1.4826 × MAD)`` over the cases of the same model and class, needs at least
  ``min_cases`` cases) or outside a reference range stored with the model (checkpoint
  ``metadata["qc"]["volume_ml"] = {class_name: [low, high]}``, or ``reference_ranges=``);
* ``flag_fragmented``: the structure falls apart (more than ``max_components`` connected components and
  the largest holds less than ``min_largest_fraction`` of the voxels);
* ``flag_border``: more than ``max_border_fraction`` of the structure's voxels lie on the volume's outer
  faces (it is likely cut off by the field of view, or the model marks the background);
* ``flag_disagreement``: one mirrored pass disagrees with the result on the boundary band
  (:func:`mirrored_disagreement`; ``disagreement > max_disagreement``).

``flagged`` is the OR of the flags and ``flags`` names the ones that fired. Only
:func:`mirrored_disagreement` runs a model; the rest is numpy / pandas on the table, so the napari
process can call :func:`add_quality_flags` without importing torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from medsegkit.io import Image

__all__ = ["FLAG_COLUMNS", "QCThresholds", "add_quality_flags", "mirrored_disagreement", "reference_ranges_of",
           "robust_z", "write_qc_report"]

FLAG_COLUMNS = ("flag_volume", "flag_fragmented", "flag_border", "flag_disagreement")
# MAD × 1.4826 estimates the standard deviation of normally distributed values.
MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class QCThresholds:
    """When each flag fires (see the module docstring)."""

    z_threshold: float = 3.5
    min_cases: int = 3
    max_components: int = 20
    min_largest_fraction: float = 0.5
    max_border_fraction: float = 0.01
    max_disagreement: float = 0.5


def robust_z(values: Any) -> np.ndarray:
    """``(v - median) / (1.4826 × MAD)`` of a 1-D sequence (NaNs ignored for the median and MAD).

    A zero MAD (half the values equal) gives ``0`` for values at the median and ``±inf`` for the rest.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.full(values.shape, math.nan)
    median = np.median(finite)
    mad = MAD_TO_SD * np.median(np.abs(finite - median))
    deviation = values - median
    with np.errstate(divide="ignore", invalid="ignore"):
        z = deviation / mad if mad > 0 else np.where(deviation == 0, 0.0, np.sign(deviation) * np.inf)
    return np.asarray(z, dtype=np.float64)


def reference_ranges_of(metadata: Mapping[str, Any] | None) -> dict[str, tuple[float, float]]:
    """``{class_name: (low_ml, high_ml)}`` from checkpoint metadata ``{"qc": {"volume_ml": {...}}}``."""
    qc = (metadata or {}).get("qc") or {}
    if not isinstance(qc, Mapping):
        raise ValueError(f'metadata["qc"] must be an object {{"volume_ml": {{class_name: [low_ml, high_ml]}}}}, '
                         f"got {qc!r}")
    return _checked_ranges(qc.get("volume_ml") or {})


def _checked_ranges(ranges: Any) -> dict[str, tuple[float, float]]:
    """``{class_name: (low_ml, high_ml)}`` with numbers ``low <= high`` (not NaN; ±inf for an open end).

    Raises:
        ValueError: one line naming the first class whose range is not two such numbers.
    """
    if not isinstance(ranges, Mapping):
        raise ValueError(f"reference volume ranges must map class names to [low_ml, high_ml], got {ranges!r}")
    out: dict[str, tuple[float, float]] = {}
    for name, bounds in ranges.items():
        pair = None
        if isinstance(bounds, (list, tuple, np.ndarray)) and len(bounds) == 2 and all(
                isinstance(b, (int, float, np.integer, np.floating)) and not isinstance(b, (bool, np.bool_))
                for b in bounds):
            pair = (float(bounds[0]), float(bounds[1]))
        if pair is None or not pair[0] <= pair[1]:  # NaN fails this too
            raise ValueError(f"reference volume range for {name!r} must be [low_ml, high_ml], two numbers with "
                             f"low <= high, got {bounds!r}")
        out[str(name)] = pair
    return out


def add_quality_flags(
    table: pd.DataFrame,
    *,
    reference_ranges: Mapping[str, tuple[float, float]] | None = None,
    thresholds: QCThresholds | None = None,
) -> pd.DataFrame:
    """A copy of ``table`` with ``volume_z``, ``volume_in_range``, ``border_fraction``, the ``flag_*`` columns,
    ``flagged`` and ``flags``.

    Args:
        table: rows from :func:`medsegkit.stats` (one case) or :func:`medsegkit.segment_many` (a cohort):
            needs ``class``, ``volume_ml``, ``components``, ``largest_component_fraction``,
            ``border_voxels``, ``voxels``; optional ``model`` (cohorts are grouped by model and class) and
            ``disagreement`` (from :func:`mirrored_disagreement`).
        reference_ranges: ``{class_name: (low_ml, high_ml)}``; a ``reference_ranges`` column (per row,
            e.g. from each model's metadata) is used where this is not given.
        thresholds: when the flags fire (default :class:`QCThresholds`).
    """
    import pandas as pd

    thresholds = thresholds or QCThresholds()
    missing = [c for c in ("class", "voxels", "volume_ml", "components", "largest_component_fraction", "border_voxels")
               if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks the column(s) {missing}; give the output of medsegkit.stats or segment_many")
    if reference_ranges is not None:
        reference_ranges = _checked_ranges(reference_ranges)
    out = table.copy()
    group_keys = [k for k in ("model", "class") if k in out.columns]
    out["volume_z"] = math.nan
    for index in out.groupby(group_keys, sort=False).indices.values():
        if len(index) >= thresholds.min_cases:
            out.iloc[index, out.columns.get_loc("volume_z")] = robust_z(out["volume_ml"].iloc[index])
    in_range = []
    for _, row in out.iterrows():
        ranges = reference_ranges if reference_ranges is not None else row.get("reference_ranges")
        bounds = _checked_ranges(ranges).get(row["class"]) if isinstance(ranges, Mapping) else None
        in_range.append(math.nan if bounds is None else bool(bounds[0] <= row["volume_ml"] <= bounds[1]))
    out["volume_in_range"] = pd.array(in_range, dtype="object")
    cohort_outlier = out["volume_z"].abs() > thresholds.z_threshold
    out_of_range = out["volume_in_range"].map(lambda v: v is False)
    out["flag_volume"] = (cohort_outlier | out_of_range).astype(bool)
    out["flag_fragmented"] = ((out["components"] > thresholds.max_components)
                              & (out["largest_component_fraction"] < thresholds.min_largest_fraction)).astype(bool)
    out["border_fraction"] = out["border_voxels"] / out["voxels"]
    out["flag_border"] = (out["border_fraction"] > thresholds.max_border_fraction).astype(bool)
    if "disagreement" in out.columns:
        out["flag_disagreement"] = (out["disagreement"] > thresholds.max_disagreement).astype(bool)
    else:
        out["flag_disagreement"] = False
    flags = out[list(FLAG_COLUMNS)]
    out["flagged"] = flags.any(axis=1)
    out["flags"] = [",".join(c.removeprefix("flag_") for c in FLAG_COLUMNS if row[c]) for _, row in flags.iterrows()]
    return out


def write_qc_report(table: pd.DataFrame, path: str | os.PathLike, *, thresholds: QCThresholds | None = None,
                    overwrite: bool = False) -> Path:
    """Write the QC result as JSON: thresholds, the flagged cases, and every row's flags and measurements
    (``{"thresholds", "cases": {case: {"flagged", "structures": {class: {...}}}}, "flagged_cases"}``).
    An existing ``path`` is refused unless ``overwrite``."""
    from medsegkit.files import check_new_output

    path = check_new_output(path, overwrite, "JSON report")
    thresholds = thresholds or QCThresholds()
    keep = [c for c in ("label", "volume_ml", "volume_z", "volume_in_range", "components",
                        "largest_component_fraction", "border_fraction", "disagreement", *FLAG_COLUMNS, "flags")
            if c in table.columns]
    cases: dict[str, Any] = {}
    for _, row in table.iterrows():
        key = str(row["case"]) if "case" in table.columns else "labels"
        if "model" in table.columns:
            key = f"{key} [{row['model']}]"
        case = cases.setdefault(key, {"flagged": False, "structures": {}})
        case["structures"][str(row["class"])] = {c: _jsonable(row[c]) for c in keep}
        case["flagged"] = bool(case["flagged"] or row.get("flagged", False))
    report = {"thresholds": asdict(thresholds), "flagged_cases": [k for k, v in cases.items() if v["flagged"]],
              "cases": cases}
    from medsegkit.files import atomic_write

    text = json.dumps(report, indent=2)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _resampling_steps(model: Any, image: Image, preprocessing: Any) -> tuple[int, ...]:
    """Per voxel axis, how many input voxels one voxel of the model's grid spans when that is a whole
    number (target spacing from ``preprocessing`` or the checkpoint's metadata), else 1."""
    spec = preprocessing
    if not isinstance(spec, Mapping):
        spec = (getattr(model, "medsegkit_metadata", None) or {}).get("preprocessing")
    target = spec.get("spacing") if isinstance(spec, Mapping) else None
    if target is None:
        return (1,) * image.spatial_ndim
    target = np.broadcast_to(np.asarray(target, dtype=np.float64), (image.spatial_ndim,))
    steps = []
    for a, spacing in enumerate(image.spacing):
        ras_axis = int(np.argmax(np.abs(image.direction[:, a])))  # the target spacing is per RAS axis
        ratio = float(target[ras_axis]) / spacing
        steps.append(int(round(ratio)) if ratio >= 1 and abs(ratio - round(ratio)) < 1e-3 else 1)
    return tuple(steps)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    return value


def mirrored_disagreement(
    model: Any,
    image: Image,
    labels: np.ndarray,
    *,
    axis: int = 0,
    band_mm: float = 4.0,
    margin_voxels: int = 8,
    **segment_kwargs: Any,
) -> dict[int, float]:
    """Per-class disagreement of one mirrored pass with ``labels``, measured on the boundary band only.

    The image is cropped to the bounding box of the foreground (plus ``margin_voxels``), mirrored along
    voxel ``axis`` (the array only, so the content is mirrored in the world), segmented once with
    :func:`medsegkit.segment` (the model's own preprocessing) and mirrored back. On the voxels within
    ``band_mm`` (world distance) of a class boundary in ``labels``, each class's disagreement is ``1 - Dice`` between
    ``labels`` and the mirrored result. This costs at most one pass over the foreground's box, not a full
    test-time augmentation; a model that understood the image gives nearly the same boundary both ways.

    Args:
        model: a model or checkpoint, as :func:`medsegkit.segment` takes.
        image: the :class:`~medsegkit.io.Image` that ``labels`` segments, ``(i, j, k)`` or ``(C, i, j, k)``.
        labels: the result on ``image``'s grid, ``(i, j, k)`` integers.
        axis: voxel axis to mirror (0: the first spatial axis, left-right in RAS/LAS data).
        band_mm: half-width of the evaluated band around the class boundaries, in mm (so a 1 mm and a
            2 mm scan are judged on the same band).
        margin_voxels: margin around the foreground's box for the crop.
        **segment_kwargs: passed to :func:`medsegkit.segment` (``roi_size``, ``device``...).

    Returns:
        ``{label: disagreement in [0, 1]}`` for every foreground class in ``labels``.
    """
    from scipy import ndimage

    from medsegkit.inference import segment
    from medsegkit.io import Image as ImageType

    labels = np.asarray(labels)
    if labels.shape != image.spatial_shape:
        raise ValueError(f"labels {labels.shape} do not lie on the image grid {image.spatial_shape}")
    if not 0 <= axis < labels.ndim:
        raise ValueError(f"axis must be a voxel axis in 0..{labels.ndim - 1}, got {axis}")
    classes = [int(c) for c in np.unique(labels) if c != 0]
    if not classes:
        return {}
    steps = _resampling_steps(model, image, segment_kwargs.get("preprocessing"))
    nonzero = np.nonzero(labels)
    box = []
    for a, (idx, n, step) in enumerate(zip(nonzero, labels.shape, steps)):
        start = max(int(idx.min()) - margin_voxels, 0)
        start -= start % step  # the crop's resampled grid keeps the full image's sample positions
        stop = min(int(idx.max()) + margin_voxels + 1, n)
        if a == axis:  # mirrored samples land on the unmirrored ones: (start + length - 1) % step == 0
            while (stop - 1) % step and stop < n:
                stop += 1
            while (stop - 1) % step and stop - 1 > start:
                stop -= 1
        box.append(slice(start, stop))
    box = tuple(box)
    shift = np.eye(4)
    shift[: labels.ndim, 3] = [s.start for s in box]
    channels = (slice(None),) if image.channel_axis is not None else ()
    crop = np.asarray(image.array[channels + box])
    data_axis = axis + len(channels)
    mirrored = ImageType(np.flip(crop, axis=data_axis).copy(), image.affine @ shift, {}, image.channel_axis)
    segment_kwargs.setdefault("progress", None)
    mirrored_labels = np.flip(np.asarray(segment(model, mirrored, **segment_kwargs).array), axis=axis)
    reference = labels[box]
    structure = ndimage.generate_binary_structure(reference.ndim, 1)
    edges = np.zeros(reference.shape, dtype=bool)
    for c in classes:
        mask = reference == c
        edges |= mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=1)
    band = ndimage.distance_transform_edt(~edges, sampling=image.spacing) <= band_mm
    result: dict[int, float] = {}
    for c in classes:
        a = (reference == c) & band
        b = (mirrored_labels == c) & band
        total = int(a.sum()) + int(b.sum())
        result[c] = 0.0 if total == 0 else 1.0 - 2.0 * int((a & b).sum()) / total
    return result
