"""medsegkit.qc: robust z-score, the per-structure flags, the JSON report, the mirrored disagreement."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from model_fixtures import ThresholdNet

from medsegkit.io import Image
from medsegkit.qc import (
    QCThresholds,
    add_quality_flags,
    mirrored_disagreement,
    reference_ranges_of,
    robust_z,
    write_qc_report,
)


def test_robust_z_uses_median_and_mad():
    z = robust_z([1.0, 2.0, 3.0, 4.0, 100.0])
    # median 3, MAD = median(|2, 1, 0, 1, 97|) = 1
    np.testing.assert_allclose(z, np.array([-2, -1, 0, 1, 97]) / 1.4826)
    assert np.all(robust_z([5.0, 5.0, 5.0, 7.0]) == [0, 0, 0, np.inf])
    assert np.isnan(robust_z([math.nan, 1.0, 2.0, 3.0])[0])


def _table(volumes, **extra):
    rows = []
    for case, volume in enumerate(volumes):
        row = {"case": f"c{case}", "class": "brain", "label": 1, "voxels": 1000, "volume_ml": volume,
               "components": 1, "largest_component_fraction": 1.0, "border_voxels": 0}
        row.update({k: v[case] for k, v in extra.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def test_cohort_volume_outlier_is_flagged_and_only_it():
    flagged = add_quality_flags(_table([1200.0, 1250.0, 1180.0, 1300.0, 400.0]))
    assert flagged["flag_volume"].tolist() == [False, False, False, False, True]
    assert flagged["flags"].tolist() == ["", "", "", "", "volume"]
    assert flagged["flagged"].tolist() == [False] * 4 + [True]
    # fewer cases than min_cases: no cohort z-score, no flag
    few = add_quality_flags(_table([1200.0, 400.0]))
    assert few["volume_z"].isna().all() and not few["flag_volume"].any()


def test_groups_by_model_and_class():
    table = pd.concat([_table([1200.0, 1250.0, 1180.0]).assign(model="a"),
                       _table([10.0, 11.0, 12.0]).assign(model="b")], ignore_index=True)
    assert not add_quality_flags(table)["flag_volume"].any()  # each model against its own cases


def test_reference_range_from_metadata_or_argument():
    metadata = {"qc": {"volume_ml": {"brain": [1000, 1600]}}}
    assert reference_ranges_of(metadata) == {"brain": (1000.0, 1600.0)}
    with pytest.raises(ValueError, match="low <= high"):
        reference_ranges_of({"qc": {"volume_ml": {"brain": [5, 1]}}})
    flagged = add_quality_flags(_table([1200.0, 1700.0]), reference_ranges={"brain": (1000.0, 1600.0)})
    assert flagged["volume_in_range"].tolist() == [True, False]
    assert flagged["flag_volume"].tolist() == [False, True]
    per_row = _table([1200.0, 900.0]).assign(reference_ranges=[{"brain": (1000.0, 1600.0)}] * 2)
    assert add_quality_flags(per_row)["flag_volume"].tolist() == [False, True]


def test_fragmented_border_and_disagreement_flags():
    table = _table([1.0, 1.0, 1.0], components=[1, 40, 40], largest_component_fraction=[1.0, 0.95, 0.3],
                   border_voxels=[0, 5, 200], disagreement=[0.05, 0.1, 0.5])
    flagged = add_quality_flags(table, thresholds=QCThresholds(max_components=20, min_largest_fraction=0.5, max_disagreement=0.2))
    assert flagged["flag_fragmented"].tolist() == [False, False, True]
    assert flagged["border_fraction"].tolist() == [0.0, 0.005, 0.2]
    assert flagged["flag_border"].tolist() == [False, False, True]
    assert flagged["flag_disagreement"].tolist() == [False, False, True]
    assert flagged["flags"].tolist() == ["", "", "fragmented,border,disagreement"]


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['border_voxels'\]"):
        add_quality_flags(_table([1.0]).drop(columns=["border_voxels"]))


def test_json_report(tmp_path):
    flagged = add_quality_flags(_table([1200.0, 1250.0, 1180.0, 1300.0, 400.0]))
    path = write_qc_report(flagged, tmp_path / "qc.json")
    report = json.loads(path.read_text())
    assert report["flagged_cases"] == ["c4"]
    assert report["cases"]["c4"]["structures"]["brain"]["flag_volume"] is True
    assert report["cases"]["c0"]["flagged"] is False
    assert report["thresholds"]["z_threshold"] == 3.5


class _LeftHalf(ThresholdNet):
    """Class 1 on the lower half of the first axis, whatever the image: mirroring moves it."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
        logits[:, 1, : x.shape[2] // 2] = 1.0
        return logits + 0 * self.conv(x)


def test_mirrored_disagreement_is_zero_for_a_symmetric_model_and_high_for_a_sided_one():
    image_array = np.zeros((24, 20, 16), np.float32)
    image_array[5:15, 4:16, 3:12] = 1.0  # an off-centre box: its mirror image lies elsewhere
    image = Image(image_array, np.diag([2.0, 2.0, 3.0, 1.0]))
    labels = (image_array > 0.5).astype(np.uint8)
    assert mirrored_disagreement(ThresholdNet().eval(), image, labels, roi_size=(16, 16, 16)) == {1: 0.0}
    sided_labels = np.zeros_like(labels)
    sided_labels[:12] = 1
    score = mirrored_disagreement(_LeftHalf().eval(), image, sided_labels, roi_size=(16, 16, 16))
    assert score[1] > 0.2
    with pytest.raises(ValueError, match="do not lie on the image grid"):
        mirrored_disagreement(ThresholdNet(), image, labels[:-1])


def test_napari_widget_quality_runs_without_torch():
    """The widget's QC (after a labels result) runs in the napari process: numpy / scipy / pandas, no torch."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, types
        import numpy as np
        from medsegkit.napari._widget import SegmentWidget, _quality_table
        labels = np.zeros((10, 12, 14), np.uint8)
        labels[2:6, 2:6, 2:6] = 1
        labels[0:3, 8:12, 8:12] = 2  # on the border
        labels[7:10:2, 0:6:2, 7:14:2] = 3  # 24 isolated voxels: 24 components, 8 of them on the face j == 0
        widget = types.SimpleNamespace(quality=types.SimpleNamespace(value=""), last_quality=None)
        SegmentWidget._set_quality(widget, _quality_table(labels, (3.0, 2.0, 2.0), ["bg", "a", "b", "c"]))
        table = widget.last_quality.set_index("class")
        assert table.loc["a", "volume_ml"] == 64 * 12 / 1000, table.loc["a", "volume_ml"]
        print(widget.quality.value)
        print("torch" in sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    message, torch_loaded = run.stdout.strip().splitlines()[-2:]
    assert message == "b: border; c: fragmented,border"
    assert torch_loaded == "False"


@pytest.mark.parametrize("bounds", [(math.nan, 1600.0), (1600.0, 1000.0), 1500, "ab", [None, 1600], [True, 2]])
def test_a_reference_range_that_is_not_low_high_numbers_is_refused(bounds):
    message = ("reference volume range for 'brain' must be [low_ml, high_ml], two numbers with low <= high, "
               f"got {bounds!r}")
    # before: (nan, 1600) and (1600, 1000) flagged every case out of range, 1500 / "ab" raised a TypeError
    with pytest.raises(ValueError) as err:
        add_quality_flags(_table([1200.0, 1300.0]), reference_ranges={"brain": bounds})
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        add_quality_flags(_table([1200.0, 1300.0]).assign(reference_ranges=[{"brain": bounds}] * 2))
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        reference_ranges_of({"qc": {"volume_ml": {"brain": bounds}}})
    assert str(err.value) == message


def test_reference_ranges_that_are_not_a_mapping_are_refused():
    with pytest.raises(ValueError, match=r"^reference volume ranges must map class names to \[low_ml, high_ml\], "
                                         r"got \[\(1000, 1600\)\]$"):
        add_quality_flags(_table([1200.0]), reference_ranges=[(1000, 1600)])
    with pytest.raises(ValueError, match=r'^metadata\["qc"\] must be an object'):
        reference_ranges_of({"qc": [1000, 1600]})  # before: AttributeError 'list' object has no attribute 'get'
    open_ended = add_quality_flags(_table([1200.0, 5.0]), reference_ranges={"brain": (100, math.inf)})
    assert open_ended["volume_in_range"].tolist() == [True, False]


def test_json_report_refuses_an_existing_file_unless_overwrite(tmp_path):
    flagged = add_quality_flags(_table([1200.0, 400.0]))
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"\x1f\x8bscan bytes")
    # before: the report replaced the scan (and a folder gave "[Errno 21] Is a directory: '.../.qc.x.part'")
    with pytest.raises(FileExistsError) as err:
        write_qc_report(flagged, scan)
    assert str(err.value) == f"{scan} exists; pass overwrite=True to replace it"
    assert scan.read_bytes() == b"\x1f\x8bscan bytes"
    with pytest.raises(IsADirectoryError) as err:
        write_qc_report(flagged, tmp_path, overwrite=True)
    assert str(err.value) == f"{tmp_path} is a folder; give the path of the JSON report to write"
    assert json.loads(write_qc_report(flagged, scan, overwrite=True).read_text())["flagged_cases"] == []
