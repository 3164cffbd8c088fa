"""Sliding-window inference on arrays: :func:`predict`, the one entry point of every task.

:func:`predict` checks its arguments and dispatches on the model's ``medsegkit_task``: semantic models
(and query models with ``task="semantic"``, through :class:`~medsegkit.inference.adapters.SemanticAdapter`)
are blended here; query models' instance / panoptic maps go to
:func:`~medsegkit.inference.adapters.predict_query`, detection models to
:func:`~medsegkit.inference.instance.predict_instances`. All three are consumers of the window engine
(:mod:`medsegkit.inference.windows`).

The semantic consumer blends window logits so that its result equals
``monai.inferers.sliding_window_inference`` with the same model and settings (MONAI's grid and
``compute_importance_map``), and does what MONAI's function cannot:

- **slab-wise output**: windows are visited in order along the *slab axis* (the spatial axis where a
  window covers the smallest fraction of the image); as soon as no remaining window touches a slab of
  the volume, that slab is normalised, turned into labels / probabilities and written out (to memory, a
  numpy memmap or a zarr array). The float32 accumulator therefore spans one window thickness along
  the slab axis instead of the whole volume (MONAI's full-size float32 output and count map);
- lazy input, ``progress`` and ``cancel`` (from the engine's iterator);
- 2D models on 3D volumes (MONAI ``SliceInferer`` semantics): a 2D window is a 3D window one voxel
  thick along ``slice_axis``;
- mirror test-time augmentation, bf16 / fp16 autocast and the optimised ``fast=True`` path.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsegkit._values import is_whole_number
from medsegkit.inference.adapters import QUERY_TASKS, SemanticAdapter, predict_query, refuse_fast
from medsegkit.inference.backends import ExportedNetwork, backend_network, check_backend, load_exported
from medsegkit.inference.instance import predict_instances
from medsegkit.inference.windows import (
    ImageSource,
    Region,
    Runner,
    WindowGrid,
    as_source,
    check_callbacks,
    check_device,
    check_out_dtype,
    check_window_options,
    iterate_windows,
    model_device,
    model_in_channels,
    model_spatial_dims,
    prepared_runner,
    resolve_overlap,
    resolve_roi,
    resolve_slice_axis,
    window_slices,
)

__all__ = ["OUTPUTS", "predict", "window_slices"]

logger = logging.getLogger("medsegkit.inference")

OUTPUTS = ("labels", "probabilities", "logits")


# --------------------------------------------------------------------------------------------------
# output
class OutputWriter:
    """Where finished slabs go: a new array in memory, a caller's array, or a zarr store at a path."""

    def __init__(self, out: Any, like_torch: bool, device: torch.device) -> None:
        self.request = out
        self.like_torch = like_torch
        self.device = device
        self.array: Any = None
        self.path: Path | None = None
        self.tmp_path: Path | None = None
        if isinstance(out, (str, os.PathLike)):
            self.path = Path(out)
            if self.path.exists():
                raise FileExistsError(f"output {self.path} already exists; remove it or choose another path")
            if not self.path.parent.is_dir():
                raise FileNotFoundError(f"output folder {self.path.parent} does not exist")
        elif out is not None:
            if isinstance(out, bytes) or not (hasattr(out, "shape") and hasattr(out, "dtype") and hasattr(out, "__setitem__")):
                raise ValueError(f"out must be an array of the result's shape (numpy, memmap, zarr, tensor) or a path, "
                                 f"got {type(out).__name__}")
            if isinstance(out, np.ndarray) and not out.flags.writeable:
                raise ValueError("out is a read-only array; give a writeable one (or a path)")
            if isinstance(out, torch.Tensor) and out.device.type == "meta":
                raise ValueError("out is a tensor on the meta device, which holds no values; give one on 'cpu' or 'cuda'")

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype, slab_axis: int, classes: int | None = None) -> None:
        """Make (or check) the result array ``shape`` of ``dtype``; a caller's ``out`` must hold the values
        (``classes``: the label count, for a label map)."""
        if self.request is None:
            if self.like_torch:
                self.array = torch.zeros(shape, dtype=_torch_dtype(dtype), device=self.device)
            else:
                self.array = np.zeros(shape, dtype=dtype)
            return
        if self.path is not None:
            import zarr

            self.tmp_path = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
            chunks = tuple(min(s, 64) if i >= len(shape) - 3 else 1 for i, s in enumerate(shape))
            self.array = zarr.create_array(store=str(self.tmp_path), shape=shape, chunks=chunks, dtype=dtype)
            return
        given = tuple(int(s) for s in self.request.shape)
        if given != shape:
            raise ValueError(f"out has shape {given}, but this prediction has shape {shape}")
        check_out_dtype(self.request.dtype, dtype, classes)
        self.array = self.request

    def write(self, index: tuple, values: torch.Tensor) -> None:
        if isinstance(self.array, torch.Tensor):
            self.array[index] = values.to(self.array.device, self.array.dtype)
        else:
            self.array[index] = values.cpu().numpy().astype(self.array.dtype, copy=False)

    def finish(self) -> Any:
        if self.path is not None and self.tmp_path is not None:
            os.replace(self.tmp_path, self.path)
            import zarr

            return zarr.open_array(store=str(self.path), mode="r+")
        return self.array

    def discard(self) -> None:
        """Remove our temporary store for a path. A caller's array (numpy, memmap, zarr, tensor) is never
        removed: it keeps the slabs finished before the error or cancel and its earlier contents elsewhere."""
        if self.tmp_path is not None:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            if self.tmp_path.exists():  # pragma: no cover - rmtree failed, say so rather than hide it
                logger.error("could not remove the partial output %s", self.tmp_path)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return {np.dtype(np.uint8): torch.uint8, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}[
        np.dtype(dtype)
    ]


