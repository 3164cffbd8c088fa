"""Instance label maps from detection models (Mask R-CNN): 2D images, large 2D images in tiles, 3D volumes.

:func:`predict_instances` turns a model that follows torchvision's detection convention (a list of
``(C, H, W)`` images in [0, 1] in, ``{"boxes", "labels", "scores", "masks"}`` per image out) into a label
map: 0 = background, 1..K = instances.

- **2D**: one detection pass per image, or per tile (``roi_size``, ``overlap``) for large images.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import DisjointSet
from torch import nn

from medsegkit._values import is_finite_number
from medsegkit.inference.windows import (
    ImageSource,
    WindowGrid,
    as_source,
    check_callbacks,
    check_device,
    check_sw_batch_size,
    iterate_windows,
    model_device,
    model_in_channels,
    prepared_runner,
    resolve_overlap,
    resolve_roi,
    resolve_slice_axis,
    write_into,
)

__all__ = ["predict_instances"]

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


class _DetectorInput:
    """Batch transform: slices of a volume ``(B, C, *roi)`` (one voxel thick along ``slice_axis``) become
    ``(B, C, H, W)``, and intensities outside [0, 1] are min–max scaled to [0, 1] over the whole image
    ``n`` (not per slice or tile, so that slices and tiles see the same scale)."""

    def __init__(self, source: ImageSource, slice_axis: int | None) -> None:
        self.source, self.slice_axis = source, slice_axis
        self.ranges: dict[int, tuple[float, float]] = {}

    def __call__(self, n: int, batch: torch.Tensor) -> torch.Tensor:
        if self.slice_axis is not None:
            batch = batch.squeeze(2 + self.slice_axis)
        if n not in self.ranges:
            self.ranges[n] = self.source.value_range(n)
            low, high = self.ranges[n]
            if low < 0.0 or high > 1.0:
                logger.info("scaling intensities [%g, %g] to [0, 1] for the detection model", low, high)
        low, high = self.ranges[n]
        if low >= 0.0 and high <= 1.0:
            return batch
        if high == low:
            return torch.zeros_like(batch)
        return (batch - low) / (high - low)


def _detections_of(
    result: dict[str, torch.Tensor],
    tile: int,
    y0: int,
    x0: int,
    score_threshold: float,
    mask_threshold: float,
) -> list[_Detection]:
    scores, masks = (result.get(key) if isinstance(result, dict) else None for key in ("scores", "masks"))
    if not (isinstance(scores, torch.Tensor) and isinstance(masks, torch.Tensor) and scores.ndim == 1
            and masks.ndim == 4 and masks.shape[:2] == (scores.shape[0], 1)):
        given = sorted(result) if isinstance(result, dict) else type(result).__name__
        raise ValueError("a detection model must return one dict per image with 'scores' (n,) and 'masks' (n, 1, H, W) "
                         f"(torchvision's convention), got {given}")
    if not bool(torch.isfinite(scores).all()):  # NaN scores fail every threshold: an empty map, silently
        raise ValueError("the detection model returned NaN or Inf scores; the instance map would be meaningless")
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
    groups = DisjointSet(range(len(detections)))
    if len(tiles) > 1:
        for i, a in enumerate(detections):
            for j in range(i + 1, len(detections)):
                b = detections[j]
                if a.tile == b.tile or a.y1 <= b.y0 or b.y1 <= a.y0 or a.x1 <= b.x0 or b.x1 <= a.x0:
                    continue
                if _shared_iou(a, b, tiles) >= link_iou:
                    groups.merge(i, j)
    members: dict[int, list[_Detection]] = {}
    for i, d in enumerate(detections):
        members.setdefault(groups[i], []).append(d)
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
    groups = DisjointSet(range(int(offsets[-1]) + 1))
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
                groups.merge(int(offsets[z]) + la, int(offsets[z + 1]) + lb)
    # consecutive ids in order of first appearance
    lookup = np.zeros(int(offsets[-1]) + 1, dtype=np.int64)
    roots: dict[int, int] = {}
    for global_id in range(1, int(offsets[-1]) + 1):
        root = groups[global_id]
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
    roi_size: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    link_iou: float = 0.3,
    sw_batch_size: int = 4,
    device: str | torch.device | None = None,
    sw_device: str | torch.device | None = None,
    amp: Any = False,
    fast: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cancel: Any = None,
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
            ``(N, C, D, H, W)`` volumes (numpy, torch or lazy arrays); any real dtype and intensity range.
        spatial_dims: 2 (image) or 3 (volume); ``None`` tells them apart as
            :func:`medsegkit.inference.predict` does (3 leading dims: channels if the first is 1 or the
            model's channel count, else a volume; a given ``slice_axis`` or 5 dims means a volume).
        slice_axis: for volumes, the spatial axis sliced along (default: the last, as ``predict``).
        score_threshold: detections with a lower score are ignored.
        mask_threshold: mask probability above which a pixel belongs to the instance.
        roi_size: detect in tiles of this size (int or ``(h, w)``, clipped to the image) on the window
            engine's grid (:class:`~medsegkit.inference.windows.WindowGrid`); ``None`` runs each image or
            slice whole.
        overlap: fractional overlap of neighbouring tiles in ``[0, 1)``.
        link_iou: mask IoU at or above which two detections are one object (across tile borders,
            measured inside the region both tiles saw; across neighbouring slices).
        sw_batch_size: tiles / slices per model call.
        device: where a tensor result goes (default: the input's device).
        sw_device: device to run the model on (default: the model's).
        amp: autocast (``True``, ``"bf16"``, ``"fp16"``; :mod:`medsegkit.amp`'s one choice).
        fast, mode: accepted for ``predict`` compatibility; detection output is not blended, so
            ``mode`` has no effect, and ``fast`` (a dense-model optimisation) is ignored with a log note.
        progress: ``progress(done, total)`` after every model call, ``total = N × ceil(tiles / sw_batch_size)``.
        cancel: object with ``is_set()``; checked before every model call, raises
            :class:`medsegkit.Cancelled`.
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
    if tta_flips is None or tuple(tta_flips):
        raise ValueError(
            f"tta_flips is not supported for instance models (flipped detections are not blended); give (), got {tta_flips!r}"
        )
    for name, value in (
        ("score_threshold", score_threshold),
        ("mask_threshold", mask_threshold),
        ("link_iou", link_iou),
    ):
        if not (is_finite_number(value) and 0.0 <= value <= 1.0):  # True was taken as 1.0, "0.5" failed in the comparison
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    check_sw_batch_size(sw_batch_size)
    if fast:
        logger.info("fast=True has no effect for instance (detection) models")
    check_callbacks(progress, cancel)
    check_device("device", device)
    check_device("sw_device", sw_device)

    in_channels = model_in_channels(model) or 3
    source, image_dims = as_source(image, 2, in_channels, slice_axis, image_dims=spatial_dims)
    axis = resolve_slice_axis(slice_axis, 2, image_dims)
    # whole images / slices by default; tiles never larger than the image (no padding)
    roi = resolve_roi(0 if roi_size is None else roi_size, model, 2, source.spatial, axis)
    grid = WindowGrid(source.spatial, tuple(min(r, s) for r, s in zip(roi, source.spatial)),
                      resolve_overlap(overlap, 2, image_dims, axis))
    plane = [a for a in range(image_dims) if a != axis]  # the two axes of a slice
    height, width = (source.spatial[a] for a in plane)
    tiles = sorted({(w[plane[0]].start, w[plane[0]].stop, w[plane[1]].start, w[plane[1]].stop) for w in grid.slices})
    tile_index = {t: i for i, t in enumerate(tiles)}

    torch_in = source.kind == "torch"
    run_on = torch.device(sw_device) if sw_device is not None else model_device(model)
    detections: dict[tuple[int, int], list[_Detection]] = {}
    example = (1, in_channels, *(grid.roi[a] for a in plane))
    with prepared_runner(model, device=run_on, fast=False, amp=amp, example_shape=example, relayout=False,
                         call=_detect) as runner:
        for batch in iterate_windows(source, grid, runner, batch_size=int(sw_batch_size), transform=_DetectorInput(source, axis),
                                     progress=progress, cancel=cancel):
            if not isinstance(batch.output, (list, tuple)) or len(batch.output) != len(batch.windows):
                raise ValueError(
                    f"a detection model must return a list of one dict per image; for {len(batch.windows)} image(s) it "
                    f"returned {len(batch.output) if isinstance(batch.output, (list, tuple)) else type(batch.output).__name__}"
                )
            for window, result in zip(batch.windows, batch.output):
                tile = (window[plane[0]].start, window[plane[0]].stop, window[plane[1]].start, window[plane[1]].stop)
                found = _detections_of(result, tile_index[tile], tile[0], tile[2], score_threshold, mask_threshold)
                detections.setdefault((batch.n, 0 if axis is None else window[axis].start), []).extend(found)

    results_per_item = []
    slices = 1 if axis is None else source.spatial[axis]
    for n in range(source.batch):
        painted = [_paint_slice(detections.get((n, s), []), tiles, (height, width), link_iou) for s in range(slices)]
        if axis is None:
            labels = painted[0][0]
        else:
            labels = np.moveaxis(_link_slices([p[0] for p in painted], [p[1] for p in painted], link_iou), 0, axis)
        results_per_item.append(labels)
    labels = np.stack(results_per_item) if source.has_batch else results_per_item[0]
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.int32
    labels = labels.astype(np.int32 if torch_in else dtype)
    if out is not None:
        return write_into(out, labels)
    if torch_in:
        return torch.from_numpy(labels).to(torch.device(device) if device is not None else source.data.device)
    return labels


def _detect(module: nn.Module, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """A detection model's outputs for a batch ``(B, C, H, W)`` given as torchvision's list of images."""
    return module(list(batch))
