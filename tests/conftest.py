"""Shared fixtures: a tiny registered model that does not depend on any family module.

torch is imported inside the fixture: the napari tests (their own process) must not load it.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

from medsegkit import registry

# Under pytest-xdist (tox runs `pytest -n 2`) each worker gets one thread: two one-thread workers on two
# cores beat one two-thread process, whose time is mostly single-threaded Python (measured on 2 cores:
# 956 s -> 402 s for the suite). Set before torch is imported (nothing above imports it), so the
# subprocesses tests start (torchrun, the CLI) inherit it too.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

# Property and fuzz tests: derandomized in CI (the same examples every run, so a red run reproduces);
# locally `HYPOTHESIS_PROFILE=explore` draws fresh examples, `HYPOTHESIS_MAX_EXAMPLES=N` scales them.
_HYPOTHESIS_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, **_HYPOTHESIS_COMMON)
settings.register_profile("explore", derandomize=False, **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def tiny_segnet_class():
    import torch
    from torch import nn

    class TinySegNet(nn.Module):
        """Two-layer N-d conv net: (N, in_channels, *spatial) -> (N, out_channels, *spatial)."""

        medsegkit_task = "semantic"

        def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, width: int = 4):
            super().__init__()
            conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
            self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
            self.body = nn.Sequential(conv(in_channels, width, 3, padding=1), nn.ReLU(), conv(width, out_channels, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    return TinySegNet


@pytest.fixture
def tiny_registered():
    """Register `test_tinynet_2d` for the duration of one test."""
    tiny_segnet = tiny_segnet_class()

    def test_tinynet_2d(spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, width: int = 4):
        return tiny_segnet(spatial_dims, in_channels, out_channels, width)

    test_tinynet_2d.__module__ = __name__
    registry.register_model(
        test_tinynet_2d,
        family="tiny",
        task="semantic",
        spatial_dims=2,
        input_shape=(1, 1, 32, 32),
        reference="test fixture",
        dotted_path="conftest.TinySegNet",  # metadata only: the builder's own signature lists the arguments
    )
    yield "test_tinynet_2d"
    registry._REGISTRY.pop("test_tinynet_2d", None)
