"""medsegkit.train's engine: MONAI SupervisedTrainer with medsegkit's step and handlers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from training_data import NAMES, TINY, blob_volume, small_config

import medsegkit.amp
from medsegkit import create_model
from medsegkit.cli import main
from medsegkit.io import Image, write_image
from medsegkit.train.baseline import nearest_class_mean_baseline
from medsegkit.train.data import (
    LabelledVolume,
    load_labelled_volume,
    split_axial,
    superior_last,
    training_items,
)
from medsegkit.train.engine import TrainConfig, recipe_preprocessing, state_path_for, train, training_loader
from medsegkit.weights import load_model, read_checkpoint


def _run(tmp_path, name, config, *, model=None, arch=TINY, seed=0, volumes=None, **kw):
    torch.manual_seed(seed)
    model = model if model is not None else create_model("UNet3d", **arch)  # same seed: same initial weights
    kw.setdefault("preprocessing", "none")
    train_volumes, val_volumes = volumes or ([blob_volume(0)], [blob_volume(1)])
    result = train(model, train_volumes, val_volumes, checkpoint=tmp_path / f"{name}.safetensors",
                   class_names=kw.pop("class_names", NAMES), config=config, progress=False,
                   log=kw.pop("log", lambda line: None), **kw)
    return model, result


def _adam_moments(checkpoint) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(state_path_for(checkpoint))
    return {k: v for k, v in tensors.items() if k.endswith(".exp_avg")}


def test_short_run_lowers_loss_and_writes_loadable_checkpoint(tmp_path):
    model, result = _run(tmp_path, "model", small_config())
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.epoch == 4 and result.step == 16
    loaded = load_model(tmp_path / "model.safetensors")
    meta = loaded.medsegkit_metadata
    assert meta["class_names"] == NAMES
    assert meta["preprocessing"] == {"orientation": None, "spacing": None, "intensity": None}
    assert meta["training"]["epochs_done"] == 4 and meta["training"]["engine"] == "monai.engines.SupervisedTrainer"
    assert set(meta["training"]["validation"]["dice"]) == {"shell", "core"}
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    # atomic writes leave no temporary files behind; the CSV has one row per epoch; the curve is a PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.learning_curve.png", "model.metrics.csv",
                                                          "model.safetensors", "model.state.safetensors"]
    assert len((tmp_path / "model.metrics.csv").read_text().strip().splitlines()) == 5
    assert (tmp_path / "model.learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_whose_names_share_a_first_dot_keep_their_own_companion_files(tmp_path):
    """``unet.v1`` and ``unet.v2``: until 2026-12-07 both wrote ``unet.state.safetensors``, ``unet.metrics.csv``
    and ``unet.learning_curve.png``, so the second run replaced the first's training state and a resume of
    ``unet.v1`` continued from ``unet.v2``'s optimizer."""
    _run(tmp_path, "unet.v1", small_config(epochs=1))
    v1_state = (tmp_path / "unet.v1.state.safetensors").read_bytes()
    _run(tmp_path, "unet.v2", small_config(epochs=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"unet.{v}.{kind}" for v in ("v1", "v2")
        for kind in ("learning_curve.png", "metrics.csv", "safetensors", "state.safetensors")]
    assert (tmp_path / "unet.v1.state.safetensors").read_bytes() == v1_state
    assert len((tmp_path / "unet.v1.metrics.csv").read_text().strip().splitlines()) == 2  # header + 1 epoch
    with pytest.raises(ValueError, match="checkpoint .*t1.nii.gz is not a checkpoint name; accepted endings"):
        train(create_model("UNet3d", **TINY), [blob_volume(0)], [], checkpoint=tmp_path / "t1.nii.gz",
              class_names=NAMES, config=small_config(epochs=1), preprocessing="none", progress=False)
    assert state_path_for(tmp_path / "a.b.pt") == tmp_path / "a.b.state.safetensors"
    assert state_path_for(tmp_path / "model.safetensors") == tmp_path / "model.state.safetensors"  # as before


def test_train_refuses_to_replace_an_existing_checkpoint_unless_asked(tmp_path):
    """Until 2026-12-07 only the CLI refused; ``train()`` itself replaced an existing checkpoint (and its
    training state, metrics and curve) without a word."""
    _run(tmp_path, "model", small_config(epochs=1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="model.safetensors exists; pass overwrite=True to replace it or "
                                              "resume=.*model.safetensors to continue it"):
        _run(tmp_path, "model", small_config(epochs=1), seed=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing was touched
    _, resumed = _run(tmp_path, "model", small_config(epochs=2), resume=tmp_path / "model.safetensors")
    assert [row["epoch"] for row in resumed.history] == [1, 2]  # a run continues its own checkpoint
    _, again = _run(tmp_path, "model", small_config(epochs=1), seed=1, overwrite=True)
    assert again.epoch == 1 and load_model(tmp_path / "model.safetensors").medsegkit_metadata["training"][
        "epochs_done"] == 1


def test_train_api_checks_its_outputs_and_class_names_before_any_work(tmp_path):
    """The command line's checks hold for train() too (until 2026-12-08 only ``medsegkit train`` had them):
    a metrics_csv named like a scan would have been replaced by the table after the first validation."""
    scan = tmp_path / "t1.nii.gz"
    scan.write_bytes(b"a scan")
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "old.csv").write_text("an earlier table")
    for kw, error, message in (
            (dict(metrics_csv=scan), ValueError, "metrics_csv must name a .csv file, got 't1.nii.gz'"),
            (dict(metrics_csv=tmp_path / "old.csv"), FileExistsError, "metrics_csv .*old.csv exists; pass "
                                                                      "overwrite=True to replace it"),
            (dict(name="folder"), IsADirectoryError, "checkpoint .*folder.safetensors is a folder; give a "
                                                     "checkpoint file name such as"),
            (dict(class_names=["bg", "x", "x"]), ValueError, "class_names must be distinct; x appears more than "
                                                             "once in bg x x")):
        with pytest.raises(error, match=message):
            _run(tmp_path, kw.pop("name", "model"), small_config(epochs=1), **kw)
    assert scan.read_bytes() == b"a scan" and (tmp_path / "old.csv").read_text() == "an earlier table"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.safetensors", "old.csv", "t1.nii.gz"]


def test_resume_names_a_state_file_of_the_old_naming(tmp_path):
    _run(tmp_path, "unet.v1", small_config(epochs=1))
    (tmp_path / "unet.v1.state.safetensors").rename(tmp_path / "unet.state.safetensors")  # as written before
    with pytest.raises(FileNotFoundError, match="unet.v1.state.safetensors .* is missing; unet.state.safetensors "
                                                "beside it may be it .*rename it to unet.v1.state.safetensors"):
        _run(tmp_path, "again", small_config(epochs=2), resume=tmp_path / "unet.v1.safetensors")


def test_learning_rate_warms_up_then_decays_per_step(tmp_path):
    _, result = _run(tmp_path, "lr", small_config(epochs=3, warmup_epochs=1))
    lrs = [row["lr"] for row in result.history]
    # the schedule steps every iteration: after epoch 1 (4 warm-up steps) the peak, then cosine to 1 %
    assert lrs[0] == pytest.approx(1e-2, rel=1e-6) and lrs[0] > lrs[1] > lrs[2]
    assert lrs[2] == pytest.approx(1e-4, rel=1e-6)


def test_validation_runs_segment_on_the_volume_grid(tmp_path):
    """Validation predicts through medsegkit.segment with the recorded preprocessing: a checkpoint's
    own Dice equals what segment gives on the validation volume afterwards."""
    from medsegkit import segment
    from medsegkit.metrics import dice_per_class

    spec = {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "intensity": {"name": "zscore", "nonzero": True}}
    _, result = _run(tmp_path, "grid", small_config(epochs=2, patch_size=(8, 8, 8)), preprocessing=spec)
    volume = blob_volume(1)
    labels = segment(tmp_path / "grid.safetensors", volume.as_image(), roi_size=(8, 8, 8), fast=False)
    assert labels.array.shape == volume.label.shape  # back on the 1 mm grid of the volume
    dice = dice_per_class(np.asarray(labels.array).ravel()[:, None], volume.label.ravel()[:, None], [1, 2])
    assert result.validation["dice"]["shell"] == pytest.approx(dice[1], abs=1e-6)
    assert load_model(tmp_path / "grid.safetensors").medsegkit_metadata["preprocessing"]["spacing"] == [2.0, 2.0, 2.0]


def test_training_items_apply_the_spec_to_image_and_labels():
    volume = blob_volume(0)
    volume.affine = np.diag([1.0, 1.0, 1.0, 1.0])
    spec = {"orientation": "LPS", "spacing": 2.0, "intensity": {"name": "zscore"}}
    (item,) = training_items([volume], spec)
    assert item["image"].shape == item["label"].shape == (1, 12, 12, 12)
    assert abs(float(item["image"].mean())) < 1e-5 and float(item["image"].std()) == pytest.approx(1, abs=1e-3)
    # LPS flips the first two axes; labels are resampled with nearest neighbours (still 0, 1, 2)
    assert set(torch.unique(item["label"]).tolist()) == {0.0, 1.0, 2.0}
    assert float(item["label"][0, -1, -1, 0]) == float(volume.label[0, 0, 0])


def test_recipe_preprocessing_fits_the_object_to_the_patch():
    volume = blob_volume(0, size=40)
    volume.affine = np.diag([1.0, 1.0, 1.0, 1.0])
    spec = recipe_preprocessing([volume], (16, 16, 16))
    # 40 mm of nonzero voxels / (1.25 × 16 voxels) = 2 mm, coarser than the 1 mm voxels
    assert spec["spacing"] == [2.0] and spec["crop_foreground"] == {"margin": 4}
    assert spec["intensity"]["name"] == "percentile" and spec["orientation"] == "RAS"
    assert recipe_preprocessing([volume], (64, 64, 64))["spacing"] == [1.0]  # never finer than the data
    zscore = recipe_preprocessing([volume], (64,) * 3, intensity={"name": "zscore", "nonzero": True}, spacing=[2, 2, 2])
    assert zscore["intensity"]["nonzero"] is True and zscore["spacing"] == [2.0, 2.0, 2.0]


def test_split_axial_and_baseline():
    volume = blob_volume(0)
    train_part, held_out = split_axial(volume, 10)
    assert train_part.label.shape == (24, 24, 10) and held_out.score_from == 10
    result = nearest_class_mean_baseline([train_part], [held_out], NAMES)
    assert np.allclose(result["class_means"], [0.1, 0.5, 0.9], atol=0.02)
    assert result["dice"]["core"] > 0.95
    with pytest.raises(ValueError, match=r"must lie in 1\.\.23: the volume has 24 axial slices"):
        split_axial(volume, 24)


def test_split_axial_cuts_along_superior_whatever_the_voxel_order():
    """An LSA file (the ITK head's order: the last voxel axis runs anterior) is split into a lower and an upper
    slab, exactly as the same head stored RAS is; every voxel keeps its position in mm."""
    import nibabel as nib

    ras = blob_volume(1)
    ras.image[0, :, :, 20:] += 2.0  # a mark on the top slab, to see where it goes
    # LSA: voxel (i, j, k) = RAS voxel (23 - i, k, j); the affine says so
    lsa_label = np.ascontiguousarray(ras.label[::-1].transpose(0, 2, 1))
    lsa_image = np.ascontiguousarray(ras.image[:, ::-1].transpose(0, 1, 3, 2))
    lsa_affine = np.array([[-1.0, 0, 0, 23], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    assert nib.aff2axcodes(lsa_affine) == ("L", "S", "A")
    lsa = LabelledVolume(lsa_image, lsa_label, lsa_affine, name="lsa")

    upright = superior_last(lsa)
    assert nib.aff2axcodes(upright.affine) == ("L", "A", "S")
    voxels = np.argwhere(np.ones(lsa_label.shape, bool))[::37]
    for voxel in voxels:  # the same point in mm holds the same label and intensity
        moved = np.linalg.solve(upright.affine, lsa_affine @ np.r_[voxel, 1.0])[:3]
        moved = tuple(np.round(moved).astype(int))
        assert upright.label[moved] == lsa_label[tuple(voxel)]
        assert upright.image[(0, *moved)] == lsa_image[(0, *voxel)]
    assert superior_last(ras) is ras
    with pytest.raises(ValueError, match="cannot reorder a volume scored from slice 5"):
        superior_last(LabelledVolume(lsa_image, lsa_label, lsa_affine, name="lsa", score_from=5))

    train_ras, held_ras = split_axial(ras, 20)
    train_lsa, held_lsa = split_axial(lsa, 20)
    assert train_lsa.label.shape == (24, 24, 20) and held_lsa.score_from == 20
    assert np.array_equal(train_lsa.label, train_ras.label[::-1])  # the lower slab, mirrored left-right only
    assert train_lsa.image.max() < 2.0 and held_lsa.image[0, ..., 20:].min() > 1.0  # the marked top is held out
    assert np.array_equal(np.sort(held_lsa.label[..., 20:].ravel()), np.sort(held_ras.label[..., 20:].ravel()))
    # an image stored upside down (LPI): k still counts from the inferior end
    lpi = LabelledVolume(ras.image[..., ::-1].copy(), ras.label[..., ::-1].copy(),
                         np.diag([1.0, 1.0, -1.0, 1.0]) @ np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -23],
                                                                    [0, 0, 0, 1]]), name="lpi")
    assert nib.aff2axcodes(lpi.affine) == ("R", "A", "I")
    train_lpi, _ = split_axial(lpi, 20)
    assert np.array_equal(train_lpi.label, train_ras.label) and train_lpi.image.max() < 2.0


def test_config_rejects_unknown_fields():
    with pytest.raises(TypeError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 0.1})


