"""Training data for ``medsegkit.train``: labelled volumes as read, held-out slabs, and the data pipeline.

Volumes keep their own grid and intensities; the checkpoint's preprocessing spec
(:func:`medsegkit.transforms.preprocessing_configs`) is applied to them by :func:`training_items`,
the same transforms ``segment`` / ``predict`` / napari run on new images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "LabelledVolume",
    "load_labelled_volume",
    "random_states",
    "sample_tissue_data",
    "split_axial",
    "superior_last",
    "training_items",
]


@dataclass
class LabelledVolume:
    """One training or validation case, on its own grid.

    Attributes:
        image: ``(C, *spatial)`` float32 intensities as read (the preprocessing spec normalises them).
        label: ``(*spatial)`` int64 class indices.
        affine: 4×4 voxel → RAS mm matrix of the grid.
        name: where it came from (for logs and checkpoint metadata).
        score_from: first index along the last axis that is scored in validation (``0``: all). The
            image outside the scored slab is still given to the model as context, as at test time.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    name: str = ""
    score_from: int = 0

    def __post_init__(self) -> None:
        if self.image.ndim != self.label.ndim + 1 or self.image.shape[1:] != self.label.shape:
            raise ValueError(
                f"image must be (C, *spatial) on the label's grid: image {self.image.shape}, label {self.label.shape}"
            )
        if self.image.dtype.kind in "fc":
            bad = int(np.count_nonzero(~np.isfinite(self.image)))
            if bad:  # else the first step's loss is NaN, and the error blames the learning rate
                raise ValueError(f"image {self.name or '(unnamed)'} holds {bad} NaN or Inf voxel(s); training needs "
                                 "finite intensities: replace them (e.g. numpy.nan_to_num) first")

    def as_image(self):
        """The image as a :class:`medsegkit.io.Image` (what ``segment`` takes)."""
        from medsegkit.io import Image

        if self.image.shape[0] == 1:
            return Image(self.image[0], self.affine, {}, None)
        return Image(self.image, self.affine, {}, 0)


def load_labelled_volume(image_path: str | os.PathLike, label_path: str | os.PathLike) -> LabelledVolume:
    """Read an image and its label map (same grid) into a :class:`LabelledVolume`."""
    from medsegkit.io import read_image
    from medsegkit.io.image import class_indices

    image = read_image(image_path)
    label = read_image(label_path)
    if image.spatial_shape != label.spatial_shape or not np.allclose(image.affine, label.affine, atol=1e-4):
        raise ValueError(
            f"image {image_path} {image.spatial_shape} and labels {label_path} {label.spatial_shape} "
            "are not on the same grid (shape and affine must match)"
        )
    labels = class_indices(label.array, f"label map {label_path}")
    if labels.min() < 0:
        raise ValueError(f"label map {label_path} holds negative values; expected class indices 0..K-1")
    array = np.asarray(image.array, dtype=np.float32)
    if image.channel_axis is None:
        array = array[None]
    return LabelledVolume(array, labels.astype(np.int64), image.affine, name=str(image_path))


def superior_last(volume: LabelledVolume) -> LabelledVolume:
    """The same volume with its voxel axes reordered so that the last one runs inferior → superior.

    The voxel axis nearest to the scanner's S–I direction moves to the end (flipped where its index grows
    towards inferior); the other axes keep their order and the affine follows, so every voxel keeps its
    position in mm. A 3D volume whose last axis already runs upwards (RAS, LPS, ...) is returned as is;
    a 2D one too (it has no axial axis to find).
    """
    import nibabel as nib

    if volume.label.ndim != 3:
        return volume
    orientation = nib.orientations.io_orientation(volume.affine)
    axis = int(np.flatnonzero(orientation[:, 0] == 2)[0])  # the voxel axis along S–I
    flip = orientation[axis, 1] < 0
    if axis == 2 and not flip:
        return volume
    if volume.score_from:
        raise ValueError(f"{volume.name}: cannot reorder a volume scored from slice {volume.score_from} of its last "
                         "axis; reorder it before splitting")
    from medsegkit.io.geometry import reorient_voxels

    order = [a for a in range(3) if a != axis] + [axis]
    transform = np.array([[order.index(a), -1.0 if a == axis and flip else 1.0] for a in range(3)])
    image, affine = reorient_voxels(volume.image, volume.affine, 3, transform, channel_first=True)
    label, _ = reorient_voxels(volume.label, volume.affine, 3, transform)
    return LabelledVolume(np.ascontiguousarray(image), np.ascontiguousarray(label), affine, name=volume.name)


