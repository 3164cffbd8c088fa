"""Interactive segmentation: progressive inference and correction by scribbles (Qt-free).

:class:`Session` holds one model and one image. :meth:`Session.run` segments the image window by window,
the region the user looks at first, and reports regions as they are finished; its final labels equal
:func:`medsegkit.inference.segment`'s exactly. :meth:`Session.refine` adapts a copy of the model to the
user's marks (a few seconds of fine-tuning of its last stage(s)), re-predicts the windows around the
marks and keeps the marked voxels at their marked class. :meth:`Session.undo`, :meth:`Session.reset`
and :meth:`Session.save` complete the loop. The napari widget and notebooks use this same class.

How the result stays exact: the session keeps every window's network output (``(K, *roi)`` float32 on
the preprocessed grid). A region is blended by :class:`medsegkit.inference.predict.SlabBlender` itself,
replaying the windows that cover it in the engine's slab order into chunks of the same shapes, so each
voxel sees the same floating-point operations in the same order as in :func:`segment`; only the order
in which the network runs the windows changes.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medsegkit.errors import Cancelled

__all__ = ["Session"]

# keyword arguments of segment() a session accepts (post-processing and output choices would break the
# equality with segment's labels or make no sense for an interactive label map)
SESSION_OPTIONS = ("preprocessing", "roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "cval",
                   "slice_axis", "tta_flips", "device", "amp")
ADAPTABLE_TASKS = ("semantic",)
RUNNABLE_TASKS = ("semantic", "universal")
DEFAULT_SECONDS = 2.0  # adaptation budget per refine (a 2 mm head round stays within ~5 s on 2 cores)
CROP = 48  # voxels an axis of the boxes the adaptation trains on
LEARNING_RATE = 3e-3  # weights: divided by sqrt(fan-in)
MAX_STEPS = 200
FIT_LOSS = 0.2  # stop adapting once the marked voxels' mean cross entropy is below this
MARGIN = 8  # preprocessed voxels around the marks whose windows are re-predicted
PREVIEW_THICKNESS = 16  # preprocessed voxels along the focus axis of run(preview=True)'s slab


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the ``True`` voxels of ``mask`` as slices (``None`` when there are none)."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _overlaps(a: Sequence[slice], b: Sequence[slice]) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters :meth:`Session.refine` adapts: the last decoder stage and the head of the U-Net family
    (``model.decoder.stages[-1]`` and ``model.head``), else the parameters of the last two modules (in
    registration order) that own parameters."""
    decoder, head = getattr(model, "decoder", None), getattr(model, "head", None)
    stages = getattr(decoder, "stages", None)
    if isinstance(head, nn.Module) and isinstance(stages, nn.ModuleList) and len(stages):
        chosen = [stages[-1], head]
    else:
        owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        chosen = owners[-2:]
    params = [p for m in chosen for p in m.parameters() if p.is_floating_point()]
    if not params:
        hint = ("; an exported network runs but cannot be adapted: refine with the PyTorch checkpoint it was "
                "exported from" if type(model).__name__ == "ExportedNetwork" else "")
        raise ValueError(f"{type(model).__name__} has no floating-point parameters to adapt{hint}")
    return params