def test_class_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="3 output classes but 2 class names"):
        _run(tmp_path, "x", small_config(), class_names=["a", "b"])


def test_accumulating_two_micro_batches_equals_one_batch_of_two(tmp_path):
    """Instance norm is batch-independent and the loss a per-patch mean, so 2 × batch 1 == 1 × batch 2
    (the loader draws the same 2 patches for both)."""
    instance = {**TINY, "norm": "instance"}
    one = dict(epochs=1, steps_per_epoch=1)
    big, big_run = _run(tmp_path, "batch2", small_config(batch_size=2, **one), arch=instance)
    acc, acc_run = _run(tmp_path, "accum2", small_config(batch_size=1, accumulate=2, **one), arch=instance)
    assert big_run.step == acc_run.step == 1
    assert big_run.history[0]["train_loss"] == pytest.approx(acc_run.history[0]["train_loss"], abs=1e-5)
    big_m, acc_m = _adam_moments(tmp_path / "batch2.safetensors"), _adam_moments(tmp_path / "accum2.safetensors")
    assert big_m.keys() == acc_m.keys() and big_m
    assert max(float(m.abs().max()) for m in big_m.values()) > 1e-3  # gradients of a real size
    for key in big_m:
        assert torch.allclose(big_m[key], acc_m[key], rtol=1e-4, atol=1e-7), key
    # without accumulation one micro-batch of 1 gives a different gradient (the check above can fail)
    _run(tmp_path, "batch1", small_config(batch_size=1, **one), arch=instance)
    single = _adam_moments(tmp_path / "batch1.safetensors")
    assert any(not torch.allclose(single[k], big_m[k], rtol=1e-2) for k in big_m)
    assert load_model(tmp_path / "accum2.safetensors").medsegkit_metadata["training"]["config"]["accumulate"] == 2


