"""Segmentation quality per class: Dice, 95th-percentile Hausdorff distance, volume difference.

Built on MONAI's metric functions (:func:`monai.metrics.compute_dice`,
:func:`monai.metrics.compute_hausdorff_distance`) so the numbers are the ones MONAI users report.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from medsegkit._values import is_finite_number
from medsegkit.files import check_new_output

__all__ = ["evaluate", "evaluate_cohort", "cohort_summary", "dice_per_class", "format_table", "save_cohort_boxplot"]


def _as_label_volume(obj: Any, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(array, affine or None)`` of a label map given as an array, a tensor or an ``Image``."""
    affine = None
    if hasattr(obj, "array") and hasattr(obj, "affine"):  # medsegkit.io.Image
        affine = np.asarray(obj.affine, dtype=np.float64)
        obj = obj.array
    if hasattr(obj, "detach"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    from medsegkit.io.image import class_indices

    array = class_indices(obj, what)
    if array.ndim not in (2, 3):
        raise ValueError(f"{what} must be a 2D or 3D label map without channel axis; got shape {array.shape}")
    return array, affine


def _spacing_of(affine: np.ndarray | None, ndim: int) -> tuple[float, ...]:
    if affine is None:
        return (1.0,) * ndim
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :ndim], axis=0))


