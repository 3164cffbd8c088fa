"""Instance label maps from detection models (Mask R-CNN): 2D images, large 2D images in tiles, 3D volumes.

:func:`predict_instances` turns a model that follows torchvision's detection convention (a list of
``(C, H, W)`` images in [0, 1] in, ``{"boxes", "labels", "scores", "masks"}`` per image out) into a label
map: 0 = background, 1..K = instances.

- **2D**: one detection pass per image, or per tile (``tile_size``, ``tile_overlap``) for large images.
  Detections from different tiles are the same object when their masks, compared inside the region the
  two tiles share, have IoU ≥ ``link_iou``; such detections are merged (union of masks).
- **3D**: slice-wise detection along ``slice_axis`` (tiles within a slice as in 2D), then the instances of
  neighbouring slices are linked into one 3D instance when their masks have IoU ≥ ``link_iou``.
- Overlapping instances: the higher score wins the pixel. Instances left without pixels are dropped.
- Images with one channel are repeated to the model's 3 channels (logged); intensities outside [0, 1]
  are min–max scaled to [0, 1] over the whole image/volume (not per slice or tile, so that slices and
  tiles see the same scale).

:func:`medsegkit.inference.predict` calls this for models with ``medsegkit_task == "instance"``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medsegkit.errors import Cancelled

__all__ = ["predict_instances", "tile_starts"]

logger = logging.getLogger("medsegkit.inference")


@dataclass
class _Detection:
    """One detected instance inside one slice: global bounding box + boolean mask crop."""

    tile: int  # index of the tile it came from
    score: float
    y0: int
    x0: int
    mask: np.ndarray  # (h, w) bool, placed at (y0, x0)

    @property
    def y1(self) -> int:
        return self.y0 + self.mask.shape[0]

    @property
    def x1(self) -> int:
        return self.x0 + self.mask.shape[1]


class _DisjointSet:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size`` with fractional ``overlap``.

    The last tile ends at the image border; an image not larger than a tile is one tile.
    """
    if size <= tile:
        return [0]
    step = max(1, int(tile * (1 - overlap)))
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _layout(
    shape: tuple[int, ...], spatial_dims: int | None, slice_axis: int | None, in_channels: int
) -> tuple[int, int]:
    """(number of image spatial dims, number of leading batch/channel axes), predict()'s rules."""
    ndim = len(shape)
    if spatial_dims is not None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 (an image) or 3 (a volume), got {spatial_dims!r}")
        image_dims = spatial_dims
    elif slice_axis is not None or ndim == 5:
        image_dims = 3
    elif ndim == 3:
        image_dims = 2 if shape[0] in {1, in_channels} else 3
    else:
        image_dims = 2
    leading = ndim - image_dims
    if leading not in (0, 1, 2):
        raise ValueError(
            f"image has {ndim} dimension(s) (shape {shape}); an instance model takes (H, W), (C, H, W), "
            "(N, C, H, W) images or (D, H, W), (C, D, H, W), (N, C, D, H, W) volumes (pass spatial_dims=3 "
            "or slice_axis for a volume)"
        )
    return image_dims, leading


def _scale_to_unit(volume: np.ndarray) -> np.ndarray:
    low, high = float(volume.min()), float(volume.max())
    if low >= 0.0 and high <= 1.0:
        return volume
    logger.info("scaling intensities [%g, %g] to [0, 1] for the detection model", low, high)
    if high == low:
        return np.zeros_like(volume)
    return (volume - low) / (high - low)


