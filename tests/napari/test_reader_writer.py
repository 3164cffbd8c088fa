"""Reader and writer through napari itself (``viewer.open`` / ``layer.save``), and the sample data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsegkit.io import Image, read_image
from medsegkit.napari._reader import get_reader, read_layers

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"


def test_reader_gives_spacing_and_origin(make_napari_viewer):
    viewer = make_napari_viewer()
    source = read_image(SAMPLE / "mni152_t1_2mm.nii.gz")
    (layer,) = viewer.open(str(SAMPLE / "mni152_t1_2mm.nii.gz"), plugin="medsegkit")
    # napari axes are (z, y, x): the voxel axes (i, j, k) reversed
    np.testing.assert_array_equal(layer.data, source.array.transpose(2, 1, 0))
    np.testing.assert_allclose(layer.scale, source.spacing[::-1])
    np.testing.assert_allclose(layer.translate, source.origin[::-1])
    np.testing.assert_allclose(layer.affine.affine_matrix, np.eye(4))
    # world position of a voxel = the image affine applied to (i, j, k), in napari's (z, y, x) order
    ijk = np.array([10, 20, 30])
    ras = (source.affine @ [*ijk, 1])[:3]
    np.testing.assert_allclose(layer.data_to_world(ijk[::-1]), ras[::-1])


def test_lsa_scan_opens_aligned_and_saves_back_to_its_grid(make_napari_viewer, tmp_path):
    """The ITK head is LSA: the layer is turned to RAS order for display, the saved labels are not."""
    viewer = make_napari_viewer()
    source = read_image(SAMPLE / "itk_head_t1.nii.gz")
    assert source.orientation == "LSA"
    (layer,) = viewer.open(str(SAMPLE / "itk_head_t1.nii.gz"), plugin="medsegkit")
    rng = np.random.default_rng(0)
    for ijk in [(0, 0, 0), (127, 127, 61), *rng.integers(0, (128, 128, 62), size=(20, 3))]:
        ras = (source.affine @ [*ijk, 1])[:3]
        index = np.round(layer.world_to_data(ras[::-1])).astype(int)  # the layer voxel at that RAS point
        assert layer.data[tuple(index)] == source.array[tuple(ijk)]
        np.testing.assert_allclose(layer.data_to_world(index), ras[::-1], atol=1e-4)
    labels = viewer.add_labels((layer.data > 100).astype(np.uint8), name="head mask", scale=layer.scale,
                               translate=layer.translate, affine=layer.affine, metadata=layer.metadata)
    out = tmp_path / "head_mask.nii.gz"
    labels.save(str(out), plugin="medsegkit")
    saved = read_image(out)
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-4)
    np.testing.assert_array_equal(saved.array, (source.array > 100).astype(np.uint8))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_labels_round_trip(make_napari_viewer, tmp_path, suffix):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    labels = viewer.add_labels(rng.integers(0, 4, (6, 7, 8)).astype(np.uint8), name="seg",
                               scale=(3.0, 1.5, 0.75), translate=(-10.0, 20.0, 5.5))
    path = tmp_path / f"seg{suffix}"
    labels.save(str(path))  # napari picks our writer from the extension
    image = read_image(path)
    assert image.spatial_shape == (8, 7, 6)
    np.testing.assert_allclose(image.spacing, (0.75, 1.5, 3.0))
    np.testing.assert_allclose(image.origin, (5.5, 20.0, -10.0))
    (back,) = viewer.open(str(path), plugin="medsegkit")
    assert back._type_string == "labels"  # integer data and "seg" in the name
    np.testing.assert_array_equal(back.data, labels.data)
    np.testing.assert_allclose(back.scale, labels.scale)
    np.testing.assert_allclose(back.translate, labels.translate, atol=1e-5)


def _dicom_series(volume: sitk.Image, folder: Path) -> None:
    """One file per slice with the tags GDCM needs to rebuild the volume (SimpleITK's DICOM example)."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.7"
    for k in range(volume.GetDepth()):
        plane = volume[:, :, k]
        for tag, value in {"0008|0060": "MR", "0020|000d": uid, "0020|000e": uid + ".1",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": str(volume.GetSpacing()[2]),
                           "0020|0013": str(k + 1), "0008|0018": f"{uid}.1.{k + 1}",
                           "0020|0032": "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, k))))}.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)


def test_dicom_folder(make_napari_viewer, tmp_path):
    volume = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    volume.SetSpacing((0.5, 0.6, 2.0))
    volume.SetOrigin((10.0, -20.0, 30.0))
    _dicom_series(volume, tmp_path / "series")
    assert get_reader(str(tmp_path)) is None  # a folder without DICOM files is not ours
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "series"), plugin="medsegkit")
    expected = Image.from_sitk(volume)  # LPS (10, -20, 30) is RAS (-10, 20, 30); the reader turns axes to RAS
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 0)]:
        ras = (expected.affine @ [*ijk, 1])[:3]
        index = np.round(layer.world_to_data(ras[::-1])).astype(int)
        assert layer.data[tuple(index)] == expected.array[ijk]
    assert layer.data.shape == (4, 5, 6) and sorted(layer.scale) == [0.5, 0.6, 2.0]


def test_reader_refuses_other_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    assert get_reader(str(tmp_path / "a.png")) is None
    assert get_reader([str(tmp_path / "a.png"), str(SAMPLE / "mni152_t1_2mm.nii.gz")]) is None
    assert callable(get_reader(str(SAMPLE / "mni152_t1_2mm.nii.gz")))


