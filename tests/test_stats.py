"""medsegkit.stats: per-structure volume (from the affine), components, bounding box, intensities."""

from __future__ import annotations

import json

import numpy as np
import pytest

import medsegkit
from medsegkit.data import sample_path
from medsegkit.io import Image, read_image, write_image
from medsegkit.measurements import metadata_path_for, write_label_metadata


def test_volume_on_the_lsa_2x2x3_itk_head_is_count_times_det():
    labels = read_image(sample_path("itk_head_brain_mask"))
    assert labels.orientation == "LSA" and np.allclose(labels.spacing, (2.0, 2.0, 3.0))
    table = medsegkit.stats(labels)
    count = int(np.count_nonzero(np.asarray(labels.array) == 1))
    assert table["label"].tolist() == [1]
    assert table.loc[0, "voxels"] == count
    # |det| of the LSA direction × (2, 2, 3) mm is 12 mm³ per voxel
    assert table.loc[0, "volume_ml"] == pytest.approx(count * 12.0 / 1000.0, rel=1e-6)
    assert table.loc[0, "volume_ml"] == pytest.approx(count * abs(np.linalg.det(labels.affine[:3, :3])) / 1000)
    assert 1000 < table.loc[0, "volume_ml"] < 2000  # an adult brain, in mL


def _oblique_affine() -> np.ndarray:
    """Rotated about two axes, anisotropic and sheared: |det| differs from the product of column norms."""
    a, b = np.deg2rad(30.0), np.deg2rad(20.0)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    shear = np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot_z @ rot_x @ shear @ np.diag([0.7, 1.3, 2.1])
    affine[:3, 3] = (-40.0, 12.5, 7.0)
    return affine


def test_volume_on_an_oblique_sheared_grid_uses_the_determinant(tmp_path):
    affine = _oblique_affine()
    det = abs(np.linalg.det(affine[:3, :3]))
    norms = np.prod(np.linalg.norm(affine[:3, :3], axis=0))
    assert abs(det - norms) / det > 0.02  # a spacing-product volume would be measurably wrong
    labels = np.zeros((20, 18, 16), np.uint8)
    labels[3:9, 4:12, 2:7] = 1
    labels[12:15, 2:5, 9:15] = 2
    path = write_image(Image(labels, affine), tmp_path / "oblique.nii.gz")
    for given in (Image(labels, affine), path):
        table = medsegkit.stats(given)
        assert table["voxels"].tolist() == [6 * 8 * 5, 3 * 3 * 6]
        np.testing.assert_allclose(table["volume_ml"], np.array([240, 54]) * det / 1000, rtol=1e-5)


def test_bounding_box_is_in_world_mm():
    affine = _oblique_affine()
    labels = np.zeros((20, 18, 16), np.uint8)
    labels[3:9, 4:12, 2:7] = 1
    row = medsegkit.stats(Image(labels, affine)).iloc[0]
    corners = np.array([[i, j, k, 1.0] for i in (3, 8) for j in (4, 11) for k in (2, 6)]).T
    world = (affine @ corners)[:3]
    np.testing.assert_allclose([row.x_min_mm, row.y_min_mm, row.z_min_mm], world.min(axis=1), atol=1e-9)
    np.testing.assert_allclose([row.x_max_mm, row.y_max_mm, row.z_max_mm], world.max(axis=1), atol=1e-9)


def test_lsa_bounding_box_follows_the_flipped_axes():
    labels = read_image(sample_path("itk_head_brain_mask"))
    row = medsegkit.stats(labels).iloc[0]
    idx = np.argwhere(np.asarray(labels.array) == 1)
    world = labels.affine[:3, :3] @ idx.T + labels.affine[:3, 3:4]
    np.testing.assert_allclose([row.x_min_mm, row.y_min_mm, row.z_min_mm], world.min(axis=1), atol=1e-4)
    np.testing.assert_allclose([row.x_max_mm, row.y_max_mm, row.z_max_mm], world.max(axis=1), atol=1e-4)


