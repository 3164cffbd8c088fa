"""medsegkit.train.loop features: gradient accumulation, mixed precision, exact resume, torchrun DDP."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import torch
from training_data import TINY, blob_volume, small_config

import medsegkit.amp
from medsegkit import create_model
from medsegkit.cli import main
from medsegkit.train.loop import state_path_for, train
from medsegkit.weights import load_model, read_checkpoint

NAMES = ["bg", "shell", "core"]


def _run(tmp_path, name, config, *, model=None, arch=TINY, seed=0, **kw):
    torch.manual_seed(seed)
    model = model if model is not None else create_model("UNet3d", **arch)  # same seed: same initial weights
    result = train(model, [blob_volume(0)], [blob_volume(1)], checkpoint=tmp_path / f"{name}.safetensors", class_names=NAMES,
                   config=config, progress=False, log=kw.pop("log", lambda line: None), **kw)
    return model, result


def _adam_moments(checkpoint) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(state_path_for(checkpoint))
    return {k: v for k, v in tensors.items() if k.endswith(".exp_avg")}


def test_accumulating_two_micro_batches_equals_one_batch_of_two(tmp_path):
    """Instance norm is batch-independent and the loss a per-patch mean, so 2 × batch 1 == 1 × batch 2."""
    instance = {**TINY, "norm": "instance"}
    one = dict(epochs=1, steps_per_epoch=1, flip_axes=(0, 1))
    big, big_run = _run(tmp_path, "batch2", small_config(batch_size=2, **one), arch=instance)
    acc, acc_run = _run(tmp_path, "accum2", small_config(batch_size=1, accumulate=2, **one),
                        arch=instance)
    assert big_run.step == acc_run.step == 1
    assert big_run.history[0]["train_loss"] == pytest.approx(acc_run.history[0]["train_loss"], abs=1e-5)
    # Adam's first moment after one step is 0.1 × gradient: the gradients agree
    big_m, acc_m = _adam_moments(tmp_path / "batch2.safetensors"), _adam_moments(tmp_path / "accum2.safetensors")
    assert big_m.keys() == acc_m.keys() and big_m
    assert max(float(m.abs().max()) for m in big_m.values()) > 1e-3  # gradients of a real size
    for key in big_m:
        assert torch.allclose(big_m[key], acc_m[key], rtol=1e-4, atol=1e-7), key
    # and so do the weights. Adam's first step moves each weight by ~lr·sign(gradient); the biases of
    # convolutions followed by instance norm get gradients of rounding-noise size (the norm cancels
    # them), so their sign is noise: those elements (|gradient| < 1e-5) are left out of this comparison.
    checked = 0
    for index, ((key, a), b) in enumerate(zip(big.named_parameters(), acc.parameters())):
        clear = (big_m[f"optimizer.state.{index}.exp_avg"] / 0.1).abs() > 1e-5
        assert torch.allclose(a.detach()[clear], b.detach()[clear], atol=1e-5), key
        checked += int(clear.sum())
    assert checked > 0.9 * sum(p.numel() for p in big.parameters())
    # without accumulation one micro-batch of 1 gives a different gradient (the check above can fail)
    _run(tmp_path, "batch1", small_config(batch_size=1, **one), arch=instance)
    single = _adam_moments(tmp_path / "batch1.safetensors")
    assert any(not torch.allclose(single[k], big_m[k], rtol=1e-2) for k in big_m)
    assert load_model(tmp_path / "accum2.safetensors").medsegkit_metadata["training"]["config"]["accumulate"] == 2


def test_accumulate_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="accumulate must be >= 1"):
        _run(tmp_path, "bad", small_config(accumulate=0))


def test_amp_trains_in_reduced_precision_and_lowers_the_loss(tmp_path):
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
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_amp_falls_back_to_float32_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(medsegkit.amp, "bf16_supported", lambda device: False)
    model = create_model("UNet3d", **TINY)
    dtypes: set[torch.dtype] = set()
    next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d)).register_forward_hook(
        lambda mod, inputs, out: dtypes.add(out.dtype))
    lines: list[str] = []
    _run(tmp_path, "fallback", small_config(amp=True, epochs=1, steps_per_epoch=2), model=model, log=lines.append)
    assert lines[0] == "--amp: cpu has no native bfloat16 support; training in float32"
    assert dtypes == {torch.float32}


def test_resumed_run_reproduces_the_loss_curve_exactly(tmp_path):
    """4 epochs straight == 2 epochs, then --resume to 4 (per-epoch losses, weights, optimizer state)."""
    straight, full = _run(tmp_path, "straight", small_config(epochs=4))
    _run(tmp_path, "part", small_config(epochs=2))
    torch.manual_seed(1)
    resumed_model = create_model("UNet3d", **TINY)  # other random weights: resume must replace them
    _, resumed = _run(tmp_path, "resumed", small_config(epochs=4), model=resumed_model, resume=tmp_path / "part.safetensors")
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4] and resumed.step == full.step == 16
    for a, b in zip(full.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6), (a, b)
        assert a["lr"] == b["lr"]
        assert a["val_mean_foreground_dice"] == pytest.approx(b["val_mean_foreground_dice"], abs=1e-6)
    for (key, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), key
    full_m, resumed_m = _adam_moments(tmp_path / "straight.safetensors"), _adam_moments(tmp_path / "resumed.safetensors")
    for key in full_m:
        assert torch.allclose(full_m[key], resumed_m[key], atol=1e-7), key


@pytest.mark.slow
def test_torchrun_two_processes_train_and_write_one_checkpoint(tmp_path, capsys):
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path / "ddp" / "m.safetensors"
    cmd += ["--standalone", "--nproc_per_node", "2", "-m", "medsegkit", "train", "--sample",
            "--set", "channels=[4,8]", "--set", "strides=[2]", "--epochs", "2", "--steps-per-epoch", "2",
            "--patch-size", "16", "16", "16", "--threads", "1", "--no-progress", "-o", str(out)]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.perf_counter() - started < 300
    # rank 0 alone wrote the files and printed the report
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.metrics.csv", "m.safetensors", "m.state.safetensors"]
    assert result.stdout.count("wrote ") == 1 and result.stderr.count("epoch 2/2") == 1
    model = load_model(out)
    meta = model.medsegkit_metadata["training"]
    assert meta["world_size"] == 2 and meta["epochs_done"] == 2 and meta["steps_done"] == 4
    assert len((out.parent / "m.metrics.csv").read_text().strip().splitlines()) == 3
    # each rank drew its own patches (sampler seeded with seed + rank) and its state was saved for resume
    _, record = read_checkpoint(state_path_for(out))
    samplers = record["metadata"]["training_state"]["samplers"]
    assert len(samplers) == 2 and samplers[0] != samplers[1]
    with torch.no_grad():
        logits = model(torch.zeros(1, 1, 16, 16, 16))
    assert logits.shape == (1, 4, 16, 16, 16)
    # resuming needs every rank's patch sequence: one process cannot continue a two-process run
    resume = [a for a in cmd[cmd.index("train"):] if a != "--no-progress"] + ["--epochs", "3", "--resume", str(out)]
    assert main(resume) == 2
    assert "trained by 2 process(es) but this run has 1" in capsys.readouterr().err
