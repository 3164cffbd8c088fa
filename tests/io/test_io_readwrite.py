"""read_image / write_image: round trips on real data, parity with nibabel / SimpleITK / MONAI, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsegkit.io import Image, read_image, write_image
from medsegkit.io.image import affine_from_geometry


def _rotation(deg_x: float, deg_z: float) -> np.ndarray:
    ax, az = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- real data ---------------------------------------------------------------------------------------


def test_itk_head_geometry_matches_nibabel(itk_head):
    img = read_image(itk_head)
    nii = nib.load(str(itk_head))
    assert img.spatial_shape == (128, 128, 62)
    assert img.channel_axis is None and img.num_channels == 1
    np.testing.assert_allclose(img.spacing, (2.0, 2.0, 3.0))
    assert nib.aff2axcodes(img.affine) == ("L", "S", "A")
    assert img.orientation == "LSA"
    np.testing.assert_array_equal(img.affine, nii.affine)
    np.testing.assert_array_equal(img.array, np.asarray(nii.dataobj))
    assert img.array.dtype == np.int16 and img.meta["dtype"] == "int16"
    assert img.meta["format"] == "nifti" and img.meta["path"] == str(itk_head)
    # origin / direction read from the affine, in RAS
    np.testing.assert_allclose(img.origin, nii.affine[:3, 3])
    np.testing.assert_allclose(img.direction @ np.diag(img.spacing), nii.affine[:3, :3])


def test_itk_head_round_trip_nifti_nrrd_mha_nifti(itk_head, tmp_path):
    original = read_image(itk_head)
    current = original
    for name in ("head.nrrd", "head.mha", "head.nii.gz"):
        written = write_image(current, tmp_path / name)
        assert written == tmp_path / name
        current = read_image(written)
        assert (
            current.meta["format"] == {"nrrd": "nrrd", "mha": "metaimage", "gz": "nifti"}[name.split(".")[-1]]
        )
        assert nib.aff2axcodes(current.affine) == ("L", "S", "A")
        np.testing.assert_allclose(current.spacing, (2.0, 2.0, 3.0), atol=1e-6)
        np.testing.assert_allclose(current.affine, original.affine, atol=1e-5)
        assert current.array.dtype == np.int16
        np.testing.assert_array_equal(current.array, original.array)
    assert _leftovers(tmp_path) == []


@pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_written_files_match_simpleitk_and_monai_readers(itk_head, tmp_path):
    """Our NRRD/MHA output, read by SimpleITK and by MONAI's ITKReader, is the same image."""
    from monai.transforms import LoadImage

    img = read_image(itk_head)
    reference = sitk.ReadImage(str(itk_head))
    for name in ("head.nrrd", "head.mha"):
        path = write_image(img, tmp_path / name)
        ours = sitk.ReadImage(str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference))
        np.testing.assert_allclose(ours.GetOrigin(), reference.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(ours.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(ours.GetDirection(), reference.GetDirection(), atol=1e-6)
        loaded = LoadImage(reader="ITKReader", image_only=True)(str(path))
        np.testing.assert_allclose(loaded.affine.numpy(), img.affine, atol=1e-5)
        np.testing.assert_array_equal(loaded.numpy(), img.array)


def test_nibabel_anatomical_smoke():
    path = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    img = read_image(path)
    nii = nib.load(str(path))
    assert img.spatial_shape == nii.shape[:3]
    np.testing.assert_array_equal(img.array, np.asarray(nii.dataobj))
    np.testing.assert_allclose(img.affine, nii.affine)


def test_2d_rotated_mhd_and_detached_nrrd_agree(itk_data, tmp_path):
    """The same 2D slice (direction +30 degrees) stored as MetaImage (.mhd + .raw) and detached NRRD (.nhdr)."""
    mhd = read_image(itk_data / "BrainT1SliceBorder20DirectionPlus30.mhd")
    nhdr = read_image(itk_data / "BrainT1SliceBorder20DirectionPlus30.nhdr")
    assert mhd.spatial_ndim == 2 and mhd.meta["format"] == "metaimage" and nhdr.meta["format"] == "nrrd"
    np.testing.assert_array_equal(mhd.array, nhdr.array)
    np.testing.assert_allclose(mhd.affine, nhdr.affine, atol=1e-6)
    reference = sitk.ReadImage(str(itk_data / "BrainT1SliceBorder20DirectionPlus30.mhd"))
    np.testing.assert_array_equal(mhd.array, sitk.GetArrayFromImage(reference).T)
    angle = np.degrees(np.arctan2(mhd.direction[1, 0], mhd.direction[0, 0]))
    assert abs(abs(angle) - 150) < 1e-3 or abs(abs(angle) - 30) < 1e-3  # LPS->RAS flips x and y
    back = read_image(write_image(mhd, tmp_path / "slice.mha"))
    assert back.spatial_ndim == 2
    np.testing.assert_array_equal(back.array, mhd.array)
    np.testing.assert_allclose(back.affine, mhd.affine, atol=1e-6)


# -- geometry and dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_oblique_geometry_round_trips_within_float32(tmp_path, suffix):
    affine = affine_from_geometry((0.7, 1.3, 2.9), (-12.25, 40.5, 7.125), _rotation(25.0, -40.0))
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    back = read_image(write_image(Image(array, affine), tmp_path / f"oblique{suffix}"))
    np.testing.assert_allclose(back.affine, affine, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(back.spacing, (0.7, 1.3, 2.9), rtol=1e-6)
    np.testing.assert_array_equal(back.array, array)


@pytest.mark.parametrize(("unit", "mm"), [("micron", 0.001), ("meter", 1000.0), ("mm", 1.0), (0, 1.0)])
def test_nifti_spatial_units_become_mm(tmp_path, unit, mm):
    """``xyzt_units`` in microns or metres. Before, nibabel's affine was taken as mm whatever the unit: a
    500 x 500 x 1000 micron grid read as 500 x 500 x 1000 mm (SimpleITK reads 0.5 x 0.5 x 1 mm)."""
    affine = affine_from_geometry((500.0, 500.0, 1000.0), (100.0, -200.0, 300.0), _rotation(20.0, 30.0))
    nii = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    nii.header.set_xyzt_units(unit, "sec")
    nib.save(nii, tmp_path / "scan.nii.gz")
    img = read_image(tmp_path / "scan.nii.gz")
    expected = affine.copy()
    expected[:3] *= mm
    np.testing.assert_allclose(img.affine, expected, rtol=1e-6)
    itk = sitk.ReadImage(str(tmp_path / "scan.nii.gz"))
    np.testing.assert_allclose(img.spacing, itk.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(img.origin, np.array(itk.GetOrigin()) * [-1, -1, 1], rtol=1e-5)
    back = read_image(write_image(img, tmp_path / "scan.nrrd"))
    np.testing.assert_allclose(back.affine, expected, rtol=1e-6)


def test_sheared_affine_gets_no_qform_in_nifti(tmp_path):
    """An affine with shear (axes 73 degrees apart). Before, the file also got a qform (code 1) holding the nearest
    rotation, which SimpleITK reads: spacing (1, 1.044, 2) with the first axis turned 8.3 degrees (direction
    column (-0.989, 0.145, 0) instead of (-1, 0, 0)), silently. Now the qform code is 0: nibabel and read_image
    use the exact sform, and SimpleITK refuses the file instead of misplacing it."""
    sheared = np.array([[1.0, 0.3, 0.0, 5.0], [0.0, 1.0, 0.0, 6.0], [0.0, 0.0, 2.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
    path = write_image(Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), sheared), tmp_path / "sheared.nii.gz")
    header = nib.load(path).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (0, 1)
    np.testing.assert_allclose(read_image(path).affine, sheared, rtol=1e-6)
    with pytest.raises(RuntimeError, match="ITK only supports orthonormal direction cosines"):
        sitk.ReadImage(str(path))
    oblique = affine_from_geometry((0.7, 1.3, 2.9), (1.0, 2.0, 3.0), _rotation(25.0, -40.0))
    path = write_image(Image(np.zeros((2, 3, 4), np.float32), oblique), tmp_path / "oblique.nii.gz")
    assert int(nib.load(path).header["qform_code"]) == 1  # a rotation: qform and sform agree


DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64, np.float32, np.float64]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_label_dtypes_kept_exactly(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    low, high = (info.min, info.max) if info is not None and info.bits <= 16 else (-5, 300)
    if info is not None and info.min == 0:
        low = 0
    labels = rng.integers(low, high, size=(4, 5, 6), endpoint=True).astype(dtype)
    back = read_image(write_image(labels, tmp_path / f"labels{suffix}", like=Image(np.zeros((4, 5, 6)))))
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, labels)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [">i2", ">u4", ">f4", ">f8"])
def test_big_endian_arrays_are_written(tmp_path, suffix, dtype):
    """Arrays in big-endian byte order (as read from some files) are written with their values. Before, NRRD
    and MHA raised SimpleITK's ``TypeError: dtype: >i2 is not supported.``"""
    array = (np.arange(24).reshape(2, 3, 4) - (0 if "u" in dtype else 3)).astype(dtype)
    back = read_image(write_image(array, tmp_path / f"big{suffix}"))
    assert back.array.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(back.array, array)


def test_bool_written_as_uint8(tmp_path):
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    for suffix in (".nii.gz", ".nrrd"):
        back = read_image(write_image(mask, tmp_path / f"mask{suffix}"))
        assert back.array.dtype == np.uint8
        np.testing.assert_array_equal(back.array, mask.astype(np.uint8))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_channels_round_trip_first_axis(tmp_path, suffix):
    affine = affine_from_geometry((1.0, 2.0, 3.0), (1, 2, 3))
    array = np.random.default_rng(1).random((3, 4, 5, 6)).astype(np.float32)
    img = Image(array, affine, channel_axis=0)
    assert img.num_channels == 3 and img.spatial_shape == (4, 5, 6)
    back = read_image(write_image(img, tmp_path / f"channels{suffix}"))
    assert back.channel_axis == 0 and back.num_channels == 3 and back.spatial_shape == (4, 5, 6)
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)


def test_several_paths_become_channels(itk_head, tmp_path):
    head = read_image(itk_head)
    mask_path = write_image(head.with_array((head.array > 50).astype(np.uint8)), tmp_path / "mask.nrrd")
    both = read_image([itk_head, mask_path])
    assert both.channel_axis == 0 and both.array.shape == (2, 128, 128, 62)
    np.testing.assert_array_equal(both.array[0], head.array)
    np.testing.assert_array_equal(both.array[1], head.array > 50)
    assert both.meta["paths"] == [str(itk_head), str(mask_path)]
    assert both.meta["format"] == ["nifti", "nrrd"]
    np.testing.assert_allclose(both.affine, head.affine, atol=1e-5)


def test_several_paths_on_different_grids_name_both(itk_head, tmp_path):
    head = read_image(itk_head)
    affine = head.affine.copy()
    affine[0, 3] += 10.0
    shifted = Image(head.array, affine)
    other = write_image(shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(ValueError, match="one grid") as err:
        read_image([itk_head, other])
    assert str(itk_head) in str(err.value) and str(other) in str(err.value)
    assert "origin (10" in str(err.value) and "origin (0" in str(err.value)


# -- writing rules --------------------------------------------------------------------------------------


def test_like_gives_geometry_and_checks_shape(itk_head, tmp_path):
    head = read_image(itk_head)
    mask = (head.array > 50).astype(np.uint8)
    out = read_image(write_image(mask, tmp_path / "mask.nii.gz", like=head))
    np.testing.assert_allclose(out.affine, head.affine, atol=1e-6)
    np.testing.assert_array_equal(out.array, mask)
    with pytest.raises(ValueError, match=r"does not fit the image grid \(128, 128, 62\)"):
        write_image(mask[:, :, :10], tmp_path / "bad.nii.gz", like=head)
    assert not (tmp_path / "bad.nii.gz").exists()


def test_image_on_another_grid_than_like_is_refused(tmp_path):
    """An Image keeps its own affine. Before, ``like`` on another grid (same shape) was ignored: the file got
    the image's 1 mm grid while the caller asked for like's 2 mm grid."""
    like = Image(np.zeros((2, 3, 4)), np.diag([2.0, 2.0, 2.0, 1.0]))
    image = Image(np.ones((2, 3, 4), np.uint8), np.eye(4))
    with pytest.raises(ValueError) as raised:
        write_image(image, tmp_path / "out.nii.gz", like=like)
    assert str(raised.value) == (
        "image grid (shape (2, 3, 4), spacing (1, 1, 1) mm, origin (0, 0, 0), orientation RAS) does not match "
        "like's grid (shape (2, 3, 4), spacing (2, 2, 2) mm, origin (0, 0, 0), orientation RAS); write the image "
        "without like, or resample it onto like's grid first")
    assert list(tmp_path.iterdir()) == []
    same = Image(np.ones((2, 3, 4), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert read_image(write_image(same, tmp_path / "same.nii.gz", like=like)).spacing == (2.0, 2.0, 2.0)


@pytest.mark.parametrize("inside", ["out.nii.gz", "sub/out.nrrd"])
def test_output_under_a_file_is_refused_with_the_reason(tmp_path, inside):
    """Before, the folder creation failed with ``FileExistsError: [Errno 17] File exists: '.../scan.nii'``, which
    read as if the output existed (and overwrite=True changed nothing)."""
    scan = tmp_path / "scan.nii"
    scan.write_bytes(b"not a folder")
    with pytest.raises(NotADirectoryError) as raised:
        write_image(np.zeros((2, 2, 2)), scan / inside, overwrite=True)
    assert str(raised.value) == (f"cannot write {scan / inside}: {scan} is a file, not a folder; choose an output "
                                 "path in a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii"] and scan.read_bytes() == b"not a folder"


def test_existing_output_needs_overwrite(tmp_path):
    target = write_image(np.zeros((3, 3, 3), np.uint8), tmp_path / "a.nii.gz")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_image(np.ones((3, 3, 3), np.uint8), target)
    assert read_image(target).array.max() == 0
    write_image(np.ones((3, 3, 3), np.uint8), target, overwrite=True)
    assert read_image(target).array.min() == 1
    assert _leftovers(tmp_path) == []


def test_never_overwrites_the_source_of_like(tmp_path):
    source = write_image(np.arange(27, dtype=np.int16).reshape(3, 3, 3), tmp_path / "scan.nii.gz")
    scan = read_image(source)
    with pytest.raises(ValueError, match="source image"):
        write_image(np.zeros((3, 3, 3), np.uint8), source, like=scan, overwrite=True)
    # a derived image remembers its source too
    with pytest.raises(ValueError, match="source image"):
        write_image(
            scan.with_array(np.zeros((3, 3, 3), np.uint8)), tmp_path / "." / "scan.nii.gz", overwrite=True
        )
    np.testing.assert_array_equal(read_image(source).array, np.arange(27).reshape(3, 3, 3))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import medsegkit.io.nifti as nifti

    def broken(image, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nifti, "write_nifti", broken)
    with pytest.raises(OSError, match="disk full"):
        write_image(np.zeros((2, 2, 2)), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(5), r"\(i, j\), \(i, j, k\) or \(C, i, j, k\)"),
        (np.zeros((2, 2, 2, 2, 2)), r"\(i, j\), \(i, j, k\) or \(C, i, j, k\)"),
        (np.zeros((2, 2, 2), dtype=complex), "dtype complex128"),
        (np.zeros((2, 0, 2)), "empty"),
    ],
)
def test_bad_arrays_are_refused(tmp_path, array, message):
    with pytest.raises(ValueError, match=message):
        write_image(array, tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="long double is float64 on this platform")
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_long_double_is_refused_with_the_reason(tmp_path, suffix):
    """Before, nibabel raised ``HeaderDataError: data dtype "float128" not supported`` and SimpleITK
    ``TypeError: dtype: float128 is not supported.`` from inside the backends."""
    array = np.zeros((2, 3, 4), dtype=np.longdouble)
    name = np.dtype(np.longdouble).name
    with pytest.raises(ValueError) as raised:
        write_image(array, tmp_path / f"out{suffix}")
    assert str(raised.value) == (
        f"cannot write 'out{suffix}': arrays of dtype {name} do not fit; NIfTI, NRRD and MetaImage store floats "
        "of at most 64 bits (convert with array.astype(np.float64))")
    assert list(tmp_path.iterdir()) == []


def test_unknown_write_suffix_lists_accepted(tmp_path):
    with pytest.raises(ValueError, match=r"\.nii\.gz, \.nii, \.nrrd, \.mha"):
        write_image(np.zeros((2, 2, 2)), tmp_path / "out.png")
    with pytest.raises(ValueError, match="read-only"):
        write_image(np.zeros((2, 2, 2)), tmp_path / "out.dcm")


def test_non_finite_affine_refused():
    affine = np.eye(4)
    affine[0, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        Image(np.zeros((2, 2, 2)), affine)


# -- reading errors ------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_image(tmp_path / "nope.nii.gz")


def test_unknown_extension_lists_accepted(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"\.nii\.gz, \.nii, \.nrrd, \.nhdr, \.mha, \.mhd.*DICOM"):
        read_image(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    with pytest.raises(ValueError, match="empty"):
        read_image(path)


def test_truncated_gzip(itk_head, tmp_path):
    data = Path(itk_head).read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="gzip stream is corrupt or truncated"):
        read_image(path)


def test_corrupt_gzip_body(itk_head, tmp_path):
    data = bytearray(Path(itk_head).read_bytes())
    data[200:400] = bytes(200)
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="gzip"):
        read_image(path)


def test_not_gzip_but_named_gz(tmp_path):
    path = tmp_path / "plain.nii.gz"
    path.write_bytes(b"not a gzip stream at all")
    with pytest.raises(ValueError, match="not gzip-compressed"):
        read_image(path)


def test_garbage_nrrd_and_nifti(tmp_path):
    (tmp_path / "bad.nrrd").write_bytes(b"this is not a nrrd header\n")
    with pytest.raises(ValueError, match="could not read .*bad.nrrd as NRRD"):
        read_image(tmp_path / "bad.nrrd")
    (tmp_path / "bad.nii").write_bytes(b"x" * 400)
    with pytest.raises(ValueError, match="could not read .*bad.nii as NIfTI"):
        read_image(tmp_path / "bad.nii")
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(b"x" * 10))
    with pytest.raises(ValueError, match="short.nii.gz"):
        read_image(tmp_path / "short.nii.gz")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no DICOM series found.*notes.txt"):
        read_image(tmp_path)


def test_torch_tensor_written_on_like_grid(itk_head, tmp_path):
    import torch

    head = read_image(itk_head)
    labels = torch.from_numpy((head.array > 60).astype(np.int32))
    back = read_image(write_image(labels, tmp_path / "labels.nrrd", like=head))
    assert back.array.dtype == np.int32
    np.testing.assert_array_equal(back.array, labels.numpy())
    np.testing.assert_allclose(back.affine, head.affine, atol=1e-5)
