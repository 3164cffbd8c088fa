"""napari writer: a Labels layer to NIfTI / NRRD / MetaImage through :func:`medsegkit.io.write_image`.

The layer's data → world transform (``scale``, ``translate``, ``rotate``, ``shear``, ``affine``) is
turned back into the image's RAS affine with the reader's axis rule (see
:mod:`medsegkit.io.geometry`); when the layer remembers its source file's affine
(``metadata["medsegkit"]["source_affine"]``, set by the reader and copied to segmentation results),
the voxels are also put back in that file's axis order, so a scan read, segmented and saved gives a
label file on exactly the scan's voxel grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medsegkit.io.geometry import from_canonical, image_affine_from_world, reverse_spatial

__all__ = ["layer_to_image", "write_labels"]


def _world_matrix(meta: dict[str, Any], ndim: int) -> np.ndarray:
    from napari.utils.transforms import Affine

    data2physical = Affine(
        scale=meta.get("scale", (1.0,) * ndim),
        translate=meta.get("translate", (0.0,) * ndim),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=ndim,
    )
    physical2world = meta.get("affine")
    if physical2world is None:
        physical2world = np.eye(ndim + 1)
    elif isinstance(physical2world, Affine):
        physical2world = physical2world.affine_matrix
    return np.asarray(physical2world, dtype=float) @ np.asarray(data2physical.affine_matrix, dtype=float)


def layer_to_image(data: Any, meta: dict[str, Any]):
    """A :class:`medsegkit.io.Image` from a 2D or 3D layer's data and its state dict (napari order → ``(i, j, k)``)."""
    from medsegkit.io import Image

    array = np.asarray(data)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"only 2D and 3D labels can be written as a medical image, but layer {meta.get('name')!r} has "
            f"shape {array.shape}; take one time point / one channel first"
        )
    world = _world_matrix(meta, array.ndim)
    affine = image_affine_from_world(world)
    voxels = reverse_spatial(array, array.ndim)
    source_affine = ((meta.get("metadata") or {}).get("medsegkit") or {}).get("source_affine")
    if source_affine is not None:
        # the reader turned the source to RAS voxel order; give the result the source's own order back
        back = from_canonical(voxels, affine, np.asarray(source_affine), array.ndim)
        if back is not None:
            voxels, affine = back
    image_meta: dict[str, Any] = {"source": "napari layer"}
    medsegkit_meta = (meta.get("metadata") or {}).get("medsegkit") or {}
    if medsegkit_meta.get("model") and medsegkit_meta.get("path"):
        # a segmentation result remembers its scan's file: write_image never writes over it
        image_meta["derived_from"] = [medsegkit_meta["path"]]
    return Image(np.ascontiguousarray(voxels), affine, image_meta)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: save a Labels layer as ``.nii`` / ``.nii.gz`` / ``.nrrd`` / ``.mha``.

    An existing file is replaced (napari's save dialog already asked), except the scan a segmentation
    result came from (``metadata["medsegkit"]["path"]`` of a layer with a ``"model"``): that is refused,
    as :func:`medsegkit.io.write_image` refuses a result's source. Returns the written path.
    """
    from medsegkit.io import write_image

    image = layer_to_image(data, meta)
    written = write_image(image, Path(path), overwrite=True)
    return [str(written)]
