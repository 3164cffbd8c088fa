"""medsegkit.train: a short run learns, checkpoints atomically and resumes where it stopped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_data import TINY, blob_volume, small_config

from medsegkit import create_model
from medsegkit.cli import main
from medsegkit.io import Image, write_image
from medsegkit.train.baseline import nearest_class_mean_baseline
from medsegkit.train.data import PatchSampler, split_axial
from medsegkit.train.loop import TrainConfig, recalibrate_batchnorm, state_path_for, train
from medsegkit.weights import load_model


def test_short_run_lowers_loss_and_writes_loadable_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("UNet3d", **TINY)
    out = tmp_path / "model.safetensors"
    result = train(model, [blob_volume(0)], [blob_volume(1)], checkpoint=out, class_names=["bg", "shell", "core"],
                   config=small_config(), metadata={"preprocessing": {"orientation": None}}, progress=False,
                   log=lambda line: None)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.epoch == 4 and result.step == 16
    loaded = load_model(out)
    meta = loaded.medsegkit_metadata
    assert meta["class_names"] == ["bg", "shell", "core"]
    assert meta["training"]["epochs_done"] == 4
    assert set(meta["training"]["validation"]["dice"]) == {"shell", "core"}
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    # atomic writes leave no temporary files behind; the CSV has one row per epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.metrics.csv", "model.safetensors",
                                                          "model.state.safetensors"]
    assert len((tmp_path / "model.metrics.csv").read_text().strip().splitlines()) == 5


def test_resume_continues_from_saved_epoch_like_an_uninterrupted_run(tmp_path):
    names = ["bg", "shell", "core"]
    torch.manual_seed(0)
    straight = create_model("UNet3d", **TINY)
    full = train(straight, [blob_volume(0)], [blob_volume(1)], checkpoint=tmp_path / "a.safetensors", class_names=names,
                 config=small_config(epochs=3), progress=False, log=lambda line: None)

    torch.manual_seed(0)
    first = create_model("UNet3d", **TINY)
    stopped = train(first, [blob_volume(0)], [blob_volume(1)], checkpoint=tmp_path / "b.safetensors", class_names=names,
                    config=small_config(epochs=3, time_budget_s=0.0), progress=False, log=lambda line: None)
    assert stopped.epoch == 1  # the time budget stopped it after the first epoch
    assert state_path_for(tmp_path / "b.safetensors").exists()

    fresh = create_model("UNet3d", **TINY)  # different random weights: resume must overwrite them
    lines: list[str] = []
    resumed = train(fresh, [blob_volume(0)], [blob_volume(1)], checkpoint=tmp_path / "c.safetensors", class_names=names,
                    config=small_config(epochs=3), resume=tmp_path / "b.safetensors", progress=False, log=lines.append)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert resumed.step == full.step == 12
    assert lines[0].startswith("epoch 2/3")
    # optimizer moments, learning-rate schedule and patch sequence restored: same weights as straight through
    for (key, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), key
    assert resumed.history[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"], abs=1e-5)


def test_patch_sampler_biases_towards_rare_class():
    volume = blob_volume(0, size=32)
    counts = np.zeros(3)
    sampler = PatchSampler([volume], patch_size=(6, 6, 6), num_classes=3, class_ratios=(0, 0, 1), flip_axes=(),
                           divisible_by=1, seed=0)
    for _ in range(20):
        image, label = sampler.sample(2)
        assert image.shape == (2, 1, 6, 6, 6) and label.shape == (2, 1, 6, 6, 6)
        counts += np.bincount(label.ravel(), minlength=3)
    assert counts[2] / counts.sum() > 5 * (volume.label == 2).mean()


def test_split_axial_and_baseline():
    volume = blob_volume(0)
    train_part, held_out = split_axial(volume, 10)
    assert train_part.label.shape == (24, 24, 10) and held_out.score_from == 10
    result = nearest_class_mean_baseline([train_part], [held_out], ["bg", "shell", "core"])
    assert np.allclose(result["class_means"], [0.1, 0.5, 0.9], atol=0.02)
    assert result["dice"]["core"] > 0.95
    with pytest.raises(ValueError, match="inside the last axis"):
        split_axial(volume, 24)


def test_config_rejects_unknown_fields():
    with pytest.raises(TypeError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 0.1})


def test_class_count_mismatch():
    model = create_model("UNet3d", **TINY)
    with pytest.raises(ValueError, match="3 output channels but 2 class names"):
        train(model, [blob_volume(0)], [blob_volume(1)], checkpoint="unused.safetensors", class_names=["a", "b"],
              config=small_config(), progress=False)


def test_train_cli_then_resume(tmp_path, capsys):
    volume = blob_volume(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = write_image(Image((volume.image[0] * 255).astype(np.uint8), affine), tmp_path / "t1.nii.gz")
    label = write_image(Image(volume.label.astype(np.uint8), affine), tmp_path / "seg.nii.gz")
    out = tmp_path / "run" / "m.safetensors"
    common = ["train", "--image", str(image), "--label", str(label), "--split-axial", "12", "--model", "UNet3d",
              "--set", "channels=(4, 8)", "--set", "strides=(2,)", "--set", "layout=classic",
              "--patch-size", "16", "16", "8", "--steps-per-epoch", "2", "--threads", "1", "--no-progress",
              "-o", str(out)]
    assert main([*common, "--epochs", "1"]) == 0
    printed = capsys.readouterr()
    assert "intensity baseline" in printed.err and "epoch 1/1" in printed.err
    assert printed.out.strip().splitlines()[-1].startswith("mean foreground Dice: ")
    meta = load_model(out).medsegkit_metadata
    assert meta["preprocessing"] == {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0],
                                     "intensity": {"name": "scale", "divisor": 255.0}}
    assert meta["class_names"] == ["class0", "class1", "class2"]
    assert meta["training"]["command"].startswith("medsegkit train --image")
    assert main([*common, "--epochs", "1"]) == 2  # refuses to overwrite
    assert "exists" in capsys.readouterr().err
    assert main([*common, "--epochs", "2", "--resume", str(out)]) == 0
    assert "epoch 2/2" in capsys.readouterr().err
    assert load_model(out).medsegkit_metadata["training"]["epochs_done"] == 2
    assert main(["train", "--sample", "--image", str(image), "-o", str(tmp_path / "x.pt")]) == 2
    assert "--sample uses the shipped" in capsys.readouterr().err


def test_batchnorm_recalibration_averages_over_patches():
    model = create_model("UNet3d", **TINY)
    first_norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))
    seen: list[torch.Tensor] = []
    first_norm.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0].mean(dim=(0, 2, 3, 4))))
    sampler = PatchSampler([blob_volume(0)], patch_size=(8, 8, 8), num_classes=3, divisible_by=2, seed=0)
    model.eval()
    assert recalibrate_batchnorm(model, sampler, 5) == sum(
        isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    assert not model.training  # mode restored
    assert int(first_norm.num_batches_tracked) == 5 and first_norm.momentum == 0.1
    assert torch.allclose(first_norm.running_mean, torch.stack(seen).mean(0), atol=1e-6)


def test_train_with_recalibration_records_it(tmp_path):
    model = create_model("UNet3d", **TINY)
    result = train(model, [blob_volume(0)], [blob_volume(1)], checkpoint=tmp_path / "m.pt", class_names=["a", "b", "c"],
                   config=small_config(epochs=1, bn_recalibration=3), progress=False, log=lambda line: None)
    assert load_model(result.checkpoint).medsegkit_metadata["training"]["config"]["bn_recalibration"] == 3
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert all(int(m.num_batches_tracked) == 3 for m in norms)


def test_freeze_batchnorm_phase_fixes_statistics(tmp_path):
    model = create_model("UNet3d", **TINY)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    train(model, [blob_volume(0)], [blob_volume(1)], checkpoint=tmp_path / "m.safetensors", class_names=["a", "b", "c"],
          config=small_config(epochs=2, freeze_bn_from=2, bn_recalibration=3), progress=False, log=lambda line: None)
    # epoch 1 trained with batch statistics (4 steps, momentum updates); epoch 2 re-estimated them over
    # max(3, 50) patches and then left them alone while the weights trained on
    assert all(int(m.num_batches_tracked) == 50 for m in norms)
    assert load_model(tmp_path / "m.safetensors").medsegkit_metadata["training"]["config"]["freeze_bn_from"] == 2
