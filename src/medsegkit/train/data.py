"""Training data for ``medsegkit.train``: labelled volumes, held-out slabs and class-biased patches."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "LabelledVolume",
    "PatchSampler",
    "load_labelled_volume",
    "normalize_intensity",
    "sample_tissue_data",
    "split_axial",
]


@dataclass
class LabelledVolume:
    """One training or validation case.

    Attributes:
        image: ``(C, H, W, D)`` float32, already normalised.
        label: ``(H, W, D)`` int64 class indices.
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


def normalize_intensity(array: np.ndarray, intensity: Mapping[str, Any]) -> np.ndarray:
    """Apply an intensity normalisation described as data (as recorded in checkpoints).

    Accepted: ``{"name": "scale", "divisor": d}`` (``x / d``), ``{"name": "zscore"}`` (mean 0, std 1 over
    non-zero voxels), ``{"name": "none"}``.
    """
    name = intensity.get("name")
    x = np.asarray(array, dtype=np.float32)
    if name == "scale":
        return x / np.float32(intensity["divisor"])
    if name == "zscore":
        inside = x[x != 0] if np.any(x != 0) else x
        return (x - inside.mean()) / max(float(inside.std()), 1e-8)
    if name == "none":
        return x
    raise ValueError(f"unknown intensity normalisation {intensity!r}; accepted names: 'scale', 'zscore', 'none'")


def load_labelled_volume(
    image_path: str | os.PathLike, label_path: str | os.PathLike, *, intensity: Mapping[str, Any]
) -> LabelledVolume:
    """Read an image and its label map (same grid) into a :class:`LabelledVolume`."""
    from medsegkit.io import read_image

    image = read_image(image_path)
    label = read_image(label_path)
    if image.spatial_shape != label.spatial_shape or not np.allclose(image.affine, label.affine, atol=1e-4):
        raise ValueError(
            f"image {image_path} {image.spatial_shape} and labels {label_path} {label.spatial_shape} "
            "are not on the same grid (shape and affine must match)"
        )
    labels = np.asarray(label.array)
    if labels.dtype.kind == "f":
        if not np.all(labels == np.round(labels)):
            raise ValueError(f"label map {label_path} holds non-integer values; expected class indices")
    if labels.min() < 0:
        raise ValueError(f"label map {label_path} holds negative values; expected class indices 0..K-1")
    array = normalize_intensity(image.array, intensity)
    if image.channel_axis is None:
        array = array[None]
    return LabelledVolume(array, labels.astype(np.int64), image.affine, name=str(image_path))


def split_axial(volume: LabelledVolume, start: int) -> tuple[LabelledVolume, LabelledVolume]:
    """Split by axial slab: ``(training part k < start, validation volume scored on k >= start)``.

    The training part is cut out (its labels and image end at ``start``); the validation volume keeps
    the whole image as input context but is scored only on ``k >= start``.
    """
    depth = volume.label.shape[-1]
    if not 0 < start < depth:
        raise ValueError(f"split index {start} must lie inside the last axis (1..{depth - 1})")
    train = LabelledVolume(
        np.ascontiguousarray(volume.image[..., :start]),
        np.ascontiguousarray(volume.label[..., :start]),
        volume.affine,
        name=f"{volume.name}[k<{start}]",
    )
    val = LabelledVolume(volume.image, volume.label, volume.affine, name=f"{volume.name}[k>={start}]", score_from=start)
    return train, val


def sample_tissue_data(intensity: Mapping[str, Any]) -> tuple[LabelledVolume, LabelledVolume]:
    """The shipped MNI152 2 mm tissue sample split into training (k < 55) and held-out (k >= 55) parts."""
    from medsegkit.data import MNI_HELD_OUT_START, sample_path

    volume = load_labelled_volume(sample_path("mni152_t1"), sample_path("mni152_tissue"), intensity=intensity)
    volume.name = "mni152"
    return split_axial(volume, MNI_HELD_OUT_START)