def test_accumulate_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="TrainConfig: accumulate must be >= 1; got 0"):
        _run(tmp_path, "bad", small_config(accumulate=0))


@pytest.mark.parametrize(("values", "message"), [
    # until 2026-12-08 only the command line checked these: TrainConfig(lr=nan) failed in the optimiser,
    # time_budget_s=-5 trained one epoch and stopped, class_weights=(0, 0) trained on a zero loss
    (dict(lr=float("nan")), "lr must be a positive number; got nan"),
    (dict(epochs=0), "epochs must be >= 1; got 0"),
    (dict(batch_size=True), "batch_size must be >= 1; got True"),
    (dict(num_threads=0), "num_threads must be >= 1; got 0"),
    (dict(time_budget_s=-5.0), "time_budget_s must be a number of seconds >= 0"),
    (dict(weight_decay=float("inf")), "weight_decay must be a number >= 0; got inf"),
    (dict(class_weights=(0.0, 0.0)), r"class_weights must be numbers >= 0, not all 0; got \[0.0, 0.0\]"),
    (dict(freeze_norm_epochs=-1), "freeze_norm_epochs must be a whole number >= 0; got -1"),
])
def test_train_config_refuses_numbers_no_run_can_use(values, message):
    with pytest.raises(ValueError, match=f"TrainConfig: {message}"):
        TrainConfig(**values)
    assert TrainConfig(time_budget_s=0.0, num_threads=None, class_weights=None).time_budget_s == 0.0


