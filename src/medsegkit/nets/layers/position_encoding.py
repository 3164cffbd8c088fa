"""N-d sine position encoding (DETR / MaskFormer style), shared by the query-based models.

For a ``spatial_dims``-d grid every axis gets ``2 * ceil(channels / (2 * spatial_dims))`` features
(alternating sin/cos of the normalised coordinate at geometrically spaced frequencies); the axes are
concatenated in spatial order (``D, H, W``) and the result is cut to ``channels``. In 2D with an even
``channels // 2`` this is exactly transformers' ``MaskFormerSinePositionEmbedding(normalize=True)``
(``pos_y`` then ``pos_x``, each ``channels // 2`` features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn

__all__ = ["SinePositionEncoding", "sine_position_encoding"]


def sine_position_encoding(
    spatial_shape: Sequence[int],
    channels: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
) -> torch.Tensor:
    """Sine position encoding of a grid.

    Args:
        spatial_shape: ``(H, W)`` or ``(D, H, W)``.
        channels: number of output channels.
        device, dtype: of the result.
        temperature: base of the frequency progression.
        normalize: scale each coordinate to ``(0, scale]`` (``i / (size + 1e-6) * scale``, i = 1..size).
        scale: see ``normalize``.

    Returns:
        ``(1, channels, *spatial_shape)``; treat it as read-only (results are cached per shape).
    """
    # built outside inference mode so that a cached tensor made under ``torch.inference_mode()`` can
    # still take part in a later training forward
    with torch.inference_mode(False), torch.no_grad():
        return _cached_encoding(
            tuple(int(s) for s in spatial_shape),
            int(channels),
            torch.device(device) if device is not None else torch.device("cpu"),
            dtype,
            float(temperature),
            bool(normalize),
            float(scale),
        )


@lru_cache(maxsize=32)
def _cached_encoding(
    spatial_shape: tuple[int, ...],
    channels: int,
    device: torch.device,
    dtype: torch.dtype,
    temperature: float,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    ndim = len(spatial_shape)
    per_axis = 2 * math.ceil(channels / (2 * ndim))
    # frequencies as transformers computes them (int64 arange cast to dtype, then the power)
    dim_t = torch.arange(per_axis, dtype=torch.int64, device=device).to(dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / per_axis)
    axes = []
    for axis, size in enumerate(spatial_shape):
        embed = torch.arange(1, size + 1, dtype=dtype, device=device)
        if normalize:
            embed = embed / (embed[-1:] + 1e-6) * scale
        pos = embed[:, None] / dim_t  # (size, per_axis)
        pos = torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)
        view = [1] * ndim
        view[axis] = size
        axes.append(pos.t().reshape(per_axis, *view).expand(per_axis, *spatial_shape))
    encoding = torch.cat(axes, dim=0)[:channels]
    return encoding.unsqueeze(0).contiguous()


class SinePositionEncoding(nn.Module):
    """Module form of :func:`sine_position_encoding` (no parameters).

    ``forward(x)`` with ``x`` of shape ``(N, C, *spatial)`` returns ``(1, channels, *spatial)`` in
    ``x``'s device and dtype.
    """

    def __init__(self, channels: int, *, temperature: float = 10000.0, normalize: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.temperature = temperature
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sine_position_encoding(
            x.shape[2:],
            self.channels,
            device=x.device,
            dtype=x.dtype,
            temperature=self.temperature,
            normalize=self.normalize,
        )
