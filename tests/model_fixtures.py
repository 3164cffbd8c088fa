"""Small models and weight helpers shared by several test modules (core tests only: imports torch)."""

from __future__ import annotations

import torch
from torch import nn


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, BatchNorm statistics and PReLU slopes, so that a parity test checks every tensor
    instead of the default initialisation. Returns ``model`` (changed in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=generator, dtype=value.dtype) + 0.5)
            else:
                value.copy_(torch.randn(value.shape, generator=generator, dtype=value.dtype) * 0.3)
    return model


class ThresholdNet(nn.Module):
    """Class 1 where the intensity is above 0.5: ``(N, 1, D, H, W)`` → logits ``(N, 2, D, H, W)``.

    Deterministic and mirror-symmetric (a mirrored pass agrees exactly)."""

    spatial_dims = 3
    in_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
