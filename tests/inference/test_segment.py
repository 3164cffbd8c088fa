"""medsegkit.inference.segment: preprocessing → predict → inverse on the input grid → clean-up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsegkit import create_model
from medsegkit.errors import CheckpointError
from medsegkit.inference import predict, segment
from medsegkit.inference.segment import clean_labels, resolve_model, resolve_tta_flips
from medsegkit.io import Image, read_image
from medsegkit.transforms import preprocess, restore
from medsegkit.weights import save_checkpoint

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "medsegkit" / "sample_data"
SPEC = {"orientation": "RAS", "spacing": [6.0, 6.0, 6.0], "intensity": {"name": "zscore", "nonzero": True}}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return create_model("UNet3d", channels=(4, 8, 16), strides=(2, 2)).eval()


@pytest.fixture(scope="module")
def head():
    """The real ITK head: 128×128×62, 2×2×3 mm, LSA orientation (not RAS)."""
    return read_image(SAMPLE / "itk_head_t1.nii.gz")


def test_result_lies_on_the_input_grid_and_equals_manual_pipeline(unet, head):
    assert head.orientation == "LSA"
    result = segment(unet, head, preprocessing=SPEC, roi_size=32)
    assert isinstance(result, Image)
    assert result.spatial_shape == head.spatial_shape and result.array.dtype == np.uint8
    np.testing.assert_array_equal(result.affine, head.affine)
    # the same steps by hand: MONAI-preprocess, predict, invert
    tensor, state = preprocess(head, SPEC)
    assert state.output_shape != head.spatial_shape  # resampled to 6 mm RAS: inversion matters
    labels = predict(unet, tensor.as_tensor(), roi_size=32)
    np.testing.assert_array_equal(result.array, restore(labels, state))
    assert result.meta["preprocessing"]["spacing"] == [6.0, 6.0, 6.0]


@pytest.mark.parametrize("intensity", [{"name": "zscore", "nonzero": True}, {"name": "zscore", "nonzero": False},
                                       "percentile", {"name": "scale", "subtrahend": 100.0, "divisor": 50.0}, None])
def test_preprocessing_never_writes_into_the_callers_image(unet, head, intensity):
    """A float32 image (what a notebook holds) shares its memory with the tensor MONAI's transforms get;
    NormalizeIntensity writes into that tensor, so segment / Session / preprocess normalised the caller's
    array in place (a second segment of the same Image then saw other intensities)."""
    from medsegkit.interactive import Session

    array = np.ascontiguousarray(head.array[::2, ::2], dtype=np.float32)
    image = Image(array, np.diag([4.0, 4.0, 3.0, 1.0]), {}, None)  # RAS, no resampling: nothing copies on the way
    before = array.copy()
    spec = {"orientation": "RAS", "intensity": intensity}
    preprocess(image, spec)
    np.testing.assert_array_equal(array, before)
    first = segment(unet, image, preprocessing=spec, roi_size=32).array
    np.testing.assert_array_equal(array, before)
    np.testing.assert_array_equal(segment(unet, image, preprocessing=spec, roi_size=32).array, first)
    Session(unet, image, preprocessing=spec, roi_size=32).run()
    np.testing.assert_array_equal(array, before)


def test_no_preprocessing_equals_predict(unet):
    rng = np.random.default_rng(0)
    image = Image(rng.standard_normal((30, 26, 20)).astype(np.float32), np.diag([1.5, 1.5, 2.0, 1.0]))
    result = segment(unet, image, preprocessing="none", roi_size=16)
    np.testing.assert_array_equal(result.array, predict(unet, image.array, roi_size=16))
    probabilities = segment(unet, image, preprocessing="none", roi_size=16, output="probabilities")
    assert probabilities.array.shape == (2, 30, 26, 20) and probabilities.array.dtype == np.float32
    np.testing.assert_allclose(probabilities.array, predict(unet, image.array, roi_size=16, output="probabilities"),
                               atol=1e-6)


@pytest.mark.parametrize("preprocessing, ndim, expected", [
    ("mr", 3, (0,)),  # RAS: axis 0 runs left-right
    ({"orientation": "LPS"}, 3, (0,)),
    ({"orientation": "PLS"}, 3, (1,)),
    ({"orientation": "RAS"}, 2, (0,)),
    ("none", 3, (0, 1, 2)),  # no anatomical frame: every axis, as nnU-Net
    ({"intensity": {"name": "zscore"}}, 2, (0, 1)),
])
def test_auto_tta_mirrors_left_right_in_an_anatomical_frame(preprocessing, ndim, expected):
    assert resolve_tta_flips("auto", preprocessing, ndim) == expected
    assert resolve_tta_flips((1, 2), preprocessing, ndim) == (1, 2)  # explicit axes are kept
    assert resolve_tta_flips((), preprocessing, ndim) == ()


def test_segment_auto_tta_equals_the_resolved_axes(unet, head):
    """With a reorienting spec "auto" is the left-right mirror alone (not every axis); without one every
    axis, which is also what predict's "auto" means."""
    kwargs = {"preprocessing": SPEC, "roi_size": 16, "output": "probabilities"}
    auto = segment(unet, head, tta_flips="auto", **kwargs).array
    np.testing.assert_array_equal(auto, segment(unet, head, tta_flips=(0,), **kwargs).array)
    assert np.abs(auto - segment(unet, head, tta_flips=(0, 1, 2), **kwargs).array).max() > 1e-4
    rng = np.random.default_rng(1)
    image = Image(rng.standard_normal((20, 18, 16)).astype(np.float32), np.eye(4))
    plain = segment(unet, image, preprocessing="none", roi_size=16, tta_flips="auto", output="probabilities").array
    np.testing.assert_array_equal(plain, predict(unet, image.array, roi_size=16, tta_flips=(0, 1, 2),
                                                 output="probabilities"))
    np.testing.assert_array_equal(plain, predict(unet, image.array, roi_size=16, tta_flips="auto",
                                                 output="probabilities"))
    with pytest.raises(ValueError, match="tta_flips must be a sequence of spatial axes such as"):
        predict(unet, image.array, roi_size=16, tta_flips="lr")


