"""Per-structure measurements of a label map: volume, shape and, with an image, intensity.

>>> import medsegkit
>>> table = medsegkit.stats("case1_seg.nii.gz", image="case1.nii.gz")   # doctest: +SKIP
>>> table[["class", "volume_ml", "components", "mean_intensity"]]     # doctest: +SKIP

Volumes come from the affine (``voxels × |det(affine[:3, :3])| / 1000`` mL), so anisotropic and oblique
grids are measured right; bounding boxes are in world (RAS) millimetres. Class names come from
``class_names=``, else from the labels' metadata: ``Image.meta["class_names"]`` (what
:func:`medsegkit.segment` returns) or the sidecar JSON :func:`medsegkit.segment_many` writes next to each
label file (:func:`metadata_path_for`), which records the checkpoint's class names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from medsegkit.io import Image

__all__ = ["STATS_COLUMNS", "metadata_path_for", "read_label_metadata", "stats", "write_label_metadata"]

# Columns of every stats table (intensity columns only when an image is given).
STATS_COLUMNS = (
    "label", "class", "voxels", "volume_ml", "components", "largest_component_fraction", "border_voxels",
    "x_min_mm", "x_max_mm", "y_min_mm", "y_max_mm", "z_min_mm", "z_max_mm",
)
INTENSITY_COLUMNS = ("mean_intensity", "median_intensity", "std_intensity")


def metadata_path_for(labels_path: str | os.PathLike) -> Path:
    """The sidecar JSON of a label file: ``case_seg.nii.gz`` → ``case_seg.json`` (same folder)."""
    from medsegkit.io import READ_SUFFIXES

    path = Path(labels_path)
    name = path.name
    ext = next((s for s in sorted(READ_SUFFIXES, key=len, reverse=True) if name.lower().endswith(s)), path.suffix)
    return path.with_name(name[: len(name) - len(ext)] + ".json")


def write_label_metadata(labels_path: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Write ``metadata`` (class names, label colours, model, QC reference ranges...) as the sidecar JSON
    of ``labels_path`` (temporary file + rename, like the label file itself)."""
    from medsegkit.files import atomic_write

    text = json.dumps(dict(metadata), indent=2, default=str)
    return atomic_write(metadata_path_for(labels_path), lambda tmp: tmp.write_text(text))