class PatchSampler:
    """Random training patches, centred on each class in given proportions, with light augmentation.

    MONAI's :class:`~monai.transforms.RandCropByLabelClassesd` picks patch centres (``class_ratios``
    weights each label; a ratio above the class's voxel share biases patches towards that class), then
    random flips, intensity scaling/shift, and zero padding to a multiple of ``divisible_by``.

    Args:
        volumes: training cases.
        patch_size: ``(H, W, D)``; larger than a volume along an axis means the whole axis.
        num_classes: number of label classes ``K``.
        class_ratios: relative frequency of patch centres per class (default: equal).
        flip_axes: spatial axes flipped with probability 0.5 each (``()`` for none).
        intensity_scale, intensity_shift: ranges of the random ``x * (1 + s) + o`` on non-zero voxels.
        divisible_by: pad each patch so every spatial size divides by this (the U-Net's total stride).
        seed: seeds MONAI's random state (reproducible patch sequence).

    Calling ``sample(batch_size)`` returns ``(image (N, C, H, W, D) float32, label (N, 1, H, W, D) int64)``
    as numpy arrays.
    """

    def __init__(
        self,
        volumes: Sequence[LabelledVolume],
        *,
        patch_size: Sequence[int],
        num_classes: int,
        class_ratios: Sequence[float] | None = None,
        flip_axes: Sequence[int] = (0,),
        intensity_scale: float = 0.0,
        intensity_shift: float = 0.0,
        divisible_by: int = 16,
        seed: int = 0,
    ) -> None:
        from monai.transforms import (
            Compose,
            DivisiblePadd,
            RandCropByLabelClassesd,
            RandFlipd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        if not volumes:
            raise ValueError("PatchSampler needs at least one training volume")
        if class_ratios is not None and len(class_ratios) != num_classes:
            raise ValueError(f"class_ratios needs {num_classes} values (one per class); got {list(class_ratios)}")
        self.volumes = list(volumes)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.rng = np.random.RandomState(seed)
        crop = RandCropByLabelClassesd(
            keys=("image", "label"),
            label_key="label",
            spatial_size=self.patch_size,
            ratios=list(class_ratios) if class_ratios is not None else None,
            num_classes=num_classes,
            num_samples=1,
            indices_key="class_indices",
            allow_smaller=True,
            warn=False,
        )
        steps = [crop]
        steps += [RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=axis) for axis in flip_axes]
        if intensity_scale:
            steps.append(RandScaleIntensityd(keys="image", factors=intensity_scale, prob=1.0))
        if intensity_shift:
            steps.append(RandShiftIntensityd(keys="image", offsets=intensity_shift, prob=1.0))
        steps.append(DivisiblePadd(keys=("image", "label"), k=divisible_by))
        self.transform = Compose(steps).set_random_state(seed=seed)
        from monai.transforms.utils import map_classes_to_indices

        # voxel indices of each class, computed once (MONAI would redo it for every patch)
        self._cases = [
            {"image": v.image, "label": v.label[None],
             "class_indices": map_classes_to_indices(v.label[None], num_classes=num_classes)}
            for v in self.volumes
        ]

    def state(self) -> dict[str, Any]:
        """JSON-able random state (to resume the same patch sequence)."""
        states = [_rs_state(self.rng)] + [_rs_state(t.R) for t in self._random_transforms()]
        return {"random_states": states}

    def load_state(self, state: Mapping[str, Any]) -> None:
        states = state["random_states"]
        _rs_load(self.rng, states[0])
        for t, s in zip(self._random_transforms(), states[1:]):
            _rs_load(t.R, s)

    def _random_transforms(self) -> list[Any]:
        """Every MONAI ``Randomizable`` in the pipeline, including the array transforms a dictionary
        transform delegates to (``RandCropByLabelClassesd.cropper`` has its own random state)."""
        from monai.transforms import Randomizable

        found: list[Any] = []

        def visit(obj: Any) -> None:
            if isinstance(obj, Randomizable) and all(obj is not f for f in found):
                found.append(obj)
                for value in vars(obj).values():
                    visit(value)

        for t in self.transform.transforms:
            visit(t)
        return found

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        shape = None
        for _ in range(batch_size):
            case = self._cases[self.rng.randint(len(self._cases))]
            out = self.transform(dict(case))
            out = out[0] if isinstance(out, list) else out
            image = np.asarray(out["image"], dtype=np.float32)
            label = np.asarray(out["label"]).astype(np.int64)
            if shape is not None and image.shape != shape:
                # cases of different sizes smaller than the patch: pad to the batch's largest
                raise ValueError(f"patches of different sizes in one batch ({image.shape} vs {shape}); use batch_size=1")
            shape = image.shape
            images.append(image)
            labels.append(label)
        return np.stack(images), np.stack(labels)


def _rs_state(rs: np.random.RandomState) -> list[Any]:
    kind, keys, pos, has_gauss, cached = rs.get_state()
    return [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]


def _rs_load(rs: np.random.RandomState, state: Sequence[Any]) -> None:
    kind, keys, pos, has_gauss, cached = state
    rs.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
