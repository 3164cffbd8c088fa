"""Inference-only layer variants that :func:`medsegkit.inference.fast.prepare_model` swaps into its copy.

The networks themselves only use plain layers (``nn.Conv2d``, ``nn.Sequential``); these subclasses add
no parameters or buffers, so a swapped module keeps its state dict, its forward hooks and its name:

- :class:`WinogradConv2d`: an ``nn.Conv2d`` that runs 2D, stride-1, 3×3 float32 convolutions on the CPU
  through NNPACK's Winograd F(6×6, 3×3) kernel when the feature map has at least
  :data:`WINOGRAD_MIN_PIXELS` pixels and both sides at least :data:`WINOGRAD_MIN_CHANNELS` channels.
  Winograd does about a third of the multiplications of a direct convolution: measured 2–2.9× faster
  than oneDNN's direct kernel for 256→256 channels at 56²–128² on 2 cores. Batches run one sample at a
  time (NNPACK's batched kernel is slower than oneDNN's). Results move by float rounding, about 1e-5
  of the output's scale, which is why ``prepare_model`` only uses it when asked (``winograd=True``,
  or ``fast=True``): FCN and Mask R-CNN keep torchvision's exact arithmetic by default, and
  Mask2Former never gets it, because its thresholded attention masks (``sigmoid < 0.5``) turn a 1e-5
  change into a different attention pattern.
- :class:`ChannelsLastSequential`: an ``nn.Sequential`` that runs on the CPU in the channels-last
  layout and hands back a contiguous tensor (the ResNet stem: the CPU max pool is 17 → 1 ms at
  64 × 256² channels-last; values are bit-equal).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "WINOGRAD_MIN_CHANNELS",
    "WINOGRAD_MIN_PIXELS",
    "ChannelsLastSequential",
    "WinogradConv2d",
    "winograd_shape",
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


def winograd_shape(layer: nn.Module) -> bool:
    """Whether ``layer`` is a convolution :class:`WinogradConv2d` can run: 2D, 3×3, stride 1, padding 1,
    no dilation or groups, zero padding, ≥ :data:`WINOGRAD_MIN_CHANNELS` channels in and out."""
    return (
        isinstance(layer, nn.Conv2d)
        and layer.kernel_size == (3, 3)
        and layer.stride == (1, 1)
        and layer.dilation == (1, 1)
        and layer.padding == (1, 1)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and min(layer.in_channels, layer.out_channels) >= WINOGRAD_MIN_CHANNELS
    )


class WinogradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that takes NNPACK's Winograd kernel where it pays.

    Made from a plain convolution by :meth:`swap`; used only in inference copies. The Winograd kernel
    runs when :meth:`takes_winograd` holds for the input; otherwise (and whenever autograd records or
    the module is training) it is the plain ``nn.Conv2d`` forward.

    Shapes: ``(N, C_in, H, W)`` → ``(N, C_out, H, W)``.
    """

    @classmethod
    def swap(cls, layer: nn.Conv2d) -> WinogradConv2d:
        """Turn ``layer`` (checked with :func:`winograd_shape`) into this class in place and return it."""
        if type(layer) is not nn.Conv2d or not winograd_shape(layer):
            raise ValueError(f"WinogradConv2d needs a 3x3, stride-1, padding-1 nn.Conv2d of >= "
                             f"{WINOGRAD_MIN_CHANNELS} channels, got {layer!r}")
        layer.__class__ = cls
        return layer

    def takes_winograd(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the Winograd kernel."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type)
            and x.dim() == 4
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.shape[-1] * x.shape[-2] >= WINOGRAD_MIN_PIXELS
            and _nnpack_ready()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes_winograd(x):
            return super().forward(x)
        if x.shape[0] == 1:
            return torch._nnpack_spatial_convolution(x, self.weight, self.bias, [1, 1])
        return torch.cat([torch._nnpack_spatial_convolution(s, self.weight, self.bias, [1, 1]) for s in x.split(1)])


class ChannelsLastSequential(nn.Sequential):
    """``nn.Sequential`` run channels-last on the CPU; ``(N, C, *spatial)`` in, contiguous out.

    Made from a plain ``nn.Sequential`` of 2D or 3D layers with :meth:`swap` (same children and state
    dict). On other devices it is the plain forward."""

    @classmethod
    def swap(cls, sequence: nn.Sequential) -> ChannelsLastSequential:
        if type(sequence) is not nn.Sequential:
            raise ValueError(f"ChannelsLastSequential is made from an nn.Sequential, got {type(sequence).__name__}")
        sequence.__class__ = cls
        return sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() not in (4, 5):
            return super().forward(x)
        layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return super().forward(x.contiguous(memory_format=layout)).contiguous()