def test_amp_trains_in_reduced_precision_and_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    model = create_model("UNet3d", **TINY)
    dtypes: set[torch.dtype] = set()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    first_conv.register_forward_hook(lambda mod, inputs, out: dtypes.add(out.dtype) if mod.training else None)
    lines: list[str] = []
    _, result = _run(tmp_path, "amp", small_config(amp=True, epochs=4), model=model, log=lines.append)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    if medsegkit.amp.bf16_supported("cpu"):
        assert dtypes == {torch.bfloat16}
        assert not any("--amp" in line for line in lines)
    else:
        assert dtypes == {torch.float32} and "no native bfloat16 support" in lines[0]
    assert next(model.parameters()).dtype == torch.float32  # master weights stay float32
    loaded = load_model(tmp_path / "amp.safetensors")
    assert loaded.medsegkit_metadata["training"]["config"]["amp"] is True


def test_amp_falls_back_to_float32_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(medsegkit.amp, "bf16_supported", lambda device: False)
    torch.manual_seed(0)
    model = create_model("UNet3d", **TINY)
    dtypes: set[torch.dtype] = set()
    next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d)).register_forward_hook(
        lambda mod, inputs, out: dtypes.add(out.dtype) if mod.training else None)
    lines: list[str] = []
    _run(tmp_path, "fallback", small_config(amp=True, epochs=1, steps_per_epoch=2), model=model, log=lines.append)
    assert lines[0] == "--amp: cpu has no native bfloat16 support; training in float32"
    assert dtypes == {torch.float32}


