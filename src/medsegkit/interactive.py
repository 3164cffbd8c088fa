"""Interactive segmentation: progressive inference and correction by scribbles (Qt-free).

:class:`Session` holds one model and one image. :meth:`Session.run` segments the image window by window,
the region the user looks at first, and reports regions as they are finished; its final labels equal
:func:`medsegkit.inference.segment`'s exactly. :meth:`Session.refine` adapts a copy of the model to the
user's marks (it refits the model's output layer: one affine map of the logits, fitted to all the marks
so far with agreement to the original prediction everywhere else), re-predicts the volume and keeps the
marked voxels at their marked class. :meth:`Session.undo`, :meth:`Session.reset`
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsegkit._values import is_whole_number
from medsegkit.errors import Cancelled
from medsegkit.nets.layers.output_map import MappedOutput

__all__ = ["MappedOutput", "Session", "fit_calibration", "fold_affine", "map_generalises", "output_layer",
           "sweeping_losses"]

# keyword arguments of segment() a session accepts (post-processing and output choices would break the
# equality with segment's labels or make no sense for an interactive label map)
SESSION_OPTIONS = ("preprocessing", "roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "cval",
                   "slice_axis", "tta_flips", "device", "amp")
ADAPTABLE_TASKS = ("semantic",)
RUNNABLE_TASKS = ("semantic", "universal")
DEFAULT_SECONDS = 2.0  # bound on the output layer's fit per refine (it converges in well under a second)
MARK_WEIGHT = 550.0  # one marked voxel weighs as much as this many voxels' agreement with the original prediction
AGREEMENT_SAMPLE = 2**18  # unmarked preprocessed voxels the agreement term reads (a fixed random sample)
ITERATIONS_PER_STEP = 10  # L-BFGS iterations between the checks of cancel and the time budget
MAX_ITERATIONS = 200
CONVERGED = 1e-7  # stop once a step changes the loss by less than this
SCOPES = ("auto", "global", "local")  # where refine updates the labels (Session.refine)
MARGIN = 8  # preprocessed voxels (in mm) around the marks whose labels a local refine updates
UNSURE = 0.8  # auto's extrapolation updates voxels whose original top class probability is below this
FAR = 30  # preprocessed voxels (in mm): local / unsure refines give a voxel its nearest mark's class, if this near
MAX_CLASS_LOSS = 0.25  # an unsure refine takes no class's voxels beyond the marks' reach if it would take more than
# this share of that class's voxels there (a map fitted to marks of one class that sweeps away another)
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


def _check_cancel(cancel: Any) -> None:
    """Refuse a ``cancel`` that is neither ``None`` nor has an ``is_set()`` method."""
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise TypeError(f"cancel must be None or have an is_set() method (a threading.Event), "
                        f"got {type(cancel).__name__}")


def _overlaps(a: Sequence[slice], b: Sequence[slice]) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))


OUTPUT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _exported_hint(model: nn.Module) -> str:
    if type(model).__name__ != "ExportedNetwork":
        return ""
    return "; an exported network runs but cannot be adapted: refine with the PyTorch checkpoint it was exported from"


def output_layer(model: nn.Module, classes: int) -> tuple[str, nn.Module]:
    """The layer :meth:`Session.refine` adapts: the last convolution (``Conv*d``, ``ConvTranspose*d``) or
    ``Linear`` layer (in registration order) with ``classes`` outputs and no groups, as ``(name, module)``. The session checks
    once, on a window, that the model's output is that layer's output mapped linearly (upsampling and
    cropping after it are fine; an activation is not)."""
    found = None
    for name, module in model.named_modules():
        outputs = module.out_features if isinstance(module, nn.Linear) else getattr(module, "out_channels", None)
        if isinstance(module, OUTPUT_LAYERS) and outputs == classes and getattr(module, "groups", 1) == 1:
            found = (name, module)
    if found is None:
        raise ValueError(f"refine adapts a model's output layer, a convolution or linear layer with {classes} "
                         f"output channel(s); {type(model).__name__} has none{_exported_hint(model)}")
    return found


def fold_affine(layer: nn.Module, matrix: torch.Tensor, offset: torch.Tensor | None) -> None:
    """Make ``layer`` (a convolution or linear layer with ``K`` outputs) compute ``matrix @ y + offset``
    where it computed ``y``: its weight becomes ``matrix @ weight`` along the output axis (axis 0, axis 1
    of a transposed convolution's ``(in, K, ...)``) and its bias ``matrix @ bias + offset``. In place;
    ``offset`` must be ``None`` or zero when the layer has no bias."""
    with torch.no_grad():
        weight = layer.weight
        matrix = matrix.to(weight)
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            weight.copy_(torch.einsum("kj,ij...->ik...", matrix, weight))
        else:
            weight.copy_((matrix @ weight.reshape(weight.shape[0], -1)).reshape(weight.shape))
        if layer.bias is not None:
            layer.bias.copy_(matrix @ layer.bias + (0 if offset is None else offset.to(layer.bias)))
        elif offset is not None and bool(offset.any()):
            raise ValueError("the output layer has no bias: the calibration cannot have an offset")


def _two_class(scores: torch.Tensor) -> torch.Tensor:
    """``(1, N)`` binary logits as ``(2, N)`` two-class logits (``[0, z]``: softmax = sigmoid); ``(K, N)`` as is."""
    return torch.cat([torch.zeros_like(scores), scores]) if scores.shape[0] == 1 else scores


def _marked_logits(scores: torch.Tensor, marks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scores`` ``(K, *spatial)`` as float ``(K, N)``, the marked voxels (bool ``(N,)``) and their target
    classes (for ``K = 1``, binary: ``0`` / ``1``), from ``marks`` ``(*spatial)`` int64, ``-1`` = unmarked."""
    classes = scores.shape[0]
    targets = marks.reshape(-1)
    marked = targets >= 0
    truth = targets[marked] if classes > 1 else (targets[marked] > 0).long()
    return scores.reshape(classes, -1).float(), marked, truth


def fit_calibration(scores: torch.Tensor, marks: torch.Tensor, *, with_offset: bool = True,
                    mark_weight: float | None = None, sample: int = AGREEMENT_SAMPLE,
                    seconds: float = DEFAULT_SECONDS, cancel: Any = None,
                    progress: Callable[[float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The affine map of the logits, ``z -> matrix @ z + offset``, that fits the marks and agrees with the
    original prediction elsewhere.

    Minimises ``mark_weight / N * sum over marked voxels of CE(class) + agreement`` with L-BFGS (convex in
    the map: it converges to the one minimum), ``N`` the number of voxels. The agreement is the cross entropy
    against the original softmax over the unmarked voxels, **balanced over the classes**: the mean over the
    voxels the original model calls class ``c``, averaged over the classes it calls, so that every class's
    agreement counts the same however few voxels it has (a map fitted to marks of one class cannot take a
    small class's voxels for next to nothing). Each marked voxel weighs ``mark_weight`` voxels' agreement
    (default :data:`MARK_WEIGHT`), so a few marks move the boundaries a little and more marks move them more,
    everywhere at once. The agreement term reads a fixed random sample of at most ``sample`` unmarked voxels.

    Args:
        scores: ``(K, *spatial)`` float logits of the original model (``K = 1``: binary, sigmoid).
        marks: ``(*spatial)`` int64, the marked class, ``-1`` = unmarked.
        with_offset: fit ``offset`` too (``False`` when the output layer has no bias).
        seconds: time budget (at least one step of ``ITERATIONS_PER_STEP`` iterations runs).
        cancel: ``is_set()`` checked between steps; raises :class:`medsegkit.Cancelled`.
        progress: called with the fraction of the budget used.

    Returns:
        ``(matrix (K, K), offset (K,) or None, iterations)``.
    """
    classes = scores.shape[0]
    flat, marked, marked_targets = _marked_logits(scores, marks)
    if not bool(marked.any()):
        raise ValueError("fit_calibration needs at least one marked voxel")
    unmarked = torch.nonzero(~marked)[:, 0]
    if len(unmarked) > sample:
        generator = torch.Generator().manual_seed(0)
        unmarked = unmarked[torch.randperm(len(unmarked), generator=generator)[:sample]]
    marked_scores = flat[:, marked]
    agree_scores = flat[:, unmarked]
    teacher = torch.softmax(_two_class(agree_scores), dim=0)
    called = teacher.argmax(0)
    balance = (1.0 / torch.bincount(called, minlength=teacher.shape[0]).clamp(min=1).float())[called]
    balance = balance / balance.sum()  # per voxel: 1 / (its class's count x the number of classes called)
    matrix = torch.eye(classes, requires_grad=True)
    offset = torch.zeros(classes, 1, requires_grad=with_offset)
    weight = (MARK_WEIGHT if mark_weight is None else mark_weight) / flat.shape[1]
    optimizer = torch.optim.LBFGS([matrix, offset] if with_offset else [matrix], lr=1.0,
                                  max_iter=ITERATIONS_PER_STEP, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        fit = nn.functional.cross_entropy(_two_class(matrix @ marked_scores + offset).T, marked_targets,
                                          reduction="sum")
        agree = -(teacher * torch.log_softmax(_two_class(matrix @ agree_scores + offset), dim=0)).sum(0) @ balance
        loss = weight * fit + (agree if agree_scores.shape[1] else 0.0)
        loss.backward()
        return loss.detach()

    start, iterations, previous = time.perf_counter(), 0, math.inf
    with torch.enable_grad():
        while iterations < MAX_ITERATIONS:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"refine cancelled after {iterations} iterations of the output layer's fit")
            loss = float(optimizer.step(closure))
            iterations += ITERATIONS_PER_STEP
            if progress is not None:
                progress(min((time.perf_counter() - start) / seconds, 1.0))
            if abs(previous - loss) < CONVERGED or time.perf_counter() - start > seconds:
                break
            previous = loss
    return matrix.detach(), (offset.detach()[:, 0] if with_offset else None), iterations


def map_generalises(scores: torch.Tensor, marks: torch.Tensor, matrix: torch.Tensor,
                    offset: torch.Tensor | None) -> bool:
    """Whether an affine map of the logits fitted to *earlier* marks also helps on new ``marks`` it has not
    seen: it lowers their cross entropy and gets more of them right than the original logits (a map that only
    lowers the loss on marks it still gets wrong has not shown that it would have fixed them).

    Args:
        scores: ``(K, *spatial)`` original logits; marks: ``(*spatial)`` int64, ``-1`` = unmarked.
        matrix / offset: the map ``z -> matrix @ z + offset``.
    """
    flat, marked, truth = _marked_logits(scores, marks)
    z = flat[:, marked]
    mapped = matrix @ z + (0 if offset is None else offset[:, None])
    before, after = _two_class(z), _two_class(mapped)
    lower = float(nn.functional.cross_entropy(after.T, truth)) < float(nn.functional.cross_entropy(before.T, truth))
    right_before = int((before.argmax(0) == truth).sum())
    right_after = int((after.argmax(0) == truth).sum())
    return lower and right_after > right_before


def sweeping_losses(labels: np.ndarray, where: np.ndarray, predicted: np.ndarray, changing: np.ndarray,
                    share: float | None = None) -> np.ndarray:
    """The changes an unsure refine leaves out: those that would take more than ``share`` (default
    :data:`MAX_CLASS_LOSS`) of one class's voxels in ``labels`` away from it. From weak tissue models, a map
    fitted to two grey-matter balls turned 79 % of the voxels called CSF into grey matter in one round, far
    from any CSF mark; a small class lost most of its Dice (docs/interactive.md).

    Args:
        labels: ``(*spatial)`` the current labels; ``where``: bool ``(*spatial)``, the voxels considered.
        predicted: ``(where.sum(),)`` the adapted model's classes there, in ``where``'s order.
        changing: ``(where.sum(),)`` bool, the changes subject to the limit (those beyond the marks' reach).

    Returns:
        ``(where.sum(),)`` bool: the changes to leave out, every change away from each class that would lose
        more than ``share`` of its voxels (the whole class's changes, so no voxel is picked over another).
    """
    share = MAX_CLASS_LOSS if share is None else share
    current = labels[where]
    leaving = changing & (predicted != current)
    left_out = np.zeros_like(leaving)
    if not leaving.any():
        return left_out
    sizes = np.bincount(labels.ravel())  # every class's voxels, in one pass over the label map
    for cls in np.unique(current[leaving]):
        losing = leaving & (current == cls)
        if np.count_nonzero(losing) > share * sizes[cls]:
            left_out |= losing
    return left_out


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
        from medsegkit.inference.segment import preprocessing_for, resolve_model, resolve_tta_flips
        from medsegkit.inference.windows import (
            WindowGrid,
            as_source,
            check_window_options,
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
        # the checkpoint file the model came from: save() never writes over it
        given = Path(model_or_checkpoint).expanduser() if isinstance(model_or_checkpoint, (str, os.PathLike)) else None
        self._source_path = given if given is not None and given.exists() else None
        self.original = copy.deepcopy(caller_model).eval()
        self.model = copy.deepcopy(self.original)
        self.image = image
        check_window_options(**{key: options[key] for key in ("sw_batch_size", "overlap", "mode", "sigma_scale", "cval")})
        self.options = options

        model_dims = model_spatial_dims(caller_model)
        if model_dims > image.spatial_ndim:
            raise ValueError(f"image is {image.spatial_ndim}D but {type(caller_model).__name__} is a {model_dims}D model")
        slice_axis = options.get("slice_axis")
        if model_dims == 2 and image.spatial_ndim == 3 and slice_axis is None:
            slice_axis = 2
        spec = preprocessing_for(caller_model, options.get("preprocessing"))
        tensor, self.state = preprocess(image, spec)
        self.batch = tensor.as_tensor()[None]  # (1, C, *spatial) on the preprocessed grid, as segment passes
        options["tta_flips"] = resolve_tta_flips(options["tta_flips"], spec, self.batch.ndim - 2)
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
        self._scores: torch.Tensor | None = None  # the original windows blended as logits (refine fits to them)
        self._unsure_mask: np.ndarray | None = None  # input voxels the original model was unsure of (_unsure)
        self._output_layer: str | None = None  # the layer refine folds its map into, once checked ("": none)
        self.last_steps = 0  # L-BFGS iterations of the last refine's fit
        self.last_scope: str | None = None  # where the last refine updated the labels ("global" / "unsure" / "local" / None)
        self._fit: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the last refine's map of the logits

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
        return self._blender_for("labels", self._scratch)

    def _blender_for(self, output: str, writer: Any):
        from medsegkit.inference.predict import SlabBlender

        return SlabBlender(0, self.grid, self.slab_order, self.weight, output, self.blend_probabilities,
                           self.source, writer)

    def _compute(self, windows: list[int], progress, cancel, done_before: int = 0, total: int | None = None,
                 after_batch: Callable[[], None] | None = None, into: dict[int, torch.Tensor] | None = None) -> None:
        """Run the network on ``windows`` (in this order) and store their outputs in :attr:`cache` (or
        ``into``)."""
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
                    (self.cache if into is None else into)[index] = output.clone()
                done += 1
                if after_batch is not None:
                    after_batch()

    def _blend(self, windows: set[int], chunks: Sequence[int], boxes: Sequence[tuple[slice, ...]],
               outputs: Mapping[int, torch.Tensor] | None = None) -> None:
        """Blend the cached ``windows`` (in slab order; mapped by :meth:`_cache_map`), or those of ``outputs``
        as they are, into ``chunks`` and copy ``boxes`` (preprocessed coordinates, each covered only by
        ``windows``) into :attr:`pre_labels`."""
        mapping = self._cache_map() if outputs is None else None
        with torch.inference_mode():
            self._replay(self._blender(), windows, chunks, self.cache if outputs is None else outputs, mapping)
            scratch = self._scratch.array[0]
            if self.pre_labels is None:
                self.pre_labels = torch.zeros_like(scratch)
            for box in boxes:
                self.pre_labels[box] = scratch[box]
                self.pre_done[box] = True

    def _replay(self, blender: Any, windows: set[int], chunks: Iterable[int], outputs: Mapping[int, torch.Tensor],
                mapping: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
        """Feed ``outputs[w]`` of ``windows`` (in slab order; mapped by ``mapping``, an affine map of logits)
        to the engine's ``blender`` and finish ``chunks``."""
        for w in self.slab_order:
            if w in windows:
                output = outputs[w]
                if mapping is not None:
                    output = MappedOutput.map_logits(output[None], *mapping)[0]
                blender._accumulate(self.grid.slices[w], output.permute(blender.to_slab_first))
        for r in sorted(set(chunks)):
            blender.finish_chunk(r)

    def _cache_map(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The affine map :meth:`_blend` applies to the cached window outputs, which stay the original
        model's (one cache, whatever the number of refines and undo steps): the last refine's map when the
        cache holds logits; ``None`` with ``tta_flips``, whose averaged probabilities cannot be mapped
        (refine blends the adapted model's windows once, :meth:`_calibrate`, and keeps only the labels)."""
        return None if self.blend_probabilities else self._fit

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
        if on_update is not None:
            on_update(region, self.labels)
        self.reported |= new  # only once reported: a callback that raised gets this region again next run

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
            if not all(is_whole_number(focus[key]) for key in ("axis", "index")):
                raise ValueError(f"focus axis and index must be integers, got {focus!r}")
            axis, index = int(focus["axis"]), int(focus["index"])
            if not 0 <= axis < len(shape) or not -shape[axis] <= index < shape[axis]:
                raise ValueError(f"focus slice {focus!r} is outside the image of shape {shape}")
            region = tuple(slice(index % shape[axis], index % shape[axis] + 1) if a == axis else slice(0, s)
                           for a, s in enumerate(shape))
        elif isinstance(focus, tuple) and len(focus) == len(shape) and all(isinstance(s, slice) for s in focus):
            if not all(s.step in (None, 1) and all(b is None or is_whole_number(b) for b in (s.start, s.stop))
                       for s in focus):
                raise ValueError(f"focus box {focus!r} must be slices of integers (or None) without a step")
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
        _check_cancel(cancel)
        focus_box = self._focus_box(focus) if focus is not None else None
        if self.finished:  # (and maybe refined) already
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
        self._publish(on_update)  # and the voxels of an on_update call that raised are reported again
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
    def finished(self) -> bool:
        """Whether :meth:`run` has finished: :attr:`labels` holds the whole prediction (a cancelled or
        interrupted run is continued by the next :meth:`run`; :meth:`refine` runs it first)."""
        return self._original_cache is not None

    @property
    def num_classes(self) -> int | None:
        """The number of classes of the label map (2 for a one-channel binary model); ``None`` before any
        window has run."""
        return max(self._classes(), 2) if self.cache else None

    def refine(self, scribbles: np.ndarray, seconds: float | None = None,
               progress: Callable[[int, int], Any] | None = None, cancel: Any = None,
               scope: str = "auto") -> np.ndarray:
        """Adapt the model to the marks so far plus ``scribbles`` and re-predict the volume.

        The adaptation refits the model's output layer (:func:`output_layer`): one affine map of its
        logits, ``z -> A z + b`` (``K x K`` + ``K`` numbers), fitted by :func:`fit_calibration` to all the
        marks so far, starting from the original model each time, with agreement to the original prediction
        on the other voxels; it is folded into a copy of the original model (:attr:`model`, what
        :meth:`save` writes). The map applies to every voxel, so a few marks correct the same kind of
        error everywhere. Re-predicting needs no network run: the kept window outputs are mapped and
        blended again (with ``tta_flips`` the windows are run again, since their probabilities were
        averaged).

        Where the labels change (``scope``): ``"global"``, wherever the adapted model's prediction changes
        (the same kind of error is corrected everywhere); ``"local"``, only within 8 preprocessed voxels
        (in mm) of this call's marks, for errors specific to one place (marking one of two identical-looking
        objects background makes the global map call both background); ``"auto"`` (default), local until the
        marks confirm that the map generalises (:func:`map_generalises`: the map fitted at the previous
        refine, which has not seen this call's marks, moves them toward their class and gets more of them
        right than the original model), and then ``"unsure"``: near the marks as local, and elsewhere only
        where the original model was unsure (top class probability below ``UNSURE`` = 0.8), so that a map
        fitted to a few marks does not overrule confident predictions far from them. The first refine is
        always local. Local and unsure give a voxel a new class only if its nearest mark (in mm, any round)
        has that class and lies within ``FAR`` = 30 preprocessed voxels: next to a mark the labels move
        toward the mark's class, never away from it, and the map's reach stays regional (an error that
        changes sign from one part of the image to another, a brain mask too large at the vertex and too
        small at the base, is corrected in each part by the marks there). Beyond this call's reach, an unsure
        refine takes no voxels from a class if it would take more than ``MAX_CLASS_LOSS`` = 25 % of that
        class's voxels (:func:`sweeping_losses`). :attr:`last_scope` says which one ran (``"global"``,
        ``"unsure"`` or ``"local"``).

        Args:
            scribbles: integer array on the image grid (``image.spatial_shape``): ``0`` unmarked,
                ``c + 1`` = "this voxel is class ``c``" (so ``1`` marks background). Added to earlier marks
                (a new mark replaces an earlier one on the same voxel).
            seconds: wall-clock budget of the output layer's fit (default 2 s; at least one L-BFGS step of
                10 iterations runs; it usually converges in well under a second).
            progress: ``progress(done, 100)``: adaptation up to 70, re-prediction up to 100.
            cancel: ``is_set()`` checked between fitting steps and window batches; raises
                :class:`medsegkit.Cancelled` and leaves the session as it was before the call.
            scope: ``"auto"`` (default), ``"global"`` or ``"local"``: where the labels are updated (above).

        Returns:
            The new label map (``labels``, updated in place). Marked voxels have their marked class.

        Raises:
            ValueError: a universal (query) model (only semantic models are adapted), a model that does not
                return one ``(B, K, ...)`` logits tensor, a wrong shape or a class outside ``[0, K)``, or an
                unknown ``scope``.
        """
        if self.task not in ADAPTABLE_TASKS:
            raise ValueError(
                f"refine adapts semantic models only; {type(self.model).__name__} is a {self.task!r} model "
                f"(its run() works, but its query heads cannot be fine-tuned from scribbles)"
            )
        scribbles = np.asarray(scribbles)
        if scribbles.shape != tuple(self.image.spatial_shape) or scribbles.dtype.kind not in "iu":
            boolean = (" (a boolean mask does not say which class it marks: write c + 1 where the voxels are "
                       "class c)" if scribbles.dtype.kind == "b" else "")
            raise ValueError(
                f"scribbles must be an integer array of the image's shape {tuple(self.image.spatial_shape)} "
                f"(0 = unmarked, c + 1 = class c), got {scribbles.dtype} {scribbles.shape}{boolean}"
            )
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
        _check_cancel(cancel)
        number = isinstance(seconds, (int, float, np.integer, np.floating)) and not isinstance(seconds, (bool, np.bool_))
        budget = DEFAULT_SECONDS if seconds is None else float(seconds) if number else math.nan
        if not budget > 0:
            raise ValueError(f"seconds must be a number > 0, got {seconds!r}")
        new = scribbles > 0
        if not new.any():
            raise ValueError("scribbles mark no voxel; paint at least one voxel with c + 1 (class c)")
        if scribbles.min() < 0:
            raise ValueError(f"scribbles values must be >= 0 (0 = unmarked, c + 1 = class c), got {scribbles.min()}")
        if not self.finished:
            self.run(cancel=cancel)  # the model's class count is known once a window has run
        top = max(self._classes(), 2)
        if scribbles.max() > top:
            raise ValueError(f"scribbles values must be in [0, {top}] (0 = unmarked, c + 1 = class c < {top}), "
                             f"got values in [{scribbles.min()}, {scribbles.max()}]")

        marked = np.flatnonzero(new)
        snapshot = {  # no window outputs (the cache stays the original model's, _cache_map), no model (its map
            # rebuilds it) and, once the round is done, only the voxels it changed (_keep_changes)
            "marked": marked, "marks_before": self.marks.reshape(-1)[marked], "rounds": self.rounds,
            "fit": self._fit,
        }
        model, labels_before, pre_before = self.model, self.labels.copy(), self.pre_labels.clone()
        last = self.last_scope, self.last_steps
        self.last_scope = None  # stays None when the marks only edit labels outside the preprocessed grid
        try:
            self.marks[new] = scribbles[new].astype(np.int32)
            pre_marks = self._pre_marks()
            if bool((pre_marks >= 0).any()):  # marks outside the preprocessed grid only edit the labels
                previous_fit = self._fit
                self._calibrate(pre_marks, budget, progress, cancel)
                if scope == "auto":
                    scope = "local"
                    new_pre = self._pre_marks(new)
                    if previous_fit is not None and bool((new_pre >= 0).any()):
                        scope = "unsure" if map_generalises(self._original_scores(), new_pre, *previous_fit) else "local"
                if scope == "global":
                    self.labels[...] = self._gather(self.pre_labels)
                else:
                    reach = self._reach(new & self.inside)
                    update = reach | self._unsure() if scope == "unsure" else reach  # local: reach is not read again
                    predicted = self._gather(self.pre_labels, update)
                    nearest, distance = self._nearest_mark(update)
                    toward_mark = (predicted == nearest) & (distance <= FAR * self._preprocessed_mm)
                    if scope == "unsure":
                        toward_mark &= ~sweeping_losses(self.labels, update, predicted, toward_mark & ~reach[update])
                    update[update] = toward_mark
                    self.labels[update] = predicted[toward_mark]
                self.last_scope = scope
            self._force_marks()
            if progress is not None:  # within the try: a progress that raises leaves the session as it was
                progress(100, 100)
        except BaseException:
            self._apply(snapshot, model, labels_before, pre_before)
            self.last_scope, self.last_steps = last
            raise
        self._keep_changes(snapshot, labels_before, pre_before)
        self.rounds += 1
        self._history.append(snapshot)
        return self.labels

    @property
    def _input_mm(self) -> np.ndarray:
        """The input grid's voxel sizes in mm, ``(ndim,)``."""
        return np.linalg.norm(self.state.input_affine[:3, :3], axis=0)[: self.marks.ndim]

    @property
    def _preprocessed_mm(self) -> float:
        """The preprocessed grid's mean voxel size in mm: the unit of ``MARGIN`` and ``FAR``."""
        return float(np.linalg.norm(self.state.output_affine[:3, :3], axis=0)[: len(self.state.output_shape)].mean())

    def _nearest_mark(self, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each voxel of ``where`` (bool, the input grid), in ``where``'s order: the class of the nearest
        marked voxel and its distance in mm, two ``(where.sum(),)`` arrays."""
        from scipy.spatial import cKDTree

        marked = np.argwhere(self.marks > 0)
        distance, nearest = cKDTree(marked * self._input_mm).query(np.argwhere(where) * self._input_mm)
        return self.marks[tuple(marked[nearest].T)] - 1, distance

    def _unsure(self) -> np.ndarray:
        """``(*input_shape)`` bool: the input voxels whose original top class probability (softmax of the
        original logits, :meth:`_original_scores`) is below ``UNSURE``, where auto's extrapolation applies."""
        if self._unsure_mask is None:
            top = torch.softmax(_two_class(self._original_scores()), dim=0).max(0).values
            self._unsure_mask = self._gather(top < UNSURE) & self.inside
        return self._unsure_mask

    def _reach(self, new: np.ndarray) -> np.ndarray:
        """Input voxels within ``MARGIN`` preprocessed voxels (in mm) of this call's marks: the only
        voxels whose labels a ``scope="local"`` refine changes (besides the marks themselves)."""
        from scipy import ndimage

        in_sizes = self._input_mm
        box = bounding_box(new)
        reach_mm = MARGIN * self._preprocessed_mm
        grow = [int(math.ceil(reach_mm / size)) for size in in_sizes]
        local = tuple(slice(max(s.start - g, 0), min(s.stop + g, n)) for s, g, n in zip(box, grow, new.shape))
        mask = np.zeros(new.shape, bool)
        mask[local] = ndimage.distance_transform_edt(~new[local], sampling=in_sizes) <= reach_mm
        return mask

    def _pre_marks(self, only: np.ndarray | None = None) -> torch.Tensor:
        """The accumulated marks on the preprocessed grid (each marked input voxel marks its nearest
        preprocessed voxel), int64 ``(*preprocessed)``, ``-1`` = unmarked; with ``only`` (bool, the input
        grid), only those voxels' marks."""
        target = np.full(self.state.output_shape, -1, dtype=np.int64)
        marked = (self.marks > 0) & self.inside  # marks outside the preprocessed grid stay label edits only
        if only is not None:
            marked &= only
        target[self.voxels.pre_coordinates(marked)[0]] = self.marks[marked] - 1
        return torch.from_numpy(target)

    def _original_scores(self) -> torch.Tensor:
        """``(K, *preprocessed)`` float32: the original model's windows blended by the engine's blender as
        logits (with ``tta_flips``: the log of the blended probabilities); computed once."""
        if self._scores is None:
            writer = self._output_class(None, True, self.stitch)
            with torch.inference_mode():
                self._replay(self._blender_for("logits", writer), set(self.slab_order), range(len(self.chunk_windows)),
                             self._original_cache)
            scores = writer.array[0].float()
            if self.blend_probabilities:  # averaged probabilities -> logits
                p = scores.clamp(1e-6, 1 - 1e-6)
                scores = torch.log(p) - torch.log1p(-p) if scores.shape[0] == 1 else torch.log(p)
            self._scores = scores.cpu()
        return self._scores

    def _foldable_layer(self) -> str | None:
        """The name of :func:`output_layer` when the model's output is that layer's output mapped linearly,
        else ``None`` (refine then appends the map, :class:`MappedOutput`). Checked once, on a window:
        mapping that layer's output by a random affine map must map the model's output the same way."""
        from medsegkit.inference.windows import model_device

        if self._output_layer is not None:
            return self._output_layer or None
        classes = self._classes()
        w = self.slab_order[0]
        x = self.grid.read(self.source, 0, self.grid.slices[w], self.options["cval"])[None]
        if self.slice_axis is not None:
            x = x.squeeze(2 + self.slice_axis)
        if not any(p.is_floating_point() for p in self.original.parameters()):
            raise ValueError(f"{type(self.original).__name__} has no floating-point parameters to adapt"
                             f"{_exported_hint(self.original)}")
        device = model_device(self.original)
        with torch.no_grad():
            base = self.original(x.to(device))
        if not (isinstance(base, torch.Tensor) and base.ndim >= 2 and base.shape[1] == classes):
            raise ValueError(f"refine adapts models that return one (B, {classes}, ...) logits tensor; "
                             f"{type(self.original).__name__} returned {type(base).__name__}")
        self._output_layer = ""
        try:
            name, layer = output_layer(self.original, classes)
        except ValueError:
            return None
        generator = torch.Generator().manual_seed(0)
        matrix = torch.eye(classes) + 0.1 * torch.randn(classes, classes, generator=generator)
        offset = 0.1 * torch.randn(classes, generator=generator) if layer.bias is not None else None
        folded = copy.deepcopy(self.original)
        fold_affine(dict(folded.named_modules())[name], matrix, offset)
        with torch.no_grad():
            mapped = folded(x.to(device))
        expected = MappedOutput.map_logits(base, matrix, offset)
        scale = float(base.abs().max()) + 1.0
        if isinstance(mapped, torch.Tensor) and torch.allclose(mapped, expected, rtol=0, atol=1e-4 * scale):
            self._output_layer = name
        return self._output_layer or None

    def _calibrate(self, pre_marks: torch.Tensor, budget: float, progress, cancel) -> None:
        """Fit the output layer's affine map to ``pre_marks`` (all marks, on the preprocessed grid), fold it
        into a copy of the original model (:attr:`model`), and bring :attr:`pre_labels` up to date (the
        kept window outputs mapped, or with ``tta_flips`` the adapted model's windows run)."""
        scores = self._original_scores()  # finite: the window runner refuses NaN / Inf outputs
        name = self._foldable_layer()
        with_offset = name is None or dict(self.original.named_modules())[name].bias is not None

        def fit_progress(fraction: float) -> None:
            if progress is not None:
                progress(min(69, int(70 * fraction)), 100)

        matrix, offset, self.last_steps = fit_calibration(
            scores, pre_marks, with_offset=with_offset, seconds=budget, cancel=cancel,
            progress=fit_progress)
        self._fit = (matrix, offset)
        if cancel is not None and cancel.is_set():  # set during the last step of the fit
            raise Cancelled(f"refine cancelled after {self.last_steps} iterations of the output layer's fit")
        model = self._adapted_model(self._fit)
        if not self.blend_probabilities:  # logits: _blend maps each kept window output (blending is linear)
            self.model = model
            self._blend_all()
            return
        # probabilities of mirrored windows were averaged: run the adapted model's windows, blend them once
        everything, adapted = list(self.slab_order), {}
        previous = self.model
        self.model = model
        try:
            size = self.options["sw_batch_size"]

            def report(done: int, total: int) -> None:
                if progress is not None:
                    progress(70 + (30 * done) // max(total, 1), 100)

            self._compute(everything, report, cancel, total=math.ceil(len(everything) / size), into=adapted)
        except BaseException:
            self.model = previous
            raise
        self._blend_all(adapted)

    def _blend_all(self, outputs: Mapping[int, torch.Tensor] | None = None) -> None:
        """Blend every window (:attr:`cache`, or ``outputs``: :meth:`_blend`) into :attr:`pre_labels` (the
        whole preprocessed grid)."""
        chunks = range(len(self.chunk_windows))
        self._blend(set(self.slab_order), chunks, [self._chunk_box(r) for r in chunks], outputs)

    def _adapted_model(self, fit: tuple[torch.Tensor, torch.Tensor | None] | None) -> nn.Module:
        """A copy of the original model with the map ``fit`` folded into its output layer, or appended
        (:class:`MappedOutput`) where that layer cannot absorb it; ``None``: the original's copy."""
        model = copy.deepcopy(self.original)
        if fit is None:
            return model
        name = self._foldable_layer()
        if name is None:  # e.g. a residual unit after the last layer (MONAI's UNet with num_res_units > 0)
            return MappedOutput(model, *fit)
        fold_affine(dict(model.named_modules())[name], *fit)
        return model

    def _keep_changes(self, snapshot: dict[str, Any], labels_before: np.ndarray, pre_before: torch.Tensor) -> None:
        """Record in ``snapshot`` the voxels this refine changed and their earlier labels (input and
        preprocessed grids), what :meth:`undo` writes back."""
        changed = np.flatnonzero(self.labels != labels_before)
        snapshot["labels_changed"], snapshot["labels_before"] = changed, labels_before.reshape(-1)[changed]
        pre_changed = torch.nonzero(self.pre_labels != pre_before, as_tuple=True)  # whatever the strides
        snapshot["pre_changed"], snapshot["pre_before"] = pre_changed, pre_before[pre_changed]

    def _apply(self, snapshot: Mapping[str, Any], model: nn.Module | None = None, labels: np.ndarray | None = None,
               pre_labels: torch.Tensor | None = None) -> None:
        """Back to ``snapshot``'s state: its model is ``model``, or rebuilt from its map; its labels are
        ``labels`` / ``pre_labels`` (a refine that failed), or the recorded changes written back (undo)."""
        if labels is not None:
            self.labels[...] = labels
            self.pre_labels = pre_labels
        else:
            self.labels.reshape(-1)[snapshot["labels_changed"]] = snapshot["labels_before"]
            with torch.inference_mode():  # pre_labels is an inference tensor (_blend)
                self.pre_labels[snapshot["pre_changed"]] = snapshot["pre_before"]
        self.marks.reshape(-1)[snapshot["marked"]] = snapshot["marks_before"]
        self.model = model if model is not None else self._adapted_model(snapshot["fit"])
        self.rounds = snapshot["rounds"]
        self._fit = snapshot["fit"]

    def undo(self) -> np.ndarray:
        """Go back to the labels, marks and model before the last :meth:`refine`."""
        if not self._history:
            raise ValueError("nothing to undo: no refine since the start or the last reset")
        self._apply(self._history.pop())
        return self.labels

    def reset(self) -> np.ndarray | None:
        """Back to the original model and its prediction; marks and undo history are cleared."""
        self.model = self._adapted_model(None)
        self.marks[...] = 0
        self.rounds = 0
        self._fit = None
        self._history.clear()
        if self._original_cache is not None:
            self.labels[...] = self._original_labels
            self._blend_all()
        return self.labels

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> os.PathLike:
        """Write the (adapted) model as a checkpoint (atomically) with ``metadata["adapted_from"]``.

        A folded map gives a checkpoint of the original architecture; an appended one
        (:class:`MappedOutput`) records the model plus ``"output_map"``, which :func:`medsegkit.load_model`
        rebuilds (a model without a medsegkit record, e.g. a MONAI network built by hand, loads with
        ``load_checkpoint(MappedOutput(network, torch.eye(K), None), path)``).

        Raises:
            ValueError: ``path`` is the checkpoint file the session was started from: the original model is
                never overwritten, ``overwrite`` or not; or its name does not end in ``.safetensors``, ``.pt``,
                ``.pth`` or ``.ckpt`` (an image's name, for example).
            FileExistsError: ``path`` exists and ``overwrite`` is ``False`` (from
                :func:`~medsegkit.weights.save_checkpoint`).
        """
        from medsegkit.files import same_file
        from medsegkit.weights import save_checkpoint
        from medsegkit.weights.checkpoint import check_checkpoint_name

        target = check_checkpoint_name(Path(path).expanduser(), "the adapted model's path")
        if self._source_path is not None and same_file(target, self._source_path):
            raise ValueError(f"{target} is the model this session started from ({self.source_name}); save the "
                             "adapted model to another path (the original is never overwritten)")
        metadata = dict(getattr(self.original, "medsegkit_metadata", None) or {})
        metadata["adapted_from"] = self.source_name
        metadata["interactive"] = {"rounds": self.rounds, "marked_voxels": int((self.marks > 0).sum())}
        return save_checkpoint(self.model, target, metadata=metadata, overwrite=overwrite)
