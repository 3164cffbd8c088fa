"""Winograd 3×3 convolutions for inference, for the networks that opt in (``fast_inference=True``).

:func:`conv` runs a 2D, stride-1, 3×3 float32 convolution on the CPU through NNPACK's Winograd
F(6×6, 3×3) kernels when the feature map has at least :data:`WINOGRAD_MIN_PIXELS` pixels and both
sides at least :data:`WINOGRAD_MIN_CHANNELS` channels. Winograd does about a third of the
multiplications of a direct convolution: measured 2–2.9× faster than oneDNN's direct kernel for
256→256 channels at 56²–128² on 2 cores. Batches run one sample at a time (NNPACK's batched kernel is
slower than oneDNN's).

It applies only while no gradient is recorded (``torch.no_grad`` / ``torch.inference_mode``) and the
module is in eval mode, so training and autograd always see the plain convolution. Results move by
float rounding, about 1e-5 of the output's scale. That is why it is opt-in: FCN and Mask R-CNN keep
torchvision's exact arithmetic, and Mask2Former keeps the plain path because its thresholded attention
masks (``sigmoid < 0.5``) turn a 1e-5 change into a different attention pattern. MaskFormer uses it.

The module's forward hooks do not run for a convolution that takes the Winograd kernel.

It also holds the small helpers every network here uses to run adds and ReLUs in place when no gradient
is recorded (:func:`recording_grad`, :func:`add_residual`, :func:`activate_`): the same values, fewer
fresh tensors.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "WINOGRAD_MIN_CHANNELS",
    "WINOGRAD_MIN_PIXELS",
    "activate_",
    "add_residual",
    "conv",
    "recording_grad",
    "winograd_applies",
]

WINOGRAD_MIN_PIXELS = 40 * 40
"""Smallest ``H * W`` for which the Winograd kernel is used (1.5× faster at 40², ~1.1× at 32²)."""

WINOGRAD_MIN_CHANNELS = 256
"""Fewest input and output channels for the Winograd kernel. Narrower convs were faster alone but
slower inside a network (64 and 128 channels at 128² / 64²: 7.7 / 6.2 ms against oneDNN's 6.2 / 5.7 ms
in a MaskFormer forward), where NNPACK's threads compete with OpenMP's still-spinning ones."""

_NNPACK: bool | None = None


def _nnpack_ready() -> bool:
    """Whether NNPACK is built in and initialises on this CPU (checked once)."""
    global _NNPACK
    if _NNPACK is None:
        _NNPACK = bool(torch.backends.nnpack.is_available())  # also initialises NNPACK
    return _NNPACK


def recording_grad(module: nn.Module) -> bool:
    """True when the plain layers must run: training mode, or autograd is recording."""
    return module.training or torch.is_grad_enabled()


def winograd_applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`conv` runs ``layer`` on ``x`` through the Winograd kernel."""
    return (
        type(layer) is nn.Conv2d
        and x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[-1] * x.shape[-2] >= WINOGRAD_MIN_PIXELS
        and min(layer.in_channels, layer.out_channels) >= WINOGRAD_MIN_CHANNELS
        and layer.kernel_size == (3, 3)
        and layer.stride == (1, 1)
        and layer.dilation == (1, 1)
        and layer.padding == (1, 1)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and _nnpack_ready()
    )


def conv(layer: nn.Module, x: torch.Tensor, *, fast: bool = True) -> torch.Tensor:
    """``layer(x)``, through the Winograd kernel when ``fast``, no gradient is recorded and it applies.

    Shapes: as ``layer``: ``(N, C_in, H, W)`` → ``(N, C_out, H, W)`` for the Winograd case.
    """
    if not (fast and not recording_grad(layer) and winograd_applies(layer, x)):
        return layer(x)
    if x.shape[0] == 1:
        return torch._nnpack_spatial_convolution(x, layer.weight, layer.bias, [1, 1])
    return torch.cat([torch._nnpack_spatial_convolution(s, layer.weight, layer.bias, [1, 1]) for s in x.split(1)])


def add_residual(x: torch.Tensor, branch: torch.Tensor, *, in_place: bool) -> torch.Tensor:
    """``x + branch``; with ``in_place`` (no autograd recording) added into ``branch``, a fresh tensor the
    caller owns: the same sum, one allocation less."""
    return branch.add_(x) if in_place else x + branch


def activate_(act: nn.Module, x: torch.Tensor, *, in_place: bool) -> torch.Tensor:
    """``act(x)``, in place for ReLU when ``in_place`` (``x`` must be a fresh intermediate)."""
    if in_place and type(act) is nn.ReLU:
        return x.relu_()
    return act(x)