def test_resumed_run_reproduces_the_loss_curve_exactly(tmp_path):
    """4 epochs straight == 1 epoch (stopped by the time budget), then resume to 4 (losses, lr, Dice,
    weights, optimizer state): the patch order, the random transforms' states, torch's RNG and the
    schedule are restored."""
    config = dict(augmentation="strong", patch_size=(12, 12, 12))
    straight, full = _run(tmp_path, "straight", small_config(epochs=4, **config))
    _, part = _run(tmp_path, "part", small_config(epochs=4, time_budget_s=0.0, **config))
    assert part.epoch == 1
    torch.manual_seed(1)
    resumed_model = create_model("UNet3d", **TINY)  # other random weights: resume must replace them
    _, resumed = _run(tmp_path, "resumed", small_config(epochs=4, **config), model=resumed_model,
                      resume=tmp_path / "part.safetensors")
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4] and resumed.step == full.step == 16
    for a, b in zip(full.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        assert a["val_mean_foreground_dice"] == pytest.approx(b["val_mean_foreground_dice"], abs=1e-6)
    for (key, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), key
    full_m, resumed_m = _adam_moments(tmp_path / "straight.safetensors"), _adam_moments(tmp_path / "resumed.safetensors")
    for key in full_m:
        assert torch.allclose(full_m[key], resumed_m[key], atol=1e-7), key


def test_checkpoints_follow_validations_not_every_epoch(tmp_path, monkeypatch):
    from medsegkit.train import engine

    saved: list[int] = []
    original = engine._Run.save
    monkeypatch.setattr(engine._Run, "save", lambda self, eng, *a: (saved.append(eng.state.epoch), original(self, eng, *a)))
    _, result = _run(tmp_path, "interval", small_config(epochs=5, val_interval=2))
    assert saved == [2, 4, 5]  # every second epoch and the last
    assert [("val_mean_foreground_dice" in row) for row in result.history] == [False, True, False, True, True]
    assert len((tmp_path / "interval.metrics.csv").read_text().strip().splitlines()) == 6


def test_the_network_trains_on_plain_tensors_not_metatensors(tmp_path):
    """MONAI's loader collates MetaTensors; handing them to the network costs ~15 % of a step."""
    torch.manual_seed(0)
    model = create_model("UNet3d", **TINY)
    seen: set[type] = set()
    model.register_forward_pre_hook(lambda mod, args: seen.add(type(args[0])) if torch.is_grad_enabled() else None)
    _run(tmp_path, "plain", small_config(epochs=1), model=model)
    assert seen == {torch.Tensor}


def test_each_torchrun_rank_draws_its_own_patches():
    """MONAI's loader re-seeds the transforms from torch's generator, seeded alike in every process; the
    ranks of a torchrun job must still crop and augment differently (else they train on the same patches)."""
    from monai.transforms import Compose

    from medsegkit.train.distributed import DistributedContext
    from medsegkit.transforms import augmentation_configs, instantiate_configs

    items = training_items([blob_volume(0)], "none")
    config = small_config(augmentation="strong")
    first_batches = []
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        torch.manual_seed(config.seed)  # what train() does in every process
        transform = Compose(instantiate_configs(augmentation_configs(config.patch_size, level="strong", num_classes=3)))
        context = DistributedContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        loader, _ = training_loader(items, transform, config, context)
        first_batches.append(next(iter(loader))["image"].as_tensor())
    single, rank0, rank1 = first_batches
    assert not torch.equal(rank0, rank1)
    assert single.shape == rank0.shape == rank1.shape == (1, 1, *config.patch_size)


def test_resume_restores_the_gradient_scaler(tmp_path, monkeypatch):
    """float16 training's loss scale (a GradScaler; CUDA in practice, CPU here) is saved and resumed."""
    from medsegkit.train import engine

    class ScaledStep(engine.TrainStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)

    monkeypatch.setattr(engine, "TrainStep", ScaledStep)
    _, part = _run(tmp_path, "part", small_config(epochs=2, time_budget_s=0.0))
    saved = read_checkpoint(state_path_for(tmp_path / "part.safetensors"))[1]["metadata"]["training_state"]
    assert saved["grad_scaler"]["scale"] == 1024.0 * 2 ** (part.step // 3)  # grown every 3 finite steps
    loaded: list[dict] = []
    original = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict",
                        lambda self, state: (loaded.append(dict(state)), original(self, state))[1])
    _run(tmp_path, "resumed", small_config(epochs=2), resume=tmp_path / "part.safetensors")
    assert loaded == [saved["grad_scaler"]]


def test_time_budget_stops_after_the_first_epoch(tmp_path):
    _, result = _run(tmp_path, "budget", small_config(epochs=3, time_budget_s=0.0))
    assert result.epoch == 1 and len(result.history) == 1
    assert state_path_for(tmp_path / "budget.safetensors").exists()


def test_budget_plan_counts_the_epochs_that_fit():
    from types import SimpleNamespace

    from medsegkit.train.engine import _Run

    def plan(spent, budget, epoch=1, max_epochs=50, start_epoch=0, ends=(), requested=50):
        """``ends``: the seconds at which this run's earlier epochs ended."""
        run = SimpleNamespace(config=small_config(time_budget_s=budget), start_epoch=start_epoch,
                              started=time.perf_counter() - spent, requested_epochs=requested, epoch_ends=list(ends))
        return _Run.budget_plan(run, epoch, max_epochs)

    assert plan(spent=10, budget=35) == 3  # 10 s per epoch: two more fit in the 25 s left
    assert plan(spent=10, budget=35, max_epochs=3, requested=3) is None  # everything fits: the schedule stays
    assert plan(spent=40, budget=35) == 1  # over budget already: stop after this epoch
    assert plan(spent=28, budget=35, epoch=2, max_epochs=3, ends=[10]) == 2  # epochs got slower: the plan shrinks
    assert plan(spent=20, budget=35, epoch=2, max_epochs=3, ends=[10]) is None  # on pace: the plan stays
    assert plan(spent=10, budget=None) is None
    assert plan(spent=10, budget=35, epoch=5, start_epoch=4) == 7  # a resumed run plans from its own start
    # a slow first epoch (30 s: start-up on a busy machine) planned 4 of the 10 requested epochs; the second
    # took 5 s, so the plan grows back: 13 more would fit in the 65 s left, capped at the 10 requested
    assert plan(spent=35, budget=100, epoch=2, max_epochs=4, ends=[30], requested=10) == 10
    assert plan(spent=35, budget=100, epoch=2, max_epochs=4, ends=[30], requested=6) == 6
    # in the second half of the plan the learning rate has decayed: no growth, though it would fit
    assert plan(spent=45, budget=100, epoch=3, max_epochs=4, ends=[30, 40], requested=10) is None


def test_time_budget_fits_the_cosine_schedule_to_the_planned_epochs(tmp_path, monkeypatch):
    from medsegkit.train.engine import _Run

    monkeypatch.setattr(_Run, "budget_plan", lambda self, epoch, max_epochs: 2 if epoch == 1 else None)
    lines = []
    _, result = _run(tmp_path, "fit", small_config(epochs=6, time_budget_s=1e6, lr=1e-2), log=lines.append)
    assert result.epoch == 2 and [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[-1]["lr"] == pytest.approx(1e-2 * 0.01)  # the cosine ended: 1 % of lr
    assert "2 epochs in all" in "\n".join(lines)
    assert load_model(tmp_path / "fit.safetensors").medsegkit_metadata["training"]["config"]["epochs"] == 2


def test_a_grown_plan_runs_the_extra_epochs_and_ends_its_cosine(tmp_path, monkeypatch):
    """A plan shrunk after a slow first epoch (2 of 6) and grown back after the second (to 4): ignite runs
    the four epochs, and the schedule still ends at 1 % of lr."""
    from medsegkit.train.engine import _Run

    monkeypatch.setattr(_Run, "budget_plan", lambda self, epoch, max_epochs: {1: 2, 2: 4}.get(epoch))
    lines = []
    _, result = _run(tmp_path, "grow", small_config(epochs=6, time_budget_s=1e6, lr=1e-2), log=lines.append)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4] and result.epoch == 4
    assert result.history[-1]["lr"] == pytest.approx(1e-2 * 0.01)
    assert "4 epochs in all" in "\n".join(lines)


def test_two_dimensional_model_trains_on_slices_of_volumes(tmp_path):
    arch = {"out_channels": 3, "channels": (4, 8), "strides": (2,), "layout": "classic"}
    torch.manual_seed(0)  # the initial weights must not depend on which tests ran before
    model = create_model("UNet2d", **arch)
    config = small_config(patch_size=(16, 16), epochs=8, batch_size=4, steps_per_epoch=6, augmentation="none")
    _, result = _run(tmp_path, "unet2d", config, model=model)
    losses = [row["train_loss"] for row in result.history]
    dice = [row["val_mean_foreground_dice"] for row in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert dice[-1] > 0.5 and dice[-1] > dice[0] + 0.3, dice  # validated slice by slice on the volume


def test_train_cli_default_recipe_then_resume(tmp_path, capsys):
    volume = blob_volume(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = write_image(Image((volume.image[0] * 1000).astype(np.int16), affine), tmp_path / "t1.nii.gz")
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
    model = load_model(out)
    meta = model.medsegkit_metadata
    # the recipe: RAS, percentile intensities, crop to the foreground, isotropic spacing at which the
    # training slab (12 slices of 2 mm) spans 1.25 patches of 8 voxels: 24 / 10 = 2.4 mm
    assert meta["preprocessing"] == {"orientation": "RAS", "spacing": [2.4],
                                     "intensity": {"name": "percentile", "lower": 1.0, "upper": 99.0, "b_min": 0.0,
                                                   "b_max": 1.0, "clip": True, "channel_wise": True},
                                     "crop_foreground": {"margin": 4}}
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules())  # the recipe's norm
    assert meta["class_names"] == ["class0", "class1", "class2"]
    assert meta["training"]["command"].startswith("medsegkit train --image")
    assert main([*common, "--epochs", "1"]) == 2  # refuses to overwrite
    assert "exists" in capsys.readouterr().err
    assert main([*common, "--epochs", "2", "--resume", str(out)]) == 0
    assert "epoch 2/2" in capsys.readouterr().err
    assert load_model(out).medsegkit_metadata["training"]["epochs_done"] == 2
    assert main(["train", "--sample", "--image", str(image), "-o", str(tmp_path / "x.pt")]) == 2
    assert "--sample uses the shipped" in capsys.readouterr().err
    # an output that is not a checkpoint name (with --overwrite, it could have been the image itself)
    image_bytes = image.read_bytes()
    assert main([*common[:-1], str(image), "--epochs", "1", "--overwrite"]) == 2
    assert f"--output {image} is not a checkpoint name; accepted endings: .safetensors" in capsys.readouterr().err
    assert image.read_bytes() == image_bytes
    # resuming one run into another run's existing checkpoint would replace that one: refused
    other = tmp_path / "run" / "other.safetensors"
    other.write_bytes(b"another run")
    assert main([*common[:-1], str(other), "--epochs", "3", "--resume", str(out)]) == 2
    assert f"{other} exists (it is not the checkpoint being resumed, {out}); pass --overwrite" in capsys.readouterr().err
    assert other.read_bytes() == b"another run"
    assert main([*common, "--intensity", "minmax", "--overwrite"]) == 2
    assert "unknown --intensity 'minmax'; accepted: 'percentile', 'zscore'" in capsys.readouterr().err


def test_train_cli_refuses_an_image_with_nan_voxels_in_one_line(tmp_path, capsys):
    """A NaN voxel in a training image made the first loss NaN: a traceback advising a lower learning rate."""
    volume = blob_volume(0)
    array = (volume.image[0] * 1000).astype(np.float32)
    array[0, 0, :3] = np.nan
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = write_image(Image(array, affine), tmp_path / "t1.nii.gz")
    label = write_image(Image(volume.label.astype(np.uint8), affine), tmp_path / "seg.nii.gz")
    assert main(["train", "--image", str(image), "--label", str(label), "--split-axial", "12", "--epochs", "1",
                 "--no-progress", "-o", str(tmp_path / "m.safetensors")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith(
        f"image {image} holds 3 NaN or Inf voxel(s); training needs finite intensities: replace them "
        "(e.g. numpy.nan_to_num) first"), lines
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("bad", [np.inf, 0.5])
def test_a_float_label_map_trains_as_class_indices_only_when_every_value_is_a_whole_number(tmp_path, bad):
    """An Inf in a float label map passed the whole-number check (inf == round(inf)) and became a huge int."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = write_image(Image(np.ones((6, 6, 6), np.float32), affine), tmp_path / "t1.nii.gz")
    labels = np.zeros((6, 6, 6), np.float32)
    labels[2:4, 2:4, 2:4] = 1.0
    good = write_image(Image(labels, affine), tmp_path / "seg.nii.gz")
    loaded = load_labelled_volume(image, good)
    assert loaded.label.dtype == np.int64 and loaded.label.sum() == 8
    labels[0, 0, 0] = bad
    broken = write_image(Image(labels, affine), tmp_path / "broken.nii.gz")
    with pytest.raises(ValueError, match=rf"^label map {broken} must be an integer label map .*got dtype float32 "
                                         "with fractional, NaN or Inf values"):
        load_labelled_volume(image, broken)


def test_train_cli_same_seed_gives_the_same_model_whatever_ran_before(tmp_path):
    """``--seed`` covers the initial weights too: the CLI built the model before seeding, so two runs of one
    command with the same seed wrote different weights (the global RNG state was whatever came before)."""
    volume = blob_volume(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = write_image(Image((volume.image[0] * 1000).astype(np.int16), affine), tmp_path / "t1.nii.gz")
    label = write_image(Image(volume.label.astype(np.uint8), affine), tmp_path / "seg.nii.gz")

    def weights(name: str, seed: int, state_before: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(state_before)  # what an earlier computation in the same process leaves behind
        out = tmp_path / f"{name}.safetensors"
        assert main(["train", "--image", str(image), "--label", str(label), "--split-axial", "12", "--model", "UNet3d",
                     "--set", "channels=(4, 8)", "--set", "strides=(2,)", "--set", "layout=classic",
                     "--patch-size", "16", "16", "8", "--steps-per-epoch", "2", "--epochs", "1", "--threads", "1",
                     "--no-progress", "--seed", str(seed), "-o", str(out)]) == 0
        return load_model(out).state_dict()

    first, again, other = weights("a", 3, 11), weights("b", 3, 12), weights("c", 4, 11)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.slow
def test_torchrun_two_processes_train_and_write_one_checkpoint(tmp_path, capsys):
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path / "ddp" / "m.safetensors"
    cmd += ["--standalone", "--nproc_per_node", "2", "-m", "medsegkit", "train", "--sample",
            "--set", "channels=[4,8]", "--set", "strides=[2]", "--epochs", "2", "--steps-per-epoch", "2",
            "--patch-size", "16", "16", "16", "--batch-size", "1", "--threads", "1", "--no-progress", "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 alone wrote the files and printed the report
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.learning_curve.png", "m.metrics.csv",
                                                            "m.safetensors", "m.state.safetensors"]
    assert result.stdout.count("wrote ") == 1 and result.stderr.count("epoch 2/2") == 1
    model = load_model(out)
    meta = model.medsegkit_metadata["training"]
    assert meta["world_size"] == 2 and meta["epochs_done"] == 2 and meta["steps_done"] == 4
    # each rank drew its own patches (seeded with seed + rank) and its state was saved for resume
    _, record = read_checkpoint(state_path_for(out))
    samplers = record["metadata"]["training_state"]["samplers"]
    assert len(samplers) == 2 and json.dumps(samplers[0]) != json.dumps(samplers[1])
    with torch.no_grad():
        logits = model.eval()(torch.zeros(1, 1, 16, 16, 16))
    assert logits.shape == (1, 4, 16, 16, 16)
    # resuming needs every rank's patch sequence: one process cannot continue a two-process run
    resume = [a for a in cmd[cmd.index("train"):] if a != "--no-progress"] + ["--epochs", "3", "--resume", str(out)]
    assert main(resume) == 2
    assert "trained by 2 process(es) but this run has 1" in capsys.readouterr().err


def test_last_epochs_train_with_frozen_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    model = create_model("UNet3d", **TINY, norm="batch")
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))
    seen: list[tuple[bool, torch.Tensor]] = []
    norm.register_forward_pre_hook(
        lambda mod, args: seen.append((mod.training, mod.running_mean.clone())) if torch.is_grad_enabled() else None)
    _, result = _run(tmp_path, "frozen", small_config(freeze_norm_epochs=2), model=model)
    assert result.epoch == 4 and len(seen) == 16
    assert [training for training, _ in seen] == [True] * 8 + [False] * 8  # epochs 3 and 4 frozen
    moving, frozen = [mean for _, mean in seen[:9]], [mean for _, mean in seen[8:]]
    assert all(not torch.equal(a, b) for a, b in zip(moving, moving[1:]))  # statistics follow each batch...
    assert all(torch.equal(frozen[0], mean) for mean in frozen)  # ...until the freeze
    assert torch.equal(norm.running_mean, frozen[0])
    meta = load_model(tmp_path / "frozen.safetensors").medsegkit_metadata
    assert meta["training"]["config"]["freeze_norm_epochs"] == 2
    with pytest.raises(ValueError, match="TrainConfig: freeze_norm_epochs must be a whole number >= 0; got -1"):
        _run(tmp_path, "negative", small_config(freeze_norm_epochs=-1))


def test_the_freeze_can_start_from_statistics_re_estimated_over_batches(tmp_path):
    torch.manual_seed(0)
    model = create_model("UNet3d", **TINY, norm="batch")
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))
    seen: list[tuple[bool, int, float | None]] = []
    norm.register_forward_pre_hook(lambda mod, args: seen.append(
        (torch.is_grad_enabled(), int(mod.num_batches_tracked), mod.momentum)) if mod.training or torch.is_grad_enabled() else None)
    _run(tmp_path, "recalibrated", small_config(freeze_norm_epochs=2, norm_recalibration_batches=3), model=model)
    # 8 moving training steps, then 3 gradient-free forwards of a cumulative average, then 8 frozen steps
    assert [grad for grad, _, _ in seen] == [True] * 8 + [False] * 3 + [True] * 8
    assert [tracked for _, tracked, _ in seen[8:11]] == [0, 1, 2] and all(m is None for _, _, m in seen[8:11])
    assert norm.num_batches_tracked == 3 and norm.momentum == 0.1  # the average of 3 batches, momentum restored


def test_train_cli_metrics_csv_must_be_a_new_csv_name(tmp_path, capsys):
    """``--metrics-csv t1.nii.gz`` replaced the training image with the metrics table after the first validation
    (exit 0); an existing CSV was replaced without ``--overwrite``. Both are refused before the data are read."""
    volume = blob_volume(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = write_image(Image((volume.image[0] * 1000).astype(np.int16), affine), tmp_path / "t1.nii.gz")
    label = write_image(Image(volume.label.astype(np.uint8), affine), tmp_path / "seg.nii.gz")
    table = tmp_path / "results.csv"
    table.write_text("case,dice\na,0.9\n")
    before = {p: p.read_bytes() for p in (image, label, table)}
    common = ["train", "--image", str(image), "--label", str(label), "--split-axial", "12", "--model", "UNet3d",
              "--set", "channels=(4, 8)", "--set", "strides=(2,)", "--patch-size", "16", "16", "8",
              "--steps-per-epoch", "1", "--epochs", "1", "--threads", "1", "--no-progress",
              "-o", str(tmp_path / "m.safetensors")]
    for metrics, message in ((image, "--metrics-csv must name a .csv file, got 't1.nii.gz'"),
                             (table, f"--metrics-csv {table} exists; pass --overwrite to replace it")):
        assert main([*common, "--metrics-csv", str(metrics)]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == [f"medsegkit train: error: {message}"]
        assert {p: p.read_bytes() for p in before} == before
        assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(("option", "message"), [
    (["--threads", "-2"], "--threads must be >= 1; got -2"),
    (["--epochs", "0"], "--epochs must be >= 1; got 0"),
    (["--steps-per-epoch", "0"], "--steps-per-epoch must be >= 1; got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1; got 0"),
    (["--val-interval", "0"], "--val-interval must be >= 1; got 0"),
    (["--lr", "nan"], "--lr must be a positive number; got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be a number >= 0; got -1.0"),
    (["--time-budget", "-5"], "--time-budget must be a number of seconds >= 0 (0: one epoch); got -5.0"),
    (["--class-weights", "1", "-1", "1"], "--class-weights must be numbers >= 0, not all 0; got [1.0, -1.0, 1.0]"),
    (["--class-weights", "1", "1"], "--class-weights needs one value per class (3: class0 class1 class2); got 2"),
    # until 2026-12-08 the validation Dice of classes 1 and 2 was reported once, as 'x' (a dict keyed by name)
    (["--class-names", "bg", "x", "x"], "--class-names must be distinct; x appears more than once in bg x x"),
])
def test_train_cli_refuses_unusable_numbers_in_one_line(tmp_path, capsys, option, message):
    """Before 2026-12-08 ``--threads -2`` ended in a RuntimeError traceback (exit 1), ``--time-budget -5`` and
    ``--val-interval 0`` trained and exited 0, and ``--epochs 0`` / ``--batch-size 0`` / ``--lr nan`` failed after
    the data were read with messages that did not name the option."""
    volume = blob_volume(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = write_image(Image((volume.image[0] * 1000).astype(np.int16), affine), tmp_path / "t1.nii.gz")
    label = write_image(Image(volume.label.astype(np.uint8), affine), tmp_path / "seg.nii.gz")
    out = tmp_path / "m.safetensors"
    assert main(["train", "--image", str(image), "--label", str(label), "--split-axial", "12", "--model", "UNet3d",
                 "--set", "channels=(4, 8)", "--set", "strides=(2,)", "--patch-size", "16", "16", "8",
                 "--steps-per-epoch", "1", "--epochs", "1", "--no-progress", "-o", str(out), *option]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"medsegkit train: error: {message}"]
    assert not out.exists()


def test_train_cli_refuses_a_folder_as_output_before_training(tmp_path, capsys):
    """Before 2026-12-08 ``-o run.safetensors`` naming a folder trained with ``--overwrite`` and then failed on the
    rename ('[Errno 21] Is a directory'); without it the message asked for ``--overwrite``."""
    volume = blob_volume(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = write_image(Image((volume.image[0] * 1000).astype(np.int16), affine), tmp_path / "t1.nii.gz")
    label = write_image(Image(volume.label.astype(np.uint8), affine), tmp_path / "seg.nii.gz")
    folder = tmp_path / "run.safetensors"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        assert main(["train", "--image", str(image), "--label", str(label), "--split-axial", "12", "--model", "UNet3d",
                     "--set", "channels=(4, 8)", "--set", "strides=(2,)", "--patch-size", "16", "16", "8",
                     "--steps-per-epoch", "1", "--epochs", "1", "--no-progress", "-o", str(folder), *extra]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == [f"medsegkit train: error: --output {folder} is a folder; give a checkpoint file name such as "
                         f"{folder / 'model.safetensors'}"]
        assert list(tmp_path.glob("run.*")) == [folder] and not any(folder.iterdir())
