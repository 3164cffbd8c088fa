"""The Image container: geometry read from the affine, SimpleITK conversion, derived images, checks."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medsegkit.io import Image, read_image
from medsegkit.io.image import affine_from_geometry, same_grid


def test_geometry_properties_follow_the_affine():
    direction = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns: A, I, L
    img = Image.from_geometry(
        np.zeros((4, 5, 6, 7)), (0.5, 1.5, 2.5), (10.0, -20.0, 30.0), direction, channel_axis=0
    )
    assert img.spatial_shape == (5, 6, 7) and img.num_channels == 4 and img.spatial_ndim == 3
    np.testing.assert_allclose(img.spacing, (0.5, 1.5, 2.5))
    np.testing.assert_allclose(img.origin, (10.0, -20.0, 30.0))
    np.testing.assert_allclose(img.direction, direction)
    assert img.orientation == "AIL"
    # world position of voxel (1, 2, 3) = origin + direction @ (spacing * index)
    expected = np.array([10.0, -20.0, 30.0]) + direction @ (np.array([0.5, 1.5, 2.5]) * [1, 2, 3])
    np.testing.assert_allclose((img.affine @ [1, 2, 3, 1])[:3], expected)


def test_sitk_conversion_matches_simpleitk_reader(itk_head):
    ours = read_image(itk_head)  # through nibabel
    theirs = Image.from_sitk(sitk.ReadImage(str(itk_head)))
    np.testing.assert_array_equal(ours.array, theirs.array)
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-5)
    back = ours.to_sitk()
    reference = sitk.ReadImage(str(itk_head))
    assert back.GetSize() == reference.GetSize() == (128, 128, 62)
    np.testing.assert_allclose(back.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(reference))
    # the voxel (i, j, k) is the same physical point in both conventions (LPS = RAS with x, y negated)
    index = (17, 40, 9)
    lps = np.array(reference.TransformIndexToPhysicalPoint(index))
    ras = (ours.affine @ [*index, 1])[:3]
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-5)
    assert ours.array[index] == sitk.GetArrayFromImage(reference)[index[::-1]]


def test_vector_sitk_image_becomes_channels_first():
    buffer = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # (k, j, i, C)
    vector = sitk.GetImageFromArray(buffer, isVector=True)
    img = Image.from_sitk(vector)
    assert img.channel_axis == 0 and img.array.shape == (5, 4, 3, 2)
    np.testing.assert_array_equal(img.array[2], buffer[..., 2].T)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img.to_sitk()), buffer)


def test_with_array_keeps_geometry_and_checks_shape(itk_head):
    head = read_image(itk_head)
    probs = np.zeros((3, *head.spatial_shape), dtype=np.float32)
    derived = head.with_array(probs)
    assert derived.channel_axis == 0 and derived.num_channels == 3
    np.testing.assert_array_equal(derived.affine, head.affine)
    assert derived.meta["derived_from"] == [str(itk_head)] and "path" not in derived.meta
    assert same_grid(derived, head)
    labels = head.with_array(np.zeros(head.spatial_shape, np.uint8))
    assert labels.channel_axis is None and labels.dtype == np.uint8
    with pytest.raises(ValueError, match=r"does not fit the image grid \(128, 128, 62\)"):
        head.with_array(np.zeros((128, 62, 128)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"array": np.zeros((2, 2, 2)), "affine": np.eye(3)}, "4x4"),
        ({"array": np.zeros((2, 2, 2)), "affine": np.diag([1.0, 0.0, 1.0, 1.0])}, "singular"),
        ({"array": np.zeros(4)}, r"\(i, j\) or \(i, j, k\)"),
        ({"array": np.zeros((2, 3, 4, 5, 6)), "channel_axis": 0}, r"\(C, i, j\) or \(C, i, j, k\)"),
        ({"array": np.zeros((2, 3, 4)), "channel_axis": -1}, "channels first"),
    ],
)
def test_invalid_images_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Image(**kwargs)


def test_affine_from_geometry_checks_inputs():
    with pytest.raises(ValueError, match="> 0"):
        affine_from_geometry((1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="origin needs 3 values"):
        affine_from_geometry((1.0, 1.0, 1.0), (0.0, 0.0))
    two_d = affine_from_geometry((0.5, 0.25), (3.0, 4.0))
    np.testing.assert_allclose(two_d, [[0.5, 0, 0, 3], [0, 0.25, 0, 4], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_repr_is_short(itk_head):
    text = repr(read_image(itk_head))
    assert text.startswith("Image(shape=(128, 128, 62), dtype=int16, spacing=(2, 2, 3), orientation='LSA'")
    assert len(text) < 300