class Session:
    """One model on one image: progressive :meth:`run`, :meth:`refine` by scribbles, :meth:`undo`,
    :meth:`reset`, :meth:`save`.

    Args:
        model_or_checkpoint: a model, a checkpoint path / URL or a registry name with weights (as for
            :func:`medsegkit.inference.segment`); the session works on a deep copy, the caller's model is
            never changed. Semantic models, and universal (query) models through their semantic output;
            :meth:`refine` adapts semantic models only.
        image: an :class:`~medsegkit.io.Image` ``(i, j, k)`` / ``(C, i, j, k)`` or a path to read.
        **segment_kwargs: ``preprocessing``, ``roi_size``, ``sw_batch_size``, ``overlap``, ``mode``,
            ``sigma_scale``, ``cval``, ``slice_axis`` (2D models on volumes: default the last axis),
            ``tta_flips``, ``device``, ``amp`` — as for :func:`segment`.

    Attributes:
        labels: the current label map on the image's grid (``(i, j, k)``, uint8 / int32), updated in place.
        marks: the accumulated scribbles (same shape, ``0`` = unmarked, ``c + 1`` = class ``c``).
        model: the session's (possibly adapted) copy of the model.
    """

    def __init__(self, model_or_checkpoint: nn.Module | str | os.PathLike, image: Any, **segment_kwargs: Any) -> None:
        from monai.data.utils import compute_importance_map

        from medsegkit.inference.predict import MirroredRunner, OutputWriter, mirror_flip_sets
        from medsegkit.inference.segment import preprocessing_for, resolve_model
        from medsegkit.inference.windows import (
            WindowGrid,
            as_source,
            check_overlap,
            model_in_channels,
            model_spatial_dims,
            resolve_overlap,
            resolve_roi,
            resolve_slice_axis,
        )
        from medsegkit.io import Image, read_image
        from medsegkit.transforms import NearestVoxelMap, preprocess

        unknown = sorted(set(segment_kwargs) - set(SESSION_OPTIONS))
        if unknown:
            raise TypeError(f"Session got unsupported option(s) {unknown}; it accepts {list(SESSION_OPTIONS)}")
        options = {"sw_batch_size": 4, "overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.125, "cval": 0.0,
                   "tta_flips": (), "amp": False, **segment_kwargs}
        if isinstance(image, (str, os.PathLike)):
            image = read_image(image)
        if not isinstance(image, Image):
            raise TypeError(f"image must be a medsegkit.io.Image or a path, got {type(image).__name__}")
        caller_model = resolve_model(model_or_checkpoint)
        task = getattr(caller_model, "medsegkit_task", "semantic")
        if task not in RUNNABLE_TASKS:
            raise ValueError(
                f"Session runs semantic models (refine adapts them) and universal models' semantic output; "
                f"{type(caller_model).__name__} is a {task!r} model"
            )
        self.task = task
        self.source_name = self._describe(model_or_checkpoint, caller_model)
        self.original = copy.deepcopy(caller_model).eval()
        self.model = copy.deepcopy(self.original)
        self.image = image
        sw_batch_size = options["sw_batch_size"]
        if not isinstance(sw_batch_size, (int, np.integer)) or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
        check_overlap(options["overlap"])
        if options["mode"] not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian' or 'constant', got {options['mode']!r}")
        self.options = options

        model_dims = model_spatial_dims(caller_model)
        if model_dims > image.spatial_ndim:
            raise ValueError(f"image is {image.spatial_ndim}D but {type(caller_model).__name__} is a {model_dims}D model")
        slice_axis = options.get("slice_axis")
        if model_dims == 2 and image.spatial_ndim == 3 and slice_axis is None:
            slice_axis = 2
        tensor, self.state = preprocess(image, preprocessing_for(caller_model, options.get("preprocessing")))
        self.batch = tensor.as_tensor()[None]  # (1, C, *spatial) on the preprocessed grid, as segment passes
        self.source, image_dims = as_source(self.batch, model_dims, model_in_channels(caller_model), slice_axis)
        self.slice_axis = resolve_slice_axis(slice_axis, model_dims, image_dims)
        roi = resolve_roi(options.get("roi_size"), caller_model, model_dims, self.source.spatial, self.slice_axis)
        self.grid = WindowGrid(self.source.spatial, roi,
                               resolve_overlap(options["overlap"], model_dims, image_dims, self.slice_axis))
        self.flip_sets = mirror_flip_sets(options["tta_flips"], roi)
        self.stitch = torch.device(options["device"]) if options.get("device") is not None else torch.device("cpu")
        self.weight = compute_importance_map(tuple(roi), mode=options["mode"], sigma_scale=options["sigma_scale"],
                                             device=self.stitch, dtype=torch.float32)
        self.blend_probabilities = len(self.flip_sets) > 1
        self.model_roi = tuple(r for i, r in enumerate(roi) if i != self.slice_axis)
        self._mirrored, self._output_class = MirroredRunner, OutputWriter

        # the chunks of the engine's slab blender and the windows touching each
        self.slab_order = self.grid.slab_order()
        self._scratch = OutputWriter(None, True, self.stitch)  # the blender writes a whole chunk here
        probe = self._blender()
        self.bounds = probe.bounds
        slab = self.grid.slab_axis
        self.chunk_windows = [
            [w for w in self.slab_order
             if self.grid.slices[w][slab].start < hi and lo < self.grid.slices[w][slab].stop]
            for lo, hi in zip(self.bounds[:-1], self.bounds[1:])
        ]

        # input voxel -> its nearest preprocessed voxel (what the nearest-neighbour inverse of labels reads)
        self.voxels = NearestVoxelMap(self.state)
        pre_shape = self.state.output_shape
        self.cache: dict[int, torch.Tensor] = {}  # window index -> its (K, *roi) output
        self.pre_labels: torch.Tensor | None = None  # labels on the preprocessed grid
        self.pre_done = np.zeros(pre_shape, dtype=bool)
        self.labels: np.ndarray | None = None
        self.reported = np.zeros(image.spatial_shape, dtype=bool)
        self.marks = np.zeros(image.spatial_shape, dtype=np.int32)
        self.rounds = 0
        self.previewing = False  # True while on_update reports run(preview=True)'s approximate slice
        self._history: list[dict[str, Any]] = []
        self._original_cache: dict[int, torch.Tensor] | None = None
        self._original_labels: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def _describe(given: Any, model: nn.Module) -> str:
        if isinstance(given, (str, os.PathLike)):
            return os.fspath(given)
        config = getattr(model, "medsegkit_config", None)
        if isinstance(config, Mapping) and "name" in config:
            return str(config["name"])
        return type(model).__name__

    def _net(self) -> nn.Module:
        if self.task == "universal":
            from medsegkit.inference.adapters import SemanticAdapter

            return SemanticAdapter(self.model)
        return self.model

    def _blender(self):
        from medsegkit.inference.predict import SlabBlender

        return SlabBlender(0, self.grid, self.slab_order, self.weight, "labels", self.blend_probabilities,
                            self.source, self._scratch)

    def _compute(self, windows: list[int], progress, cancel, done_before: int = 0, total: int | None = None,
                 after_batch: Callable[[], None] | None = None) -> None:
        """Run the network on ``windows`` (in this order) and store their outputs in :attr:`cache`."""
        from medsegkit.inference.windows import iterate_windows, model_device, prepared_runner

        if not windows:
            return
        net = self._net()
        size = self.options["sw_batch_size"]
        total = total if total is not None else math.ceil(len(windows) / size)
        channels = self.source.channels * self.source.repeat_channels
        example = (1, channels, *self.model_roi)
        with prepared_runner(net, device=model_device(net), fast=False, amp=self.options["amp"],
                             example_shape=example) as runner:
            forward = self._mirrored(runner, self.flip_sets, self.slice_axis, self.blend_probabilities, self.stitch)
            done = done_before

            def report(_done: int, _total: int) -> None:
                if progress is not None:
                    progress(done, total)

            for batch in iterate_windows(self.source, self.grid, forward, batch_size=size, order=windows,
                                         cval=self.options["cval"], progress=report, cancel=cancel):
                for index, output in zip(batch.indices, batch.output):
                    self.cache[index] = output.clone()
                done += 1
                if after_batch is not None:
                    after_batch()

    def _blend(self, windows: set[int], chunks: Sequence[int], boxes: Sequence[tuple[slice, ...]]) -> None:
        """Blend the cached ``windows`` (in slab order) into ``chunks`` and copy ``boxes`` (preprocessed
        coordinates, each covered only by ``windows``) into :attr:`pre_labels`."""
        blender = self._blender()
        with torch.inference_mode():
            for w in self.slab_order:
                if w in windows:
                    blender._accumulate(self.grid.slices[w], self.cache[w].permute(blender.to_slab_first))
            for r in sorted(set(chunks)):
                blender.finish_chunk(r)
            scratch = self._scratch.array[0]
            if self.pre_labels is None:
                self.pre_labels = torch.zeros_like(scratch)
            for box in boxes:
                self.pre_labels[box] = scratch[box]
                self.pre_done[box] = True

    def _chunk_box(self, r: int) -> tuple[slice, ...]:
        slab, before, size = self.grid.slab_axis, self.grid.pad_before[self.grid.slab_axis], self.source.spatial[self.grid.slab_axis]
        lo, hi = max(self.bounds[r], before) - before, min(self.bounds[r + 1], before + size) - before
        return tuple(slice(max(lo, 0), max(hi, 0)) if a == slab else slice(None) for a in range(len(self.source.spatial)))

    def _chunks_of(self, windows: set[int]) -> list[int]:
        return [r for r, ws in enumerate(self.chunk_windows) if any(w in windows for w in ws)]

    @property
    def inside(self) -> np.ndarray:
        """``(*input_shape)`` bool: the input voxels inside the preprocessed grid (outside: label 0)."""
        return self.voxels.inside

    def _gather(self, pre: torch.Tensor, where: np.ndarray | None = None) -> np.ndarray:
        """Labels on the preprocessed grid read at each input voxel's nearest preprocessed voxel, 0 outside
        the preprocessed grid: what ``restore(pre, is_label=True)`` gives (:class:`NearestVoxelMap`), for a
        fraction of its cost. The partial updates, the preview and refine use it. With ``where`` (bool, the
        input grid) only those voxels, as ``_gather(pre)[where]``."""
        return self.voxels.gather(pre.detach().cpu().numpy(), where)

    def _publish(self, on_update) -> None:
        """Bring the newly finished voxels' labels to the input grid (:meth:`_gather`), copy them into
        :attr:`labels` and call ``on_update(region, labels)``."""
        if self.labels is None:
            self.labels = np.zeros(self.image.spatial_shape, dtype=self.pre_labels.detach().cpu().numpy().dtype)
        finished = self.voxels.gather(self.pre_done, outside=True)  # outside the grid: 0, final at once
        new = finished & ~self.reported
        region = bounding_box(new)
        if region is None:
            return
        self.labels[new] = self._gather(self.pre_labels, new)
        self.reported |= new
        if on_update is not None:
            on_update(region, self.labels)

    def _focus_box(self, focus: Any) -> tuple[slice, ...]:
        """``focus`` (``{"axis": a, "index": i}`` or a tuple of slices on the input grid) as a box on the
        preprocessed grid (the preprocessed voxels the focus region reads)."""
        return self.voxels.pre_box(self._focus_region(focus))

    def _focus_region(self, focus: Any) -> tuple[slice, ...]:
        """``focus`` as a box (tuple of slices) on the input grid, checked."""
        shape = self.image.spatial_shape
        if isinstance(focus, Mapping):
            if set(focus) != {"axis", "index"}:
                raise ValueError(f"focus must be {{'axis': a, 'index': i}} or a tuple of slices, got {focus!r}")
            axis, index = int(focus["axis"]), int(focus["index"])
            if not 0 <= axis < len(shape) or not -shape[axis] <= index < shape[axis]:
                raise ValueError(f"focus slice {focus!r} is outside the image of shape {shape}")
            region = tuple(slice(index % shape[axis], index % shape[axis] + 1) if a == axis else slice(0, s)
                           for a, s in enumerate(shape))
        elif isinstance(focus, tuple) and len(focus) == len(shape) and all(isinstance(s, slice) for s in focus):
            region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(focus, shape))
            if any(s.stop <= s.start for s in region):
                raise ValueError(f"focus box {focus!r} is empty on the image of shape {shape}")
        else:
            raise ValueError(
                f"focus must be None, {{'axis': a, 'index': i}} or a tuple of {len(shape)} slices, got {focus!r}")
        return region

    def _preview(self, focus: Any, focus_box: tuple[slice, ...], on_update) -> bool:
        """Label the focus slice from one forward pass over a thin slab around it (``PREVIEW_THICKNESS``
        preprocessed voxels along the slice's axis, the whole extent along the others) and report it with
        ``on_update``; the exact labels replace it once the windows covering the focus have run.

        Only for models that take any input size (``size_multiple``: the U-Net family) on volumes, without
        TTA, and only when the slab is at most half the volume along that axis (else it would save little).
        Returns whether a preview was reported. It does not touch the windows' outputs or the finished
        regions, so the final labels stay exactly :func:`segment`'s.
        """
        multiple = getattr(self.model, "size_multiple", None)
        shape = tuple(self.state.output_shape)
        if (multiple is None or len(multiple) != len(shape) or self.slice_axis is not None or self.task != "semantic"
                or len(self.flip_sets) > 1 or self.source.repeat_channels != 1 or not isinstance(focus, Mapping)):
            return False
        lengths = [s.stop - s.start for s in focus_box]
        axis = int(np.argmin([n / size for n, size in zip(lengths, shape)]))
        step = int(multiple[axis])
        thickness = -(-max(PREVIEW_THICKNESS, lengths[axis]) // step) * step
        if 2 * thickness > shape[axis]:
            return False
        centre = (focus_box[axis].start + focus_box[axis].stop) // 2
        lo = min(max(centre - thickness // 2, 0), shape[axis] - thickness)
        slab = tuple(slice(lo, lo + thickness) if a == axis else slice(0, n) for a, n in enumerate(shape))
        x = self.batch[(slice(None), slice(None), *slab)].float()
        pads = [(-n) % int(m) for n, m in zip(x.shape[2:], multiple)]
        x = nn.functional.pad(x, [p for pad in reversed(pads) for p in (0, pad)], value=float(self.options["cval"]))
        from medsegkit.inference.windows import model_device

        net = self._net()
        with torch.inference_mode():
            y = net(x.to(model_device(net)))
        if not isinstance(y, torch.Tensor) or y.ndim != x.ndim:
            return False
        y = y[(0, slice(None), *[slice(0, n) for n in (s.stop - s.start for s in slab)])].to(self.stitch)
        labels = (y[0] > 0).to(torch.uint8) if y.shape[0] == 1 else y.argmax(0).to(
            torch.uint8 if y.shape[0] <= 256 else torch.int32)
        full = torch.zeros(shape, dtype=labels.dtype, device=self.stitch)
        full[slab] = labels
        restored = self._gather(full)
        region = self._focus_region(focus)
        if self.labels is None:
            self.labels = np.zeros(self.image.spatial_shape, dtype=restored.dtype)
        self.labels[region] = restored[region]
        self.previewing = True
        try:
            on_update(region, self.labels)
        finally:
            self.previewing = False
        return True

    def _windows_over(self, box: Sequence[slice]) -> list[int]:
        """Windows (slab order) overlapping ``box`` (preprocessed coordinates)."""
        padded = tuple(slice(s.start + b, s.stop + b) for s, b in zip(box, self.grid.pad_before))
        return [w for w in self.slab_order if _overlaps(self.grid.slices[w], padded)]

    # ------------------------------------------------------------------------------------------------
    def run(self, focus: Any = None, on_update: Callable[[tuple[slice, ...], np.ndarray], Any] | None = None,
            progress: Callable[[int, int], Any] | None = None, cancel: Any = None, preview: bool = False) -> np.ndarray:
        """Segment progressively; the windows the ``focus`` region needs run first.

        Args:
            focus: ``None``, ``{"axis": a, "index": i}`` (a slice of the input grid) or a tuple of slices
                (a box); its labels are finished (exactly) first.
            on_update: ``on_update(region, labels)`` each time voxels are finished: ``region`` is the
                bounding box (tuple of slices) of the voxels finished since the last call, ``labels`` the
                session's label map (``(i, j, k)``), updated in place.
            progress: ``progress(done, total)`` window batches.
            cancel: ``is_set()`` checked before each window batch; raises :class:`medsegkit.Cancelled`
                (the windows done so far are kept: a later ``run`` continues).
            preview: with a slice ``focus``, first report approximate labels of that slice from one
                forward pass over a thin slab around it (see :meth:`_preview`; :attr:`previewing` is
                ``True`` during that ``on_update`` call); the exact labels of the slice follow in the
                next call. For models that take any input size (the U-Net family); ignored otherwise.

        Returns:
            The label map on the input grid, equal to ``segment(model, image, **segment_kwargs)``.
        """
        focus_box = self._focus_box(focus) if focus is not None else None
        if self.labels is not None and self.pre_done.all():  # finished (and maybe refined) already
            if on_update is not None:
                on_update(tuple(slice(0, n) for n in self.labels.shape), self.labels)
            return self.labels
        focus_windows = self._windows_over(focus_box) if focus_box is not None else []
        order = focus_windows + [w for w in self.slab_order if w not in set(focus_windows)]
        todo = [w for w in order if w not in self.cache]
        state = {"focus": focus_box is not None and not self.pre_done[focus_box].all()}
        finished_chunks = {r for r, ws in enumerate(self.chunk_windows) if self.pre_done[self._chunk_box(r)].all()}

        def after_batch() -> None:
            if state["focus"] and all(w in self.cache for w in focus_windows):
                # the focus box alone first: every window covering it is done, so it is exact already
                self._blend(set(focus_windows), self._chunks_of(set(focus_windows)), [focus_box])
                self._publish(on_update)
                state["focus"] = False
            if state["focus"]:
                return  # the focus region is reported first
            windows: set[int] = set()
            chunks: list[int] = []
            boxes: list[tuple[slice, ...]] = []
            for r, ws in enumerate(self.chunk_windows):
                if r not in finished_chunks and all(w in self.cache for w in ws):
                    windows |= set(ws)
                    chunks.append(r)
                    boxes.append(self._chunk_box(r))
                    finished_chunks.add(r)
            if boxes:
                self._blend(windows, chunks, boxes)
                self._publish(on_update)

        if preview and state["focus"] and on_update is not None and todo:
            self._preview(focus, focus_box, on_update)
        size = self.options["sw_batch_size"]
        self._compute(todo, progress, cancel, total=math.ceil(len(todo) / size), after_batch=after_batch)
        after_batch()  # windows cached by a cancelled run still publish
        if not self.pre_done.all():  # pragma: no cover - every chunk's windows are computed above
            raise RuntimeError("internal error: some chunks were not finished")
        # every input voxel has now been published once its preprocessed voxel was final, through the voxel
        # map: what restore(pre_labels) gives, as segment does (the same nearest-neighbour inverse; tested),
        # without a second inverse; the preview's voxels were overwritten then
        if not self.reported.all():  # pragma: no cover - _publish above reports every finished voxel
            raise RuntimeError("internal error: some voxels were not published")
        if self._original_cache is None:
            self._original_cache = dict(self.cache)
            self._original_labels = self.labels.copy()
        self._force_marks()
        return self.labels

    # ------------------------------------------------------------------------------------------------
    def _force_marks(self) -> None:
        if not self.marks.any():  # marks are >= 0: a scan without a full-size temporary
            return
        marked = self.marks > 0
        self.labels[marked] = (self.marks[marked] - 1).astype(self.labels.dtype)

    def _classes(self) -> int:
        return int(next(iter(self.cache.values())).shape[0])

    @property
    def num_classes(self) -> int | None:
        """The number of classes of the label map (2 for a one-channel binary model); ``None`` before any
        window has run."""
        return max(self._classes(), 2) if self.cache else None

    def refine(self, scribbles: np.ndarray, seconds: float | None = None,
               progress: Callable[[int, int], Any] | None = None, cancel: Any = None) -> np.ndarray:
        """Adapt the model to the marks so far plus ``scribbles`` and re-predict the windows around them.

        Args:
            scribbles: integer array on the image grid (``image.spatial_shape``): ``0`` unmarked,
                ``c + 1`` = "this voxel is class ``c``" (so ``1`` marks background). Added to earlier marks
                (a new mark replaces an earlier one on the same voxel).
            seconds: wall-clock budget of the fine-tuning (default 2 s; at least one step is taken).
            progress: ``progress(done, 100)``: adaptation up to 70, re-prediction up to 100.
            cancel: ``is_set()`` checked between steps and window batches; raises
                :class:`medsegkit.Cancelled` and leaves the session as it was before the call.

        Returns:
            The new label map (``labels``, updated in place). Marked voxels have their marked class.

        Raises:
            ValueError: a universal (query) model (only semantic models are adapted), a wrong shape or a
                class outside ``[0, K)``.
        """
        if self.task not in ADAPTABLE_TASKS:
            raise ValueError(
                f"refine adapts semantic models only; {type(self.model).__name__} is a {self.task!r} model "
                f"(its run() works, but its query heads cannot be fine-tuned from scribbles)"
            )
        scribbles = np.asarray(scribbles)
        if scribbles.shape != tuple(self.image.spatial_shape) or scribbles.dtype.kind not in "iub":
            raise ValueError(
                f"scribbles must be an integer array of the image's shape {tuple(self.image.spatial_shape)} "
                f"(0 = unmarked, c + 1 = class c), got {scribbles.dtype} {scribbles.shape}"
            )
        if self.labels is None or not self.pre_done.all():
            self.run(cancel=cancel)
        classes = self._classes()
        top = max(classes, 2)
        if scribbles.min() < 0 or scribbles.max() > top:
            raise ValueError(f"scribbles values must be in [0, {top}] (0 = unmarked, c + 1 = class c < {top}), "
                             f"got values in [{scribbles.min()}, {scribbles.max()}]")
        new = scribbles > 0
        if not new.any():
            raise ValueError("scribbles mark no voxel; paint at least one voxel with c + 1 (class c)")
        budget = DEFAULT_SECONDS if seconds is None else float(seconds)
        if not budget > 0:
            raise ValueError(f"seconds must be > 0, got {seconds!r}")

        snapshot = {
            "labels": self.labels.copy(), "pre_labels": self.pre_labels.clone(), "cache": dict(self.cache),
            "marks": self.marks.copy(), "model": copy.deepcopy(self.model.state_dict()), "rounds": self.rounds,
        }
        try:
            self.marks[new] = scribbles[new].astype(np.int32)
            pre_marks = self._pre_marks()
            new_inside = new & self.inside  # marks outside the preprocessed grid only edit the labels
            if new_inside.any():
                new_pre, _ = self.voxels.pre_coordinates(new_inside)
                box = tuple(slice(max(int(c.min()) - MARGIN, 0), min(int(c.max()) + 1 + MARGIN, n))
                            for c, n in zip(new_pre, self.state.output_shape))
                windows = self._windows_over(box)
                self._adapt(pre_marks, budget, progress, cancel)
                size = self.options["sw_batch_size"]
                batches = math.ceil(len(windows) / size)

                def report(done: int, total: int) -> None:
                    if progress is not None:
                        progress(70 + (30 * done) // max(total, 1), 100)

                self._compute(windows, report, cancel, total=batches)
                chunks = self._chunks_of(set(windows))
                needed = {w for r in chunks for w in self.chunk_windows[r]}
                self._blend(needed, chunks, [self._chunk_box(r) for r in chunks])
                reach = self._reach(new_inside)
                self.labels[reach] = self._gather(self.pre_labels, reach)
            self._force_marks()
        except BaseException:
            self._apply(snapshot)
            raise
        self.rounds += 1
        self._history.append(snapshot)
        if progress is not None:
            progress(100, 100)
        return self.labels

    def _reach(self, new: np.ndarray) -> np.ndarray:
        """Input voxels within ``MARGIN`` preprocessed voxels (in mm) of this call's marks: the only
        voxels whose labels a refine changes (besides the marks themselves)."""
        from scipy import ndimage

        out_sizes = np.linalg.norm(self.state.output_affine[:3, :3], axis=0)[: len(self.state.output_shape)]
        in_sizes = np.linalg.norm(self.state.input_affine[:3, :3], axis=0)[: new.ndim]
        box = bounding_box(new)
        reach_mm = MARGIN * float(out_sizes.mean())
        grow = [int(math.ceil(reach_mm / size)) for size in in_sizes]
        local = tuple(slice(max(s.start - g, 0), min(s.stop + g, n)) for s, g, n in zip(box, grow, new.shape))
        mask = np.zeros(new.shape, bool)
        mask[local] = ndimage.distance_transform_edt(~new[local], sampling=in_sizes) <= reach_mm
        return mask

    def _pre_marks(self) -> torch.Tensor:
        """The accumulated marks on the preprocessed grid (each marked input voxel marks its nearest
        preprocessed voxel), int64 ``(*preprocessed)``, ``-1`` = unmarked."""
        target = np.full(self.state.output_shape, -1, dtype=np.int64)
        marked = (self.marks > 0) & self.inside  # marks outside the preprocessed grid stay label edits only
        target[self.voxels.pre_coordinates(marked)[0]] = self.marks[marked] - 1
        return torch.from_numpy(target)

    def _adapt(self, pre_marks: torch.Tensor, budget: float, progress, cancel) -> None:
        """Fine-tune :func:`trainable_parameters` for ``budget`` seconds on the windows holding marks: cross
        entropy on the marked voxels + KL divergence to the current prediction on the others."""
        model = self.model
        params = trainable_parameters(model)
        chosen = {id(p) for p in params}
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        padded_marks = torch.full(self.grid.padded, -1, dtype=torch.int64)
        padded_marks[self.grid.crop] = pre_marks
        windows = [w for w in self.slab_order if bool((padded_marks[self.grid.slices[w]] >= 0).any())]
        # at most 4 windows: those holding the most marks
        windows = sorted(windows, key=lambda w: -int((padded_marks[self.grid.slices[w]] >= 0).sum()))[:4]
        # train on a crop of each window around its marks (at most CROP voxels an axis: a fraction of the cost)
        crops = [self._crop(padded_marks[self.grid.slices[w]] >= 0) for w in windows]
        inputs = torch.stack([self.grid.read(self.source, 0, self.grid.slices[w], self.options["cval"])[(slice(None), *c)]
                              for w, c in zip(windows, crops)])
        targets = torch.stack([padded_marks[self.grid.slices[w]][c] for w, c in zip(windows, crops)])
        teacher = torch.stack([self.cache[w][(slice(None), *c)] for w, c in zip(windows, crops)]).float()
        if self.slice_axis is not None:
            inputs, targets, teacher = (t.squeeze(t.ndim - len(self.grid.roi) + self.slice_axis)
                                        for t in (inputs, targets, teacher))
        binary = teacher.shape[1] == 1
        if self.blend_probabilities:
            teacher_prob = teacher.clamp(1e-6, 1 - 1e-6)
        else:
            teacher_prob = torch.sigmoid(teacher) if binary else torch.softmax(teacher, dim=1)
        marked = targets >= 0
        # Adam moves every weight by about lr per step, which adds up over a layer's fan-in: lr / sqrt(fan-in)
        groups = [{"params": [q], "lr": LEARNING_RATE / math.sqrt(q[0].numel()) if q.ndim > 1 else LEARNING_RATE}
                  for q in params]
        optimizer = torch.optim.Adam(groups)
        was_training = [(m, m.training) for m in model.modules()]
        model.eval()  # normalisation statistics and dropout as at inference
        start, step = time.perf_counter(), 0
        try:
            forward = self._tail(model, inputs)
            with torch.enable_grad():
                while step < MAX_STEPS and (step == 0 or time.perf_counter() - start < budget):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"refine cancelled after {step} adaptation steps")
                    optimizer.zero_grad(set_to_none=True)
                    logits = forward()
                    if binary:
                        logp = nn.functional.logsigmoid(logits[:, 0])
                        lognp = nn.functional.logsigmoid(-logits[:, 0])
                        mark_loss = -(torch.where(targets == 1, logp, lognp))[marked].mean()
                        q = teacher_prob[:, 0]
                        agree = -(q * logp + (1 - q) * lognp)[~marked].mean()
                    else:
                        logp = torch.log_softmax(logits, dim=1)
                        mark_loss = nn.functional.nll_loss(logp, targets, ignore_index=-1)
                        agree = (-(teacher_prob * logp).sum(1))[~marked].mean()
                    if step >= 1 and float(mark_loss.detach()) < FIT_LOSS:
                        break  # the marks are fitted with confidence: more steps only risk the rest
                    loss = mark_loss + (agree if bool((~marked).any()) else 0.0)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    if progress is not None:
                        progress(min(69, int(70 * (time.perf_counter() - start) / budget)), 100)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in was_training:
                m.training = mode
        self.last_steps = step

    @staticmethod
    def _tail(model: nn.Module, inputs: torch.Tensor) -> Callable[[], torch.Tensor]:
        """A function giving the model's logits on ``inputs`` with gradients for the adapted parameters.
        For the U-Net family the frozen part runs once: its inputs to the last decoder stage are kept and
        each step runs only ``head(decoder.stages[-1](x, skip))``; other models run whole each step."""
        decoder, head = getattr(model, "decoder", None), getattr(model, "head", None)
        stages = getattr(decoder, "stages", None)
        if not (isinstance(head, nn.Module) and isinstance(stages, nn.ModuleList) and len(stages)
                and hasattr(model, "encoder") and hasattr(model, "bottleneck")):
            return lambda: model(inputs)
        captured: list[tuple] = []
        handle = stages[-1].register_forward_hook(lambda module, args, output: captured.append(args))
        try:
            with torch.no_grad():
                model(inputs)
        finally:
            handle.remove()
        args = tuple(a.detach() for a in captured[-1])
        return lambda: head(stages[-1](*args))

    def _crop(self, marked: torch.Tensor) -> tuple[slice, ...]:
        """A box of ``min(roi, CROP)`` voxels an axis inside a window, centred on its marked voxels
        (``marked``: bool ``(*roi)``)."""
        multiple = getattr(self.model, "size_multiple", None) or (1,) * len(self.model_roi)
        box, model_axis = [], 0
        for axis, size in enumerate(self.grid.roi):
            if axis == self.slice_axis:
                box.append(slice(0, size))
                continue
            step = int(multiple[model_axis]) if model_axis < len(multiple) else 1
            model_axis += 1
            length = min(size, max(step, CROP // step * step))
            hits = torch.nonzero(marked.any(dim=tuple(a for a in range(marked.ndim) if a != axis)))[:, 0]
            centre = int(hits.float().mean()) if len(hits) else size // 2
            start = min(max(centre - length // 2, 0), size - length)
            box.append(slice(start, start + length))
        return tuple(box)

    def _apply(self, snapshot: Mapping[str, Any]) -> None:
        self.labels[...] = snapshot["labels"]
        self.pre_labels = snapshot["pre_labels"].clone()
        self.cache = dict(snapshot["cache"])
        self.marks = snapshot["marks"].copy()
        self.model.load_state_dict(snapshot["model"])
        self.rounds = snapshot["rounds"]

    def undo(self) -> np.ndarray:
        """Go back to the labels, marks and model before the last :meth:`refine`."""
        if not self._history:
            raise ValueError("nothing to undo: no refine since the start or the last reset")
        self._apply(self._history.pop())
        return self.labels

    def reset(self) -> np.ndarray | None:
        """Back to the original model and its prediction; marks and undo history are cleared."""
        self.model = copy.deepcopy(self.original)
        self.marks[...] = 0
        self.rounds = 0
        self._history.clear()
        if self._original_cache is not None:
            self.cache = dict(self._original_cache)
            self.labels[...] = self._original_labels
            self._blend(set(self.cache), range(len(self.chunk_windows)),
                        [self._chunk_box(r) for r in range(len(self.chunk_windows))])
        return self.labels

    def save(self, path: str | os.PathLike) -> os.PathLike:
        """Write the (adapted) model as a checkpoint (atomically) with ``metadata["adapted_from"]``."""
        from medsegkit.weights import save_checkpoint

        metadata = dict(getattr(self.original, "medsegkit_metadata", None) or {})
        metadata["adapted_from"] = self.source_name
        metadata["interactive"] = {"rounds": self.rounds, "marked_voxels": int((self.marks > 0).sum())}
        return save_checkpoint(self.model, path, metadata=metadata)