def _label_dtype(classes: int) -> np.dtype:
    return np.dtype(np.uint8) if classes <= 256 else np.dtype(np.int32)


def mirror_flip_sets(tta_flips: Sequence[int] | str, roi: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the ``tta_flips`` axes (``"auto"``: of every spatial axis; an array carries no
    anatomical frame, see :func:`medsegkit.inference.segment.resolve_tta_flips`), without the axes along
    which the window is one voxel thick."""
    image_dims = len(roi)
    if isinstance(tta_flips, str) and tta_flips == "auto":
        tta_flips = tuple(range(image_dims))
    if isinstance(tta_flips, (bool, int, str)) or not all(
        is_whole_number(a) for a in tta_flips
    ):
        raise ValueError(f"tta_flips must be a sequence of spatial axes such as (0, 1, 2) or 'auto', got {tta_flips!r}")
    axes = tuple(int(a) for a in tta_flips)
    for a in axes:
        if not -image_dims <= a < image_dims:
            raise ValueError(f"tta_flips axes must be spatial axes in [0, {image_dims}), got {tta_flips!r}")
    # mirroring a window one voxel thick (the slice axis of a 2D model) changes nothing: skip it
    axes = tuple(sorted({a % image_dims for a in axes if roi[a % image_dims] > 1}))
    sets = [()]
    for a in axes:  # every subset, as nnU-Net mirrors
        sets += [s + (a,) for s in sets]
    return sets


def predict(
    model: nn.Module,
    image: Any,
    *,
    roi_size: int | Sequence[int] | None = None,
    sw_batch_size: int = 4,
    overlap: float | Sequence[float] = 0.5,
    mode: str = "gaussian",
    device: str | torch.device | None = None,
    sw_device: str | torch.device | None = None,
    amp: bool | str = False,
    fast: bool = False,
    tta_flips: Sequence[int] | str = (),
    slice_axis: int | None = None,
    task: str | None = None,
    output: str = "labels",
    out: Any = None,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Any = None,
    sigma_scale: float | Sequence[float] = 0.125,
    cval: float = 0.0,
    backend: str | None = None,
):
    """Segment an array with a model by sliding windows (no preprocessing).

    Args:
        model: a segmentation network; its ``spatial_dims`` (2 or 3) and ``in_channels`` attributes
            tell the image layout apart; ``medsegkit_task`` routes instance and universal models. Or an
            export of :func:`medsegkit.export` (its folder or network file: ``.onnx``, ``.xml``, ``.pt2``,
            ``.ts``), whose windows have the exported roi size.
        image: ``(*spatial)``, ``(C, *spatial)`` or ``(N, C, *spatial)`` as a numpy array, torch tensor
            or lazy array (dask, zarr: read window by window). A 2D model on a 3D volume ``(D, H, W)``
            runs slice by slice along ``slice_axis``; for a 2D model a 3-axis array is ``(C, H, W)``
            when ``slice_axis`` is ``None`` and its first size is 1 or ``model.in_channels``, else a volume.
            A 1-channel image given to a 3-channel model is repeated to 3 channels (logged).
        roi_size: window size (int or one per model axis; ``None``: the model's registered
            ``default_roi_size``, else 96³ / 256²; non-positive entries take the image size). A window
            larger than the image pads the image with ``cval``.
        sw_batch_size: windows per forward pass.
        overlap: overlap of neighbouring windows, in ``[0, 1)``.
        mode: ``"gaussian"`` or ``"constant"`` blending (``sigma_scale`` as in MONAI).
        device: where the result is stitched (default: the input tensor's device, CPU for arrays).
        sw_device: where windows run (default: the model's device).
        amp: autocast (``True``: bf16 where native, else fp16 on CUDA; or ``"bf16"`` / ``"fp16"``).
        fast: the optimised path of :mod:`medsegkit.inference.fast` (BatchNorm folding, channels-last,
            bf16 where native, ``inference_mode``). The default path stays float32 with the model's own
            weights; a 3D model on the CPU runs them in the channels-last-3d layout for the call (put
            back afterwards), which changes results only by float32 rounding. Refused (``ValueError``)
            for query models (MaskFormer / Mask2Former, every task): bf16 changed a trained model's
            labels beyond the 0.5 % the fast path may change (``docs/inference.md``); ignored, with a
            logged note, for detection models.
        tta_flips: spatial axes of the image to mirror for test-time augmentation; every subset of
            them is run and the probabilities are averaged (nnU-Net's mirroring). ``"auto"``: every
            spatial axis here; :func:`~medsegkit.inference.segment` and the interactive session narrow
            it to the left-right axis when the preprocessing reorients to an anatomical frame.
        slice_axis: for a 2D model on a volume, the spatial axis to slice along (default: the last
            axis, axial for RAS volumes).
        task: for universal models: ``"semantic"`` (default), ``"instance"`` or ``"panoptic"``.
        output: ``"labels"`` (``(*spatial)`` or ``(N, *spatial)``, uint8 up to 256 classes, else int32),
            ``"probabilities"`` or ``"logits"`` (``(K, *spatial)`` / ``(N, K, *spatial)``, float32).
            Labels and probabilities come from softmax (sigmoid > 0.5 for a 1-channel model) of the
            blended logits; with ``tta_flips`` the probabilities are blended instead.
        out: where to write: ``None`` (a new array), an array of the result's shape (numpy, memmap,
            zarr, tensor) or a path, where a zarr array is created (written under a temporary name and
            renamed when complete).
        progress: ``progress(done, total)`` called after every window batch; ``total`` is
            ``N × ceil(number_of_windows / sw_batch_size)``.
        cancel: an object with ``is_set()`` (``threading.Event``) checked before every window batch;
            when set, :class:`medsegkit.Cancelled` is raised; the temporary store of a path ``out`` is
            removed, and a caller's ``out`` array is left as it is (the slabs finished so far written).
        backend: what runs the windows. ``None`` (default): the model's own, PyTorch for a PyTorch model
            and the format's backend for an export (ONNX → ONNX Runtime, OpenVINO IR → OpenVINO,
            ``.pt2`` / ``.ts`` → torch). ``"torch"``, ``"onnxruntime"`` or ``"openvino"``: that one (a
            PyTorch model is converted to ONNX once per model and batch shape, seconds; an export is
            opened on that backend). ``"auto"``: for a PyTorch semantic model on the CPU, one window
            batch is measured on each available backend and precision (torch float32, torch bf16
            fast path, OpenVINO float32 / int8, ONNX Runtime), those whose labels agree ≥ 99.5 % with
            float32 are kept and the fastest runs (:mod:`medsegkit.inference.autobackend`; cached per
            machine and model under ``MEDSEGKIT_HOME``; the choice and an ETA are printed to stderr);
            ``fast`` / ``amp`` are then refused (auto chooses the precision). For an export, a query
            model's instance / panoptic output or a GPU, ``"auto"`` is the model's own backend.
            Other backends run semantic models only, in float32 (``fast`` / ``amp`` are refused).

    Returns:
        numpy array for numpy / lazy input, tensor for tensor input (on ``device``); ``out`` when given
        (the zarr array for a path).

    Raises:
        ValueError: wrong number of dims or channels, NaN/Inf, empty image, bad dtype, bad roi_size,
            overlap outside ``[0, 1)``, a ``sigma_scale`` that is not positive, a ``cval`` that
            is not finite, unknown ``output`` / ``mode`` / ``task``.
        medsegkit.Cancelled: ``cancel`` was set.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if not isinstance(model, (nn.Module, str, os.PathLike)):
        raise TypeError(f"model must be a torch.nn.Module or the path of an export, got {type(model).__name__}")
    check_window_options(sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, sigma_scale=sigma_scale, cval=cval)
    check_callbacks(progress, cancel)
    check_device("device", device)
    check_device("sw_device", sw_device)
    check_backend(backend)
    if backend == "auto" and (fast or amp):
        raise ValueError("backend='auto' chooses the precision itself (bf16 only where labels agree >= 99.5 %); "
                         "drop fast / amp, or choose backend='torch' with them")
    if isinstance(model, (str, os.PathLike)):
        model = load_exported(model, backend=backend)
    elif isinstance(model, ExportedNetwork) and backend not in (None, "auto", model.backend):
        if model.path is None:
            raise ValueError(f"this network was opened on {model.backend}; backend={backend!r} needs the PyTorch model")
        model = load_exported(model.path, backend=backend)

    options = dict(
        roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, device=device,
        sw_device=sw_device, amp=amp, fast=fast, tta_flips=tta_flips, slice_axis=slice_axis,
        output=output, out=out, progress=progress, cancel=cancel,
    )
    model_task = getattr(model, "medsegkit_task", "semantic")
    if model_task == "semantic":
        if task not in (None, "semantic"):
            raise ValueError(f"task={task!r} needs a universal model; {type(model).__name__} is a semantic model")
        return _predict_semantic(model, image, sigma_scale=sigma_scale, cval=cval, backend=backend, **options)
    if backend not in (None, "auto", "torch"):
        raise ValueError(
            f"backend={backend!r} runs semantic output only; {type(model).__name__} with task={task!r} "
            "runs on backend='torch'"
        )
    if model_task == "instance":
        if task not in (None, "instance"):
            raise ValueError(f"{type(model).__name__} is an instance model; task must be None or 'instance', got {task!r}")
        return predict_instances(model, image, **options)
    if model_task == "universal":
        task = task or "semantic"
        if task not in ("semantic", *QUERY_TASKS):
            raise ValueError(f"task must be 'semantic', 'instance' or 'panoptic', got {task!r}")
        refuse_fast(model, fast, task)
        if task == "semantic":
            return _predict_semantic(SemanticAdapter(model), image, sigma_scale=sigma_scale, cval=cval,
                                     backend=backend, **options)
        return predict_query(model, image, task=task, **options)
    raise ValueError(
        f"{type(model).__name__}.medsegkit_task is {model_task!r}; expected 'semantic', 'instance' or 'universal'"
    )


# --------------------------------------------------------------------------------------------------
# the semantic consumer: blending window logits into slabs
def _predict_semantic(
    model: nn.Module, image: Any, *, roi_size, sw_batch_size, overlap, mode, device, sw_device, amp, fast,
    tta_flips, slice_axis, output, out, progress, cancel, sigma_scale, cval, backend=None,
):
    """:func:`predict` for a dense model ``(N, C, *roi)`` → ``(N, K, *roi)``."""
    from monai.data.utils import compute_importance_map

    model_dims = model_spatial_dims(model)
    in_channels = model_in_channels(model)
    source, image_dims = as_source(image, model_dims, in_channels, slice_axis)
    slice_axis = resolve_slice_axis(slice_axis, model_dims, image_dims)
    roi = resolve_roi(roi_size, model, model_dims, source.spatial, slice_axis)
    grid = WindowGrid(source.spatial, roi, resolve_overlap(overlap, model_dims, image_dims, slice_axis))
    flip_sets = mirror_flip_sets(tta_flips, roi)

    torch_in = source.kind == "torch"
    stitch = torch.device(device) if device is not None else (source.data.device if torch_in else torch.device("cpu"))
    run_on = torch.device(sw_device) if sw_device is not None else model_device(model)
    weight = compute_importance_map(tuple(roi), mode=mode, sigma_scale=sigma_scale, device=stitch, dtype=torch.float32)
    blend_probabilities = bool(len(flip_sets) > 1 and output != "logits")
    model_roi = tuple(r for i, r in enumerate(roi) if i != slice_axis)
    example = (1, in_channels or source.channels * source.repeat_channels, *model_roi)
    if backend == "auto" and not isinstance(model, ExportedNetwork) and run_on.type == "cpu":
        model, backend, fast = _auto_backend(model, source, grid, sw_batch_size, slice_axis, cval, model_dims,
                                             len(flip_sets) * source.batch * -(-len(grid.slices) // sw_batch_size))
    if backend in ("onnxruntime", "openvino") and not isinstance(model, ExportedNetwork):
        model = backend_network(model, backend, (sw_batch_size, *example[1:]), model_dims)

    writer = OutputWriter(out, torch_in and out is None, stitch)
    order = grid.slab_order()  # slabs finish (and are written) as the windows pass them
    try:
        with prepared_runner(model, device=run_on, fast=fast, amp=amp, example_shape=example) as runner:
            forward = MirroredRunner(runner, flip_sets, slice_axis, blend_probabilities, stitch)
            blender = None
            for batch in iterate_windows(source, grid, forward, batch_size=sw_batch_size, order=order, cval=cval,
                                         slab_reads=True, progress=progress, cancel=cancel):
                if blender is None or blender.n != batch.n:
                    blender = SlabBlender(batch.n, grid, order, weight, output, blend_probabilities, source, writer)
                blender.add(batch.windows, batch.output)
        return writer.finish()
    except BaseException:
        writer.discard()
        raise


def _auto_backend(model, source, grid, sw_batch_size, slice_axis, cval, model_dims, batches) -> tuple[nn.Module, str, bool]:
    """``backend="auto"`` for a PyTorch model: ``(model, backend, fast)`` as measured (or cached) by
    :func:`medsegkit.inference.autobackend.choose_backend` on the grid's middle window batch (``model``
    is the int8 export when that won)."""
    from medsegkit.inference.autobackend import announce, choose_backend, measurement_batch, open_int8

    batch = measurement_batch(grid, source, sw_batch_size, slice_axis, cval)
    choice = choose_backend(model, batch, spatial_dims=model_dims, allow_bf16=not isinstance(model, SemanticAdapter),
                            log=logger.info)
    announce(choice, batches)
    if choice.precision == "int8":
        return open_int8(choice.int8_export), "openvino", False
    return model, choice.backend, choice.precision == "bf16"


class MirroredRunner:
    """The runner with mirror TTA and 2D-on-3D slicing: ``(B, C, *roi)`` → float32 ``(B, K, *roi)`` on ``stitch``
    (TTA averaged; probabilities when ``blend_probabilities``)."""

    def __init__(self, runner: Runner, flip_sets, slice_axis: int | None, blend_probabilities: bool, stitch) -> None:
        self.runner, self.flip_sets, self.slice_axis = runner, flip_sets, slice_axis
        self.blend_probabilities, self.stitch = blend_probabilities, stitch

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.runner.device)
        total = None
        for axes in self.flip_sets:
            x = batch.flip([2 + a for a in axes]) if axes else batch
            if self.slice_axis is not None:
                x = x.squeeze(2 + self.slice_axis)
            y = self.runner(x)
            if self.slice_axis is not None:
                y = y.unsqueeze(2 + self.slice_axis)
            if tuple(y.shape[2:]) != tuple(batch.shape[2:]) or y.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"the model returned shape {tuple(y.shape)} for windows of shape {tuple(x.shape)}; "
                    "a semantic model must return (N, K, *spatial) of its input's spatial size"
                )
            if y.shape[1] == 0:
                raise ValueError(f"the model returned shape {tuple(y.shape)}: no class channel (K = 0); a semantic "
                                 "model must return (N, K, *spatial) with K >= 1")
            # argmax / blending would turn NaN / Inf into a plausible map. A NaN or Inf anywhere makes the sum
            # non-finite: median 0.9 ms for 2 x 4 x 96^3 against 12 ms for isfinite(y).all() (2 threads, 2026-12-08)
            if not bool(torch.isfinite(y.sum())):
                raise ValueError(
                    f"the model returned NaN or Inf values for windows of shape {tuple(x.shape)}; the labels would "
                    "be meaningless (a diverged checkpoint, or fp16 overflow: try amp=False)"
                )
            if axes:
                y = y.flip([2 + a for a in axes])
            if self.blend_probabilities:
                y = torch.sigmoid(y) if y.shape[1] == 1 else torch.softmax(y, dim=1)
            total = y if total is None else total + y
        if len(self.flip_sets) > 1:
            total = total / len(self.flip_sets)
        return total.to(self.stitch)


class SlabBlender:
    """Weighted blending of the windows of image ``n``; slabs are finished and written as soon as no window
    left in ``order`` needs them.

    The accumulator is split into *chunks* along the slab axis, one per gap between consecutive window
    starts (so a window touches two or three chunks); a chunk is made when a window first touches it
    and dropped once written, so memory holds only the chunks the windows in flight cover.
    """

    def __init__(self, n: int, grid: WindowGrid, order: list[int], weight: torch.Tensor, output: str,
                 blend_probabilities: bool, source: ImageSource, writer: OutputWriter) -> None:
        self.n, self.grid, self.output, self.source, self.writer = n, grid, output, source, writer
        self.blend_probabilities = blend_probabilities
        dims = len(grid.padded)
        self.slab = slab = grid.slab_axis
        self.others = [a for a in range(dims) if a != slab]
        self.to_slab_first = [0, 1 + slab] + [1 + a for a in self.others]
        self.from_slab_first = [self.to_slab_first.index(i) for i in range(dims + 1)]
        self.w_slab = weight[None].permute(self.to_slab_first)[0]  # (roi_slab, *roi_others)
        self.other_shape = tuple(grid.padded[a] for a in self.others)
        self.starts = [grid.slices[i][slab].start for i in order]  # slab starts of the windows, in visiting order
        self.seen = 0
        self.bounds = sorted(set(self.starts) | {grid.padded[slab]})
        self.chunks: dict[int, torch.Tensor] = {}  # chunk index -> (K, length, *others) weighted sum
        self.counts: dict[int, torch.Tensor] = {}  # chunk index -> (length, *others) sum of weights
        # written chunks are reused instead of freed and allocated again: fresh memory costs a page fault
        # per 4 kB, which on a 3D volume adds up to a tenth of the network's time
        self.spare: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self.weighted: torch.Tensor | None = None  # the weight broadcast over the classes, in the output's layout
        # Label maps need no normalisation: every voxel's weighted sum is divided by the same positive sum of
        # weights for all classes, which cannot change the argmax or the sign of a 1-class logit. Only a
        # 1-class probability (threshold 0.5) and the logits / probability outputs need the weight sums.
        self.normalise: bool | None = None  # decided when the number of classes is known (first window)
        self.finished = 0  # chunks below this index are written
        self.crop_others = tuple(slice(grid.pad_before[a], grid.pad_before[a] + source.spatial[a]) for a in self.others)

    def add(self, windows: list[Region], predicted: torch.Tensor) -> None:
        """Blend a batch ``(B, K, *roi)`` and write the slabs no later window touches."""
        for window, p in zip(windows, predicted):
            self._accumulate(window, p.permute(self.to_slab_first))
        self.seen += len(windows)
        self._finish(self.starts[self.seen] if self.seen < len(self.starts) else self.grid.padded[self.slab])

    def _zeros(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Zeros of ``shape`` in ``like``'s memory order (a channels-last network output keeps the classes
        innermost: accumulating it into a chunk of the same order is a contiguous, vectorised FMA)."""
        reusable = self.spare.get(shape)
        if reusable:
            return reusable.pop().zero_()
        order = sorted(range(like.dim()), key=lambda d: (-like.stride(d), d))
        return like.new_zeros([shape[d] for d in order]).permute([order.index(d) for d in range(like.dim())])

    def _accumulate(self, window: Region, p: torch.Tensor) -> None:
        """Add ``p × weight`` (``p``: ``(K, roi_slab, *roi_others)``) into the chunks the window covers."""
        if self.normalise is None:
            self.normalise = self.output != "labels" or (self.blend_probabilities and p.shape[0] == 1)
        weighted = self.weighted
        if weighted is None or weighted.shape != p.shape or weighted.stride() != p.stride():
            weighted = self.weighted = torch.empty_like(p).copy_(self.w_slab.expand_as(p))  # in p's memory order
        start, stop = window[self.slab].start, window[self.slab].stop
        region = tuple(window[a] for a in self.others)
        bounds = self.bounds
        r = bisect.bisect_right(bounds, start) - 1
        while r < len(bounds) - 1 and bounds[r] < stop:
            lo, hi = bounds[r], bounds[r + 1]
            if r not in self.chunks:
                self.chunks[r] = self._zeros((p.shape[0], hi - lo, *self.other_shape), p)
                if self.normalise:
                    self.counts[r] = self._zeros((hi - lo, *self.other_shape), self.w_slab)
            a, b = max(start, lo), min(stop, hi)
            self.chunks[r][(slice(None), slice(a - lo, b - lo), *region)].addcmul_(
                p[:, a - start:b - start], weighted[:, a - start:b - start])
            if self.normalise:
                self.counts[r][(slice(a - lo, b - lo), *region)] += self.w_slab[a - start:b - start]
            r += 1

    def _finish(self, upto: int) -> None:
        """Write every chunk that ends at or before slab index ``upto``."""
        while self.finished < len(self.bounds) - 1 and self.bounds[self.finished + 1] <= upto:
            self.finish_chunk(self.finished)
            self.finished += 1

    def finish_chunk(self, index: int) -> None:
        """Write chunk ``index`` (slab ``bounds[index]:bounds[index + 1]``) from what was accumulated into it,
        and recycle its memory. :class:`medsegkit.interactive.Session` calls it to finish chunks out of
        order (after accumulating the windows that touch them, in ``order``)."""
        bounds, before, size = self.bounds, self.grid.pad_before[self.slab], self.source.spatial[self.slab]
        lo, hi = bounds[index], bounds[index + 1]
        start, stop = max(lo, before), min(hi, before + size)
        if stop > start and index in self.chunks:
            inside = (slice(start - lo, stop - lo), *self.crop_others)
            values = self.chunks[index][(slice(None), *inside)]
            if self.normalise:
                values = values / self.counts[index][inside]
            self._emit(values.permute(self.from_slab_first), start - before, stop - before)
        for store in (self.chunks, self.counts):
            done_chunk = store.pop(index, None)
            if done_chunk is not None:
                self.spare.setdefault(tuple(done_chunk.shape), []).append(done_chunk)

    def _emit(self, values: torch.Tensor, start: int, stop: int) -> None:
        """Turn blended ``(K, *region)`` values into the requested output and write them."""
        classes, output, source = values.shape[0], self.output, self.source
        if output == "logits":
            result = values
        elif output == "probabilities":
            if self.blend_probabilities:
                result = values
            else:
                result = torch.sigmoid(values) if classes == 1 else torch.softmax(values, dim=0)
        elif classes == 1:
            result = (values[0] > (0.5 if self.blend_probabilities else 0.0)).to(torch.uint8)
        else:
            result = _argmax(values)
        if self.writer.array is None:
            shape = ((source.batch,) if source.has_batch else ()) + ((classes,) if output != "labels" else ()) + source.spatial
            dtype = _label_dtype(classes) if output == "labels" else np.dtype(np.float32)
            self.writer.allocate(tuple(shape), dtype, self.slab, classes=classes)
        region = [slice(None)] * len(source.spatial)
        region[self.slab] = slice(start, stop)
        index = ((self.n,) if source.has_batch else ()) + ((slice(None),) if output != "labels" else ()) + tuple(region)
        self.writer.write(index, result)


def _argmax(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(0)`` as ``uint8`` / ``int32`` (first maximum wins, as in argmax).

    A loop over the K classes: torch's reduction over a leading axis is several times slower.
    """
    dtype = torch.uint8 if values.shape[0] <= 256 else torch.int32
    if values.shape[0] == 2:  # one comparison (a tie gives 0, as argmax does)
        return torch.gt(values[1], values[0]).to(dtype)
    best = values[0].clone()
    index = torch.zeros(values.shape[1:], dtype=dtype, device=values.device)
    for k in range(1, values.shape[0]):
        better = values[k] > best
        index.masked_fill_(better, k)
        torch.maximum(best, values[k], out=best)
    return index
