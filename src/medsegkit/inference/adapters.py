"""Inference for query (universal) models: MaskFormer, Mask2Former.

- :class:`SemanticAdapter` turns a query model into a semantic one: ``forward(x)`` returns per-class
  scores ``(N, K, *spatial)`` at the input size, so the sliding window of
  :func:`medsegkit.inference.predict` stitches them like any logits, and a MONAI bundle can use it as
  its network (``_target_: medsegkit.nets.SemanticAdapter``).
- :func:`predict_query` runs instance or panoptic segmentation window by window (the per-window rules of
  :mod:`medsegkit.postprocess`, which equal transformers') and merges each window's segments with the
  segments already found, by mask IoU in the region the windows share. Each voxel takes its label from
  the window in which it lies farthest from an inner window border. 2D and 3D alike.

``predict(model, image, task="instance" | "panoptic")`` calls :func:`predict_query` for models whose
``medsegkit_task`` is ``"universal"``; ``task="semantic"`` wraps them in :class:`SemanticAdapter`.
:func:`predict_query` is a consumer of the window engine (:mod:`medsegkit.inference.windows`): the grid,
the reading, the batches, progress, cancel and the network call are the engine's; merging is its own.
``fast=True`` is refused for query models (:func:`refuse_fast`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medsegkit._values import is_finite_number
from medsegkit.inference.windows import (
    WindowGrid,
    as_source,
    check_callbacks,
    check_device,
    check_sw_batch_size,
    iterate_windows,
    model_device,
    model_in_channels,
    model_spatial_dims,
    prepared_runner,
    registered_roi,
    resolve_overlap,
    resolve_roi,
    write_into,
)
from medsegkit.postprocess import instance_map, linear_interp_mode, panoptic_map, semantic_probabilities

__all__ = ["QUERY_TASKS", "SemanticAdapter", "predict_query", "refuse_fast"]

QUERY_TASKS = ("instance", "panoptic")
FAST_REFUSED = (
    "fast=True is not available for query models (MaskFormer / Mask2Former): its bf16 autocast changed "
    "{share} of a trained model's labels, more than the 0.5 % the fast path may change; run with fast=False"
)


def refuse_fast(model: nn.Module, fast: bool, task: str) -> None:
    """Raise ``ValueError`` for ``fast=True`` on a query model (any ``task``).

    Measured on tiny MaskFormer / Mask2Former trained on synthetic shapes (``docs/inference.md``):
    Mask2Former's semantic labels agreed on 98.4 % of pixels (less than the 99.5 % the fast path must
    keep), so the fast path is refused for every task of these models instead of degrading silently.
    """
    if fast:
        raise ValueError(FAST_REFUSED.format(share="up to 1.6 %") + f" (task={task!r}, {type(model).__name__})")


class SemanticAdapter(nn.Module):
    """A query model seen as a semantic model: ``(N, C, *spatial)`` → scores ``(N, K, *spatial)``.

    The scores are ``Σ_q softmax(class_q)[k] · sigmoid(mask_q)``, resized (bi/trilinear,
    ``align_corners=False``) from the mask resolution to the input size; their argmax is transformers'
    ``post_process_semantic_segmentation`` map at the input size. They are not logits: every value lies
    in ``[0, Q]``; normalise with ``scores / scores.sum(1)`` if class fractions are wanted.

    Args:
        model: a query model (``forward(x)`` → ``{"pred_logits": (N, Q, K+1), "pred_masks": (N, Q, *s)}``
            with attributes ``spatial_dims``, ``in_channels``, ``num_classes``), or a registry name.
        **overrides: arguments for :func:`medsegkit.create_model` when ``model`` is a name.

    Attributes:
        spatial_dims, in_channels: those of the wrapped model.
        out_channels: ``K``, the wrapped model's ``num_classes``.
    """

    medsegkit_task = "semantic"

    def __init__(self, model: nn.Module | str, **overrides: Any) -> None:
        super().__init__()
        if isinstance(model, str):
            from medsegkit.registry import create_model

            model = create_model(model, **overrides)
        elif overrides:
            raise TypeError(f"overrides {sorted(overrides)} are only accepted with a registry name, not a built model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or a registry name, got {type(model).__name__}")
        task = getattr(model, "medsegkit_task", None)
        missing = [a for a in ("spatial_dims", "in_channels", "num_classes") if not isinstance(getattr(model, a, None), int)]
        if task != "universal" or missing:
            raise TypeError(
                f"SemanticAdapter wraps query models (medsegkit_task 'universal' with int attributes spatial_dims, "
                f"in_channels, num_classes); {type(model).__name__} has medsegkit_task={task!r}"
                + (f" and lacks {missing}" if missing else "")
            )
        self.model = model
        self.spatial_dims = model.spatial_dims
        self.in_channels = model.in_channels
        self.out_channels = model.num_classes
        roi = registered_roi(model)
        if roi is not None:
            self.default_roi_size = roi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, *spatial)`` → per-class scores ``(N, K, *spatial)``."""
        outputs = self.model(x)
        scores = semantic_probabilities(outputs["pred_logits"], outputs["pred_masks"])
        if scores.shape[2:] != x.shape[2:]:
            mode = linear_interp_mode(x.ndim - 2)
            scores = F.interpolate(scores, size=x.shape[2:], mode=mode, align_corners=False)
        return scores


