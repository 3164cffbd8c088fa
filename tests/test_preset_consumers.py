"""One preset definition, three consumers: segment(), the bundle's JSON and training run the same transforms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsegkit.bundle import init_bundle
from medsegkit.train.data import LabelledVolume, training_items
from medsegkit.transforms import preprocess, preprocessing_configs

PRESETS = ["mr", "mr_robust", "ct"]


def _head(seed: int = 0) -> LabelledVolume:
    """A 'head' (bright ellipsoid + skull shell, zero outside) on an anisotropic LPS grid with an offset origin."""
    rng = np.random.default_rng(seed)
    shape = (30, 26, 14)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    label = (radius < 0.55).astype(np.int64)
    image = np.where(radius < 0.55, 400.0, np.where(radius < 0.8, 900.0, 0.0)) + rng.normal(0, 20, shape) * (radius < 0.8)
    affine = np.diag([-1.2, -0.9, 2.5, 1.0])
    affine[:3, 3] = [40.0, -7.0, 12.0]
    return LabelledVolume(image[None].astype(np.float32), label, affine, name="head")


@pytest.mark.parametrize("preset", PRESETS)
def test_bundle_json_dumps_exactly_the_preset_configs(tmp_path, preset):
    directory = init_bundle("UNet3d", tmp_path / preset, preprocessing=preset, spacing=(2.0, 2.0, 2.0),
                            crop_foreground=True, overrides={"channels": (4, 8), "strides": (2,)})
    spec = {"preset": preset, "spacing": [2.0, 2.0, 2.0], "crop_foreground": True}
    inference = json.loads((directory / "configs" / "inference.json").read_text())
    steps = inference["preprocessing"]["transforms"]
    assert [s["_target_"] for s in steps[:2]] == ["LoadImaged", "EnsureChannelFirstd"]
    assert steps[2:-1] == preprocessing_configs(spec)  # then EnsureTyped
    train = json.loads((directory / "configs" / "train.json").read_text())
    deterministic = train["train"]["deterministic_transforms"]
    assert deterministic[2:-1] == preprocessing_configs(spec, keys=["image"], label_keys=["label"])
    assert [s["_target_"] for s in deterministic[2:-1]] == ["Orientationd", "Spacingd", "CropForegroundd",
                                                              deterministic[-2]["_target_"]]


@pytest.mark.parametrize("spec", [
    {"preset": "mr_robust", "crop_foreground": True, "spacing": 2.0},
    {"preset": "mr", "spacing": [1.5, 1.5, 3.0]},
    {"preset": "ct", "crop_foreground": {"margin": 2}},
    {"preset": "none", "intensity": {"name": "scale", "divisor": 255.0}},
])
def test_training_sees_exactly_what_segment_feeds_the_model(spec):
    volume = _head()
    segment_input, state = preprocess(volume.as_image(), spec)  # what segment() hands to predict()
    (item,) = training_items([volume], spec)
    assert item["image"].shape == segment_input.shape
    torch.testing.assert_close(item["image"], segment_input.as_tensor().float(), rtol=0, atol=0)
    # labels follow the image through orientation, resampling and crop (nearest neighbours: still 0/1)
    assert item["label"].shape == (1, *segment_input.shape[1:])
    assert set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0}
    if "crop_foreground" not in spec:  # same grid: the label marks the bright core of the preprocessed image
        image, label = item["image"][0], item["label"][0].bool()
        assert float(image[label].mean()) < float(image[~label & (image > image.min())].mean())


def test_segment_restores_onto_the_original_grid_through_the_same_spec():
    from medsegkit.transforms import restore

    volume = _head()
    spec = {"preset": "mr_robust", "crop_foreground": True, "spacing": 2.0}
    tensor, state = preprocess(volume.as_image(), spec)
    (item,) = training_items([volume], spec)
    restored = restore(item["label"][0], state, is_label=True)
    assert restored.shape == volume.label.shape
    # nearest-neighbour resampling there and back: the label agrees on almost every voxel
    assert (restored.astype(np.int64) == volume.label).mean() > 0.95
