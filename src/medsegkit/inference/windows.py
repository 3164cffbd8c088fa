"""The window engine under every inference task.

One module owns the four things every sliding-window task needs; the tasks are consumers of it:

- **the image source** (:class:`ImageSource`, made by :func:`as_source`): numpy, torch or lazy arrays
  (dask, zarr: anything with ``shape``, ``dtype`` and slicing) seen as ``(N, C, *spatial)`` and read one
  window (or one slab) at a time, with the layout rules shared by all tasks (batch / channel axes, a 2D
  model on a 3D volume, a 1-channel image for a 3-channel model);
- **the window grid** (:class:`WindowGrid`): MONAI's ``dense_patch_slices`` with the scan-interval rule
  of ``sliding_window_inference``, on the image padded to at least one window;
- **the runner** (:class:`Runner`): the one place a network is called on a window batch. A backend
  other than eager PyTorch (ONNX Runtime, OpenVINO, an exported program) is another callable with the
  same contract (:class:`medsegkit.inference.backends.BackendRunner`, chosen by :func:`prepared_runner`);
- **one iterator** (:func:`iterate_windows`) over window batches: reads, calls the runner, reports
  ``progress(done, total)`` after the consumer has used each batch and checks ``cancel`` before each
  one. It takes an optional window ``order`` / subset (slab order for blending; focus-first order or a
  partial recompute for an interactive session).

Consumers: semantic blending (:func:`medsegkit.inference.predict`), query-segment merging
(:func:`medsegkit.inference.adapters.predict_query`) and detection linking
(:func:`medsegkit.inference.instance.predict_instances`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medsegkit._values import is_finite_number, is_whole_number
from medsegkit.errors import Cancelled
from medsegkit.inference.fast import PreparedModel, prepare_model
from medsegkit.nets.modes import evaluating

__all__ = [
    "ImageSource", "Runner", "WindowBatch", "WindowGrid", "as_source", "check_callbacks", "check_device", "check_out_dtype", "check_overlap", "check_sw_batch_size", "iterate_windows",
    "model_device",
    "model_in_channels", "model_spatial_dims", "prepared_runner", "registered_roi", "resolve_overlap", "resolve_roi",
    "resolve_slice_axis", "window_slices", "write_into",
]

logger = logging.getLogger("medsegkit.inference")

DEFAULT_ROI = {2: (256, 256), 3: (96, 96, 96)}
MAX_PADDED_VOXELS = 2**31 - 1  # how far a window larger than the image may pad it (float32: 8 GiB per channel)
Region = tuple[slice, ...]


# --------------------------------------------------------------------------------------------------
# model facts
def model_spatial_dims(model: nn.Module) -> int:
    """2 or 3 (1 for 1D models): the ``spatial_dims`` / ``dimensions`` attribute, else the first convolution."""
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


def model_in_channels(model: nn.Module) -> int | None:
    """The ``in_channels`` attribute, else the first convolution's, else ``None``."""
    value = getattr(model, "in_channels", None)
    if isinstance(value, int):
        return value
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return int(module.in_channels)
    return None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def registered_roi(model: nn.Module) -> tuple[int, ...] | None:
    """The model's ``default_roi_size`` attribute, else the window its checkpoint was trained with
    (``medsegkit_metadata["roi_size"]``), else its registry entry's (from ``medsegkit_config``), else ``None``."""
    roi = getattr(model, "default_roi_size", None)
    metadata = getattr(model, "medsegkit_metadata", None)
    if roi is None and isinstance(metadata, dict) and metadata.get("roi_size"):
        roi = metadata["roi_size"]
    config = getattr(model, "medsegkit_config", None)
    if roi is None and isinstance(config, dict) and "name" in config:
        from medsegkit.registry import get_model_spec

        try:
            roi = get_model_spec(config["name"]).default_roi_size
        except KeyError:  # a checkpoint of a name this build does not register: the generic default
            roi = None
    return None if roi is None else tuple(int(r) for r in roi)


def default_roi(model: nn.Module, spatial_dims: int) -> tuple[int, ...]:
    """:func:`registered_roi` when it has ``spatial_dims`` entries, else 96³ / 256²."""
    roi = registered_roi(model)
    if roi is not None and len(roi) == spatial_dims:
        return roi
    return DEFAULT_ROI.get(spatial_dims, (128,) * spatial_dims)


