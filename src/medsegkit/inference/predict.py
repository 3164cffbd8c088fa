"""Sliding-window inference on arrays: :func:`predict`.

One window loop, built on MONAI's utilities (``dense_patch_slices``, ``compute_importance_map``,
``get_valid_patch_size`` and the scan interval rule of ``sliding_window_inference``), so that its result
equals ``monai.inferers.sliding_window_inference`` with the same model and settings, and so that it can
do what MONAI's function cannot:

- **lazy input**: numpy, torch, dask, zarr (anything with ``shape``, ``dtype`` and slicing) is read one
  window at a time; the input is never converted or padded as a whole;
- **slab-wise output**: windows are visited in order along the *slab axis* (the spatial axis where a
  window covers the smallest fraction of the image); as soon as no remaining window touches a slab of
  the volume, that slab is normalised, turned into labels / probabilities and written out (to memory, a
  numpy memmap or a zarr array). The float32 accumulator therefore spans one window thickness along
  the slab axis instead of the whole volume (MONAI's full-size float32 output and count map);
- ``progress(done, total)`` after every window batch, ``cancel`` checked between batches;
- 2D models on 3D volumes (MONAI ``SliceInferer`` semantics) through the same loop: a 2D window is a 3D
  window one voxel thick along ``slice_axis``;
- mirror test-time augmentation, bf16 / fp16 autocast and the optimised ``fast=True`` path.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsegkit.errors import Cancelled

__all__ = ["OUTPUTS", "predict", "window_slices"]

logger = logging.getLogger("medsegkit.inference")

OUTPUTS = ("labels", "probabilities", "logits")
MODES = ("gaussian", "constant")
DEFAULT_ROI = {2: (256, 256), 3: (96, 96, 96)}


# --------------------------------------------------------------------------------------------------
# model facts
def _model_spatial_dims(model: nn.Module) -> int:
    for attr in ("spatial_dims", "dimensions"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value in (1, 2, 3):
            return value
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            return 2
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            return 3
    raise ValueError(
        f"cannot tell whether {type(model).__name__} is a 2D or 3D model: set its attribute "
        f"`spatial_dims` to 2 or 3"
    )


def _model_in_channels(model: nn.Module) -> int | None:
    value = getattr(model, "in_channels", None)
    if isinstance(value, int):
        return value
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return int(module.in_channels)
    return None


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _default_roi(model: nn.Module, spatial_dims: int) -> tuple[int, ...]:
    roi = getattr(model, "default_roi_size", None)
    config = getattr(model, "medsegkit_config", None)
    if roi is None and isinstance(config, dict) and "name" in config:
        from medsegkit.registry import get_model_spec

        try:
            roi = get_model_spec(config["name"]).default_roi_size
        except KeyError:
            roi = None
    if roi is not None and len(roi) == spatial_dims:
        return tuple(int(r) for r in roi)
    return DEFAULT_ROI.get(spatial_dims, (128,) * spatial_dims)


# --------------------------------------------------------------------------------------------------
# input
@dataclass
class _Source:
    """The image as ``(N, C, *spatial)`` whatever its container, read one window at a time."""

    data: Any  # numpy array, torch tensor or lazy array, in its original layout
    kind: str  # "numpy" | "torch" | "lazy"
    has_batch: bool
    has_channel: bool
    spatial: tuple[int, ...]
    channels: int
    batch: int
    repeat_channels: int = 1

    def read(self, n: int, region: Sequence[slice]) -> torch.Tensor:
        """Float32 tensor ``(C_model, *region)`` of image ``n`` (region inside the image)."""
        index: tuple = ((n,) if self.has_batch else ()) + ((slice(None),) if self.has_channel else ()) + tuple(region)
        if self.kind == "torch":
            window = self.data[index]
        else:
            array = np.asarray(self.data[index])
            if not array.flags.writeable or any(step < 0 for step in array.strides):
                array = array.copy()  # torch.from_numpy takes neither; the copy is C-contiguous
            window = torch.from_numpy(array)  # a strided view: the window batch makes the one copy
        if not self.has_channel:
            window = window[None]
        window = window.float()
        if self.kind == "lazy" and not bool(torch.isfinite(window).all()):
            raise ValueError(
                f"image contains NaN or Inf values (found in the window at {_region_text(region)}); "
                "replace them (e.g. numpy.nan_to_num) before inference"
            )
        if self.repeat_channels > 1:
            window = window.repeat(self.repeat_channels, *([1] * (window.ndim - 1)))
        return window


def _region_text(region: Sequence[slice]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


def _check_dtype(image: Any) -> None:
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.bool or image.is_complex():
            raise ValueError(
                f"image dtype {image.dtype} is not accepted; give real numbers (float or integer tensors)"
            )
        return
    dtype = np.dtype(getattr(image, "dtype", np.float32))
    if dtype.kind not in "iuf":
        raise ValueError(
            f"image dtype {dtype} is not accepted; give real numbers (float or integer arrays), "
            f"not {'booleans' if dtype.kind == 'b' else 'complex numbers' if dtype.kind == 'c' else dtype.name}"
        )


def _as_source(image: Any, model_dims: int, in_channels: int | None, slice_axis: int | None) -> tuple[_Source, int]:
    """Wrap ``image`` and return it with the number of spatial dims of the *image* (2 or 3)."""
    if isinstance(image, torch.Tensor):
        kind = "torch"
    elif isinstance(image, np.ndarray):
        kind = "numpy"
    elif hasattr(image, "shape") and hasattr(image, "dtype") and hasattr(image, "__getitem__"):
        kind = "lazy"
    elif isinstance(image, (list, tuple)):
        image = np.asarray(image)
        kind = "numpy"
    else:
        raise ValueError(
            f"image must be a numpy array, a torch tensor or a lazy array (dask, zarr), got {type(image).__name__}"
        )
    _check_dtype(image)
    shape = tuple(int(s) for s in image.shape)
    if any(s == 0 for s in shape) or len(shape) == 0:
        raise ValueError(f"image is empty (shape {shape}); give an array with at least one voxel")

    # how many leading axes are batch / channel
    ndim = len(shape)
    accepted = f"(*spatial), (C, *spatial) or (N, C, *spatial) with {model_dims} spatial axes"
    if model_dims == 2 and (slice_axis is not None or ndim == 5):
        image_dims = 3  # a volume, run slice by slice
    elif model_dims == 2 and ndim == 3:
        # (C, H, W) when the first axis looks like channels, else a (D, H, W) volume
        image_dims = 2 if shape[0] in {1, in_channels} else 3
    else:
        image_dims = model_dims
    leading = ndim - image_dims
    if leading not in (0, 1, 2):
        if model_dims == 2:
            accepted += " (or a volume (D, H, W), (C, D, H, W), (N, C, D, H, W) run slice by slice)"
        raise ValueError(
            f"image has {ndim} dimension(s) (shape {shape}) but a {model_dims}D model takes {accepted}"
        )
    has_batch, has_channel = leading == 2, leading >= 1
    channels = shape[1] if has_batch else (shape[0] if has_channel else 1)
    repeat = 1
    if in_channels is not None and channels != in_channels:
        if in_channels == 3 and channels == 1:
            repeat = 3
            logger.info("the model takes 3 input channels; repeating the single image channel 3 times")
        else:
            raise ValueError(
                f"image has {channels} channel(s) (shape {shape}) but the model takes {in_channels}; "
                f"give an array (C={in_channels}, *spatial) or (N, {in_channels}, *spatial)"
            )
    if kind != "lazy":
        finite = torch.isfinite(image).all() if kind == "torch" else np.isfinite(image).all()
        if not bool(finite):
            raise ValueError("image contains NaN or Inf values; replace them (e.g. numpy.nan_to_num) before inference")
    source = _Source(
        data=image,
        kind=kind,
        has_batch=has_batch,
        has_channel=has_channel,
        spatial=shape[leading:],
        channels=channels,
        batch=shape[0] if has_batch else 1,
        repeat_channels=repeat,
    )
    return source, image_dims


# --------------------------------------------------------------------------------------------------
# windows
def _scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    # the rule of monai.inferers.utils._get_scan_interval (private there, so restated here)
    interval = []
    for size, roi, o in zip(image_size, roi_size, overlap):
        if roi == size:
            interval.append(int(roi))
        else:
            step = int(roi * (1 - o))
            interval.append(step if step > 0 else 1)
    return tuple(interval)


def window_slices(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float] = 0.5
) -> tuple[list[tuple[slice, ...]], tuple[int, ...], list[int]]:
    """The windows MONAI's ``sliding_window_inference`` visits.

    Args:
        image_size: spatial size of the image.
        roi_size: window size (same length).
        overlap: fraction of overlap per axis, in ``[0, 1)``.

    Returns:
        ``(slices, padded_size, pad_before)``: window slices in the coordinates of the image padded to
        at least ``roi_size`` (MONAI pads symmetrically, the odd voxel after), the padded size, and the
        padding before each axis.
    """
    from monai.data.utils import dense_patch_slices

    overlaps = tuple(overlap) if isinstance(overlap, Sequence) else (float(overlap),) * len(image_size)
    padded = tuple(max(s, r) for s, r in zip(image_size, roi_size))
    pad_before = [(p - s) // 2 for p, s in zip(padded, image_size)]
    slices = dense_patch_slices(padded, roi_size, _scan_interval(padded, roi_size, overlaps))
    return slices, padded, pad_before


def _read_window(source: _Source, n: int, window: Sequence[slice], pad_before: Sequence[int], cval: float) -> torch.Tensor:
    """Window of image ``n`` in padded coordinates; the parts outside the image are ``cval``."""
    inside = []
    target = []
    clipped = False
    for s, before, size in zip(window, pad_before, source.spatial):
        lo, hi = s.start - before, s.stop - before
        lo_c, hi_c = max(lo, 0), min(hi, size)
        clipped |= (lo_c, hi_c) != (lo, hi)
        inside.append(slice(lo_c, hi_c))
        target.append(slice(lo_c - lo, hi_c - lo))
    data = source.read(n, inside)
    if not clipped:
        return data
    full = torch.full((data.shape[0], *(s.stop - s.start for s in window)), float(cval), dtype=data.dtype)
    full[(slice(None), *target)] = data
    return full


# --------------------------------------------------------------------------------------------------
# output
class _Output:
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

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype, slab_axis: int) -> None:
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
        """Remove what was written: our temporary store, or a caller's zarr store."""
        if self.tmp_path is not None:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            if self.tmp_path.exists():  # pragma: no cover - rmtree failed, say so rather than hide it
                logger.error("could not remove the partial output %s", self.tmp_path)
            return
        root = _zarr_local_path(self.request)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
            logger.info("removed the partially written zarr array %s", root)


