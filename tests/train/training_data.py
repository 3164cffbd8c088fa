"""Synthetic training data and a tiny configuration shared by the training-engine tests."""

from __future__ import annotations

import numpy as np

from medsegkit.train.data import LabelledVolume
from medsegkit.train.engine import TrainConfig

TINY = {"out_channels": 3, "channels": (4, 8), "strides": (2,), "layout": "classic"}
NAMES = ["bg", "shell", "core"]


def blob_volume(seed: int = 0, size: int = 24) -> LabelledVolume:
    """Two nested blobs: class 1 (intensity ~0.5) around class 2 (~0.9), background ~0.1, plus noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    dist = np.linalg.norm(grid - (size / 2 + rng.uniform(-2, 2, (3, 1, 1, 1))), axis=0)
    label = np.where(dist < size / 5, 2, np.where(dist < size / 3, 1, 0)).astype(np.int64)
    image = np.array([0.1, 0.5, 0.9], np.float32)[label] + rng.normal(0, 0.08, label.shape).astype(np.float32)
    return LabelledVolume(image[None], label, np.eye(4), name=f"blob{seed}")


def small_config(**kw) -> TrainConfig:
    base = dict(epochs=4, steps_per_epoch=4, patch_size=(16, 16, 16), batch_size=1, lr=1e-2, seed=0, num_threads=1,
                augmentation="light")
    return TrainConfig(**{**base, **kw})