def read_label_metadata(labels_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar JSON of ``labels_path`` as a dict (``{}`` when there is none)."""
    target = metadata_path_for(labels_path)
    if not target.exists():
        return {}
    from medsegkit._serialize import label_metadata_problem
    from medsegkit.files import read_json_object

    sidecar = read_json_object(target, "label metadata", "delete or fix it")
    problem = label_metadata_problem(sidecar)
    if problem:
        raise ValueError(f"label metadata {target}: {problem}; delete or fix it")
    return sidecar


def _as_labels(labels: Any) -> Image:
    from medsegkit.io import Image, read_image
    from medsegkit.io.image import class_indices

    if isinstance(labels, (str, os.PathLike)):
        path = labels
        labels = read_image(path)
        sidecar = read_label_metadata(path)
        for key in ("class_names", "label_colors"):
            if sidecar.get(key) and key not in labels.meta:
                labels.meta[key] = sidecar[key]
    elif not isinstance(labels, Image):
        if hasattr(labels, "detach"):
            labels = labels.detach().cpu().numpy()
        labels = Image(np.asarray(labels))  # identity affine: 1 mm voxels
    if labels.channel_axis is not None:
        raise ValueError(f"labels must be a label map without channels; got {labels.num_channels} channels "
                         f"(shape {labels.array.shape})")
    array = class_indices(labels.array, "labels")
    if array.dtype != labels.array.dtype:  # whole numbers saved as float
        labels = labels.with_array(array, meta=labels.meta)
    if array.min() < 0:
        raise ValueError("labels must be non-negative class indices (0 = background); found negative values")
    return labels


def _as_intensities(image: Any, labels: Image) -> np.ndarray:
    from medsegkit.io import Image, read_image, same_grid

    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, Image):
        if image.channel_axis is not None:
            raise ValueError(f"image has {image.num_channels} channels; give one channel "
                             "(image.with_array(image.array[c]))")
        if image.spatial_shape != labels.spatial_shape or not same_grid(image, labels):
            raise ValueError(f"image and labels must lie on the same grid: image {image.spatial_shape} with affine\n"
                             f"{np.round(image.affine, 4)}\nlabels {labels.spatial_shape} with affine\n"
                             f"{np.round(labels.affine, 4)}")
        return np.asarray(image.array)
    array = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if array.shape != labels.spatial_shape:
        raise ValueError(f"image shape {array.shape} differs from the labels' shape {labels.spatial_shape}")
    return array


def voxel_volume_ml(affine: np.ndarray, spatial_ndim: int = 3) -> float:
    """Volume of one voxel in mL: ``|det(affine[:3, :3])| / 1000`` (area in mm² / 1000 for 2D grids,
    whose third axis is the slice thickness in the affine)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def _world_box(affine: np.ndarray, lower: Sequence[int], upper: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """RAS min / max (mm) over the voxel centres at the corners of the index box ``[lower, upper]``."""
    n = len(lower)
    corners = np.array(np.meshgrid(*[(lo, hi) for lo, hi in zip(lower, upper)], indexing="ij")).reshape(n, -1)
    homogeneous = np.zeros((4, corners.shape[1]))
    homogeneous[:n] = corners
    homogeneous[3] = 1.0
    world = (affine @ homogeneous)[:3]
    return world.min(axis=1), world.max(axis=1)


def stats(
    labels: Any,
    image: Any = None,
    *,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
) -> pd.DataFrame:
    """One row per class present in ``labels`` (background 0 excluded).

    Args:
        labels: label map ``(i, j, k)`` (or ``(i, j)``): an :class:`~medsegkit.io.Image`, a path, or an
            integer array / tensor (identity affine: 1 mm voxels at the origin).
        image: optional intensity image on the same grid (Image, path or array ``(i, j, k)``); adds
            ``mean_intensity``, ``median_intensity``, ``std_intensity`` inside each class.
        class_names: names by class index (a list, background first, or ``{label: name}``); default: the
            labels' ``meta["class_names"]`` or sidecar JSON, else ``"class<N>"``.

    Returns:
        A ``pandas.DataFrame`` with columns :data:`STATS_COLUMNS` (+ intensity columns): ``label``,
        ``class``, ``voxels``, ``volume_ml`` (``voxels × |det(affine[:3, :3])| / 1000``), ``components``
        (connected components, full connectivity: 26 in 3D), ``largest_component_fraction`` (the largest
        component's share of the class's voxels), ``border_voxels`` (voxels on the grid's outer faces),
        and the bounding box of the class's voxel centres in world RAS mm (``x_min_mm`` ... ``z_max_mm``).

    Raises:
        ValueError: a non-integer or negative label map, a multi-channel image, or grids that differ.
    """
    import pandas as pd
    from scipy import ndimage

    labels = _as_labels(labels)
    array = np.asarray(labels.array)
    intensities = None if image is None else _as_intensities(image, labels)
    names = class_names if class_names is not None else labels.meta.get("class_names")
    affine = np.asarray(labels.affine, dtype=np.float64)
    voxel_ml = voxel_volume_ml(affine)
    structure = ndimage.generate_binary_structure(array.ndim, array.ndim)
    shape = array.shape
    rows: list[dict[str, Any]] = []
    # find_objects on the ranks of the values (1..n), not the values: it allocates a list entry per label
    # value up to the largest, so one voxel of 2**31 asked for 16 GB
    values, ranks = np.unique(array, return_inverse=True)
    present = [int(v) for v in values if v != 0]
    boxes = ndimage.find_objects(ranks.reshape(array.shape) + int(values[0] != 0)) if present else []
    for label, box in zip(present, boxes):
        mask = array[box] == label
        voxels = int(mask.sum())
        component_map, count = ndimage.label(mask, structure=structure)
        sizes = np.bincount(component_map.ravel())[1:]
        lower = [s.start for s in box]
        upper = [s.stop - 1 for s in box]
        world_min, world_max = _world_box(affine, lower, upper)
        row: dict[str, Any] = {
            "label": label,
            "class": _name(names, label),
            "voxels": voxels,
            "volume_ml": voxels * voxel_ml,
            "components": int(count),
            "largest_component_fraction": float(sizes.max()) / voxels,
            "border_voxels": _border_voxels(mask, box, shape),
        }
        for axis, name in enumerate("xyz"):
            row[f"{name}_min_mm"] = float(world_min[axis])
            row[f"{name}_max_mm"] = float(world_max[axis])
        if intensities is not None:
            inside = np.asarray(intensities[box][mask], dtype=np.float64)
            row.update(mean_intensity=float(inside.mean()), median_intensity=float(np.median(inside)),
                       std_intensity=float(inside.std()))
        rows.append(row)
    columns = list(STATS_COLUMNS) + (list(INTENSITY_COLUMNS) if intensities is not None else [])
    return pd.DataFrame(rows, columns=columns)


def _border_voxels(mask: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> int:
    """Voxels of ``mask`` (the class inside its bounding ``box``) that lie on the full grid's outer faces."""
    on_face = np.zeros(mask.shape, dtype=bool)
    for axis, (part, n) in enumerate(zip(box, shape)):
        index = [slice(None)] * mask.ndim
        if part.start == 0:
            index[axis] = 0
            on_face[tuple(index)] = True
        if part.stop == n:
            index[axis] = -1
            on_face[tuple(index)] = True
    return int((mask & on_face).sum())


def _name(names: Sequence[str] | Mapping[int, str] | None, label: int) -> str:
    if isinstance(names, Mapping):
        return str(names.get(label, names.get(str(label), f"class{label}")))
    if names is not None and label < len(names):
        return str(names[label])
    return f"class{label}"