def _positive_spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    """``spacing`` as ``ndim`` finite positive floats (a NaN, zero or negative voxel size made MONAI fail deep
    inside, or the volumes zero / negative)."""
    values = np.asarray(spacing, dtype=object).ravel() if not isinstance(spacing, (str, bytes)) else None
    if values is None or values.size != ndim or not all(
            is_finite_number(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {ndim} finite voxel sizes > 0 in mm for a {ndim}D map; got {spacing!r}")
    return tuple(float(v) for v in values)


def _class_list(labels: Any) -> list[int]:
    """``labels`` as a list of class indices >= 0 (a string was read digit by digit, 1.5 as class 1)."""
    try:
        values = None if isinstance(labels, (str, bytes)) else list(labels)
    except TypeError:  # a single number
        values = None
    if values is None or not all(
            isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer())
            for v in values) or any(isinstance(v, (bool, np.bool_)) for v in values):
        raise ValueError(f"labels must be whole class indices >= 0 (0 = background); got {labels!r}")
    values = [int(v) for v in values]
    if any(v < 0 for v in values):
        raise ValueError(f"labels are class indices >= 0 (0 = background); got {values}")
    return values


def evaluate(
    prediction: Any,
    reference: Any,
    *,
    labels: Iterable[int] | None = None,
    spacing: Sequence[float] | None = None,
    hd95: bool = True,
) -> dict[str, Any]:
    """Dice, HD95 and volume difference of ``prediction`` against ``reference`` for each class.

    Args:
        prediction: predicted label map ``(H, W, D)`` or ``(H, W)`` — numpy array, torch tensor or
            :class:`medsegkit.io.Image`.
        reference: reference label map on the same grid (same shape; for two Images also the same
            affine within 1e-4).
        labels: the classes to score; default every non-zero label present in either map.
        spacing: voxel size in mm for arrays (default: from the Images' affines, else 1 per axis).
        hd95: compute the 95th-percentile Hausdorff distance (the slowest part).

    Returns:
        ``{"labels": [...], "dice": {label: float}, "hd95": {label: float (mm)},
        "volume_prediction": {label: mL}, "volume_reference": {label: mL},
        "volume_difference": {label: mL, prediction minus reference},
        "relative_volume_difference": {label: (pred - ref) / ref}, "mean_dice": float,
        "spacing": (...)}``. Dice is 1.0 when a class is absent from both maps; HD95 is ``nan`` when
        it is absent from either (no surface to measure); volumes are in mL (voxel counts × spacing).

    Raises:
        ValueError: the maps have different shapes or grids, or are not integer label maps, or ``labels``
            holds a negative class.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    pred, pred_affine = _as_label_volume(prediction, "prediction")
    ref, ref_affine = _as_label_volume(reference, "reference")
    if pred.shape != ref.shape:
        raise ValueError(
            f"prediction and reference must lie on the same grid: shapes {pred.shape} and {ref.shape} differ. "
            "Resample the prediction onto the reference grid first (medsegkit.inference.segment does)."
        )
    if pred_affine is not None and ref_affine is not None and not np.allclose(pred_affine, ref_affine, atol=1e-4):
        raise ValueError(
            "prediction and reference have the same shape but different affines (voxel-to-world maps):\n"
            f"{np.round(pred_affine, 4)}\nvs\n{np.round(ref_affine, 4)}\n"
            "Resample one onto the other's grid first."
        )
    affine = ref_affine if ref_affine is not None else pred_affine
    voxel_ml = None
    if spacing is None:
        spacing = _spacing_of(affine, pred.ndim)
        if affine is not None and pred.ndim == 3:  # |det|: right on oblique / sheared grids too, as stats
            from medsegkit.measurements import voxel_volume_ml

            voxel_ml = voxel_volume_ml(affine)
    spacing = _positive_spacing(spacing, pred.ndim)
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0)
    else:
        labels = _class_list(labels)
    if voxel_ml is None:
        voxel_ml = float(np.prod(spacing)) / 1000.0
    result: dict[str, Any] = {
        "labels": labels,
        "spacing": spacing,
        "dice": {},
        "hd95": {},
        "volume_prediction": {},
        "volume_reference": {},
        "volume_difference": {},
        "relative_volume_difference": {},
    }
    for label in labels:
        p = torch.from_numpy(pred == label)[None, None]
        r = torch.from_numpy(ref == label)[None, None]
        n_pred, n_ref = int(p.sum()), int(r.sum())
        dice = float(compute_dice(p, r, include_background=True, ignore_empty=False)[0, 0])
        result["dice"][label] = dice
        if hd95:
            if n_pred and n_ref:
                with warnings.catch_warnings():
                    # MONAI 1.5+ passes its own deprecated argument internally; nothing for our callers to change
                    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
                    dist = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
                result["hd95"][label] = float(dist[0, 0])
            else:
                result["hd95"][label] = math.nan
        result["volume_prediction"][label] = n_pred * voxel_ml
        result["volume_reference"][label] = n_ref * voxel_ml
        result["volume_difference"][label] = (n_pred - n_ref) * voxel_ml
        result["relative_volume_difference"][label] = (n_pred - n_ref) / n_ref if n_ref else math.nan
    result["mean_dice"] = float(np.mean(list(result["dice"].values()))) if labels else math.nan
    if not hd95:
        del result["hd95"]
    return result


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice of each label (MONAI's ``compute_dice``; 1.0 where a label is absent from both maps)."""
    return evaluate(prediction, reference, labels=labels, hd95=False)["dice"]


def format_table(result: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """A plain-text table of an :func:`evaluate` result, one row per class."""
    has_hd = "hd95" in result
    header = f"{'class':<14}{'Dice':>8}" + (f"{'HD95 mm':>10}" if has_hd else "")
    header += f"{'ref mL':>10}{'pred mL':>10}{'diff mL':>10}{'diff %':>9}"
    rows = [header]
    for label in result["labels"]:
        name = class_names[label] if class_names and label < len(class_names) else str(label)
        row = f"{name:<14}{result['dice'][label]:>8.3f}"
        if has_hd:
            row += f"{result['hd95'][label]:>10.2f}"
        rel = result["relative_volume_difference"][label]
        row += (
            f"{result['volume_reference'][label]:>10.1f}{result['volume_prediction'][label]:>10.1f}"
            f"{result['volume_difference'][label]:>+10.1f}{rel * 100:>+9.1f}"
        )
        rows.append(row)
    rows.append(f"mean Dice: {result['mean_dice']:.3f}")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# cohorts: many (prediction, reference) pairs -> one table


def _cohort_pairs(pairs: Any) -> list[tuple[str, Any, Any]]:
    """``[(case, prediction, reference)]`` from ``{case: (prediction, reference)}`` or a list of pairs."""
    import os
    from pathlib import Path

    if isinstance(pairs, (str, os.PathLike)):
        raise TypeError("evaluate_cohort takes (prediction, reference) pairs; for two folders or patterns use "
                        "evaluate_cohort(medsegkit.cohort.match_pairs(predictions, references))")
    items = list(pairs.items()) if isinstance(pairs, dict) else list(enumerate(pairs))
    out = []
    for key, pair in items:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"pair {key!r} must be (prediction, reference); got {type(pair).__name__}")
        prediction, reference = pair
        if isinstance(key, str):
            case = key
        elif isinstance(prediction, (str, os.PathLike)):
            case = Path(prediction).name
        else:
            case = f"case{key}"
        out.append((case, prediction, reference))
    return out


def evaluate_cohort(
    pairs: Any,
    *,
    labels: Iterable[int] | None = None,
    class_names: Sequence[str] | None = None,
    hd95: bool = True,
    boxplot: Any = None,
    overwrite: bool = False,
) -> Any:
    """Score many predictions against their references: one row per case and class.

    Args:
        pairs: ``{case: (prediction, reference)}`` or a list of ``(prediction, reference)`` pairs (paths,
            Images or arrays on the same grid; a list names cases by the prediction's file name).
            For two folders or glob patterns: :func:`medsegkit.cohort.match_pairs`.
        labels: classes to score (default: every non-zero label present in either map, per case).
        class_names: names by label (background first) for the ``class`` column.
        hd95: compute HD95 (the slowest part).
        boxplot: optional PNG path: Dice (and HD95) per class across cases as box plots
            (:func:`save_cohort_boxplot`).
        overwrite: replace an existing ``boxplot`` file (refused by default, before scoring).

    Returns:
        A ``pandas.DataFrame`` with ``case, label, class, dice, hd95, volume_prediction_ml,
        volume_reference_ml, volume_difference_ml, relative_volume_difference``;
        :func:`cohort_summary` turns it into per-class mean / std / median.
    """
    import os

    import pandas as pd

    from medsegkit.io import read_image

    if boxplot is not None:
        check_new_output(boxplot, overwrite, "PNG file")
    rows = []
    for case, prediction, reference in _cohort_pairs(pairs):
        prediction = read_image(prediction) if isinstance(prediction, (str, os.PathLike)) else prediction
        reference = read_image(reference) if isinstance(reference, (str, os.PathLike)) else reference
        result = evaluate(prediction, reference, labels=labels, hd95=hd95)
        for label in result["labels"]:
            rows.append({
                "case": case,
                "label": label,
                "class": class_names[label] if class_names and label < len(class_names) else str(label),
                "dice": result["dice"][label],
                "hd95": result["hd95"][label] if hd95 else math.nan,
                "volume_prediction_ml": result["volume_prediction"][label],
                "volume_reference_ml": result["volume_reference"][label],
                "volume_difference_ml": result["volume_difference"][label],
                "relative_volume_difference": result["relative_volume_difference"][label],
            })
    table = pd.DataFrame(rows, columns=["case", "label", "class", "dice", "hd95", "volume_prediction_ml",
                                        "volume_reference_ml", "volume_difference_ml", "relative_volume_difference"])
    if boxplot is not None:
        save_cohort_boxplot(table, boxplot, overwrite=overwrite)
    return table


def cohort_summary(table: Any) -> Any:
    """Per-class ``mean``, ``std``, ``median``, ``min`` and ``max`` of Dice, HD95 and volume difference of an
    :func:`evaluate_cohort` table (one row per class, ``cases`` = how many cases scored it)."""
    metrics = ["dice", "hd95", "volume_difference_ml"]
    summary = table.groupby(["label", "class"])[metrics].agg(["mean", "std", "median", "min", "max"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.insert(0, "cases", table.groupby(["label", "class"]).size())
    return summary.reset_index()


def save_cohort_boxplot(table: Any, path: Any, *, overwrite: bool = False) -> Any:
    """PNG of Dice (left) and HD95 in mm (right) per class across cases, as box plots with the cases as
    dots; written atomically. Returns the path. An existing ``path`` is refused unless ``overwrite``."""
    from pathlib import Path

    from matplotlib.figure import Figure  # no pyplot: works headless and leaves the user's backend alone

    from medsegkit.files import atomic_write

    check_new_output(path, overwrite, "PNG file")
    if table.empty:
        raise ValueError("the cohort table is empty: nothing to plot")
    classes = list(dict.fromkeys(table["class"]))
    metrics = [("dice", "Dice")] + ([("hd95", "HD95 (mm)")] if table["hd95"].notna().any() else [])
    fig = Figure(figsize=(4.5 * len(metrics), 3.6))
    for position, (column, title) in enumerate(metrics, start=1):
        ax = fig.add_subplot(1, len(metrics), position)
        values = [table.loc[table["class"] == c, column].dropna().to_numpy() for c in classes]
        ax.boxplot(values, showfliers=False)
        ax.set_xticks(range(1, len(classes) + 1), classes)
        for x, v in enumerate(values, start=1):
            ax.plot(np.full(v.shape, x, dtype=float), v, "o", alpha=0.6, color="tab:blue")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    target = Path(path)
    atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    return target
