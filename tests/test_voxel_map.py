"""NearestVoxelMap: each input voxel's nearest preprocessed voxel, equal to MONAI's inverse of an index map."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsegkit.io import Image
from medsegkit.transforms import NearestVoxelMap, _flat_nearest_index, preprocess, restore

SPACINGS = [0.5, 0.7, 0.9375, 1.0, 1.5, 2.0, 3.0]


@st.composite
def geometries(draw):
    """An image with a box of foreground (for the crop), axes permuted and flipped, anisotropic voxels
    (ratios 2 and 3 to the target put voxel centres exactly half-way: nearest-neighbour ties), and a
    preprocessing spec: RAS or the voxel order, a target spacing, a foreground crop or none."""
    dims = draw(st.sampled_from([2, 3, 3]))
    shape = tuple(draw(st.integers(6, 40)) for _ in range(dims))
    lo = [draw(st.integers(0, n // 3)) for n in shape]
    hi = [n - draw(st.integers(0, n // 3)) for n in shape]
    array = np.zeros(shape, np.float32)
    array[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1.0 + np.random.default_rng(0).random(
        tuple(b - a for a, b in zip(lo, hi))).astype(np.float32)
    spacing = [draw(st.sampled_from(SPACINGS)) for _ in range(dims)]
    permutation = draw(st.permutations(range(3))) if dims == 3 else [0, 1, 2]
    signs = [draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)]
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis in range(3):
        affine[permutation[axis], axis] = signs[axis] * (spacing[axis] if axis < dims else 1.0)
    affine[:3, 3] = [draw(st.sampled_from([0.0, -97.5, 12.25, 33.3])) for _ in range(3)]
    spec = {"orientation": draw(st.sampled_from(["RAS", None])), "spacing": draw(st.sampled_from([0.8, 1.0, 1.5, 2.0])),
            "intensity": None}
    if draw(st.booleans()):
        spec["crop_foreground"] = draw(st.integers(0, 2))
    return Image(array, affine, {}, None), spec


def _flat_map(voxels: NearestVoxelMap) -> tuple[np.ndarray, np.ndarray]:
    """The separable map as one flat preprocessed index per input voxel (outside: 0) and the inside mask."""
    coords, inside = voxels.pre_coordinates(np.ones(voxels.input_shape, dtype=bool))
    flat = np.ravel_multi_index(coords, voxels.pre_shape).reshape(voxels.input_shape)
    return flat, inside.reshape(voxels.input_shape)


@settings(max_examples=60)
@given(geometries())
def test_separable_map_equals_monai_inverse_of_the_index_map(case):
    image, spec = case
    _, state = preprocess(image, spec)
    voxels = NearestVoxelMap(state)
    assert voxels.separable
    reference, reference_inside = _flat_nearest_index(state)
    flat, inside = _flat_map(voxels)
    np.testing.assert_array_equal(inside, reference_inside)
    np.testing.assert_array_equal(voxels.inside, reference_inside)
    np.testing.assert_array_equal(np.where(inside, flat, 0), reference)

    # gather == restore(labels) exactly, for all voxels, a few (one by one) and many (through the whole map)
    labels = np.random.default_rng(1).integers(0, 5, state.output_shape).astype(np.uint8)
    restored = restore(labels, state, is_label=True)
    np.testing.assert_array_equal(voxels.gather(labels), restored)
    few = np.zeros(voxels.input_shape, dtype=bool)
    few.reshape(-1)[:: max(few.size // 7, 1)] = True
    many = ~few
    for where in (few, many):
        np.testing.assert_array_equal(voxels.gather(labels, where), restored[where])
    np.testing.assert_array_equal(voxels.gather(np.ones(state.output_shape, bool), outside=False), reference_inside)

    # the box a slice reads: the preprocessed voxels its inside voxels map to
    axis = 0
    region = tuple(slice(image.spatial_shape[axis] // 2, image.spatial_shape[axis] // 2 + 1) if a == axis
                   else slice(0, n) for a, n in enumerate(image.spatial_shape))
    box = voxels.pre_box(region)
    sources = reference[region][reference_inside[region]]
    if sources.size:
        coords = np.unravel_index(sources, state.output_shape)
        assert box == tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)


def test_oblique_resampling_and_zero_padding_take_the_whole_inverse():
    """A rotated grid resampled to another spacing is not separable: the map is MONAI's whole inverse."""
    array = np.zeros((20, 24, 18), np.float32)
    array[4:16, 5:20, 3:15] = 1.0
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.3, 1.1, 2.0])
    _, state = preprocess(Image(array, affine, {}, None), {"orientation": "RAS", "spacing": 2.0, "intensity": None,
                                                         "crop_foreground": 1})
    voxels = NearestVoxelMap(state)
    assert not voxels.separable
    labels = np.random.default_rng(2).integers(0, 3, state.output_shape).astype(np.uint8)
    np.testing.assert_array_equal(voxels.gather(labels), restore(labels, state, is_label=True))
    assert not voxels.inside.all() and voxels.inside.any()


def test_no_resampling_takes_the_whole_inverse():
    array = np.zeros((12, 10, 8), np.float32)
    array[2:9, 2:8, 1:7] = 1.0
    _, state = preprocess(Image(array, np.diag([-1.0, 1.0, 1.0, 1.0]), {}, None),
                          {"orientation": "RAS", "spacing": None, "intensity": None, "crop_foreground": 0})
    voxels = NearestVoxelMap(state)
    assert not voxels.separable
    labels = np.random.default_rng(3).integers(0, 3, state.output_shape).astype(np.uint8)
    np.testing.assert_array_equal(voxels.gather(labels), restore(labels, state, is_label=True))


@pytest.mark.parametrize("limit", [0, 2**24])
def test_flat_map_one_channel_and_per_axis_agree(monkeypatch, limit):
    """Preprocessed grids of 2**24 voxels or more are inverted one axis at a time: the same map."""
    import medsegkit.transforms as transforms

    array = np.zeros((40, 36, 30), np.float32)
    array[8:30, 6:28, 5:24] = 1.0
    _, state = preprocess(Image(array, np.diag([1.5, 1.5, 2.0, 1.0]), {}, None),
                          {"orientation": "RAS", "spacing": [2, 2, 2], "intensity": None, "crop_foreground": 1})
    reference, reference_inside = NearestVoxelMap(state).gather(
        np.arange(np.prod(state.output_shape)).reshape(state.output_shape)), NearestVoxelMap(state).inside
    monkeypatch.setattr(transforms, "FLAT_INDEX_LIMIT", limit)
    flat, inside = _flat_nearest_index(state)
    np.testing.assert_array_equal(inside, reference_inside)
    np.testing.assert_array_equal(np.where(inside, flat, 0), reference)
    assert not inside.all() and inside.any()