def test_components_largest_share_and_border():
    labels = np.zeros((12, 12, 12), np.int16)
    labels[1:4, 1:4, 1:4] = 1  # 27 voxels
    labels[6:8, 6:8, 6:8] = 1  # 8 voxels, separate component
    labels[9, 9, 9] = 1  # two steps from (7, 7, 7): a third component
    labels[0:2, 5:7, 5:7] = 2  # 8 voxels, 4 of them on the face i == 0
    table = medsegkit.stats(labels).set_index("label")
    assert table.loc[1, "voxels"] == 36
    assert table.loc[1, "components"] == 3  # (9, 9, 9) is two steps away from (7, 7, 7)
    assert table.loc[1, "largest_component_fraction"] == pytest.approx(27 / 36)
    assert table.loc[1, "border_voxels"] == 0
    assert table.loc[2, "border_voxels"] == 4
    labels[8, 8, 8] = 1  # now diagonal neighbours chain the 2×2×2 block and (9, 9, 9): full connectivity
    assert medsegkit.stats(labels).set_index("label").loc[1, "components"] == 2


def test_intensity_statistics_inside_each_class():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 15, (10, 11, 12)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[2:6, 3:9, 1:10] = 3
    row = medsegkit.stats(labels, image).iloc[0]
    inside = image[labels == 3].astype(np.float64)
    assert row["class"] == "class3"
    assert row.mean_intensity == pytest.approx(inside.mean())
    assert row.median_intensity == pytest.approx(np.median(inside))
    assert row.std_intensity == pytest.approx(inside.std())


def test_class_names_from_argument_meta_and_sidecar(tmp_path):
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[4:6, 4:6, 4:6] = 2
    assert medsegkit.stats(labels, class_names=["bg", "a", "b"])["class"].tolist() == ["a", "b"]
    assert medsegkit.stats(labels, class_names={2: "two"})["class"].tolist() == ["class1", "two"]
    meta_image = Image(labels, np.eye(4), {"class_names": ["background", "CSF", "GM"]})
    assert medsegkit.stats(meta_image)["class"].tolist() == ["CSF", "GM"]
    path = write_image(Image(labels), tmp_path / "case_seg.nii.gz")
    assert medsegkit.stats(path)["class"].tolist() == ["class1", "class2"]
    sidecar = write_label_metadata(path, {"class_names": ["background", "left", "right"]})
    assert sidecar == metadata_path_for(path) == tmp_path / "case_seg.json"
    assert json.loads(sidecar.read_text())["class_names"][1] == "left"
    assert medsegkit.stats(path)["class"].tolist() == ["left", "right"]


@pytest.mark.parametrize(("text", "match"), [
    ("{oops", "is not valid JSON"),
    ('["background", "left"]', "holds a JSON array, expected an object"),
    ('{"class_names": "left"}', "class_names = 'left' is not a list of strings"),
    ('{"class_names": ["bg", 1]}', "class_names = \\['bg', 1\\] is not a list of strings"),
    ('{"label_colors": [[1, 2]]}', "label_colors = \\[\\[1, 2\\]\\] is not a list of RGB\\(A\\) triples"),
])
def test_a_damaged_label_sidecar_is_one_error_naming_it(tmp_path, text, match):
    # before: a list sidecar failed with "AttributeError: 'list' object has no attribute 'get'", a string of
    # class names was indexed letter by letter
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    path = write_image(Image(labels), tmp_path / "case_seg.nii.gz")
    metadata_path_for(path).write_text(text)
    with pytest.raises(ValueError, match=match) as raised:
        medsegkit.stats(path)
    assert str(metadata_path_for(path)) in str(raised.value) and str(raised.value).endswith("delete or fix it")


def test_empty_label_map_gives_an_empty_table_with_the_columns():
    table = medsegkit.stats(np.zeros((4, 4, 4), np.uint8), np.ones((4, 4, 4)))
    assert table.empty
    assert {"volume_ml", "components", "mean_intensity"} <= set(table.columns)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="integer label map"):
        medsegkit.stats(np.full((4, 4, 4), 0.5))
    with pytest.raises(ValueError, match="non-negative"):
        medsegkit.stats(-np.ones((4, 4, 4), np.int8))
    with pytest.raises(ValueError, match="differs from the labels' shape"):
        medsegkit.stats(np.ones((4, 4, 4), np.uint8), np.ones((4, 4, 5)))
    with pytest.raises(ValueError, match="same grid"):
        medsegkit.stats(Image(np.ones((4, 4, 4), np.uint8)), Image(np.ones((4, 4, 4)), np.diag([2, 1, 1, 1])))
    with pytest.raises(ValueError, match="channels"):
        medsegkit.stats(Image(np.ones((2, 4, 4, 4), np.uint8), channel_axis=0))