def split_axial(volume: LabelledVolume, start: int) -> tuple[LabelledVolume, LabelledVolume]:
    """Split by axial slab: ``(training part k < start, validation volume scored on k >= start)``.

    ``k`` counts axial slices from the inferior end, whatever the file's voxel order: the volume is first
    put in :func:`superior_last` order (a coronal-first file such as the LSA ITK head would otherwise be cut
    into a posterior and an anterior part), so the validation slab is the top of the head. The training
    part is cut out (its labels and image end at ``start``; the grid keeps its origin, so the affine is
    unchanged); the validation volume keeps the whole image as input context but is scored only on
    ``k >= start``.
    """
    volume = superior_last(volume)
    depth = volume.label.shape[-1]
    if not 0 < start < depth:
        raise ValueError(f"split index {start} must lie in 1..{depth - 1}: the volume has {depth} axial slices "
                         "(counted from the inferior end)")
    train = LabelledVolume(
        np.ascontiguousarray(volume.image[..., :start]),
        np.ascontiguousarray(volume.label[..., :start]),
        volume.affine,
        name=f"{volume.name}[k<{start}]",
    )
    val = LabelledVolume(volume.image, volume.label, volume.affine, name=f"{volume.name}[k>={start}]", score_from=start)
    return train, val


def sample_tissue_data() -> tuple[LabelledVolume, LabelledVolume]:
    """The shipped MNI152 2 mm tissue sample split into training (k < 55) and held-out (k >= 55) parts."""
    from medsegkit.data import MNI_HELD_OUT_START, sample_path

    volume = load_labelled_volume(sample_path("mni152_t1"), sample_path("mni152_tissue"))
    volume.name = "mni152"
    return split_axial(volume, MNI_HELD_OUT_START)


def training_items(volumes: Sequence[LabelledVolume], preprocessing: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each volume as MONAI dictionary data, preprocessed once by the spec's transforms.

    Returns:
        ``[{"image": tensor (C, *spatial) float32, "label": tensor (1, *spatial) of class indices}, ...]``
        on the preprocessed grid (labels resampled with nearest neighbours; no intensity step on them).
    """
    import torch
    from monai.data import MetaTensor

    from medsegkit.transforms import build_preprocessing, image_to_metatensor

    items = []
    for volume in volumes:
        image = image_to_metatensor(volume.as_image())
        label = MetaTensor(torch.as_tensor(volume.label[None].astype(np.float32)), affine=image.affine.clone())
        spatial_ndim = volume.label.ndim
        transform = build_preprocessing(preprocessing, label_keys=("label",), spatial_ndim=spatial_ndim)
        out = transform({"image": image, "label": label})
        if min(out["image"].shape[1:]) < 1:
            raise ValueError(f"{volume.name}: preprocessing left an empty image (is the image all zeros?)")
        items.append({"image": out["image"].as_tensor().float(), "label": out["label"].as_tensor().round()})
    return items


def random_states(transform: Any) -> list[Any]:
    """Every MONAI ``Randomizable`` in a transform pipeline, including the array transforms a dictionary
    transform delegates to (``RandCropByLabelClassesd.cropper`` has its own random state)."""
    from monai.transforms import Randomizable

    found: list[Any] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, Randomizable) and all(obj is not f for f in found):
            found.append(obj)
            for value in vars(obj).values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    for t in getattr(transform, "transforms", [transform]):
        visit(t)
    return found
