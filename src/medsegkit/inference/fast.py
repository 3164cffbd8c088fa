"""Inference preparation: a copy of the network with a cheaper forward; the caller's model is never changed.

The networks' own forwards are plain PyTorch. :func:`prepare_model` builds an inference copy by module
swaps that keep the state dict and forward hooks (``medsegkit.nets.layers.residual.InPlaceResidual``,
in-place ReLUs, ``medsegkit.nets.layers.inference_conv.ChannelsLastSequential`` for the ResNet stem,
and on request ``WinogradConv2d``), on every path. The optimised path (``predict(..., fast=True)``)
adds, in order:

1. **Conv–BatchNorm folding**: every ``BatchNorm`` (eval mode, running statistics) that reads the output
   of a convolution used nowhere else is folded into that convolution's weight and bias
   (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`) on a copy of the model, and replaced by
   ``nn.Identity``. The pairs are found by tracing one forward pass with hooks, and the folded copy is
   checked against the original on that pass; if they disagree the original is used (and logged).
2. **channels-last** memory format (``channels_last_3d`` for 3D models, ``channels_last`` for 2D), for
   the model and every window batch.
3. **bfloat16 autocast** where the hardware has native bf16 (CPU: AVX-512 BF16 / AMX; CUDA: compute
   capability ≥ 8.0); otherwise float32 (fp16 autocast on older CUDA GPUs) with a logged note.
4. ``torch.inference_mode`` around the whole window loop.

``torch.compile`` is not used: on CPU its first call costs tens of seconds, far more than it saves on
one volume (see ``docs/inference.md``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medsegkit.amp import (  # amp_dtype, bf16_supported re-exported: the one AMP choice lives in medsegkit.amp
    amp_dtype,
    autocast_as,
    bf16_supported,
)
from medsegkit.nets.modes import evaluating

__all__ = ["PreparedModel", "amp_dtype", "bf16_supported", "fold_batchnorm", "prepare_model", "to_memory_format"]

logger = logging.getLogger("medsegkit.inference")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

def _trace_pairs(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """(conv name, bn name) pairs where the BN's input is the conv's output, and the traced output."""
    names = {m: n for n, m in model.named_modules()}
    conv_outputs: dict[int, str] = {}
    calls: dict[str, int] = {}
    bn_inputs: dict[str, int] = {}
    alive: list[torch.Tensor] = []  # conv outputs held during the pass so that their ids stay unique
    handles = []

    def conv_hook(module, inputs, output):
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        conv_outputs[id(output)] = name
        alive.append(output)

    def bn_hook(module, inputs):
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        bn_inputs[name] = id(inputs[0])

    for module in model.modules():
        if isinstance(module, _CONV):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, _BN) and module.track_running_stats and module.running_mean is not None:
            handles.append(module.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            reference = _first_tensor(model(example))
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for bn_name, tensor_id in bn_inputs.items():
        conv_name = conv_outputs.get(tensor_id)
        if conv_name is not None and calls.get(conv_name) == 1 and calls.get(bn_name) == 1:
            pairs.append((conv_name, bn_name))
    alive.clear()
    return pairs, reference


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["out"]
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"model returned {type(output).__name__}; expected a tensor (N, C, *spatial)")


def _dense_output(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    output = _first_tensor(module(batch))
    if output.is_complex() or output.dtype == torch.bool:  # .float() would drop the imaginary part silently
        raise ValueError(f"the model returned {output.dtype} values; a semantic model must return real logits (N, K, *spatial)")
    return output.float()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of ``model`` (eval mode) with each BatchNorm folded into the convolution before it.

    Args:
        model: any module; it is not changed.
        example: one input batch ``(N, C, *spatial)`` used to find conv→BN pairs and to check the copy.

    Returns:
        ``(folded_copy, number_of_folded_norms)``; ``(model, 0)`` when nothing could be folded or the
        folded copy did not reproduce the original output (logged).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    with evaluating(model):
        pairs, reference = _trace_pairs(model, example)
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model).eval()
    for conv_name, bn_name in pairs:
        conv = folded.get_submodule(conv_name)
        bn = folded.get_submodule(bn_name)
        transpose = isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        _set_submodule(folded, conv_name, fuse_conv_bn_eval(conv, bn, transpose=transpose))
        _set_submodule(folded, bn_name, nn.Identity())
    with torch.no_grad():
        check = _first_tensor(folded(example))
    scale = float(reference.abs().max()) + 1.0
    error = float((check - reference).abs().max())
    if not error <= 1e-4 * scale:
        logger.warning("BatchNorm folding changed the output (max |diff| %.3g); using the model unfolded", error)
        return model, 0
    return folded, len(pairs)


def _weights_key(model: nn.Module, device: torch.device, shape: tuple[int, ...]) -> tuple:
    state = [(t.data_ptr(), t._version) for t in model.state_dict().values()]
    return (str(device), shape, tuple(state))


def to_memory_format(batch: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``batch`` with the strides of ``memory_format``.

    ``Tensor.contiguous(memory_format=...)`` returns a 1-channel batch unchanged (it already counts as
    channels-last contiguous), keeping the NCDHW strides; oneDNN then reads that layout as contiguous and
    converts layouts back and forth inside the network (measured: a 14 ms copy per window batch in a 3D
    U-Net). A 1-channel batch gets the channels-last strides without a copy (same byte order)."""
    if memory_format is torch.contiguous_format:
        return batch.contiguous()
    wanted = torch.empty(batch.shape, memory_format=memory_format, device="meta").stride()
    if batch.stride() == wanted:
        return batch
    if batch.shape[1] == 1 and batch.is_contiguous():
        return batch.as_strided(batch.shape, wanted)
    return batch.contiguous(memory_format=memory_format)


