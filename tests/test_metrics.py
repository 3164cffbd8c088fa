"""medsegkit.metrics.evaluate and `medsegkit evaluate`: values checked against hand computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medsegkit.cli import main
from medsegkit.io import Image, write_image
from medsegkit.metrics import evaluate


def _cubes():
    ref = np.zeros((20, 20, 20), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:12, 2:12, 2:12] = 1  # 1000 voxels
    pred[4:12, 2:12, 2:12] = 1  # 800 voxels, all inside the reference
    ref[15:18, 15:18, 15:18] = 2  # class 2 only in the reference
    return pred, ref


def test_dice_volume_and_hd95_by_hand():
    pred, ref = _cubes()
    result = evaluate(pred, ref, spacing=(2.0, 1.0, 1.0))
    assert result["labels"] == [1, 2]
    assert result["dice"][1] == pytest.approx(2 * 800 / 1800)
    assert result["dice"][2] == 0.0
    # surfaces differ only by the two missing slabs along axis 0: max distance 2 voxels x 2 mm
    assert 0 < result["hd95"][1] <= 4.0 + 1e-6
    assert math.isnan(result["hd95"][2])  # no predicted surface
    voxel_ml = 2.0 / 1000
    assert result["volume_reference"][1] == pytest.approx(1000 * voxel_ml)
    assert result["volume_difference"][1] == pytest.approx(-200 * voxel_ml)
    assert result["relative_volume_difference"][1] == pytest.approx(-0.2)
    assert result["mean_dice"] == pytest.approx((2 * 800 / 1800) / 2)


def test_identical_maps_and_absent_label():
    _, ref = _cubes()
    result = evaluate(ref, ref, labels=[1, 2, 3])
    assert result["dice"] == {1: 1.0, 2: 1.0, 3: 1.0}  # absent from both maps counts as agreement
    assert result["hd95"][1] == 0.0
    assert math.isnan(result["hd95"][3])


def test_images_use_affine_spacing_and_must_share_grid():
    pred, ref = _cubes()
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    result = evaluate(Image(pred, affine), Image(ref, affine), hd95=False)
    assert result["spacing"] == (3.0, 3.0, 3.0)
    assert result["volume_reference"][1] == pytest.approx(1000 * 27 / 1000)
    shifted = affine.copy()
    shifted[0, 3] = 5.0
    with pytest.raises(ValueError, match="different affines"):
        evaluate(Image(pred, affine), Image(ref, shifted))
    with pytest.raises(ValueError, match="same grid"):
        evaluate(pred[:10], ref)


def test_rejects_probabilities():
    pred, ref = _cubes()
    with pytest.raises(ValueError, match="integer label map"):
        evaluate(pred * 0.5, ref)


def test_evaluate_cli(tmp_path, capsys):
    pred, ref = _cubes()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    pred_path = write_image(Image(pred, affine), tmp_path / "pred.nii.gz")
    ref_path = write_image(Image(ref, affine), tmp_path / "ref.nii.gz")
    assert main(["evaluate", str(pred_path), str(ref_path), "--class-names", "bg", "liver", "tumour"]) == 0
    out = capsys.readouterr().out
    assert "liver" in out and "0.889" in out and "HD95" in out
    other = write_image(Image(ref, np.diag([1.0, 1.0, 1.0, 1.0])), tmp_path / "other.nii.gz")
    assert main(["evaluate", str(pred_path), str(other)]) == 2
    assert "different affines" in capsys.readouterr().err


def test_evaluate_cli_json_is_strict_json_with_null_for_missing_values(tmp_path, capsys):
    """Class 2 is only in the reference: its HD95 does not exist. Before 2026-12-08 ``--json`` printed ``NaN``, which
    is not JSON (``jq`` and JavaScript's JSON.parse refuse the whole document)."""
    pred, ref = _cubes()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    pred_path = write_image(Image(pred, affine), tmp_path / "pred.nii.gz")
    ref_path = write_image(Image(ref, affine), tmp_path / "ref.nii.gz")
    assert main(["evaluate", str(pred_path), str(ref_path), "--json"]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    data = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert data["hd95"]["2"] is None and data["dice"]["2"] == 0.0
    assert data["relative_volume_difference"] == {"1": -0.2, "2": -1.0}
    assert data["hd95"]["1"] == pytest.approx(4.0)


def test_negative_labels_are_refused_not_scored_as_perfect(tmp_path, capsys):
    """No voxel holds class -1, so before 2026-12-08 ``--labels -1`` scored it Dice 1.000 (absent from both maps)
    and ``mean Dice: 1.000``, exit 0."""
    pred, ref = _cubes()
    with pytest.raises(ValueError, match=r"^labels are class indices >= 0 \(0 = background\); got \[1, -1\]$"):
        evaluate(pred, ref, labels=[1, -1])
    pred_path = write_image(Image(pred, np.eye(4)), tmp_path / "pred.nii.gz")
    ref_path = write_image(Image(ref, np.eye(4)), tmp_path / "ref.nii.gz")
    assert main(["evaluate", str(pred_path), str(ref_path), "--labels", "-1", "--no-hd95"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "medsegkit evaluate: error: labels are class indices >= 0 (0 = background); got [-1]"]


def test_class_names_that_do_not_cover_the_scored_labels_are_refused(tmp_path, capsys):
    """Before 2026-12-08 ``--class-names bg liver`` on maps with classes 1 and 2 printed a row named ``liver`` and one
    named ``2`` (exit 0): names for part of the classes are most likely names for another label map."""
    pred, ref = _cubes()
    pred_path = write_image(Image(pred, np.eye(4)), tmp_path / "pred.nii.gz")
    ref_path = write_image(Image(ref, np.eye(4)), tmp_path / "ref.nii.gz")
    assert main(["evaluate", str(pred_path), str(ref_path), "--class-names", "bg", "liver", "--no-hd95"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "medsegkit evaluate: error: --class-names gives 2 names (labels 0..1) but label 2 is scored; give one name per "
        "label, background first"]
    assert main(["evaluate", str(pred_path), str(ref_path), "--class-names", "bg", "liver", "--labels", "1",
                 "--no-hd95"]) == 0
    assert "liver" in capsys.readouterr().out


@pytest.mark.parametrize("spacing", [(math.nan, 1.0, 1.0), (math.inf, 1.0, 1.0), (-2.0, 1.0, 1.0), (0.0, 1.0, 1.0),
                                     "abc", (True, 1.0, 1.0), (1.0, 1.0)])
def test_spacing_that_is_not_three_positive_sizes_is_one_line(spacing):
    pred, ref = _cubes()
    # before: NaN / inf failed inside MONAI ("data must be finite"), -2 mm gave -2.0 mL for 1000 voxels, 0 mm gave 0 mL
    with pytest.raises(ValueError) as err:
        evaluate(pred, ref, spacing=spacing)
    assert str(err.value) == f"spacing must be 3 finite voxel sizes > 0 in mm for a 3D map; got {spacing!r}"


@pytest.mark.parametrize("labels", ["12", [1.5], [True], 3])
def test_labels_that_are_not_whole_class_indices_are_refused(labels):
    pred, ref = _cubes()
    # before: "12" scored classes 1 and 2 (one per character), [1.5] scored class 1
    with pytest.raises(ValueError) as err:
        evaluate(pred, ref, labels=labels, hd95=False)
    assert str(err.value) == f"labels must be whole class indices >= 0 (0 = background); got {labels!r}"
    assert evaluate(pred, ref, labels=[2.0, np.int64(1)], hd95=False)["labels"] == [2, 1]


def test_volumes_on_a_sheared_grid_use_the_determinant_like_stats():
    import medsegkit

    pred, ref = _cubes()
    sheared = np.array([[2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    result = evaluate(Image(pred, sheared), Image(ref, sheared), hd95=False)
    # |det| = 6 mm³ per voxel; before: the product of the column lengths, 2 * sqrt(2) * 3 = 8.49 mm³
    assert result["volume_reference"][1] == pytest.approx(1000 * 6 / 1000)
    assert result["volume_difference"][1] == pytest.approx(-200 * 6 / 1000)
    measured = medsegkit.stats(Image(ref, sheared)).set_index("label")["volume_ml"]
    assert result["volume_reference"][1] == pytest.approx(measured[1])
    assert result["volume_reference"][2] == pytest.approx(measured[2])