def test_cli_stats_prints_and_writes_csv(tmp_path, capsys):
    import pandas as pd

    from medsegkit.cli import main

    out = tmp_path / "stats.csv"
    code = main(["stats", str(sample_path("itk_head_brain_mask")), "--image", str(sample_path("itk_head_t1")),
                 "--class-names", "background", "brain", "--csv", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "brain" in printed and f"wrote {out}" in printed
    table = pd.read_csv(out)
    expected = medsegkit.stats(sample_path("itk_head_brain_mask"), sample_path("itk_head_t1"))
    assert table["class"].tolist() == ["brain"]
    assert table.loc[0, "volume_ml"] == pytest.approx(expected.loc[0, "volume_ml"])
    assert table.loc[0, "mean_intensity"] == pytest.approx(expected.loc[0, "mean_intensity"])
    assert main(["stats", str(sample_path("itk_head_brain_mask")), "--csv", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "missing.nii.gz")]) == 2
    assert capsys.readouterr().err.strip() == f"medsegkit stats: error: {tmp_path / 'missing.nii.gz'} does not exist"


def test_cli_stats_refuses_class_names_that_do_not_cover_the_labels(tmp_path, capsys):
    """Before 2026-12-08 ``--class-names background brain`` on a map with classes 1 and 2 named the second ``class2``
    and wrote the CSV (exit 0)."""
    from medsegkit.cli import main
    from medsegkit.io import write_image

    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[4:6, 4:6, 4:6] = 2
    path = write_image(Image(labels, np.eye(4)), tmp_path / "seg.nii.gz")
    out = tmp_path / "stats.csv"
    assert main(["stats", str(path), "--class-names", "background", "brain", "--csv", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "medsegkit stats: error: --class-names gives 2 names (labels 0..1) but the label map holds label 2; give one "
        "name per label, background first"]
    assert not out.exists()


def test_cli_stats_refuses_a_folder_as_csv_before_measuring(tmp_path, capsys):
    """Before 2026-12-08 ``--csv`` naming a folder printed the table and then failed on the rename ('[Errno 21] Is a
    directory') with ``--overwrite``; without it the message asked for ``--overwrite``."""
    from medsegkit.cli import main
    from medsegkit.io import write_image

    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    path = write_image(Image(labels, np.eye(4)), tmp_path / "seg.nii.gz")
    folder = tmp_path / "out.csv"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        assert main(["stats", str(path), "--csv", str(folder), *extra]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.splitlines() == [
            f"medsegkit stats: error: --csv {folder} is a folder; give a file name such as {folder / 'stats.csv'}"]
        assert not any(folder.iterdir())


@pytest.mark.parametrize("value", [65535, 2**31, 2**63 - 1])
def test_huge_label_values_are_measured_without_a_table_per_value(value):
    import resource

    labels = np.zeros((5, 5, 4), np.int64)
    labels[1:3, 1:4, 2] = 1
    labels[4, 4, 3] = value  # one voxel in the grid's corner
    with open("/proc/self/status") as status:
        in_use = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # 1 GB more address space; a table per label value up to 2**31 would need 16 GB (a MemoryError before)
    resource.setrlimit(resource.RLIMIT_AS, (in_use + 2**30, hard))
    try:
        table = medsegkit.stats(Image(labels, np.diag([2.0, 1.0, 3.0, 1.0])))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert table["label"].tolist() == [1, value]
    assert table["voxels"].tolist() == [6, 1]
    assert table["volume_ml"].tolist() == pytest.approx([6 * 6 / 1000, 6 / 1000])
    assert table.loc[1, ["x_min_mm", "y_min_mm", "z_min_mm", "border_voxels"]].tolist() == [8.0, 4.0, 9.0, 1]
    assert table.loc[0, ["x_min_mm", "x_max_mm", "y_max_mm", "z_max_mm"]].tolist() == [2.0, 4.0, 3.0, 6.0]
