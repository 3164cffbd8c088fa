"""medsegkit.segment_many (folder / glob / list, resumable, sharded) and metrics.evaluate_cohort."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from model_fixtures import ThresholdNet

import medsegkit
from medsegkit.cohort import list_inputs, match_pairs
from medsegkit.io import Image, read_image, write_image
from medsegkit.metrics import cohort_summary, evaluate_cohort


class Threshold(ThresholdNet):
    """:class:`ThresholdNet` with checkpoint-like metadata: class names and a reference volume range."""

    def __init__(self) -> None:
        super().__init__()
        self.medsegkit_metadata = {"class_names": ["background", "blob"], "preprocessing": "none",
                                   "qc": {"volume_ml": {"blob": [0.2, 1.05]}}}


# box edges in voxels; "e" is the cohort's outlier, "d" is above the model's reference range
SIZES = {"a": (8, 8, 8), "b": (8, 8, 9), "c": (8, 9, 9), "d": (9, 9, 9), "e": (3, 3, 3)}


@pytest.fixture()
def cohort_dir(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for case, (di, dj, dk) in SIZES.items():
        array = np.zeros((20, 20, 16), np.float32)
        array[4:4 + di, 5:5 + dj, 3:3 + dk] = 1.0
        write_image(Image(array, np.diag([1.0, 1.0, 1.5, 1.0])), folder / f"{case}.nii.gz")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_segment_many_writes_labels_measures_and_flags(cohort_dir, tmp_path):
    out = tmp_path / "out"
    table = medsegkit.segment_many(Threshold().eval(), cohort_dir, out, progress=False, roi_size=(16, 16, 16))
    assert table["case"].tolist() == list(SIZES)
    assert (table["status"] == "segmented").all()
    assert table["class"].unique().tolist() == ["blob"]
    expected_ml = np.array([np.prod(e) for e in SIZES.values()]) * 1.5 / 1000
    np.testing.assert_allclose(table["volume_ml"], expected_ml)
    np.testing.assert_allclose(table["mean_intensity"], 1.0)
    assert (table["disagreement"] == 0.0).all()  # the model is mirror-symmetric
    # the cohort z-score flags the small box; the model's stored reference range [0.2, 1.05] mL flags "d"
    assert table.set_index("case")["flag_volume"].to_dict() == {"a": False, "b": False, "c": False, "d": True,
                                                                 "e": True}
    assert table.set_index("case").loc["e", "volume_z"] < -3.5
    assert table.set_index("case").loc["d", "volume_in_range"] is False  # 1.09 mL > 1.05 mL
    assert abs(table.set_index("case").loc["d", "volume_z"]) < 3.5
    for case in SIZES:
        labels = read_image(out / f"{case}_seg.nii.gz")
        assert int(np.asarray(labels.array).sum()) == np.prod(SIZES[case])
        sidecar = json.loads((out / f"{case}_seg.json").read_text())
        assert sidecar["class_names"] == ["background", "blob"]
        assert sidecar["disagreement"] == {"1": 0.0}
    saved = pd.read_csv(out / "cohort.csv")
    assert saved["case"].tolist() == list(SIZES)
    report = json.loads((out / "qc_report.json").read_text())
    assert sorted(report["flagged_cases"]) == ["d [Threshold]", "e [Threshold]"]


def test_existing_results_are_skipped_and_still_measured(cohort_dir, tmp_path):
    out = tmp_path / "out"
    first = medsegkit.segment_many(Threshold().eval(), cohort_dir, out, progress=False, roi_size=(16, 16, 16))
    # nothing left to compute: the model is never loaded (a missing checkpoint would raise)
    second = medsegkit.segment_many(tmp_path / "missing.safetensors", cohort_dir, out, progress=False)
    assert (second["status"] == "skipped").all()
    columns = ["case", "voxels", "volume_ml", "disagreement", "flag_volume"]
    pd.testing.assert_frame_equal(first[columns], second[columns])
    (out / "b_seg.nii.gz").unlink()
    third = medsegkit.segment_many(Threshold().eval(), cohort_dir, out, progress=False, roi_size=(16, 16, 16))
    assert third.set_index("case")["status"].to_dict() == {
        "a": "skipped", "b": "segmented", "c": "skipped", "d": "skipped", "e": "skipped"}


def test_a_failed_table_write_keeps_the_previous_cohort_table(cohort_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    medsegkit.segment_many(Threshold().eval(), cohort_dir, out, progress=False, roi_size=(16, 16, 16))
    before = (out / "cohort.csv").read_bytes()

    def half_then_fail(self, path, **kwargs):  # a full disk / a kill in the middle of the table
        with open(path, "w") as f:
            f.write("case,mod")
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        medsegkit.segment_many(Threshold().eval(), cohort_dir, out, progress=False, roi_size=(16, 16, 16))
    assert (out / "cohort.csv").read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".part")]


def test_inputs_as_glob_list_and_rank_share(cohort_dir, tmp_path):
    assert [p.name for p in list_inputs(str(cohort_dir / "[ab]*.nii.gz"))] == ["a.nii.gz", "b.nii.gz"]
    listed = [cohort_dir / "d.nii.gz", cohort_dir / "a.nii.gz"]
    assert list_inputs(listed) == listed
    share = medsegkit.segment_many(Threshold().eval(), cohort_dir, tmp_path / "out", progress=False, rank=1,
                                   world_size=2, disagreement=False, roi_size=(16, 16, 16))
    assert share["case"].tolist() == ["b", "d"]  # images[1::2]
    assert "disagreement" not in share.columns and not share["flag_disagreement"].any()
    assert not (tmp_path / "out" / "cohort.csv").exists()  # only rank 0 writes the cohort files


def test_input_errors(cohort_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches the pattern"):
        list_inputs(str(tmp_path / "*.nrrd"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs([tmp_path / "nope.nii.gz"])
    with pytest.raises(ValueError, match="same file twice"):
        list_inputs([cohort_dir / "a.nii.gz", cohort_dir / "a.nii.gz"])
    with pytest.raises(ValueError, match="output must be 'labels'"):
        medsegkit.segment_many(Threshold(), cohort_dir, tmp_path / "o", output="probabilities")


def test_evaluate_cohort_pairs_folders_summary_and_boxplot(tmp_path):
    rng = np.random.default_rng(0)
    predictions, references = tmp_path / "pred", tmp_path / "ref"
    predictions.mkdir()
    references.mkdir()
    pairs = []
    for case in ("p1", "p2", "p3"):
        reference = np.zeros((12, 12, 12), np.uint8)
        reference[2:9, 2:9, 2:9] = 1
        reference[9:11, 2:6, 2:6] = 2
        prediction = reference.copy()
        prediction[rng.integers(0, 12, 30), rng.integers(0, 12, 30), rng.integers(0, 12, 30)] = 1
        affine = np.diag([1.0, 2.0, 1.0, 1.0])
        write_image(Image(prediction, affine), predictions / f"{case}_seg.nii.gz")
        write_image(Image(reference, affine), references / f"{case}.nii.gz")
        pairs.append((predictions / f"{case}_seg.nii.gz", references / f"{case}.nii.gz"))
    boxplot = tmp_path / "box.png"
    matched = match_pairs(predictions, references)
    assert matched == {f"p{n}": pair for n, pair in zip((1, 2, 3), pairs)}
    table = evaluate_cohort(matched, class_names=["bg", "big", "small"], boxplot=boxplot)
    assert table["case"].tolist() == ["p1", "p1", "p2", "p2", "p3", "p3"]
    one = medsegkit.evaluate(read_image(pairs[1][0]), read_image(pairs[1][1]))  # the pair API is unchanged
    row = table[(table["case"] == "p2") & (table["label"] == 1)].iloc[0]
    assert row["dice"] == pytest.approx(one["dice"][1])
    assert row["hd95"] == pytest.approx(one["hd95"][1])
    assert row["volume_difference_ml"] == pytest.approx(one["volume_difference"][1])
    assert boxplot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_file = evaluate_cohort(pairs, class_names=["bg", "big", "small"])  # a list: cases named by file
    assert by_file["case"].tolist()[:2] == ["p1_seg.nii.gz"] * 2
    pd.testing.assert_frame_equal(by_file.drop(columns="case"), table.drop(columns="case"))
    summary = cohort_summary(table)
    assert summary["class"].tolist() == ["big", "small"]
    assert summary["cases"].tolist() == [3, 3]
    assert summary.loc[0, "dice_mean"] == pytest.approx(table[table["label"] == 1]["dice"].mean())
    with pytest.raises(FileNotFoundError, match="no reference for prediction"):
        (references / "p3.nii.gz").unlink()
        match_pairs(predictions, references)
    with pytest.raises(TypeError, match="match_pairs"):
        evaluate_cohort(predictions)


def test_segment_many_into_the_input_folder_keeps_scans_and_results_apart(cohort_dir):
    """Results next to their scans: a rerun read case_seg.nii.gz as a scan (and segmented it). Now results
    are not inputs, and a result that would be its own scan (``suffix=""``) is refused before anything is
    computed (write_image's input guard refused it only after the first segmentation)."""
    scans = {p.name: p.read_bytes() for p in cohort_dir.glob("*.nii.gz")}
    first = medsegkit.segment_many(Threshold().eval(), cohort_dir, cohort_dir, progress=False, roi_size=(16, 16, 16))
    again = medsegkit.segment_many(Threshold().eval(), cohort_dir, cohort_dir, progress=False, roi_size=(16, 16, 16))
    assert again["case"].tolist() == first["case"].tolist() == list(SIZES)
    assert (again["status"] == "skipped").all()
    assert not list(cohort_dir.glob("*_seg_seg*"))
    with pytest.raises(ValueError, match=r"a.nii.gz would replace it .* give another output folder or a suffix"):
        medsegkit.segment_many(Threshold().eval(), cohort_dir, cohort_dir, suffix="", overwrite=True, progress=False,
                               roi_size=(16, 16, 16))
    assert {name: (cohort_dir / name).read_bytes() for name in scans} == scans


def test_a_nan_reference_range_is_refused_before_segmenting(cohort_dir, tmp_path):
    # before: every case was segmented, then flagged out of range (nan <= volume is False)
    with pytest.raises(ValueError, match=r"^reference volume range for 'blob' must be \[low_ml, high_ml\]"):
        medsegkit.segment_many(Threshold().eval(), cohort_dir, tmp_path / "out", progress=False,
                               reference_ranges={"blob": (float("nan"), 1.0)}, roi_size=(16, 16, 16))
    assert not (tmp_path / "out").exists()


def test_a_label_file_segment_many_did_not_write_is_refused_not_measured(cohort_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    manual = np.zeros((20, 20, 16), np.uint8)
    manual[0:2, 0:2, 0:2] = 1
    write_image(Image(manual, np.diag([1.0, 1.0, 1.5, 1.0])), out / "a_seg.nii.gz")  # the user's own segmentation
    before = (out / "a_seg.nii.gz").read_bytes()
    # before: measured as case a's result (8 voxels, status "skipped") and given a sidecar of this model's
    with pytest.raises(ValueError) as err:
        medsegkit.segment_many(Threshold().eval(), cohort_dir, out, progress=False, roi_size=(16, 16, 16))
    assert str(err.value) == (f"{out / 'a_seg.nii.gz'} has no sidecar a_seg.json (segment_many writes one with "
                              "every result): segment_many resumes only from its own results; move it away, "
                              "or pass overwrite=True to segment the case again")
    assert (out / "a_seg.nii.gz").read_bytes() == before and not (out / "a_seg.json").exists()


@pytest.mark.parametrize(("change", "problem"), [
    ({"image": "/elsewhere/z.nii.gz"}, "was made from the image '/elsewhere/z.nii.gz', not b.nii.gz"),
    ({"image": None}, "was made from the image None, not b.nii.gz"),
    ({"disagreement": "high"}, "has a sidecar whose disagreement is not {label: score}: 'high'"),
])
def test_a_result_of_another_image_or_a_damaged_sidecar_is_refused(cohort_dir, tmp_path, change, problem):
    out = tmp_path / "out"
    medsegkit.segment_many(Threshold().eval(), [cohort_dir / "b.nii.gz"], out, progress=False, qc=False,
                           roi_size=(16, 16, 16))
    sidecar = json.loads((out / "b_seg.json").read_text())
    (out / "b_seg.json").write_text(json.dumps({**sidecar, **change}))
    # before: another image's result was measured as b's; a string disagreement raised AttributeError 'get'
    with pytest.raises(ValueError) as err:
        medsegkit.segment_many(Threshold().eval(), [cohort_dir / "b.nii.gz"], out, progress=False, qc=False)
    assert str(err.value).startswith(f"{out / 'b_seg.nii.gz'} {problem}: segment_many resumes only")


def test_a_run_stopped_between_the_sidecar_and_the_labels_segments_the_case_again(cohort_dir, tmp_path,
                                                                                   monkeypatch):
    import medsegkit.io

    out = tmp_path / "out"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(medsegkit.io, "write_image", killed)
    with pytest.raises(KeyboardInterrupt):
        medsegkit.segment_many(Threshold().eval(), [cohort_dir / "b.nii.gz"], out, progress=False,
                               roi_size=(16, 16, 16))
    monkeypatch.undo()
    assert (out / "b_seg.json").exists() and not (out / "b_seg.nii.gz").exists()
    table = medsegkit.segment_many(Threshold().eval(), [cohort_dir / "b.nii.gz"], out, progress=False, qc=False,
                                   roi_size=(16, 16, 16))
    assert table["status"].tolist() == ["segmented"] and table["voxels"].tolist() == [8 * 8 * 9]


def test_the_boxplot_refuses_an_existing_file_before_scoring(tmp_path):
    reference = np.zeros((6, 6, 6), np.uint8)
    reference[1:4, 1:4, 1:4] = 1
    target = write_image(Image(reference), tmp_path / "ref.nii.gz")
    before = target.read_bytes()
    # before: the PNG replaced the reference scan it had just scored
    with pytest.raises(FileExistsError) as err:
        evaluate_cohort({"c": (reference, target)}, boxplot=target)
    assert str(err.value) == f"{target} exists; pass overwrite=True to replace it"
    assert target.read_bytes() == before
    with pytest.raises(IsADirectoryError, match="is a folder; give the path of the PNG file to write"):
        evaluate_cohort({"c": (reference, target)}, boxplot=tmp_path)
    png = tmp_path / "box.png"
    png.write_bytes(b"old")
    evaluate_cohort({"c": (reference, target)}, boxplot=png, overwrite=True, hd95=False)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
