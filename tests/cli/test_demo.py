"""`medsegkit demo` end to end with the shipped checkpoint, and the checkpoint's recorded facts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsegkit.cli import main
from medsegkit.cli.demo import OVERLAY_NAME, PREDICTION_NAME
from medsegkit.data import MNI_CLASS_NAMES, demo_checkpoint_path, sample_path
from medsegkit.io import read_image
from medsegkit.weights import read_checkpoint


def _record():
    return read_checkpoint(demo_checkpoint_path())[1]


def test_shipped_checkpoint_is_small_and_documented():
    path = demo_checkpoint_path()
    assert path.stat().st_size < 10 * 2**20
    record = _record()
    assert record["model"]["name"] == "UNet3d"
    meta = record["metadata"]
    assert meta["class_names"] == list(MNI_CLASS_NAMES)
    assert len(meta["label_colors"]) == 4
    assert meta["preprocessing"]["spacing"] == [2.0, 2.0, 2.0] and meta["preprocessing"]["orientation"] == "RAS"
    assert meta["preprocessing"]["intensity"]["name"] == "percentile"  # the training recipe's robust intensity
    assert meta["roi_size"] == [64, 64, 48]  # the training window; the demo and predict use it
    training = meta["training"]
    assert training["command"].startswith("medsegkit train --sample")
    assert "k < 55" in training["data"]["split"]
    # the shipped model beats the nearest-class-mean intensity baseline on every class, mean >= 0.85
    dice, baseline = training["validation"]["dice"], training["baseline_nearest_class_mean"]["dice"]
    assert set(dice) == {"CSF", "GM", "WM"}
    assert all(dice[k] > baseline[k] for k in dice), (dice, baseline)
    assert training["validation"]["mean_foreground_dice"] >= 0.87
    assert training["engine"] == "monai.engines.SupervisedTrainer" and training["config"]["freeze_norm_epochs"] == 14


@pytest.mark.slow
def test_demo_end_to_end_matches_recorded_dice(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("mean foreground Dice: ")
    recorded = _record()["metadata"]["training"]["validation"]
    assert float(lines[-1].split(":")[1]) == pytest.approx(recorded["mean_foreground_dice"], abs=1e-3)
    for name, value in recorded["dice"].items():
        row = next(line for line in lines if line.strip().startswith(name + " "))
        assert float(row.split()[1]) == pytest.approx(value, abs=1e-3)

    prediction = read_image(out / PREDICTION_NAME)
    t1 = read_image(sample_path("mni152_t1"))
    assert prediction.spatial_shape == t1.spatial_shape and np.allclose(prediction.affine, t1.affine)
    assert set(np.unique(prediction.array)) <= {0, 1, 2, 3}
    assert (out / OVERLAY_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run replaces only the demo's own files
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([PREDICTION_NAME, OVERLAY_NAME, "notes.txt"])
    assert (out / "notes.txt").read_text() == "mine"


def test_demo_refuses_file_as_out(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["demo", "--out", str(target), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize(("device", "message"), [
    ("bogus", "--device 'bogus' is not a torch device (cpu, cuda, cuda:0, ...)"),
    pytest.param("cuda", "--device cuda: CUDA is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_demo_refuses_a_bad_device_in_one_line_before_any_work(tmp_path, capsys, device, message):
    """Before 2026-12-08 ``--device bogus`` loaded the model and the sample and ended in a RuntimeError traceback."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", device, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [f"medsegkit demo: error: {message}"]
    assert not out.exists()


@pytest.mark.parametrize(("names", "out_channels", "found"), [
    (["background", "brain"], 2, "classes ['background', 'brain']"),
    (None, 2, "2 output classes"),
])
def test_demo_refuses_a_checkpoint_of_other_classes(tmp_path, capsys, names, out_channels, found):
    """The reference is the MNI152 tissue map. Before 2026-12-08 a brain-mask checkpoint had its 'brain' scored
    against CSF (label 1): 'brain 0.012', exit 0; a 2-class checkpoint without names was scored as CSF / GM / WM."""
    from medsegkit import create_model
    from medsegkit.weights import save_checkpoint

    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=out_channels)
    checkpoint = save_checkpoint(model, tmp_path / "other.safetensors",
                                 metadata={"class_names": names} if names else None)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--checkpoint", str(checkpoint), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"medsegkit demo: error: --checkpoint {checkpoint} has {found}; the demo scores the MNI152 tissue classes "
        "['background', 'CSF', 'GM', 'WM']: give a checkpoint of `medsegkit train --sample`"]
    assert not out.exists()