# --------------------------------------------------------------------------------------------------
# the image source
def _region_text(region: Sequence[slice]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


@dataclass
class ImageSource:
    """The image as ``(N, C, *spatial)`` whatever its container, read one window at a time."""

    data: Any  # numpy array, torch tensor or lazy array, in its original layout
    kind: str  # "numpy" | "torch" | "lazy"
    has_batch: bool
    has_channel: bool
    spatial: tuple[int, ...]
    channels: int
    batch: int
    repeat_channels: int = 1

    def _index(self, n: int, region: Sequence[slice]) -> tuple:
        return ((n,) if self.has_batch else ()) + ((slice(None),) if self.has_channel else ()) + tuple(region)

    def read(self, n: int, region: Sequence[slice]) -> torch.Tensor:
        """Float32 tensor ``(C_model, *region)`` of image ``n`` (region inside the image)."""
        if self.kind == "torch":
            window = self.data[self._index(n, region)]
        else:
            array = np.asarray(self.data[self._index(n, region)])
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

    def value_range(self, n: int) -> tuple[float, float]:
        """``(min, max)`` over image ``n`` (all channels; a lazy array is read whole)."""
        item = self.data[self._index(n, [slice(None)] * len(self.spatial))]
        if self.kind == "torch":
            return float(item.min()), float(item.max())
        item = np.asarray(item)
        return float(item.min()), float(item.max())


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


def as_source(
    image: Any, model_dims: int, in_channels: int | None, slice_axis: int | None, image_dims: int | None = None
) -> tuple[ImageSource, int]:
    """Wrap ``image`` and return it with the number of spatial dims of the *image* (2 or 3).

    ``image_dims`` forces the image's number of spatial dims (else: a 2D model sees a 3-axis array as
    ``(C, H, W)`` when its first size is 1 or ``in_channels``, else as a volume; ``slice_axis`` or 5 axes
    mean a volume).
    """
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
    if kind == "torch" and image.device.type == "meta":
        raise ValueError("image is a tensor on the meta device, which holds no values; give a tensor with data")
    shape = tuple(int(s) for s in image.shape)
    if any(s == 0 for s in shape) or len(shape) == 0:
        raise ValueError(f"image is empty (shape {shape}); give an array with at least one voxel")

    ndim = len(shape)
    accepted = f"(*spatial), (C, *spatial) or (N, C, *spatial) with {model_dims} spatial axes"
    if image_dims is not None:
        if image_dims not in (2, 3) or image_dims < model_dims:
            raise ValueError(f"spatial_dims must be 2 (an image) or 3 (a volume), got {image_dims!r}")
    elif model_dims == 2 and (slice_axis is not None or ndim == 5):
        image_dims = 3  # a volume, run slice by slice
    elif model_dims == 2 and ndim == 3:
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
    source = ImageSource(
        data=image, kind=kind, has_batch=has_batch, has_channel=has_channel, spatial=shape[leading:],
        channels=channels, batch=shape[0] if has_batch else 1, repeat_channels=repeat,
    )
    return source, image_dims


# --------------------------------------------------------------------------------------------------
# the window grid
def resolve_slice_axis(slice_axis: int | None, model_dims: int, image_dims: int) -> int | None:
    """The axis a 2D model slices a volume along (default: the last), ``None`` when dims agree."""
    if image_dims == model_dims:
        if slice_axis is not None:
            raise ValueError(
                f"slice_axis is only for a 2D model on a 3D volume; this is a {model_dims}D model on a "
                f"{image_dims}D image"
            )
        return None
    if slice_axis is not None and not is_whole_number(slice_axis):  # int() took 1.5 as 1, True as 1 and "0" as 0
        raise ValueError(f"slice_axis must be an int, a spatial axis in [0, {image_dims}), got {slice_axis!r}")
    axis = image_dims - 1 if slice_axis is None else int(slice_axis)
    if not -image_dims <= axis < image_dims:
        raise ValueError(f"slice_axis must be a spatial axis in [0, {image_dims}), got {slice_axis}")
    return axis % image_dims


def resolve_roi(
    roi_size: Any, model: nn.Module, model_dims: int, image_spatial: Sequence[int], slice_axis: int | None
) -> tuple[int, ...]:
    """The window size in the *image's* dims: ``roi_size`` (int or one per model axis; ``None``: the
    model's default; non-positive / ``None`` entries take the image size), with a 1 inserted at
    ``slice_axis`` for a 2D model on a volume."""
    of_model = [s for i, s in enumerate(image_spatial) if i != slice_axis]

    if roi_size is None:
        roi = default_roi(model, model_dims)
    elif is_whole_number(roi_size):  # True is no window size
        roi = (int(roi_size),) * model_dims
    else:
        roi = tuple(roi_size) if isinstance(roi_size, Sequence) and not isinstance(roi_size, str) else ()
        if len(roi) != model_dims or not all(is_whole_number(r) or r is None for r in roi):
            raise ValueError(f"roi_size must be an int or {model_dims} ints for a {model_dims}D model, got {roi_size!r}")
    roi = tuple(int(size) if r is None or r <= 0 else int(r) for r, size in zip(roi, of_model))
    if slice_axis is not None:
        roi = roi[:slice_axis] + (1,) + roi[slice_axis:]
    return roi


def check_overlap(overlap: Any) -> tuple[float, ...]:
    """``overlap`` (one float or one per axis) as a tuple, each value checked to lie in ``[0, 1)``."""
    overlaps = tuple(overlap) if isinstance(overlap, Sequence) and not isinstance(overlap, str) else (overlap,)
    if not overlaps or not all(is_finite_number(o) and 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must be in [0, 1) (0.5 = half a window), got {overlap!r}")
    return tuple(float(o) for o in overlaps)


MODES = ("gaussian", "constant")  # how window outputs are blended


def check_sw_batch_size(sw_batch_size: Any) -> None:
    """``sw_batch_size`` (windows per network call) is a positive int; ``ValueError`` otherwise (semantic,
    query and instance paths alike)."""
    if not is_whole_number(sw_batch_size) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")


def check_window_options(*, sw_batch_size: Any, overlap: Any, mode: Any, sigma_scale: Any, cval: Any) -> None:
    """The sliding-window options :func:`~medsegkit.inference.predict` and the interactive session share,
    checked before any work: ``sw_batch_size`` a positive int, ``overlap`` in ``[0, 1)``, ``mode`` one of
    :data:`MODES`, ``sigma_scale`` a positive number or one per axis, ``cval`` a finite number.

    Raises:
        ValueError: one line naming the option, the value and what is accepted.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    check_sw_batch_size(sw_batch_size)
    check_overlap(overlap)
    sigmas = tuple(sigma_scale) if isinstance(sigma_scale, Sequence) and not isinstance(sigma_scale, str) else (sigma_scale,)
    if not sigmas or not all(is_finite_number(s) and s > 0 for s in sigmas):
        raise ValueError(f"sigma_scale must be a positive number or one per axis (the Gaussian's sigma as a fraction "
                         f"of the window, default 0.125), got {sigma_scale!r}")
    if not is_finite_number(cval):
        raise ValueError(f"cval must be a finite number (the value read outside the image), got {cval!r}")


def check_device(name: str, device: Any) -> None:
    """``device`` (``None``, a ``torch.device``, a string such as ``"cuda:1"`` or a CUDA index) names a device
    this process can use: not ``meta``, and CUDA / MPS only where available (with the CUDA index in range).

    Raises:
        ValueError: one line naming the argument, the value and why it cannot be used.
    """
    if device is None:
        return
    try:
        if isinstance(device, bool):
            raise TypeError
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if resolved.type == "meta":
        raise ValueError(f"{name}={device!r}: a meta device holds no data; use 'cpu' or 'cuda'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={device!r}: CUDA is not available here (torch.cuda.is_available() is False); use 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={device!r}: MPS is not available here (torch.backends.mps.is_available() is False); use 'cpu'")


def check_callbacks(progress: Any, cancel: Any) -> None:
    """``progress`` ``None`` or callable, ``cancel`` ``None`` or an object with a callable ``is_set()``,
    checked before any window runs (they were first touched after the first window batch, or before it).

    Raises:
        ValueError: one line naming the argument, what it is and what is accepted.
    """
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be a callable progress(done, total) or None, got {type(progress).__name__}")
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise ValueError(f"cancel must have an is_set() method (a threading.Event) or be None, got {type(cancel).__name__}")


def resolve_overlap(overlap: Any, model_dims: int, image_dims: int, slice_axis: int | None) -> tuple[float, ...]:
    """One overlap per image axis (``0`` along ``slice_axis``); each in ``[0, 1)``."""
    overlaps = check_overlap(overlap)
    if len(overlaps) == 1:
        overlaps = overlaps * image_dims
    elif len(overlaps) == model_dims and slice_axis is not None:
        overlaps = overlaps[:slice_axis] + (0.0,) + overlaps[slice_axis:]
    if len(overlaps) != image_dims:
        raise ValueError(f"overlap must be one float or one per spatial axis ({model_dims}), got {overlap!r}")
    return tuple(float(o) for o in overlaps)


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

    Raises:
        ValueError: a window larger than the image pads it beyond :data:`MAX_PADDED_VOXELS` voxels.
    """
    from monai.data.utils import dense_patch_slices

    overlaps = tuple(overlap) if isinstance(overlap, Sequence) else (float(overlap),) * len(image_size)
    padded = tuple(max(s, r) for s, r in zip(image_size, roi_size))
    if math.prod(padded) > max(math.prod(image_size), MAX_PADDED_VOXELS):  # the padded grid is allocated per window
        raise ValueError(
            f"roi_size {tuple(roi_size)} pads the image {tuple(image_size)} to {math.prod(padded):,} voxels; a window "
            f"larger than the image may pad it to at most {MAX_PADDED_VOXELS:,} voxels (2**31 - 1): give a smaller roi_size"
        )
    pad_before = [(p - s) // 2 for p, s in zip(padded, image_size)]
    slices = dense_patch_slices(padded, roi_size, _scan_interval(padded, roi_size, overlaps))
    return slices, padded, pad_before


@dataclass
class WindowGrid:
    """The windows over an image of size ``spatial`` (MONAI's grid, padded coordinates).

    Attributes:
        spatial: the image's spatial size; roi: the window size (same length).
        slices: the windows, in MONAI's order, in padded coordinates.
        padded: the image size padded to at least one window; pad_before: padding before each axis.
        slab_axis: the axis where a window covers the smallest fraction of the image.
    """

    spatial: tuple[int, ...]
    roi: tuple[int, ...]
    overlap: tuple[float, ...]
    slices: list[Region] = field(init=False)
    padded: tuple[int, ...] = field(init=False)
    pad_before: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.slices, self.padded, self.pad_before = window_slices(self.spatial, self.roi, self.overlap)

    @property
    def slab_axis(self) -> int:
        return min(range(len(self.roi)), key=lambda a: (self.roi[a] / self.padded[a], a))

    @property
    def crop(self) -> Region:
        """The image inside the padded grid."""
        return tuple(slice(b, b + s) for b, s in zip(self.pad_before, self.spatial))

    def slab_order(self) -> list[int]:
        """Window indices sorted by their start along :attr:`slab_axis` (stable)."""
        slab = self.slab_axis
        return sorted(range(len(self.slices)), key=lambda i: self.slices[i][slab].start)

    def read(self, source: ImageSource, n: int, window: Region, cval: float) -> torch.Tensor:
        """Window of image ``n`` in padded coordinates; the parts outside the image are ``cval``."""
        inside, target, clipped = [], [], False
        for s, before, size in zip(window, self.pad_before, source.spatial):
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
# the runner: the one place the network is called
class Runner:
    """Calls the network on one window batch ``(B, C, *roi)``: the only call site of inference.

    Args:
        prepared: the model as :func:`medsegkit.inference.fast.prepare_model` made it ready (device,
            autocast, memory format).
        call: ``None``: a dense model, returning float32 ``(B, K, *roi)`` (``PreparedModel.__call__``);
            else ``call(module, batch)`` returns the network's own output (the query models' dict, the
            detection models' list), run under the prepared autocast and memory format.
    """

    def __init__(self, prepared: PreparedModel, call: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> None:
        self.prepared = prepared
        self.call = call

    @property
    def device(self) -> torch.device:
        return self.prepared.device

    @property
    def notes(self) -> list[str]:
        return self.prepared.notes

    def __call__(self, batch: torch.Tensor) -> Any:
        batch = batch.to(self.prepared.device)
        if self.call is None:
            return self.prepared(batch)
        return self.prepared.invoke(self.call, batch)  # decides the channels-last fallback on the first batch


@contextlib.contextmanager
def prepared_runner(
    model: nn.Module, *, call: Callable[[nn.Module, torch.Tensor], Any] | None = None, **prepare: Any
) -> Iterator[Runner]:
    """A :class:`Runner` (``call`` as there) for ``model`` made ready by
    :func:`~medsegkit.inference.fast.prepare_model` (``prepare``: its keyword arguments ``device``, ``fast``,
    ``amp``, ``example_shape``, ...), in eval mode under ``inference_mode``; afterwards each module's own
    training flag is restored (``prepare_model`` never changes the caller's weights).

    An exported network (:class:`~medsegkit.inference.backends.ExportedNetwork`: ONNX Runtime, OpenVINO,
    torch.export, TorchScript) is another runner, :class:`~medsegkit.inference.backends.BackendRunner`:
    it runs as exported, so ``fast`` / ``amp`` are refused and ``call`` (query / detection outputs) too."""
    from medsegkit.inference.backends import BackendRunner, ExportedNetwork

    if isinstance(model, ExportedNetwork):
        if call is not None or prepare.get("fast") or prepare.get("amp"):
            raise ValueError(
                f"an exported network ({model.backend}) runs as it was exported: fast=True, amp and query / "
                "detection outputs need the PyTorch model"
            )
        with torch.inference_mode():
            yield BackendRunner(model)  # type: ignore[misc]
        return
    with evaluating(model):
        prepared = prepare_model(model, **prepare)
        if prepared.notes:
            logger.info("inference: %s", ", ".join(prepared.notes))
        with torch.inference_mode():
            yield Runner(prepared, call)


# --------------------------------------------------------------------------------------------------
# the iterator
class _WindowReader:
    """Reads windows of image ``n``; with ``slab_reads`` a lazy source is read one slab (window thickness
    along ``grid.slab_axis`` × the whole plane) at a time, kept until a window of another slab comes."""

    def __init__(self, source: ImageSource, grid: WindowGrid, n: int, cval: float, slab_reads: bool) -> None:
        self.source, self.grid, self.n, self.cval = source, grid, n, cval
        self.slab_reads = slab_reads and source.kind == "lazy"
        self.slab = grid.slab_axis
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, window: Region) -> torch.Tensor:
        if not self.slab_reads:
            return self.grid.read(self.source, self.n, window, self.cval)
        slab, dims = self.slab, len(window)
        key = (window[slab].start, window[slab].stop)
        if key not in self.cache:
            self.cache.clear()  # sorted along the slab axis: an old slab is never needed again
            whole = tuple(window[a] if a == slab else slice(0, self.grid.padded[a]) for a in range(dims))
            self.cache[key] = self.grid.read(self.source, self.n, whole, self.cval)
        crop = tuple(slice(0, key[1] - key[0]) if a == slab else window[a] for a in range(dims))
        return self.cache[key][(slice(None), *crop)]


@dataclass
class WindowBatch:
    """One batch of windows of image ``n``: their indices in the grid, their slices and the runner's output."""

    n: int
    indices: list[int]
    windows: list[Region]
    output: Any


def iterate_windows(
    source: ImageSource,
    grid: WindowGrid,
    run: Callable[[torch.Tensor], Any],
    *,
    batch_size: int,
    order: Sequence[int] | None = None,
    images: Sequence[int] | None = None,
    cval: float = 0.0,
    slab_reads: bool = False,
    transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Any = None,
) -> Iterator[WindowBatch]:
    """Window batches of every image, in ``order``, run through ``run``.

    Args:
        source, grid: the image and its windows.
        run: a :class:`Runner` (or any ``(B, C, *roi)`` → output callable).
        batch_size: windows per call.
        order: window indices to visit, in this order (default: all, in the grid's order); a subset
            recomputes only those windows.
        images: image indices of the batch axis to visit (default: all).
        cval: value of the padding outside the image.
        slab_reads: read a lazy source one slab (window thickness along ``grid.slab_axis`` × the whole
            plane) at a time, for an ``order`` sorted along the slab axis (zarr / dask chunks are read
            once instead of once per window).
        transform: ``transform(n, batch)`` applied to each read batch before ``run`` (e.g. intensity
            scaling).
        progress: ``progress(done, total)`` after the consumer has used each batch;
            ``total = images × ceil(windows / batch_size)``.
        cancel: ``is_set()`` checked before each batch; raises :class:`medsegkit.Cancelled`.

    Yields:
        :class:`WindowBatch` for each batch.
    """
    order = list(range(len(grid.slices))) if order is None else list(order)
    images = list(range(source.batch)) if images is None else list(images)
    total = len(images) * math.ceil(len(order) / batch_size)
    done = 0
    buffer: torch.Tensor | None = None
    for n in images:
        read = _WindowReader(source, grid, n, cval, slab_reads)
        for first in range(0, len(order), batch_size):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"inference cancelled after {done} of {total} window batches")
            indices = order[first:first + batch_size]
            windows = [grid.slices[i] for i in indices]
            read_windows = [read(w) for w in windows]
            # the batch buffer is reused: fresh memory costs a page fault per 4 kB on every batch
            if buffer is None or buffer.dtype != read_windows[0].dtype or buffer.shape[1:] != read_windows[0].shape:
                # never more windows than the order holds: a batch size above it is no reason to allocate more
                buffer = read_windows[0].new_empty((min(batch_size, len(order)), *read_windows[0].shape))
            batch = torch.stack(read_windows, out=buffer[:len(windows)])
            if transform is not None:
                batch = transform(n, batch)
            yield WindowBatch(n=n, indices=indices, windows=windows, output=run(batch))
            done += 1
            if progress is not None:
                progress(done, total)


# --------------------------------------------------------------------------------------------------
def check_out_dtype(out_dtype: Any, dtype: np.dtype, classes: int | None) -> None:
    """Refuse a caller's ``out`` dtype (numpy, zarr or torch) that cannot hold the result: probabilities /
    logits (float ``dtype``) need a floating array, labels ``0..classes - 1`` an integer, bool or float dtype
    holding ``classes - 1`` (numpy's cast wraps 300 classes into uint8 and truncates probabilities to 0)."""
    if isinstance(out_dtype, torch.dtype):
        floating, boolean = out_dtype.is_floating_point, out_dtype == torch.bool
        largest = None if floating or boolean or out_dtype.is_complex else torch.iinfo(out_dtype).max
    else:
        kind = np.dtype(out_dtype).kind
        floating, boolean = kind == "f", kind == "b"
        largest = np.iinfo(np.dtype(out_dtype)).max if kind in "iu" else None
    if np.dtype(dtype).kind == "f":
        if not floating:
            raise ValueError(f"out has dtype {out_dtype}, but probabilities / logits are float32; give a floating array")
        return
    top = max((classes or 2) - 1, 1)  # the largest label (a 1-class map: 0 / 1)
    if boolean and top > 1 or largest is not None and largest < top or not (floating or boolean or largest is not None):
        raise ValueError(f"out has dtype {out_dtype}, which cannot hold labels 0 to {top}; give an integer array "
                         f"(uint8 up to 256 classes, else int32)")


def write_into(out: Any, result: Any) -> Any:
    """Copy a finished ``result`` (numpy array or tensor) into the caller's array ``out`` and return it."""
    if isinstance(out, (str, bytes)) or hasattr(out, "__fspath__") or not hasattr(out, "shape"):
        raise ValueError(
            f"out must be an array of the result's shape (numpy, memmap, zarr, tensor), got {type(out).__name__}; "
            "label maps of segments are not written to paths"
        )
    if tuple(out.shape) != tuple(result.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, but the result has shape {tuple(result.shape)}")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("out is a read-only array; give a writeable one")
    if isinstance(out, torch.Tensor) and out.device.type == "meta":
        raise ValueError("out is a tensor on the meta device, which holds no values; give one on 'cpu' or 'cuda'")
    values = np.asarray(result.cpu() if isinstance(result, torch.Tensor) else result)
    if values.dtype.kind in "iu":  # label maps: out must hold the largest label (bool: 0 / 1 only)
        check_out_dtype(out.dtype, values.dtype, int(values.max(initial=0)) + 1)
    if isinstance(out, torch.Tensor):
        out.copy_(torch.as_tensor(result).to(out.device, out.dtype))
    else:
        out[...] = result.cpu().numpy() if isinstance(result, torch.Tensor) else result
    return out