def _autocast(device: torch.device, amp: Any):
    if not amp:
        return torch.autocast(device.type, enabled=False)
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if isinstance(amp, torch.dtype):
        dtype = amp
    elif isinstance(amp, str):
        if amp not in names:
            raise ValueError(f"amp must be a bool, 'bf16' or 'fp16', got {amp!r}")
        dtype = names[amp]
    else:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _detections_of(
    result: dict[str, torch.Tensor],
    tile: int,
    y0: int,
    x0: int,
    score_threshold: float,
    mask_threshold: float,
) -> list[_Detection]:
    keep = result["scores"] >= score_threshold
    scores = result["scores"][keep].float().cpu().numpy()
    masks = (result["masks"][keep][:, 0] > mask_threshold).cpu().numpy()
    found = []
    for score, mask in zip(scores, masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            continue
        crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        found.append(_Detection(tile, float(score), y0 + int(rows[0]), x0 + int(cols[0]), crop))
    return found


def _shared_iou(a: _Detection, b: _Detection, tiles: list[tuple[int, int, int, int]]) -> float:
    """Mask IoU of two detections from different tiles, inside the region both tiles saw."""
    ta, tb = tiles[a.tile], tiles[b.tile]
    y0, y1 = max(ta[0], tb[0], min(a.y0, b.y0)), min(ta[1], tb[1], max(a.y1, b.y1))
    x0, x1 = max(ta[2], tb[2], min(a.x0, b.x0)), min(ta[3], tb[3], max(a.x1, b.x1))
    if y0 >= y1 or x0 >= x1:
        return 0.0

    def window(d: _Detection) -> np.ndarray:
        canvas = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        sy0, sy1, sx0, sx1 = max(d.y0, y0), min(d.y1, y1), max(d.x0, x0), min(d.x1, x1)
        if sy0 < sy1 and sx0 < sx1:
            canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = d.mask[
                sy0 - d.y0 : sy1 - d.y0, sx0 - d.x0 : sx1 - d.x0
            ]
        return canvas

    ma, mb = window(a), window(b)
    union = np.count_nonzero(ma | mb)
    return np.count_nonzero(ma & mb) / union if union else 0.0


def _paint_slice(
    detections: list[_Detection],
    tiles: list[tuple[int, int, int, int]],
    shape: tuple[int, int],
    link_iou: float,
) -> tuple[np.ndarray, int]:
    """Merge detections across tile borders and paint them (highest score first) into a label map."""
    groups = _DisjointSet(len(detections))
    if len(tiles) > 1:
        for i, a in enumerate(detections):
            for j in range(i + 1, len(detections)):
                b = detections[j]
                if a.tile == b.tile or a.y1 <= b.y0 or b.y1 <= a.y0 or a.x1 <= b.x0 or b.x1 <= a.x0:
                    continue
                if _shared_iou(a, b, tiles) >= link_iou:
                    groups.union(i, j)
    members: dict[int, list[_Detection]] = {}
    for i, d in enumerate(detections):
        members.setdefault(groups.find(i), []).append(d)
    labels = np.zeros(shape, dtype=np.int32)
    count = 0
    for group in sorted(members.values(), key=lambda g: -max(d.score for d in g)):
        y0, y1 = min(d.y0 for d in group), max(d.y1 for d in group)
        x0, x1 = min(d.x0 for d in group), max(d.x1 for d in group)
        mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for d in group:
            mask[d.y0 - y0 : d.y1 - y0, d.x0 - x0 : d.x1 - x0] |= d.mask
        region = labels[y0:y1, x0:x1]
        free = mask & (region == 0)
        if free.any():
            count += 1
            region[free] = count
    return labels, count


def _link_slices(label_slices: list[np.ndarray], counts: list[int], link_iou: float) -> np.ndarray:
    """Join 2D instances of neighbouring slices with mask IoU ≥ ``link_iou``; (D, H, W) labels 1..K."""
    offsets = np.cumsum([0] + counts)
    groups = _DisjointSet(int(offsets[-1]) + 1)
    for z in range(len(label_slices) - 1):
        a, b = label_slices[z], label_slices[z + 1]
        if counts[z] == 0 or counts[z + 1] == 0:
            continue
        both = (a > 0) & (b > 0)
        if not both.any():
            continue
        area_a = np.bincount(a.ravel(), minlength=counts[z] + 1)
        area_b = np.bincount(b.ravel(), minlength=counts[z + 1] + 1)
        pairs, inter = np.unique(a[both].astype(np.int64) * (counts[z + 1] + 1) + b[both], return_counts=True)
        for pair, overlap in zip(pairs, inter):
            la, lb = divmod(int(pair), counts[z + 1] + 1)
            if overlap / (area_a[la] + area_b[lb] - overlap) >= link_iou:
                groups.union(int(offsets[z]) + la, int(offsets[z + 1]) + lb)
    # consecutive ids in order of first appearance
    lookup = np.zeros(int(offsets[-1]) + 1, dtype=np.int64)
    roots: dict[int, int] = {}
    for global_id in range(1, int(offsets[-1]) + 1):
        root = groups.find(global_id)
        lookup[global_id] = roots.setdefault(root, len(roots) + 1)
    volume = np.zeros((len(label_slices), *label_slices[0].shape), dtype=np.int64)
    for z, labels in enumerate(label_slices):
        shifted = np.where(labels > 0, labels + offsets[z], 0)
        volume[z] = lookup[shifted]
    return volume


def predict_instances(
    model: nn.Module,
    image: Any,
    *,
    spatial_dims: int | None = None,
    slice_axis: int | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    tile_size: int | Sequence[int] | None = None,
    tile_overlap: float = 0.25,
    link_iou: float = 0.3,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: Any = False,
    progress: Callable[[int, int], None] | None = None,
    cancel: Any = None,
    roi_size: int | Sequence[int] | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    sw_device: str | torch.device | None = None,
    fast: bool = False,
    mode: str = "gaussian",
    tta_flips: Sequence[int] = (),
    output: str = "labels",
    out: Any = None,
) -> np.ndarray | torch.Tensor:
    """Instance label map of a 2D image or a 3D volume from a detection model.

    Args:
        model: a detection model in torchvision's convention (``MaskRCNN``); run in eval mode, without
            gradients, on its own device (or ``sw_device``).
        image: ``(H, W)``, ``(C, H, W)``, ``(N, C, H, W)`` images or ``(D, H, W)``, ``(C, D, H, W)``,
            ``(N, C, D, H, W)`` volumes (numpy or torch); any real dtype and intensity range.
        spatial_dims: 2 (image) or 3 (volume); ``None`` tells them apart as
            :func:`medsegkit.inference.predict` does (3 leading dims: channels if the first is 1 or the
            model's channel count, else a volume; a given ``slice_axis`` or 5 dims means a volume).
        slice_axis: for volumes, the spatial axis sliced along (default: the last, as ``predict``).
        score_threshold: detections with a lower score are ignored.
        mask_threshold: mask probability above which a pixel belongs to the instance.
        tile_size: detect in tiles of this size (int or ``(h, w)``) with ``tile_overlap``; ``None`` runs
            each image or slice whole. ``roi_size`` is accepted as its alias (``predict``'s name).
        tile_overlap: fractional overlap of neighbouring tiles in ``[0, 1)`` (``overlap`` is an alias).
        link_iou: mask IoU at or above which two detections are one object (across tile borders,
            measured inside the region both tiles saw; across neighbouring slices).
        batch_size: images (tiles/slices) per model call (``sw_batch_size`` is an alias).
        device: where a tensor result goes (default: the input's device).
        amp: autocast (``True``, ``"bf16"``, ``"fp16"``).
        progress: ``progress(done, total)`` after every model call.
        cancel: object with ``is_set()``; checked before every model call, raises
            :class:`medsegkit.Cancelled`.
        sw_device: device to run the model on (default: the model's).
        fast, mode: accepted for ``predict`` compatibility; detection output is not blended, so
            ``mode`` has no effect, and ``fast`` (a dense-model optimisation) is ignored with a log note.
        tta_flips: must be empty (test-time flips are not defined for instance maps).
        output: must be ``"labels"``.
        out: optional array of the result's shape to write into (returned).

    Returns:
        Labels ``(*spatial)`` (``(N, *spatial)`` for a batch), 0 = background, 1..K instances numbered in
        order of first appearance: numpy ``uint16`` (``int32`` beyond 65,535 instances) for numpy input,
        an ``int32`` tensor for tensor input.

    Raises:
        ValueError: bad shape, channels, NaN/Inf, thresholds or unsupported ``output`` / ``tta_flips``.
        medsegkit.Cancelled: ``cancel`` was set.
    """
    if output != "labels":
        raise ValueError(
            f"an instance model gives output='labels' only (an instance label map), got {output!r}"
        )
    if tuple(tta_flips):
        raise ValueError(
            "tta_flips is not supported for instance models (flipped detections are not blended)"
        )
    for name, value in (
        ("score_threshold", score_threshold),
        ("mask_threshold", mask_threshold),
        ("link_iou", link_iou),
    ):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    tile_size = tile_size if tile_size is not None else roi_size
    tile_overlap = float(overlap) if overlap is not None else float(tile_overlap)
    if not 0.0 <= tile_overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {tile_overlap!r}")
    batch_size = int(sw_batch_size) if sw_batch_size is not None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size!r}")
    if fast:
        logger.info("fast=True has no effect for instance (detection) models")

    torch_in = isinstance(image, torch.Tensor)
    if torch_in:
        if image.dtype == torch.bool or image.is_complex():
            raise ValueError(f"image dtype {image.dtype} is not accepted; give real numbers")
        out_device = torch.device(device) if device is not None else image.device
        array = image.detach().cpu().float().numpy()
    else:
        array = np.asarray(image)
        if array.dtype.kind not in "iuf":
            raise ValueError(
                f"image dtype {array.dtype} is not accepted; give real numbers (float or integer arrays)"
            )
        array = array.astype(np.float32, copy=False)
    if array.size == 0:
        raise ValueError(f"image is empty (shape {array.shape}); give an array with at least one pixel")
    if not np.isfinite(array).all():
        raise ValueError(
            "image contains NaN or Inf values; replace them (e.g. numpy.nan_to_num) before inference"
        )

    in_channels = int(getattr(model, "in_channels", 3))
    shape = tuple(array.shape)
    image_dims, leading = _layout(shape, spatial_dims, slice_axis, in_channels)
    has_batch = leading == 2
    if leading == 0:
        array = array[None]
    if not has_batch:
        array = array[None]
    channels = array.shape[1]
    if channels != in_channels:
        if channels == 1 and in_channels == 3:
            logger.info("the model takes 3 input channels; repeating the single image channel 3 times")
            array = np.repeat(array, 3, axis=1)
        else:
            raise ValueError(
                f"image has {channels} channel(s) (shape {shape}) but the model takes {in_channels}; give "
                f"(*spatial), (1, *spatial) or ({in_channels}, *spatial)"
            )
    if image_dims == 3:
        axis = 2 if slice_axis is None else int(slice_axis)
        if not -3 <= axis < 3:
            raise ValueError(f"slice_axis must be a spatial axis in [0, 3), got {slice_axis!r}")
        axis %= 3
    elif slice_axis is not None:
        raise ValueError(f"slice_axis is only for volumes; got a 2D image of shape {shape}")

    # (N, C, *spatial) -> per item: slices (S, C, H, W)
    items = []
    for item in array:
        item = _scale_to_unit(item)
        if image_dims == 3:
            item = np.moveaxis(item, 1 + axis, 0)  # (S, C, H, W)
        else:
            item = item[None]
        items.append(item)
    height, width = items[0].shape[-2:]
    tile_hw = (
        (height, width)
        if tile_size is None
        else (
            (int(tile_size),) * 2
            if isinstance(tile_size, (int, np.integer))
            else tuple(int(t) for t in tile_size)
        )
    )
    if len(tile_hw) != 2 or min(tile_hw) < 1:
        raise ValueError(f"tile_size must be a positive int or (h, w), got {tile_size!r}")
    tiles = [
        (y, min(y + tile_hw[0], height), x, min(x + tile_hw[1], width))
        for y in tile_starts(height, tile_hw[0], tile_overlap)
        for x in tile_starts(width, tile_hw[1], tile_overlap)
    ]
    units = [
        (n, s, t) for n, item in enumerate(items) for s in range(item.shape[0]) for t in range(len(tiles))
    ]
    detections: dict[tuple[int, int], list[_Detection]] = {}
    run_on = torch.device(sw_device) if sw_device is not None else next(model.parameters()).device
    total = -(-len(units) // batch_size)
    was_training = model.training
    model.eval()
    try:
        for done, start in enumerate(range(0, len(units), batch_size), start=1):
            if cancel is not None and cancel.is_set():
                raise Cancelled("instance prediction cancelled")
            batch = units[start : start + batch_size]
            inputs = []
            for n, s, t in batch:
                y0, y1, x0, x1 = tiles[t]
                inputs.append(torch.from_numpy(np.ascontiguousarray(items[n][s, :, y0:y1, x0:x1])).to(run_on))
            with torch.no_grad(), _autocast(run_on, amp):
                results = model(inputs)
            for (n, s, t), result in zip(batch, results):
                found = _detections_of(result, t, tiles[t][0], tiles[t][2], score_threshold, mask_threshold)
                detections.setdefault((n, s), []).extend(found)
            if progress is not None:
                progress(done, total)
    finally:
        model.train(was_training)

    results_per_item = []
    for n, item in enumerate(items):
        painted = [
            _paint_slice(detections.get((n, s), []), tiles, (height, width), link_iou)
            for s in range(item.shape[0])
        ]
        if image_dims == 2:
            labels = painted[0][0]
        else:
            labels = np.moveaxis(
                _link_slices([p[0] for p in painted], [p[1] for p in painted], link_iou), 0, axis
            )
        results_per_item.append(labels)
    labels = np.stack(results_per_item) if has_batch else results_per_item[0]
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.int32
    labels = labels.astype(np.int32 if torch_in else dtype)
    result: np.ndarray | torch.Tensor = torch.from_numpy(labels).to(out_device) if torch_in else labels
    if out is not None:
        if isinstance(out, (str, bytes, os.PathLike)) or not hasattr(out, "shape"):
            raise ValueError(
                f"out must be an array of the result's shape (numpy, memmap, zarr, tensor), got {type(out).__name__}; "
                "instance label maps are not written to paths"
            )
        if tuple(out.shape) != tuple(labels.shape):
            raise ValueError(f"out has shape {tuple(out.shape)} but the label map is {tuple(labels.shape)}")
        out[...] = (
            torch.from_numpy(labels).to(out.device, out.dtype) if isinstance(out, torch.Tensor) else labels
        )
        return out
    return result
