"""Attention blocks shared by the segmentation networks (N-d: one code path for 2D and 3D).

- :class:`SpatialSelfAttention`: residual single-head self-attention over all voxels of a feature map
  (norm, 1×1 qkv projection, scaled dot-product attention, 1×1 output projection).
- :class:`AttentionGate`: the additive attention gate of Oktay et al. 2018 (Attention U-Net), with the
  options MONAI's ``AttentionBlock`` hard-codes made explicit (normalisation, inter channels, gating
  signal resolution, initial opening of the gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_norm_layer
from torch import nn

__all__ = ["AttentionGate", "NoGate", "SpatialSelfAttention"]


def _norm_or_identity(norm: tuple | str | None, spatial_dims: int, channels: int) -> nn.Module:
    if norm is None:
        return nn.Identity()
    return get_norm_layer(norm, spatial_dims=spatial_dims, channels=channels)


class SpatialSelfAttention(nn.Module):
    """Residual single-head self-attention over the spatial positions of a feature map.

    ``y = x + proj(attention(q, k, v))`` with ``q, k, v = qkv(norm(x))`` (1×1 convolutions), every voxel
    attending to every other one. Cost is quadratic in the number of voxels: use it on coarse stages.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels ``C`` (unchanged by the block).
        norm: MONAI norm spec applied before the qkv projection (``None`` for none).

    Shapes: ``(N, C, *spatial)`` → ``(N, C, *spatial)``.
    """

    def __init__(self, spatial_dims: int, channels: int, norm: tuple | str | None = "batch") -> None:
        super().__init__()
        self.channels = channels
        self.norm = _norm_or_identity(norm, spatial_dims, channels)
        self.qkv = Conv[Conv.CONV, spatial_dims](channels, 3 * channels, kernel_size=1)
        self.proj = Conv[Conv.CONV, spatial_dims](channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        qkv = self.qkv(self.norm(x)).reshape(n, 3, c, -1).transpose(2, 3)  # (N, 3, L, C)
        q, k, v = qkv[:, 0:1], qkv[:, 1:2], qkv[:, 2:3]  # (N, 1, L, C): one head
        attended = F.scaled_dot_product_attention(q, k, v)  # (N, 1, L, C)
        attended = attended[:, 0].transpose(1, 2).reshape(x.shape)
        return x + self.proj(attended)


class NoGate(nn.Module):
    """Stand-in for a decoder level without attention gate: returns the skip features unchanged."""

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        return skip


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018): ``skip * sigmoid(ψ(relu(θ(skip) + φ(gating))))``.

    Args:
        spatial_dims: 2 or 3.
        skip_channels: channels of the skip features ``x`` that are gated.
        gating_channels: channels of the gating signal ``g``.
        inter_channels: channels of θ and φ (default ``max(1, min(skip, gating) // 2)``).
        norm: MONAI norm spec applied after θ, φ and ψ (MONAI's ``AttentionBlock`` uses ``"batch"``);
            ``None`` for a gate without normalisation (the original paper).
        interp_mode: ``"nearest"`` or ``"linear"`` resampling used when ``g`` is coarser than ``x``:
            θ(x) is resampled to ``g``'s grid and the attention map back to ``x``'s grid.
        bias_init: when given, ψ starts with weight 0 and this bias, so every attention coefficient
            starts at ``sigmoid(bias_init)`` (2.0 → 0.88: the gate starts nearly open).

    Shapes: ``skip (N, C_x, *S)``, ``gating (N, C_g, *S_g)`` with ``S_g`` equal to ``S`` or coarser
    → ``(N, C_x, *S)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        skip_channels: int,
        gating_channels: int,
        inter_channels: int | None = None,
        norm: tuple | str | None = "batch",
        interp_mode: str = "linear",
        bias_init: float | None = None,
    ) -> None:
        super().__init__()
        if inter_channels is None:
            inter_channels = max(1, min(skip_channels, gating_channels) // 2)
        if inter_channels < 1:
            raise ValueError(f"inter_channels must be >= 1, got {inter_channels}")
        conv = Conv[Conv.CONV, spatial_dims]
        self.theta = conv(skip_channels, inter_channels, kernel_size=1)
        self.theta_norm = _norm_or_identity(norm, spatial_dims, inter_channels)
        self.phi = conv(gating_channels, inter_channels, kernel_size=1)
        self.phi_norm = _norm_or_identity(norm, spatial_dims, inter_channels)
        self.psi = conv(inter_channels, 1, kernel_size=1)
        self.psi_norm = _norm_or_identity(norm, spatial_dims, 1)
        if interp_mode not in ("nearest", "linear"):
            raise ValueError(f"interp_mode must be 'nearest' or 'linear', got {interp_mode!r}")
        self.mode = "nearest" if interp_mode == "nearest" else ("bilinear", "trilinear")[spatial_dims - 2]
        self.align_corners: bool | None = None if interp_mode == "nearest" else False
        if bias_init is not None:
            nn.init.zeros_(self.psi.weight)
            nn.init.constant_(self.psi.bias, float(bias_init))

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        theta = self.theta_norm(self.theta(skip))
        gating_size = gating.shape[2:]
        resample = gating_size != skip.shape[2:]
        if resample:
            theta = F.interpolate(theta, size=gating_size, mode=self.mode, align_corners=self.align_corners)
        psi = self.psi_norm(self.psi(torch.relu(theta + self.phi_norm(self.phi(gating)))))
        alpha = torch.sigmoid(psi)
        if resample:
            alpha = F.interpolate(
                alpha, size=skip.shape[2:], mode=self.mode, align_corners=self.align_corners
            )
        return skip * alpha
