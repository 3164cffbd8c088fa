"""DICOM series folders: a series written slice by slice with SimpleITK, and pydicom's real CT slice."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsegkit.io import Image, read_image, write_image

# LPS direction (columns = voxel axes): rows along x, columns along -z, slices along y (a proper rotation).
DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)


def _write_series(volume: sitk.Image, folder: Path, series_uid: str, modality: str = "CT") -> None:
    """One file per slice with the tags GDCM needs to rebuild the volume (SimpleITK's DICOM example)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = volume.GetDirection()
    orientation = "\\".join(
        str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
    )
    tags = {
        "0008|0060": modality,
        "0008|0008": "DERIVED\\SECONDARY",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
        "0020|000e": series_uid,
        "0020|0037": orientation,
        "0008|103e": f"test series {series_uid[-1]}",
        "0018|0050": str(volume.GetSpacing()[2]),
    }
    n = volume.GetDepth()
    for k in range(n):
        slice_ = volume[:, :, k]
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        slice_.SetMetaData(
            "0020|0032", "\\".join(str(v) for v in volume.TransformIndexToPhysicalPoint((0, 0, k)))
        )
        slice_.SetMetaData("0020|0013", str(k + 1))
        slice_.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        # names in reverse order: the reader must sort by position, not by file name
        writer.SetFileName(str(folder / f"img_{series_uid[-1]}_{n - k:03d}.dcm"))
        writer.Execute(slice_)


def _volume(shape_kji, spacing, origin, seed) -> sitk.Image:
    rng = np.random.default_rng(seed)
    volume = sitk.GetImageFromArray(rng.integers(-1000, 2000, size=shape_kji).astype(np.int16))
    volume.SetSpacing(spacing)
    volume.SetOrigin(origin)
    volume.SetDirection(DIRECTION)
    return volume


@pytest.fixture
def two_series(tmp_path):
    main = _volume((8, 12, 10), (0.75, 0.8, 2.5), (-30.0, 12.5, 40.0), seed=0)
    small = _volume((3, 6, 5), (1.0, 1.0, 4.0), (0.0, 0.0, 0.0), seed=1)
    folder = tmp_path / "dicom"
    _write_series(main, folder, "1.2.826.0.1.3680043.2.1125.1.1")
    _write_series(small, folder, "1.2.826.0.1.3680043.2.1125.1.2", modality="MR")
    return folder, main, small


def test_series_with_most_files_is_read(two_series):
    folder, main, _ = two_series
    img = read_image(folder)
    expected = Image.from_sitk(main)
    assert img.spatial_shape == (10, 12, 8)
    np.testing.assert_array_equal(img.array, expected.array)
    np.testing.assert_allclose(img.affine, expected.affine, atol=1e-4)
    np.testing.assert_allclose(img.spacing, (0.75, 0.8, 2.5), atol=1e-5)
    # LPS origin (-30, 12.5, 40) is RAS (30, -12.5, 40); axes: L->R flipped x, slices along -y in RAS
    np.testing.assert_allclose(img.origin, (30.0, -12.5, 40.0), atol=1e-4)
    assert img.orientation == "LIP"
    assert img.meta["format"] == "dicom" and img.meta["modality"] == "CT"
    assert img.meta["series_uid"] == "1.2.826.0.1.3680043.2.1125.1.1"
    assert img.meta["dicom_files"] == 8 and len(img.meta["series_uids"]) == 2


def test_series_uid_selects_another_series(two_series):
    folder, _, small = two_series
    img = read_image(folder, series_uid="1.2.826.0.1.3680043.2.1125.1.2")
    assert img.spatial_shape == (5, 6, 3) and img.meta["modality"] == "MR"
    np.testing.assert_array_equal(img.array, Image.from_sitk(small).array)
    with pytest.raises(ValueError, match=r"not in .*1\.2\.826\.0\.1\.3680043\.2\.1125\.1\.1 \(8 files\)"):
        read_image(folder, series_uid="9.9.9")


def test_dicom_series_converts_to_nifti(two_series, tmp_path):
    folder, main, _ = two_series
    img = read_image(folder)
    back = read_image(write_image(img, tmp_path / "series.nii.gz"))
    np.testing.assert_array_equal(back.array, img.array)
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-4)
    with pytest.raises(ValueError, match="read-only"):
        write_image(img, tmp_path / "series.dcm")


def test_pydicom_ct_slice_matches_pydicom(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copy(source, folder / "CT_small.dcm")
    img = read_image(folder)
    ds = pydicom.dcmread(source)
    assert img.spatial_shape == (ds.Columns, ds.Rows, 1)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # pydicom's pixel_array is (rows, columns) = (j, i)
    np.testing.assert_array_equal(img.array[:, :, 0], hu.T)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    np.testing.assert_allclose(img.spacing[:2], (column_spacing, row_spacing), rtol=1e-6)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    np.testing.assert_allclose(img.origin, (-x, -y, z), atol=1e-4)
    assert img.meta["modality"] == ds.Modality


def test_one_dcm_file_reads_its_whole_series(two_series):
    folder, _, small = two_series
    one_file = sorted(folder.glob("img_2_*.dcm"))[0]  # a file of the 3-slice series
    img = read_image(one_file)
    assert img.meta["series_uid"] == "1.2.826.0.1.3680043.2.1125.1.2" and img.spatial_shape == (5, 6, 3)
    np.testing.assert_array_equal(img.array, Image.from_sitk(small).array)


def test_unreadable_dicom_in_folder_is_explained(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    # DICM preamble and magic, then garbage: GDCM recognises DICOM but cannot parse it
    (folder / "broken.dcm").write_bytes(
        bytes(128) + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + bytes(8) + b"\xff" * 64
    )
    with pytest.raises(ValueError, match=r"no DICOM series found in folder .*broken\.dcm"):
        read_image(folder)
    with pytest.raises(ValueError, match=r"could not read .*broken\.dcm as DICOM"):
        read_image(folder / "broken.dcm")


def test_per_slice_rescale_keeps_every_slice_exact(tmp_path):
    """Each slice's own RescaleSlope / RescaleIntercept (as in PET). Before, the volume took the first slice's
    int16 type, so a slope of 0.25 or an intercept of 0.5 on a later slice was truncated (3.25 -> 3)."""
    pydicom = pytest.importorskip("pydicom")
    volume = _volume((3, 4, 5), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), seed=2)
    folder = tmp_path / "pet"
    _write_series(volume, folder, "1.2.826.0.1.3680043.2.1125.1.3", modality="PT")
    rescale = {1: ("1", "0"), 2: ("0.25", "0"), 3: ("1", "0.5")}  # InstanceNumber -> slope, intercept
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = rescale[int(ds.InstanceNumber)]
        ds.save_as(path)
    img = read_image(folder)
    raw = Image.from_sitk(volume).array.astype(np.float64)  # (i, j, k): slice k is InstanceNumber k + 1
    expected = raw * np.array([1.0, 0.25, 1.0]) + np.array([0.0, 0.0, 0.5])
    assert img.array.dtype == np.float64
    np.testing.assert_array_equal(img.array, expected)