# --------------------------------------------------------------------------------------------------
class _Canvas:
    """Global label map of one image (padded coordinates) and the segments found so far."""

    def __init__(self, size: Sequence[int], device: torch.device, merge_iou: float) -> None:
        self.labels = torch.zeros(tuple(size), dtype=torch.int32, device=device)
        # how far (in voxels) each written voxel lay from an inner border of the window that wrote it;
        # half-voxel steps up to 1024 are exact in float16, which keeps the canvas at 6 bytes a voxel
        self.depth = torch.full(tuple(size), -1.0, dtype=torch.float16, device=device)
        self.size = tuple(size)
        self.merge_iou = merge_iou
        self.segments: dict[int, dict[str, Any]] = {}
        self.stuff: dict[int, int] = {}

    def window_depth(self, window: Sequence[slice]) -> torch.Tensor:
        """``(*roi)`` distance of each voxel to the window's nearest inner border (image edges do not count)."""
        depth = None
        for axis, (s, full) in enumerate(zip(window, self.size)):
            i = torch.arange(s.stop - s.start, dtype=torch.float16, device=self.depth.device) + 0.5
            far = torch.full_like(i, float("inf"))
            before = i if s.start > 0 else far
            after = (s.stop - s.start) - i if s.stop < full else far
            d = torch.minimum(before, after)
            d = d.reshape([-1 if a == axis else 1 for a in range(len(window))])
            depth = d if depth is None else torch.minimum(depth, d)
        return depth.expand(*(s.stop - s.start for s in window))

    def _match(self, mask: torch.Tensor, label: int, region: torch.Tensor, covered: torch.Tensor) -> int | None:
        seen = mask & covered
        if not bool(seen.any()):
            return None
        best, best_iou = None, self.merge_iou
        for gid in torch.unique(region[seen]).tolist():
            if gid == 0 or self.segments[gid]["label_id"] != label:
                continue
            other = (region == gid) & covered
            iou = float((seen & other).sum()) / float((seen | other).sum())
            if iou >= best_iou:
                best, best_iou = gid, iou
        return best

    def add_window(self, window: Sequence[slice], segments: list[dict[str, Any]]) -> None:
        """Merge one window's segments (``mask`` ``(*roi)`` bool, ``label_id``, ``score``, ``was_fused``)."""
        region = self.labels[tuple(window)]
        depth_now = self.depth[tuple(window)]
        covered = depth_now >= 0
        ids = torch.zeros_like(region)
        for seg in segments:
            label = seg["label_id"]
            gid = self.stuff.get(label) if seg["was_fused"] else self._match(seg["mask"], label, region, covered)
            if gid is None:
                gid = len(self.segments) + 1
                self.segments[gid] = {"label_id": label, "was_fused": seg["was_fused"], "score": seg["score"]}
                if seg["was_fused"]:
                    self.stuff[label] = gid
            else:
                self.segments[gid]["score"] = max(self.segments[gid]["score"], seg["score"])
            ids[seg["mask"]] = gid
        depth = self.window_depth(window)
        deeper = depth > depth_now
        region[deeper] = ids[deeper]
        depth_now[deeper] = depth[deeper]

    def result(self, crop: Sequence[slice]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Labels ``1..S`` in order of discovery (segments that kept no voxel dropped) and their info."""
        labels = self.labels[tuple(crop)]
        present = torch.unique(labels)
        present = present[present > 0]
        lookup = torch.zeros(len(self.segments) + 1, dtype=torch.int32, device=labels.device)
        lookup[present.long()] = torch.arange(1, present.numel() + 1, dtype=torch.int32, device=labels.device)
        info = [{"id": new, **self.segments[int(old)]} for new, old in enumerate(present.tolist(), start=1)]
        return lookup[labels], info


def _window_segments(seg: torch.Tensor, info: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Per-window postprocess result → segments with boolean masks (fused ones combined)."""
    by_id: dict[int, dict[str, Any]] = {}
    for entry in info:
        known = by_id.get(entry["id"])
        if known is None:
            by_id[entry["id"]] = {
                "label_id": entry["label_id"], "was_fused": entry["was_fused"], "score": entry["score"],
            }
        else:
            known["score"] = max(known["score"], entry["score"])
    segments = []
    for sid, entry in by_id.items():
        mask = seg == sid
        if bool(mask.any()):  # instances painted over by later ones vanish (transformers' rule)
            segments.append({"mask": mask, **entry})
    return segments


def predict_query(
    model: nn.Module,
    image: Any,
    *,
    task: str = "instance",
    roi_size: int | Sequence[int] | None = None,
    sw_batch_size: int = 4,
    overlap: float | Sequence[float] = 0.5,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Iterable[int] | None = None,
    merge_iou: float = 0.5,
    device: str | torch.device | None = None,
    sw_device: str | torch.device | None = None,
    amp: bool | str = False,
    fast: bool = False,
    cval: float = 0.0,
    return_segments: bool = False,
    out: Any = None,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Any = None,
    mode: str = "gaussian",
    tta_flips: Sequence[int] = (),
    slice_axis: int | None = None,
    output: str = "labels",
):
    """Instance or panoptic label map of an image, by sliding windows, for a query model.

    Each window of ``roi_size`` is segmented with :func:`medsegkit.postprocess.instance_map` or
    :func:`~medsegkit.postprocess.panoptic_map` (masks resized to the window size). A window's segment
    joins the already-found segment of the same class whose mask it overlaps best (IoU, within the part of
    the window that earlier windows covered, at least ``merge_iou``), else it becomes a new segment; fused
    (stuff) classes form one segment each. A voxel's label comes from the window in which it lies
    farthest from an inner window border.

    Args:
        model: a query model (``medsegkit_task == "universal"``), ``spatial_dims`` 2 or 3.
        image: ``(*spatial)``, ``(C, *spatial)`` or ``(N, C, *spatial)``: numpy, torch or lazy arrays
            (dask, zarr; read window by window) with the model's number of spatial dims.
        task: ``"instance"`` or ``"panoptic"``.
        roi_size: window size (int or one per axis; ``None``: the model's default; non-positive entries
            take the image size); an image smaller than a window is padded with ``cval``.
        sw_batch_size: windows per forward pass.
        overlap: overlap of neighbouring windows in ``[0, 1)``; segments are matched in the shared part.
        threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse: the per-window
            postprocessing arguments (the last two for panoptic only).
        merge_iou: minimum IoU for a window's segment to join an existing one.
        device: where the label map is stitched (default: the input tensor's device, CPU for arrays).
        sw_device: where windows run (default: the model's device).
        amp: as in :func:`medsegkit.inference.predict`.
        fast: must be ``False``: refused for query models (:func:`refuse_fast`).
        cval: padding value.
        return_segments: also return the segment table.
        out: an array of the result's shape to write into (numpy, memmap, zarr, tensor).
        progress: ``progress(done, total)`` after every window batch, ``total = N × ceil(windows / sw_batch_size)``.
        cancel: object with ``is_set()`` checked before every window batch; raises :class:`medsegkit.Cancelled`.
        mode, tta_flips, slice_axis, output: accepted because :func:`~medsegkit.inference.predict` passes
            them; windows are merged by segment, not blended, so ``mode`` has no effect, and only
            ``tta_flips=()``, ``slice_axis=None`` and ``output="labels"`` are supported.

    Returns:
        int32 labels ``(*spatial)`` or ``(N, *spatial)`` — ``0`` background, segments ``1..S`` — as a
        numpy array (tensor for tensor input; ``out`` when given). With ``return_segments=True``
        ``(labels, segments)``, ``segments`` one list per image (a flat list without a batch axis) of
        ``{"id", "label_id", "was_fused", "score"}``.

    Raises:
        ValueError: bad task, image layout, NaN/Inf, roi_size, overlap, ``fast=True`` or unsupported option.
        medsegkit.Cancelled: ``cancel`` was set.
    """
    if task not in QUERY_TASKS:
        raise ValueError(f"task must be 'instance' or 'panoptic' for predict_query, got {task!r}")
    if getattr(model, "medsegkit_task", None) != "universal":
        raise ValueError(
            f"predict_query needs a query model (medsegkit_task 'universal'), got {type(model).__name__} "
            f"with medsegkit_task={getattr(model, 'medsegkit_task', None)!r}"
        )
    if output != "labels":
        raise ValueError(f"task={task!r} gives label maps only; output must be 'labels', got {output!r}")
    if tta_flips is None or tuple(tta_flips):
        raise ValueError("tta_flips is not supported for instance / panoptic segmentation (segments cannot be averaged); "
                         f"give (), got {tta_flips!r}")
    check_sw_batch_size(sw_batch_size)
    if not (is_finite_number(merge_iou) and 0.0 <= merge_iou <= 1.0):  # True was 1.0, "0.5" a TypeError
        raise ValueError(f"merge_iou must be in [0, 1], got {merge_iou!r}")
    if not is_finite_number(cval):  # NaN padding went into the windows past the image's edge
        raise ValueError(f"cval must be a finite number (the value read outside the image), got {cval!r}")
    if isinstance(out, (str, bytes)) or hasattr(out, "__fspath__"):
        raise ValueError("out for instance / panoptic results must be an array of the result's shape, not a path")
    refuse_fast(model, fast, task)
    check_callbacks(progress, cancel)
    check_device("device", device)
    check_device("sw_device", sw_device)

    dims = model_spatial_dims(model)
    in_channels = model_in_channels(model)
    source, image_dims = as_source(image, dims, in_channels, slice_axis)
    if image_dims != dims or slice_axis is not None:
        raise ValueError(
            f"a {dims}D query model segments {dims}D images for task={task!r}; slice-by-slice instance "
            "segmentation of volumes is not supported (use a 3D model)"
        )
    try:
        overlaps = resolve_overlap(overlap, dims, dims, None)
    except ValueError:
        raise ValueError(f"overlap must be one float in [0, 1) or one per spatial axis ({dims}), got {overlap!r}") from None
    roi = resolve_roi(roi_size, model, dims, source.spatial, None)
    grid = WindowGrid(source.spatial, roi, overlaps)

    torch_in = source.kind == "torch"
    stitch = torch.device(device) if device is not None else (source.data.device if torch_in else torch.device("cpu"))
    run_on = torch.device(sw_device) if sw_device is not None else model_device(model)
    channels = in_channels or source.channels * source.repeat_channels

    def segments_of(outputs: dict[str, torch.Tensor], windows: int) -> list[list[dict[str, Any]]]:
        tensors = [outputs.get(key) if isinstance(outputs, dict) else None for key in ("pred_logits", "pred_masks")]
        if not all(isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == windows for t in tensors):
            given = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in outputs.items()} \
                if isinstance(outputs, dict) else type(outputs).__name__
            raise ValueError(f"a query model must return {{'pred_logits': (N, Q, K+1), 'pred_masks': (N, Q, *spatial)}} "
                             f"with N = {windows} windows; got {given}")
        outputs = {"pred_logits": tensors[0].float(), "pred_masks": tensors[1].float()}
        if task == "instance":
            maps = instance_map(outputs, threshold=threshold, mask_threshold=mask_threshold, target_size=roi)
        else:
            maps = panoptic_map(
                outputs, threshold=threshold, mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold, label_ids_to_fuse=label_ids_to_fuse,
                target_size=roi,
            )
        return [_window_segments(seg.to(stitch), info, task) for seg, info in maps]

    canvases = [_Canvas(grid.padded, stitch, merge_iou) for _ in range(source.batch)]
    # relayout=False: the query models' attention reshapes with .view(), which channels-last would break
    with prepared_runner(model, device=run_on, fast=False, amp=amp, example_shape=(1, channels, *roi),
                         relayout=False, call=_query_outputs) as runner:
        for batch in iterate_windows(source, grid, runner, batch_size=sw_batch_size, cval=cval, progress=progress,
                                     cancel=cancel):
            for window, segments in zip(batch.windows, segments_of(batch.output, len(batch.windows))):
                canvases[batch.n].add_window(window, segments)
    results, tables = zip(*(canvas.result(grid.crop) for canvas in canvases))

    labels = torch.stack(results) if source.has_batch else results[0]
    if not torch_in:
        labels = labels.cpu().numpy()
    if out is not None:
        labels = write_into(out, labels)
    if return_segments:
        return labels, list(tables) if source.has_batch else tables[0]
    return labels


def _query_outputs(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The query model's own outputs (``pred_logits``, ``pred_masks``) for a window batch."""
    return model(batch)
