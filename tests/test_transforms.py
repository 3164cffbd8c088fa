"""Preprocessing presets and their inverse (MONAI dictionary transforms on in-memory Images)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from medsegkit.io import Image, read_image
from medsegkit.transforms import (
    PRESETS,
    build_preprocessing,
    image_to_metatensor,
    metatensor_to_image,
    preprocess,
    resolve_preprocessing,
    restore,
)

ITK_HEAD = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz")


@pytest.fixture(scope="module")
def head() -> Image:
    if not ITK_HEAD.exists():
        pytest.skip(f"{ITK_HEAD} missing: apt-get install -y insighttoolkit5-examples")
    return read_image(ITK_HEAD)


# -- specs -------------------------------------------------------------------------------------------


def test_presets_expand_to_specs():
    assert resolve_preprocessing("mr") == {
        "orientation": "RAS",
        "spacing": None,
        "intensity": {"name": "zscore", "nonzero": True, "channel_wise": True},
    }
    ct = resolve_preprocessing("ct", target_spacing=2)
    assert ct["spacing"] == [2.0] and ct["intensity"]["a_min"] == -1000 and ct["intensity"]["clip"] is True
    assert resolve_preprocessing("none") == {"orientation": None, "spacing": None, "intensity": None}
    assert resolve_preprocessing({"preset": "mr", "spacing": [1, 1, 2]})["spacing"] == [1.0, 1.0, 2.0]
    assert resolve_preprocessing({"intensity": {"name": "scale", "divisor": 255}})["intensity"] == {
        "name": "scale",
        "subtrahend": 0.0,
        "divisor": 255,
    }
    # the resolved spec is what a checkpoint records: plain JSON
    import json

    for name in PRESETS:
        spec = resolve_preprocessing(name, target_spacing=[1.5, 1.5, 1.5], orientation="LPS")
        assert json.loads(json.dumps(spec)) == spec and resolve_preprocessing(spec) == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("brain", "unknown preprocessing preset 'brain'; accepted: mr, mr_robust, ct, none"),
        ({"orientation": "RAS", "crop": True}, r"unknown preprocessing keys \['crop'\]"),
        ({"orientation": "RRS"}, "not a set of axis codes"),
        ({"spacing": [1, -1, 1]}, "positive"),
        (
            {"intensity": {"name": "gamma"}},
            "unknown intensity step 'gamma'; accepted: zscore, range, scale, percentile",
        ),
        ({"intensity": {"name": "percentile", "lower": 50, "upper": 10}}, "lower < upper"),
        ({"intensity": {"name": "range", "a_min": 0}}, r"needs \['a_max'\]"),
        ({"intensity": {"name": "range", "a_min": 5, "a_max": 1}}, "a_max > a_min"),
        ({"intensity": {"name": "zscore", "mean": 3}}, r"does not take \['mean'\]"),
        # until 2026-12-08: "could not convert string to float: 'x'", naming no field, or accepted as given
        # (a NaN divisor made every voxel NaN; "false" and 2 are truthy; True was a spacing of 1 mm)
        ({"spacing": [1, "x"]}, r"spacing must be a positive number or 2-3 positive numbers \(mm\), got \[1, 'x'\]"),
        ({"spacing": True}, "spacing must be a positive number .*got True"),
        ({"intensity": {"name": "range", "a_min": "x", "a_max": 1}}, "intensity 'range' a_min must be a finite number"),
        ({"intensity": {"name": "scale", "divisor": float("nan")}}, "intensity 'scale' divisor must be a finite number"),
        ({"intensity": {"name": "range", "a_min": 0, "a_max": float("inf")}}, "a_max must be a finite number, got inf"),
        ({"intensity": {"name": "percentile", "clip": "false"}}, "intensity 'percentile' clip must be true or false"),
        ({"intensity": {"name": "zscore", "nonzero": 2}}, "intensity 'zscore' nonzero must be true or false, got 2"),
        ({"intensity": {"name": ["zscore"]}}, r"unknown intensity step \['zscore'\]; accepted"),
    ],
)
def test_bad_specs_are_explained(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_preprocessing(spec)


_spec_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["RAS", "LPS", "mr", "zscore", "range", "scale", "percentile", "none"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "a_min", "a_max", "b_min", "divisor", "lower", "upper", "clip", "nonzero",
                         "margin", "x"]), inner, max_size=4),
    max_leaves=8,
)


@given(key=st.sampled_from(["orientation", "spacing", "intensity", "crop_foreground", "preset"]), value=_spec_values)
def test_fuzzed_specs_resolve_to_finite_values_or_raise_one_line(key, value):
    """A spec comes from checkpoints, bundles and sidecars: whatever it holds, the result is a spec of
    finite numbers and real booleans, or one line saying what was wrong."""
    try:
        spec = resolve_preprocessing({key: value})
    except (ValueError, TypeError) as error:
        assert "\n" not in str(error) and str(error)
        return
    assert resolve_preprocessing(spec) == spec
    for field in [*(spec["spacing"] or []), *(spec["intensity"] or {}).values()]:
        assert isinstance(field, str) or isinstance(field, bool) or np.isfinite(field)


# -- intensity steps ---------------------------------------------------------------------------------


def _tensor(values: np.ndarray):
    return image_to_metatensor(Image(values.astype(np.float32), np.eye(4)))


def test_ct_window_maps_hounsfield_to_unit_range():
    hu = np.array([-2000, -1000, 0, 500, 1000, 3000], dtype=np.float32).reshape(6, 1, 1)
    out = build_preprocessing("ct")({"image": _tensor(hu)})["image"]
    np.testing.assert_allclose(out.numpy().ravel(), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)


def test_mr_zscore_over_nonzero_voxels():
    rng = np.random.default_rng(0)
    values = np.where(rng.random((8, 9, 10)) > 0.4, rng.normal(300, 40, (8, 9, 10)), 0).astype(np.float32)
    out = build_preprocessing("mr")({"image": _tensor(values)})["image"].numpy()[0]
    inside = values != 0
    np.testing.assert_array_equal(out[~inside], 0)
    np.testing.assert_allclose(out[inside].mean(), 0, atol=1e-5)
    np.testing.assert_allclose(out[inside].std(), 1, atol=1e-3)
    expected = (values[inside] - values[inside].mean()) / values[inside].std()
    np.testing.assert_allclose(out[inside], expected, atol=1e-4)


def test_mr_robust_maps_percentiles_to_unit_range():
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    out = build_preprocessing("mr_robust")({"image": _tensor(values)})["image"].numpy()[0]
    low, high = np.percentile(values, [1, 99])
    np.testing.assert_allclose(out, np.clip((values - low) / (high - low), 0, 1), atol=1e-6)


def test_scale_divides():
    values = np.array([0, 51, 255], dtype=np.float32).reshape(3, 1, 1)
    out = build_preprocessing({"intensity": {"name": "scale", "divisor": 255}})({"image": _tensor(values)})[
        "image"
    ]
    np.testing.assert_allclose(out.numpy().ravel(), [0.0, 0.2, 1.0], atol=1e-6)


# -- spatial steps and their inverse -----------------------------------------------------------------


def test_orientation_only_matches_nibabel_canonical_and_restores_exactly(head):
    tensor, state = preprocess(head, {"orientation": "RAS"})
    canonical = nib.as_closest_canonical(nib.load(str(ITK_HEAD)))
    assert tuple(tensor.shape) == (1, *canonical.shape)
    np.testing.assert_array_equal(tensor.numpy()[0], np.asarray(canonical.dataobj).astype(np.float32))
    np.testing.assert_allclose(state.output_affine, canonical.affine, atol=1e-6)
    assert metatensor_to_image(tensor).orientation == "RAS"
    labels = (tensor[0] > 40).to(torch.uint8)
    back = restore(labels, state)
    assert back.dtype == np.uint8 and back.shape == head.spatial_shape
    np.testing.assert_array_equal(back, (head.array > 40).astype(np.uint8))


def test_resample_to_ras_1p5mm_and_invert_labels(head):
    """Preprocess the LSA 2x2x3 mm head to RAS 1.5 mm, threshold there, invert: the labels land on the
    same voxels as thresholding the original."""
    tensor, state = preprocess(head, {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": None})
    out = metatensor_to_image(tensor)
    assert out.orientation == "RAS"
    np.testing.assert_allclose(out.spacing, (1.5, 1.5, 1.5), atol=1e-6)
    # the field of view is kept: 128*2, 62*3, 128*2 mm along R, A, S -> about 170, 123, 170 voxels
    assert tuple(tensor.shape[1:]) == (170, 123, 170)
    threshold = 60
    prediction = (tensor[0] > threshold).to(torch.int32)
    back = restore(prediction, state)
    assert back.shape == head.spatial_shape and back.dtype == np.int32
    restored_image = head.with_array(back)
    np.testing.assert_array_equal(restored_image.affine, head.affine)
    agreement = (back == (head.array > threshold)).mean()
    assert agreement > 0.98, agreement
    # the restored mask covers the original mask's voxels, not a flipped / shifted copy of them
    direct = head.array > threshold
    dice = 2 * (back.astype(bool) & direct).sum() / (back.astype(bool).sum() + direct.sum())
    assert dice > 0.95, dice
    flipped = direct[::-1]
    assert 2 * (back.astype(bool) & flipped).sum() / (back.astype(bool).sum() + flipped.sum()) < dice - 0.1


def test_invert_probabilities_linearly(head):
    tensor, state = preprocess(
        head, {"orientation": "RAS", "spacing": 1.5, "intensity": {"name": "scale", "divisor": 255}}
    )
    probabilities = torch.cat([tensor, 1 - tensor])  # (2, *spatial), a smooth "prediction"
    back = restore(probabilities, state, is_label=False)
    assert back.shape == (2, *head.spatial_shape) and back.dtype == np.float32
    original = head.array / 255.0
    assert np.abs(back[0] - original).mean() < 0.01
    np.testing.assert_allclose(back[0] + back[1], 1.0, atol=1e-5)
    # linear inversion gives intermediate values, nearest (labels) would not
    assert len(np.unique(back[0])) > len(np.unique(head.array))


def test_restore_checks_the_grid(head):
    _, state = preprocess(head, {"spacing": 3.0})
    with pytest.raises(ValueError, match="not on the preprocessed grid"):
        restore(np.zeros(head.spatial_shape, np.uint8), state)


def test_none_preset_is_identity(head):
    tensor, state = preprocess(head, "none")
    np.testing.assert_array_equal(tensor.numpy()[0], head.array)
    np.testing.assert_array_equal(state.output_affine, head.affine)
    labels = (head.array > 10).astype(np.uint8)
    np.testing.assert_array_equal(restore(labels, state), labels)


def test_label_keys_resample_with_nearest(head):
    compose = build_preprocessing("mr", target_spacing=1.5, keys=("image",), label_keys=("label",))
    mask = head.with_array((head.array > 60).astype(np.uint8))
    data = compose({"image": image_to_metatensor(head), "label": image_to_metatensor(mask)})
    assert data["image"].shape == data["label"].shape
    assert set(np.unique(data["label"].numpy())) <= {0.0, 1.0}
    torch.testing.assert_close(data["image"].affine, data["label"].affine)
    assert abs(float(data["image"][data["image"] != 0].mean())) < 1e-4  # intensity step on images only


def test_2d_image_preprocess_and_restore():
    rng = np.random.default_rng(3)
    array = rng.integers(0, 4, size=(20, 30)).astype(np.uint8)
    img = Image.from_geometry(array, (0.5, 1.0), (0.0, 0.0))
    tensor, state = preprocess(img, {"orientation": "LPS", "spacing": 0.5})
    assert tuple(tensor.shape) == (1, 20, 59)
    back = restore(tensor[0].round().to(torch.uint8), state)
    assert back.shape == (20, 30)
    np.testing.assert_array_equal(back, array)
