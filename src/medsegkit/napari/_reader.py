"""napari reader: NIfTI, NRRD, MetaImage and DICOM series folders through :func:`medsegkit.io.read_image`.

Layers get the image's geometry (see :mod:`medsegkit.io.geometry`): data turned to the closest
RAS voxel order (permutations and flips only, no resampling) with the spatial axes reversed to
napari's ``(z, y, x)``, ``scale`` = spacing, ``translate`` = origin, and ``affine`` = the
direction when it is not the identity, so that the layer lies at its RAS millimetre position.
Integer images whose file name says they are labels (``label``, ``seg``, ``mask``, ``tissue``,
``aseg``, ``parc``) open as Labels layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medsegkit.io.geometry import layer_geometry, reverse_spatial, to_canonical

__all__ = ["get_reader", "image_to_layer_data", "read_layers"]

LABEL_HINTS = ("label", "seg", "mask", "tissue", "aseg", "parc")
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

LayerData = tuple[Any, dict[str, Any], str]


def _is_dicom_folder(path: Path, probe: int = 16) -> bool:
    """True when a folder holds DICOM files (``.dcm`` suffix, or the ``DICM`` magic at byte 128)."""
    checked = 0
    for entry in sorted(path.iterdir()):
        if not entry.is_file():
            continue
        if entry.suffix.lower() == ".dcm":
            return True
        try:
            with open(entry, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
        except OSError:
            continue
        checked += 1
        if checked >= probe:
            break
    return False


def _supported(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.is_dir():
        return _is_dicom_folder(p)
    return p.name.lower().endswith(_SUFFIXES)


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 ``get_reader``: :func:`read_layers` when every path is a supported file or a DICOM folder."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_supported(p) for p in paths):
        return None
    return read_layers


def _layer_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_to_layer_data(image: Any, name: str, *, layer_type: str | None = None) -> LayerData:
    """One napari layer-data tuple for a :class:`medsegkit.io.Image` (channels become one layer each)."""
    n = image.spatial_ndim
    voxels, affine = to_canonical(image.array, image.affine, n, channel_first=image.channel_axis is not None)
    data = reverse_spatial(voxels, n)
    kwargs: dict[str, Any] = {"name": name, **layer_geometry(affine, n)}
    kwargs["metadata"] = {
        "medsegkit": {
            "path": image.meta.get("path"),
            "source_affine": image.affine.tolist(),  # the file's own voxel grid; the writer returns to it
            "orientation": image.orientation,
            "spacing": list(image.spacing),
        }
    }
    if layer_type is None:
        integer = image.array.dtype.kind in "biu"
        hinted = any(h in name.lower() for h in LABEL_HINTS)
        layer_type = "labels" if integer and hinted and image.channel_axis is None else "image"
    if layer_type == "image" and image.channel_axis is not None:
        kwargs["channel_axis"] = 0
        kwargs["name"] = [f"{name} [{c}]" for c in range(image.num_channels)]
    if layer_type == "image" and image.channel_axis is None:
        # Skipping napari's full-array min/max scan is worth nothing here; the image is in memory.
        kwargs["contrast_limits"] = _contrast_limits(data)
    return data, kwargs, layer_type


def _contrast_limits(data: Any) -> tuple[float, float]:
    import numpy as np

    lo, hi = float(np.min(data)), float(np.max(data))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def read_layers(path: str | Sequence[str]) -> list[LayerData]:
    """Read each path (file or DICOM folder) into layer-data tuples.

    A path that cannot be read (damaged, truncated, an impossible header, an inconsistent DICOM series:
    :class:`medsegkit.errors.ImageReadError`, or a missing file) shows an error notification with the
    reader's one-line message and adds no layer; the other paths are still read. When no path could be
    read, napari's "nothing to add" sentinel ``[(None,)]`` keeps the viewer as it was.
    """
    from medsegkit.errors import ImageReadError
    from medsegkit.io import read_image

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        try:
            image = read_image(p)
        except (ImageReadError, FileNotFoundError) as err:
            from napari.utils.notifications import show_error

            show_error(f"medsegkit: {' '.join(str(err).split())}")
            continue
        layers.append(image_to_layer_data(image, _layer_name(p)))
    return layers or [(None,)]