def _zarr_local_path(array: Any) -> Path | None:
    store = getattr(array, "store", None)
    root = getattr(store, "root", None)
    if root is None or not hasattr(array, "path"):
        return None
    return Path(str(root)) / str(array.path) if array.path else Path(str(root))


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return {np.dtype(np.uint8): torch.uint8, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}[
        np.dtype(dtype)
    ]


def _label_dtype(classes: int) -> np.dtype:
    return np.dtype(np.uint8) if classes <= 256 else np.dtype(np.int32)


# --------------------------------------------------------------------------------------------------
def _dispatch(model: nn.Module, image: Any, task: str | None, kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    """Route instance and universal models; returns ``(dense_model, None)`` or ``(None, result)``."""
    model_task = getattr(model, "medsegkit_task", "semantic")
    if model_task == "semantic":
        if task not in (None, "semantic"):
            raise ValueError(f"task={task!r} needs a universal model; {type(model).__name__} is a semantic model")
        return model, None
    if model_task == "instance":
        if task not in (None, "instance"):
            raise ValueError(f"{type(model).__name__} is an instance model; task must be None or 'instance', got {task!r}")
        from medsegkit.inference import instance

        return None, instance.predict_instances(model, image, **kwargs)
    if model_task == "universal":
        task = task or "semantic"
        from medsegkit.inference import adapters

        if task == "semantic":
            return adapters.SemanticAdapter(model), None
        if task in ("instance", "panoptic"):
            return None, adapters.predict_query(model, image, task=task, **kwargs)
        raise ValueError(f"task must be 'semantic', 'instance' or 'panoptic', got {task!r}")
    raise ValueError(
        f"{type(model).__name__}.medsegkit_task is {model_task!r}; expected 'semantic', 'instance' or 'universal'"
    )


def _roi_for(roi_size: Any, model_dims: int, model: nn.Module, image_spatial: Sequence[int], slice_axis: int | None) -> tuple[int, ...]:
    """The window size in the model's dims, non-positive entries replaced by the image size."""
    spatial_of_model = [s for i, s in enumerate(image_spatial) if i != slice_axis] if slice_axis is not None else list(image_spatial)
    if roi_size is None:
        roi = _default_roi(model, model_dims)
    elif isinstance(roi_size, (int, np.integer)):
        roi = (int(roi_size),) * model_dims
    else:
        roi = tuple(roi_size)
        if len(roi) != model_dims or not all(isinstance(r, (int, np.integer)) or r is None for r in roi):
            raise ValueError(f"roi_size must be an int or {model_dims} ints for a {model_dims}D model, got {roi_size!r}")
    return tuple(int(size) if r is None or r <= 0 else int(r) for r, size in zip(roi, spatial_of_model))


def _flip_sets(tta_flips: Sequence[int], roi: Sequence[int]) -> list[tuple[int, ...]]:
    image_dims = len(roi)
    if isinstance(tta_flips, (bool, int)) or not all(isinstance(a, (int, np.integer)) for a in tta_flips):
        raise ValueError(f"tta_flips must be a sequence of spatial axes such as (0, 1, 2), got {tta_flips!r}")
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
    tta_flips: Sequence[int] = (),
    slice_axis: int | None = None,
    task: str | None = None,
    output: str = "labels",
    out: Any = None,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Any = None,
    sigma_scale: float | Sequence[float] = 0.125,
    cval: float = 0.0,
):
    """Segment an array with a model by sliding windows (no preprocessing).

    Args:
        model: a segmentation network; its ``spatial_dims`` (2 or 3) and ``in_channels`` attributes
            tell the image layout apart; ``medsegkit_task`` routes instance and universal models.
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
            back afterwards), which changes results only by float32 rounding.
        tta_flips: spatial axes of the image to mirror for test-time augmentation; every subset of
            them is run and the probabilities are averaged (nnU-Net's mirroring).
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
            when set, :class:`medsegkit.Cancelled` is raised and a partly written ``out`` store removed.

    Returns:
        numpy array for numpy / lazy input, tensor for tensor input (on ``device``); ``out`` when given
        (the zarr array for a path).

    Raises:
        ValueError: wrong number of dims or channels, NaN/Inf, empty image, bad dtype, bad roi_size,
            overlap outside ``[0, 1)``, unknown ``output`` / ``mode`` / ``task``.
        medsegkit.Cancelled: ``cancel`` was set.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    if not isinstance(sw_batch_size, (int, np.integer)) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
    overlaps = tuple(overlap) if isinstance(overlap, Sequence) else (overlap,)
    if not all(isinstance(o, (int, float)) and 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must be in [0, 1) (0.5 = half a window), got {overlap!r}")

    passthrough = dict(
        roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, device=device,
        sw_device=sw_device, amp=amp, fast=fast, tta_flips=tta_flips, slice_axis=slice_axis,
        output=output, out=out, progress=progress, cancel=cancel,
    )
    dense_model, routed = _dispatch(model, image, task, passthrough)
    if dense_model is None:
        return routed
    model = dense_model

    model_dims = _model_spatial_dims(model)
    in_channels = _model_in_channels(model)
    source, image_dims = _as_source(image, model_dims, in_channels, slice_axis)
    if image_dims != model_dims:
        slice_axis = image_dims - 1 if slice_axis is None else int(slice_axis)
        if not -image_dims <= slice_axis < image_dims:
            raise ValueError(f"slice_axis must be a spatial axis in [0, {image_dims}), got {slice_axis}")
        slice_axis %= image_dims
    elif slice_axis is not None:
        raise ValueError(f"slice_axis is only for a 2D model on a 3D volume; this is a {model_dims}D model on a {image_dims}D image")
    roi = _roi_for(roi_size, model_dims, model, source.spatial, slice_axis)
    if slice_axis is not None:
        roi = roi[:slice_axis] + (1,) + roi[slice_axis:]
    if len(overlaps) == 1:
        overlaps = overlaps * image_dims
    elif len(overlaps) == model_dims and slice_axis is not None:
        overlaps = overlaps[:slice_axis] + (0.0,) + overlaps[slice_axis:]
    if len(overlaps) != image_dims:
        raise ValueError(f"overlap must be one float or one per spatial axis ({model_dims}), got {overlap!r}")
    flip_sets = _flip_sets(tta_flips, roi)

    torch_in = source.kind == "torch"
    stitch = torch.device(device) if device is not None else (source.data.device if torch_in else torch.device("cpu"))
    run_on = torch.device(sw_device) if sw_device is not None else _model_device(model)

    from monai.data.utils import compute_importance_map

    slices, padded, pad_before = window_slices(source.spatial, roi, overlaps)
    # slab axis: the axis where a window covers the smallest fraction of the image
    slab = min(range(image_dims), key=lambda a: (roi[a] / padded[a], a))
    order = sorted(range(len(slices)), key=lambda i: slices[i][slab].start)
    slices = [slices[i] for i in order]
    weight = compute_importance_map(tuple(roi), mode=mode, sigma_scale=sigma_scale, device=stitch, dtype=torch.float32)
    weight = weight[None]  # (1, *roi)

    from medsegkit.inference.fast import prepare_model

    # each module's own mode, restored afterwards (an adapter made here must not leave the wrapped model in training mode)
    was_training = [(module, module.training) for module in model.modules()]
    model.eval()
    model_roi = tuple(r for i, r in enumerate(roi) if i != slice_axis)
    try:
        prepared = prepare_model(
            model, device=run_on, fast=fast, amp=amp,
            example_shape=(1, in_channels or source.channels * source.repeat_channels, *model_roi),
        )
    except BaseException:
        _restore_modes(was_training)
        raise
    if prepared.notes:
        logger.info("inference: %s", ", ".join(prepared.notes))
    blend_probabilities = bool(len(flip_sets) > 1 and output != "logits")

    def forward(batch: torch.Tensor) -> torch.Tensor:
        """``(B, C, *roi)`` on run_on → float32 ``(B, K, *roi)`` on stitch (TTA averaged)."""
        total = None
        for axes in flip_sets:
            x = batch.flip([2 + a for a in axes]) if axes else batch
            if slice_axis is not None:
                x = x.squeeze(2 + slice_axis)
            y = prepared(x)
            if slice_axis is not None:
                y = y.unsqueeze(2 + slice_axis)
            if tuple(y.shape[2:]) != tuple(batch.shape[2:]) or y.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"the model returned shape {tuple(y.shape)} for windows of shape {tuple(x.shape)}; "
                    "a semantic model must return (N, K, *spatial) of its input's spatial size"
                )
            if axes:
                y = y.flip([2 + a for a in axes])
            if blend_probabilities:
                y = torch.sigmoid(y) if y.shape[1] == 1 else torch.softmax(y, dim=1)
            total = y if total is None else total + y
        if len(flip_sets) > 1:
            total = total / len(flip_sets)
        return total.to(stitch)

    batches_per_image = math.ceil(len(slices) / sw_batch_size)
    total_batches = source.batch * batches_per_image
    writer = None
    done = 0
    try:
        writer = _Output(out, torch_in and out is None, stitch)
        with torch.inference_mode():
            for n in range(source.batch):
                done = _run_image(
                    n, source, slices, padded, pad_before, slab, weight, forward, run_on, sw_batch_size,
                    cval, output, blend_probabilities, writer, progress, cancel, done, total_batches,
                )
        result = writer.finish()
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    finally:
        prepared.restore()  # the caller's weights in their own layout again
        _restore_modes(was_training)
    return result


def _restore_modes(was_training: list[tuple[torch.nn.Module, bool]]) -> None:
    for module, mode in was_training:
        module.training = mode


def _run_image(
    n, source, slices, padded, pad_before, slab, weight, forward, run_on, sw_batch_size, cval, output,
    blend_probabilities, writer, progress, cancel, done, total_batches,
) -> int:
    """Window loop over image ``n``; slabs are finished and written as soon as no window needs them.

    The accumulator is split into *chunks* along the slab axis, one per gap between consecutive window
    starts (so a window touches two or three chunks); a chunk is made when a window first touches it
    and dropped once written, so memory holds only the chunks the windows in flight cover.
    """
    dims = len(padded)
    others = [a for a in range(dims) if a != slab]
    to_slab_first = [0, 1 + slab] + [1 + a for a in others]
    from_slab_first = [to_slab_first.index(i) for i in range(dims + 1)]
    w_slab = weight.permute(to_slab_first)[0]  # (roi_slab, *roi_others)
    other_shape = tuple(padded[a] for a in others)
    bounds = sorted({w[slab].start for w in slices} | {padded[slab]})
    chunks: dict[int, torch.Tensor] = {}  # chunk index -> (K, length, *others) weighted sum
    counts: dict[int, torch.Tensor] = {}  # chunk index -> (length, *others) sum of weights
    # written chunks and the window batch are reused instead of freed and allocated again: fresh memory
    # costs a page fault per 4 kB, which on a 3D volume adds up to a tenth of the network's time
    spare: dict[tuple[int, ...], list[torch.Tensor]] = {}
    batch_buffer: torch.Tensor | None = None
    weighted: torch.Tensor | None = None  # the blending weight broadcast over the classes, in the output's layout
    # Label maps need no normalisation: every voxel's weighted sum is divided by the same positive sum of
    # weights for all classes, which cannot change the argmax or the sign of a 1-class logit. Only a
    # 1-class probability (threshold 0.5) and the logits / probability outputs need the weight sums.
    normalise: bool | None = None  # decided when the number of classes is known (first window)
    finished = 0  # chunks below this index are written
    crop_others = tuple(slice(pad_before[a], pad_before[a] + source.spatial[a]) for a in others)

    def finish(upto: int) -> None:
        """Write every chunk that ends at or before slab index ``upto``."""
        nonlocal finished
        while finished < len(bounds) - 1 and bounds[finished + 1] <= upto:
            lo, hi = bounds[finished], bounds[finished + 1]
            start, stop = max(lo, pad_before[slab]), min(hi, pad_before[slab] + source.spatial[slab])
            if stop > start and finished in chunks:
                inside = (slice(start - lo, stop - lo), *crop_others)
                values = chunks[finished][(slice(None), *inside)]
                if normalise:
                    values = values / counts[finished][inside]
                _emit(values.permute(from_slab_first), n, slab, start - pad_before[slab], stop - pad_before[slab],
                      source, output, blend_probabilities, writer)
            for store in (chunks, counts):
                done_chunk = store.pop(finished, None)
                if done_chunk is not None:
                    spare.setdefault(tuple(done_chunk.shape), []).append(done_chunk)
            finished += 1

    def zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Zeros of ``shape`` in ``like``'s memory order (a channels-last network output keeps the classes
        innermost: accumulating it into a chunk of the same order is a contiguous, vectorised FMA)."""
        reusable = spare.get(shape)
        if reusable:
            return reusable.pop().zero_()
        order = sorted(range(like.dim()), key=lambda d: (-like.stride(d), d))
        return like.new_zeros([shape[d] for d in order]).permute([order.index(d) for d in range(like.dim())])

    def accumulate(window: tuple[slice, ...], p: torch.Tensor) -> None:
        """Add ``p × weight`` (``p``: ``(K, roi_slab, *roi_others)``) into the chunks the window covers."""
        nonlocal normalise, weighted
        if normalise is None:
            normalise = output != "labels" or (blend_probabilities and p.shape[0] == 1)
        if weighted is None or weighted.shape != p.shape or weighted.stride() != p.stride():
            weighted = torch.empty_like(p).copy_(w_slab.expand_as(p))  # once, in the network output's memory order
        start, stop = window[slab].start, window[slab].stop
        region = tuple(window[a] for a in others)
        r = bisect.bisect_right(bounds, start) - 1
        while r < len(bounds) - 1 and bounds[r] < stop:
            lo, hi = bounds[r], bounds[r + 1]
            if r not in chunks:
                chunks[r] = zeros((p.shape[0], hi - lo, *other_shape), p)
                if normalise:
                    counts[r] = zeros((hi - lo, *other_shape), w_slab)
            a, b = max(start, lo), min(stop, hi)
            chunks[r][(slice(None), slice(a - lo, b - lo), *region)].addcmul_(
                p[:, a - start:b - start], weighted[:, a - start:b - start])
            if normalise:
                counts[r][(slice(a - lo, b - lo), *region)] += w_slab[a - start:b - start]
            r += 1

    slab_cache: dict[tuple[int, int], torch.Tensor] = {}

    def read(window: tuple[slice, ...]) -> torch.Tensor:
        """One window; a lazy source is read one slab (window thickness × whole plane) at a time."""
        if source.kind != "lazy":
            return _read_window(source, n, window, pad_before, cval)
        key = (window[slab].start, window[slab].stop)
        if key not in slab_cache:
            slab_cache.clear()  # windows come sorted along the slab axis: an old slab is never needed again
            whole = tuple(window[a] if a == slab else slice(0, padded[a]) for a in range(dims))
            slab_cache[key] = _read_window(source, n, whole, pad_before, cval)
        crop = tuple(slice(0, key[1] - key[0]) if a == slab else window[a] for a in range(dims))
        return slab_cache[key][(slice(None), *crop)]

    for first in range(0, len(slices), sw_batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"inference cancelled after {done} of {total_batches} window batches")
        group = slices[first:first + sw_batch_size]
        windows = [read(w) for w in group]
        if batch_buffer is None or batch_buffer.dtype != windows[0].dtype:
            batch_buffer = windows[0].new_empty((sw_batch_size, *windows[0].shape))
        batch = torch.stack(windows, out=batch_buffer[:len(group)]).to(run_on)
        predicted = forward(batch)  # (B, K, *roi)
        for w, p in zip(group, predicted):
            accumulate(w, p.permute(to_slab_first))
        done += 1
        if progress is not None:
            progress(done, total_batches)
        remaining = first + sw_batch_size
        finish(slices[remaining][slab].start if remaining < len(slices) else padded[slab])
    return done


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


def _emit(values, n, slab, start, stop, source, output, blend_probabilities, writer) -> None:
    """Turn blended ``(K, *region)`` values into the requested output and write them."""
    classes = values.shape[0]
    if output == "logits":
        result = values
    elif output == "probabilities":
        if blend_probabilities:
            result = values
        else:
            result = torch.sigmoid(values) if classes == 1 else torch.softmax(values, dim=0)
    else:
        if classes == 1:
            result = (values[0] > (0.5 if blend_probabilities else 0.0)).to(torch.uint8)
        else:
            result = _argmax(values)
    if writer.array is None:
        spatial = source.spatial
        shape = ((source.batch,) if source.has_batch else ()) + ((classes,) if output != "labels" else ()) + spatial
        dtype = _label_dtype(classes) if output == "labels" else np.dtype(np.float32)
        writer.allocate(tuple(shape), dtype, slab)
    region = [slice(None)] * len(source.spatial)
    region[slab] = slice(start, stop)
    index = ((n,) if source.has_batch else ()) + ((slice(None),) if output != "labels" else ()) + tuple(region)
    writer.write(index, result)
