"""The optimised inference path (``predict(..., fast=True)``): same network, cheaper forward.

What it does, in order:

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["PreparedModel", "amp_dtype", "bf16_supported", "fold_batchnorm", "prepare_model", "to_memory_format"]

logger = logging.getLogger("medsegkit.inference")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# model -> (key, folded copy, count); a repeated predict() on the same weights reuses the folded copy
_FOLD_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: AVX-512 BF16 or AMX; CUDA: capability ≥ 8)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def amp_dtype(device: torch.device | str, amp: bool | str | torch.dtype) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (``None``: run in float32).

    ``amp=True`` picks bfloat16 where native, else float16 on CUDA, else float32 (logged).
    ``"bf16"`` / ``"fp16"`` / a ``torch.dtype`` ask for one type; bf16 without hardware support falls
    back to float32 with a logged warning instead of running an emulated, slower bf16.
    """
    device = torch.device(device)
    if amp is False or amp is None:
        return None
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if isinstance(amp, str):
        if amp not in names:
            raise ValueError(f"amp must be True, False, 'bf16' or 'fp16', got {amp!r}")
        wanted: torch.dtype | None = names[amp]
    elif isinstance(amp, torch.dtype):
        if amp not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp dtype must be torch.bfloat16 or torch.float16, got {amp}")
        wanted = amp
    elif amp is True:
        wanted = None
    else:
        raise ValueError(f"amp must be True, False, 'bf16' or 'fp16', got {amp!r}")
    if wanted in (None, torch.bfloat16) and bf16_supported(device):
        return torch.bfloat16
    if device.type == "cuda" and wanted in (None, torch.float16):
        return torch.float16
    if wanted is torch.float16 and device.type == "cpu":
        logger.warning("fp16 autocast is not supported on CPU; running in float32")
        return None
    logger.warning("%s has no native bfloat16 support; running in float32 instead of bf16", device)
    return None


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

    was_training = model.training
    model.eval()
    try:
        pairs, reference = _trace_pairs(model, example)
    finally:
        model.train(was_training)
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
class PreparedModel:
    """A model ready to run window batches, and how it will run them.

    Attributes:
        module: the network to call (a folded copy on the fast path).
        autocast: autocast dtype, or ``None`` for float32.
        memory_format: memory format for window batches (``torch.contiguous_format`` by default).
        notes: human-readable description of the optimisations in use (for logs and the CLI).
        swapped: on the default path, the caller's weights given a channels-last layout for the run
            (undone by :meth:`restore`, or at once if the model raises a layout error); else ``None``.
    """

    module: nn.Module
    device: torch.device
    autocast: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    notes: list[str] = field(default_factory=list)
    swapped: list | None = None  # default path: (tensor, original data) of the re-laid-out weights

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.autocast is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast))
            yield

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, C, *roi)`` → float32 ``(B, K, *roi)``."""
        if self.memory_format is torch.contiguous_format:
            with self.context():
                return _first_tensor(self.module(batch)).float()
        try:
            with self.context():
                result = _first_tensor(self.module(to_memory_format(batch, self.memory_format)))
        except RuntimeError as error:
            if self.swapped is None:
                raise
            # the default path only: a model that reshapes activations with .view() cannot run
            # channels-last; it runs with its own weights, contiguous, from now on
            logger.info("inference: %s cannot run channels-last (%s); running it contiguous",
                        type(self.module).__name__, str(error).splitlines()[0])
            self.restore()
            self.memory_format, self.swapped = torch.contiguous_format, None
            self.notes[:] = [note for note in self.notes if not note.startswith("channels-last")]
            with self.context():
                result = _first_tensor(self.module(batch))
        return result.float()

    def restore(self) -> None:
        """Put back the caller's weight tensors that the default path re-laid out (idempotent)."""
        if self.swapped:
            with torch.no_grad():
                for tensor, original in self.swapped:
                    tensor.data = original
            self.swapped.clear()


def prepare_model(
    model: nn.Module,
    *,
    device: torch.device,
    fast: bool,
    amp: bool | str | torch.dtype,
    example_shape: tuple[int, ...],
    relayout: bool = True,
) -> PreparedModel:
    """Prepare ``model`` for window batches of shape ``example_shape = (B, C, *roi)`` on ``device``.

    ``fast=False`` computes in float32 with the model's own weights (autocast only when ``amp`` asks for
    it). For a 3D model on the CPU those weights are put in the channels-last-3d memory order for the run
    (same values, same float32 arithmetic in another order: about 15 % faster, outputs equal to float32
    rounding; ``relayout=False`` turns this off); :meth:`PreparedModel.restore` puts the original tensors
    back. ``fast=True`` runs a cached
    copy with BatchNorm folding, channels-last for 2D and 3D, and bf16 autocast where native (module
    docstring); the caller's model is not changed.
    """
    notes: list[str] = []
    dtype = amp_dtype(device, amp if amp else (True if fast else False))
    if dtype is not None:
        notes.append(f"autocast {str(dtype).replace('torch.', '')}")
    elif fast or amp:
        notes.append("float32 (no native bf16 on this device)")
    spatial = len(example_shape) - 2
    if not fast:
        if relayout and spatial == 3 and device.type == "cpu":
            swapped = _weights_to_memory_format(model, torch.channels_last_3d)
            notes.append("channels-last-3d")
            return PreparedModel(module=model, device=device, autocast=dtype, notes=notes,
                                 memory_format=torch.channels_last_3d, swapped=swapped)
        return PreparedModel(module=model, device=device, autocast=dtype, notes=notes)

    memory_format = torch.contiguous_format
    if spatial in (2, 3):
        memory_format = torch.channels_last_3d if spatial == 3 else torch.channels_last
    key = _weights_key(model, device, example_shape)
    cached = _FOLD_CACHE.get(model)
    if cached is not None and cached[0] == key:
        module, count = cached[1], cached[2]
    else:
        generator = torch.Generator(device="cpu").manual_seed(0)
        example = torch.randn(example_shape[1:], generator=generator)[None].to(device)
        module, count = fold_batchnorm(model, example)
        if memory_format is not torch.contiguous_format:
            if module is model:  # never change the caller's model in place
                module = copy.deepcopy(model).eval()
            module = module.to(memory_format=memory_format)
        _FOLD_CACHE[model] = (key, module, count)
    notes.append(f"{count} BatchNorm layer(s) folded into convolutions")
    if memory_format is not torch.contiguous_format:
        notes.append("channels-last" + ("-3d" if spatial == 3 else ""))
    notes.append("inference_mode")
    return PreparedModel(module=module, device=device, autocast=dtype, memory_format=memory_format, notes=notes)


def _weights_to_memory_format(model: nn.Module, memory_format: torch.memory_format) -> list:
    """Give every 5-D parameter / buffer of ``model`` a ``memory_format`` copy of its data, in place
    (the tensor objects stay the same). Returns ``[(tensor, original data), ...]`` to undo it."""
    swapped = []
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dim() == 5:
                relaid = to_memory_format(tensor.data, memory_format)
                if relaid.stride() != tensor.stride():
                    swapped.append((tensor, tensor.data))
                    tensor.data = relaid
    return swapped


def describe(device: torch.device | str = "cpu") -> str:
    """One line saying what ``fast=True`` will do on ``device`` (used by the CLI)."""
    device = torch.device(device)
    precision = "bf16 autocast" if bf16_supported(device) else "float32 (no native bf16)"
    return f"fast path on {device}: BatchNorm folding, channels-last, {precision}, inference_mode"


Predictor = Callable[[torch.Tensor], torch.Tensor]