def test_checkpoint_path_rebuilds_model_and_uses_recorded_preprocessing(tmp_path, unet, head):
    path = save_checkpoint(unet, tmp_path / "model.safetensors",
                           metadata={"preprocessing": SPEC, "class_names": ["background", "brain"]})
    result = segment(str(path), head, roi_size=32)
    np.testing.assert_array_equal(result.array, segment(unet, head, preprocessing=SPEC, roi_size=32).array)
    assert result.meta["class_names"] == ["background", "brain"]
    assert result.meta["preprocessing"]["spacing"] == [6.0, 6.0, 6.0]


def test_2d_model_on_volume_runs_axially(head):
    torch.manual_seed(0)
    model = create_model("UNet2d", channels=(4, 8), strides=(2,)).eval()
    result = segment(model, head, preprocessing=SPEC, roi_size=48)
    tensor, state = preprocess(head, SPEC)
    expected = predict(model, tensor.as_tensor()[None], roi_size=48, slice_axis=2)[0]
    np.testing.assert_array_equal(result.array, restore(expected, state))


def test_registry_name_without_weights_is_refused():
    with pytest.raises(ValueError, match="has no registered weights; refusing to segment with random weights"):
        resolve_model("UNet3d")
    with pytest.raises(KeyError, match="unknown model name"):
        resolve_model("UNet9d")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("no/such/model.pt")


def test_unsafe_checkpoint_is_refused(tmp_path, head):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Path("x")}, path)  # a pickled class instance
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        segment(str(path), head)


def test_segment_argument_errors(unet, head):
    with pytest.raises(ValueError, match="clean up labels; use output='labels'"):
        segment(unet, head, output="probabilities", fill_holes=True)
    with pytest.raises(ValueError, match="output must be one of"):
        segment(unet, head, output="masks")
    with pytest.raises(ValueError, match="segment writes no out= store"):
        segment(unet, head, out="x.zarr")
    with pytest.raises(TypeError, match="image must be a medsegkit.io.Image or a path"):
        segment(unet, np.zeros((8, 8, 8)))


def test_clean_labels():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[2:12, 2:12, 2:12] = 1  # big cube of class 1 with a hole
    labels[6, 6, 6] = 0
    labels[20:22, 20:22, 20:22] = 1  # small cube of class 1
    labels[15:25, 2:8, 2:8] = 2  # class 2
    labels[27, 27, 27] = 2  # a one-voxel speck of class 2
    original = labels.copy()
    largest = clean_labels(labels, largest_component=True)
    assert largest[20, 20, 20] == 0 and largest[27, 27, 27] == 0 and largest[3, 3, 3] == 1 and largest[16, 3, 3] == 2
    filled = clean_labels(labels, fill_holes=True)
    assert filled[6, 6, 6] == 1 and filled.dtype == np.uint8
    small_removed = clean_labels(labels, min_size=10)
    assert small_removed[20, 20, 20] == 0 and small_removed[27, 27, 27] == 0 and small_removed[3, 3, 3] == 1
    assert (small_removed[20:22, 20:22, 20:22] == 0).all() and small_removed[6, 6, 6] == 0
    np.testing.assert_array_equal(labels, original)  # the input is never changed
    # until 2026-12-08 2.5 was taken as 2 and NaN failed inside int() ("cannot convert float NaN to integer")
    for bad in (-1, 2.5, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="min_size must be a whole number of voxels >= 0, got"):
            clean_labels(labels, min_size=bad)
    np.testing.assert_array_equal(clean_labels(labels, min_size=np.int64(10)), small_removed)


def test_clean_up_through_segment(unet):
    rng = np.random.default_rng(1)
    image = Image(rng.standard_normal((24, 24, 24)).astype(np.float32))
    raw = segment(unet, image, preprocessing="none", roi_size=16).array
    cleaned = segment(unet, image, preprocessing="none", roi_size=16, largest_component=True, fill_holes=True,
                      min_size=5).array
    np.testing.assert_array_equal(
        cleaned, clean_labels(raw, largest_component=True, fill_holes=True, min_size=5)
    )