@dataclass
class _InferenceCopy:
    """What :func:`prepare_model` built for one model and one set of options (cached per model)."""

    key: tuple
    module: nn.Module
    folded: int
    swaps: dict[str, int]
    memory_format: torch.memory_format
    layout_decided: bool = False  # set by the first batch: the channels-last fallback is decided once


@dataclass
class PreparedModel:
    """A model ready to run window batches, and how it will run them.

    Attributes:
        module: the network to call: the caller's model when nothing needed changing, else the
            inference copy (module swaps, folded BatchNorm, channels-last weights); never the caller's
            model changed.
        autocast: autocast dtype, or ``None`` for float32.
        memory_format: memory format for window batches (``torch.contiguous_format`` by default).
        notes: human-readable description of the optimisations in use (for logs and the CLI).
    """

    module: nn.Module
    device: torch.device
    autocast: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    notes: list[str] = field(default_factory=list)
    built: _InferenceCopy | None = field(default=None, repr=False)

    def context(self) -> contextlib.AbstractContextManager:
        """The autocast the network runs under (a null context in float32)."""
        return autocast_as(self.device, self.autocast)

    def _run(self, call: Callable[[nn.Module, torch.Tensor], Any], batch: torch.Tensor) -> Any:
        with torch.inference_mode(), self.context():
            return call(self.module, to_memory_format(batch, self.memory_format))

    def invoke(self, call: Callable[[nn.Module, torch.Tensor], Any], batch: torch.Tensor) -> Any:
        """``call(module, batch)`` with the batch in :attr:`memory_format`, under autocast and
        ``inference_mode``; returns what ``call`` returns (e.g. a query model's dict).

        The first batch decides the layout, once: a model that cannot run channels-last (it reshapes
        activations with ``.view()``) raises a ``RuntimeError`` there, and the copy is put back to the
        contiguous layout for this and every later batch. Errors on later batches are raised as they are.
        """
        built = self.built
        if built is None or built.layout_decided or self.memory_format is torch.contiguous_format:
            if built is not None:
                built.layout_decided = True
            return self._run(call, batch)
        try:
            result = self._run(call, batch)
        except RuntimeError as error:
            logger.info("inference: %s cannot run channels-last (%s); running it contiguous",
                        type(self.module).__name__, str(error).splitlines()[0])
            built.module.to(memory_format=torch.contiguous_format)  # the copy, never the caller's model
            built.memory_format = self.memory_format = torch.contiguous_format
            built.layout_decided = True
            self.notes[:] = [note for note in self.notes if not note.startswith("channels-last")]
            return self._run(call, batch)
        built.layout_decided = True
        return result

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, C, *roi)`` → float32 ``(B, K, *roi)`` (:meth:`invoke` on a dense model)."""
        return self.invoke(_dense_output, batch)


# model -> {options: _InferenceCopy}; a repeated predict() on the same weights reuses the copy
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _inference_swaps(model: nn.Module, *, winograd: bool) -> dict[str, list[str]]:
    """Which modules of ``model`` :func:`_apply_swaps` changes, by kind → module names (nothing is changed).

    - ``"residual"``: every :class:`~medsegkit.nets.layers.residual.Residual` → ``InPlaceResidual``.
    - ``"relu"``: the ``nn.ReLU`` modules of a :class:`~medsegkit.nets.backbones.resnet.ResNet`, which
      only ever see fresh tensors (norm outputs, residual sums) → ``inplace=True``.
    - ``"stem"``: a ResNet's stem → :class:`~medsegkit.nets.layers.inference_conv.ChannelsLastSequential`.
    - ``"winograd"`` (with ``winograd``): every 2D 3×3 convolution that
      :func:`~medsegkit.nets.layers.inference_conv.winograd_shape` accepts, outside a Mask2Former →
      :class:`~medsegkit.nets.layers.inference_conv.WinogradConv2d`.
    """
    from medsegkit.nets.backbones.resnet import ResNet
    from medsegkit.nets.layers.inference_conv import winograd_shape
    from medsegkit.nets.layers.residual import Residual
    from medsegkit.nets.mask2former import Mask2Former

    swaps: dict[str, list[str]] = {"residual": [], "relu": [], "stem": [], "winograd": []}
    plain_convs: set[str] = set()  # inside a Mask2Former: its attention-mask thresholds flip on 1e-5 changes
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Mask2Former):
            plain_convs.update(prefix + n for n, _ in module.named_modules())
        if type(module) is Residual:
            swaps["residual"].append(name)
        elif isinstance(module, ResNet):
            if type(module.stem) is nn.Sequential:
                swaps["stem"].append(prefix + "stem")
            swaps["relu"] += [prefix + n for n, m in module.named_modules() if type(m) is nn.ReLU and not m.inplace]
        elif winograd and type(module) is nn.Conv2d and winograd_shape(module) and name not in plain_convs:
            swaps["winograd"].append(name)
    return {kind: names for kind, names in swaps.items() if names}


def _apply_swaps(model: nn.Module, swaps: dict[str, list[str]]) -> None:
    """Make the changes :func:`_inference_swaps` listed, in place (on the inference copy only)."""
    from medsegkit.nets.layers.inference_conv import ChannelsLastSequential, WinogradConv2d
    from medsegkit.nets.layers.residual import InPlaceResidual

    for name in swaps.get("residual", []):
        model.get_submodule(name).__class__ = InPlaceResidual
    for name in swaps.get("relu", []):
        model.get_submodule(name).inplace = True
    for name in swaps.get("stem", []):
        ChannelsLastSequential.swap(model.get_submodule(name))
    for name in swaps.get("winograd", []):
        WinogradConv2d.swap(model.get_submodule(name))


def _build(model: nn.Module, key: tuple, *, fast: bool, winograd: bool, memory_format: torch.memory_format,
           device: torch.device, example_shape: tuple[int, ...]) -> _InferenceCopy:
    """The inference copy of ``model``: BatchNorm folded (``fast``), module swaps, weights in ``memory_format``."""
    module, folded = model, 0
    if fast:
        generator = torch.Generator(device="cpu").manual_seed(0)
        example = torch.randn(example_shape[1:], generator=generator)[None].to(device)
        module, folded = fold_batchnorm(model, example)
    swaps = _inference_swaps(module, winograd=winograd)
    if module is model and (swaps or memory_format is not torch.contiguous_format):
        # never change the caller's model: new module objects; they share the caller's weight tensors
        # (no second copy in memory) unless the weights get another layout
        shared = {} if memory_format is not torch.contiguous_format else {
            id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())
        }
        module = copy.deepcopy(model, shared)
    if module is not model:
        module.eval()
        _apply_swaps(module, swaps)
        if memory_format is not torch.contiguous_format:
            module = module.to(memory_format=memory_format)
    return _InferenceCopy(key, module, folded, {kind: len(names) for kind, names in swaps.items()}, memory_format)


def prepare_model(
    model: nn.Module,
    *,
    device: torch.device,
    fast: bool,
    amp: bool | str | torch.dtype,
    example_shape: tuple[int, ...],
    relayout: bool = True,
    winograd: bool | None = None,
) -> PreparedModel:
    """Prepare ``model`` for window batches of shape ``example_shape = (B, C, *roi)`` on ``device``.

    The caller's model is never changed: everything below happens on a copy (cached per model until its
    weights change), built by module swaps that keep the state dict and forward hooks:

    - always: residual adds and the ResNet's ReLUs in place, the ResNet stem channels-last on the CPU
      (:func:`_inference_swaps`; the same values as the plain model, fewer passes over memory);
    - ``fast=False``: float32 (autocast only when ``amp`` asks for it); a 3D model on the CPU gets its
      weights in the channels-last-3d order (same values to float32 rounding, about 15 % faster;
      ``relayout=False`` turns this off);
    - ``fast=True``: BatchNorm folding, channels-last for 2D and 3D, and bf16 autocast where native
      (module docstring);
    - ``winograd`` (default: ``fast``): Winograd 3×3 convolutions
      (:class:`~medsegkit.nets.layers.inference_conv.WinogradConv2d`) outside Mask2Former; outputs move
      by ~1e-5 of their scale.

    A model that cannot run channels-last falls back to the contiguous layout on its first batch
    (:meth:`PreparedModel.__call__`).
    """
    notes: list[str] = []
    dtype = amp_dtype(device, amp if amp else (True if fast else False))
    if dtype is not None:
        notes.append(f"autocast {str(dtype).replace('torch.', '')}")
    elif fast or amp:
        notes.append("float32 (no native bf16 on this device)")
    spatial = len(example_shape) - 2
    winograd = fast if winograd is None else bool(winograd)
    memory_format = torch.contiguous_format
    if fast and spatial in (2, 3):
        memory_format = torch.channels_last_3d if spatial == 3 else torch.channels_last
    elif relayout and spatial == 3 and device.type == "cpu":
        memory_format = torch.channels_last_3d
    key = (_weights_key(model, device, example_shape if fast else ()), fast, winograd, memory_format)
    copies = _COPIES.setdefault(model, {})
    built = copies.get(key[1:])
    if built is None or built.key != key:
        built = _build(model, key, fast=fast, winograd=winograd, memory_format=memory_format, device=device,
                       example_shape=example_shape)
        copies[key[1:]] = built
    if fast:
        notes.append(f"{built.folded} BatchNorm layer(s) folded into convolutions")
    if built.swaps.get("winograd"):
        notes.append(f"Winograd 3x3 convolutions ({built.swaps['winograd']})")
    if built.swaps.get("residual") or built.swaps.get("relu"):
        notes.append("in-place residual adds and ReLUs")
    if built.memory_format is not torch.contiguous_format:
        notes.append("channels-last" + ("-3d" if spatial == 3 else ""))
    if fast:
        notes.append("inference_mode")
    return PreparedModel(module=built.module, device=device, autocast=dtype, memory_format=built.memory_format,
                         notes=notes, built=built if built.module is not model else None)


def describe(device: torch.device | str = "cpu") -> str:
    """One line saying what ``fast=True`` will do on ``device`` and for which models (used by the CLI)."""
    device = torch.device(device)
    precision = "bf16 autocast" if bf16_supported(device) else "float32 (no native bf16)"
    return (f"fast path on {device}: BatchNorm folding, channels-last, {precision}, inference_mode "
            "(semantic and detection models; refused for MaskFormer / Mask2Former)")


Predictor = Callable[[torch.Tensor], torch.Tensor]