def test_writer_refuses_4d_labels(tmp_path):
    from medsegkit.napari._writer import write_labels

    with pytest.raises(ValueError, match="only 2D and 3D labels"):
        write_labels(str(tmp_path / "x.nii.gz"), np.zeros((2, 3, 4, 5), np.uint8), {"name": "t"})


def test_writer_never_saves_a_result_over_the_scan_it_came_from(tmp_path):
    """A result layer remembers its scan's path; saving it there (the dialog's "replace?" answered yes)
    replaced the scan. A Labels layer read from its own file still saves back to it."""
    from medsegkit.io import write_image
    from medsegkit.napari._writer import write_labels

    scan = write_image(Image(np.random.default_rng(0).random((4, 5, 6)).astype(np.float32), np.eye(4)),
                       tmp_path / "scan.nii.gz")
    before = scan.read_bytes()
    labels = np.ones((6, 5, 4), np.uint8)
    result = {"name": "scan [demo]", "metadata": {"medsegkit": {"path": str(scan), "model": "demo"}}}
    with pytest.raises(ValueError, match=r"refusing to write .*scan.nii.gz: it is the source image"):
        write_labels(str(scan), labels, result)
    assert scan.read_bytes() == before
    (written,) = write_labels(str(tmp_path / "scan_seg.nii.gz"), labels, result)
    edited = write_image(Image(np.zeros((4, 5, 6), np.uint8), np.eye(4)), tmp_path / "seg.nii.gz")
    read_back = {"name": "seg", "metadata": {"medsegkit": {"path": str(edited)}}}  # opened from seg.nii.gz
    assert write_labels(str(edited), labels, read_back) == [str(edited)]


def test_writer_keeps_2d_geometry(tmp_path):
    from medsegkit.napari._writer import write_labels

    data = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (path,) = write_labels(str(tmp_path / "plane.nrrd"), data, {"scale": (2.0, 0.5), "translate": (1.0, 3.0)})
    image = read_image(path)
    np.testing.assert_array_equal(image.array, data.T)
    np.testing.assert_allclose(image.spacing, (0.5, 2.0))
    np.testing.assert_allclose(image.origin, (3.0, 1.0))


def test_sample_data_has_image_and_reference_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("medsegkit", "mni152")
    t1, tissue = viewer.layers["MNI152 T1"], viewer.layers["MNI152 tissue (reference)"]
    assert t1.data.shape == tissue.data.shape == (95, 117, 99)
    assert tissue._type_string == "labels" and set(np.unique(tissue.data)) == {0, 1, 2, 3}
    np.testing.assert_allclose(t1.scale, (2.0, 2.0, 2.0))
    np.testing.assert_allclose(t1.translate, tissue.translate)
    assert t1.metadata["medsegkit"]["sample"] == "mni152"
    assert tissue.metadata["medsegkit"]["class_names"] == ["background", "CSF", "GM", "WM"]


def _damaged_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Inputs the reader fuzzing found (tests/io/test_fuzz_readers.py): {name: (path, part of the message)}."""
    huge = folder / "huge.nrrd"
    huge.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10000 10000 10000\nencoding: raw\n"
                     b"endian: little\n\nabcd")
    zlib_damaged = folder / "damaged.mha"
    zlib_damaged.write_bytes(b"NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nCompressedData = True\n"
                             b"ElementDataFile = LOCAL\nx\x9c" + bytes(range(40, 60)))
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes((SAMPLE / "mni152_t1_2mm.nii.gz").read_bytes()[:5000])
    cases = {"huge": (huge, "10000 x 10000 x 10000 image"), "zlib": (zlib_damaged, "compressed voxel data are damaged"),
             "truncated": (truncated, "truncated.nii.gz")}
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    duplicated = folder / "duplicated"
    duplicated.mkdir()
    for name in ("a.dcm", "b.dcm"):  # one slice twice: two slices at one position
        (duplicated / name).write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    cases["dicom"] = (duplicated, "two slices are at the same position")
    assert pydicom is not None
    return cases


def test_damaged_files_notify_and_keep_the_viewer(make_napari_viewer, tmp_path):
    """A file the reader refuses: an error notification with its one-line reason, no layer, the viewer alive
    (another file opens afterwards)."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    viewer = make_napari_viewer()
    cases = _damaged_inputs(tmp_path)
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        for name, (path, message) in cases.items():
            seen.clear()
            assert get_reader(str(path)) is not None, name  # ours to read, and refused with a reason
            assert viewer.open(str(path), plugin="medsegkit") == [], name
            assert len(viewer.layers) == 0
            errors = [n for n in seen if n.severity == NotificationSeverity.ERROR]
            assert len(errors) == 1 and message in errors[0].message and "\n" not in errors[0].message, seen
        # several paths handed to the reader at once: the readable one still opens, the damaged one is reported
        seen.clear()
        (layer,) = read_layers([str(cases["huge"][0]), str(SAMPLE / "mni152_t1_2mm.nii.gz")])
        assert layer[1]["name"] == "mni152_t1_2mm" and layer[0].shape == (95, 117, 99)
        assert sum(n.severity == NotificationSeverity.ERROR for n in seen) == 1
        (opened,) = viewer.open(str(SAMPLE / "mni152_t1_2mm.nii.gz"), plugin="medsegkit")
        assert opened.data.shape == (95, 117, 99)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
