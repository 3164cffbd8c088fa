"""Training throughput: medsegkit's engine (MONAI ``SupervisedTrainer`` + handlers) vs a plain PyTorch loop.

Both arms train the same model on the same task — the MNI152 tissue sample (k < 55), the recipe's
preprocessing, ``strong`` augmentation, ``DiceCELoss``, AdamW with the warm-up/cosine schedule — from the
same initial weights, in one process, interleaved (engine, loop, loop, engine, engine, ...: the arms take
turns going first). The plain loop is the
floor: a ``for`` over the same ``DataLoader`` with ``loss.backward(); optimizer.step(); scheduler.step()``,
no checkpoints, no CSV, no validation. The engine's steps/s are measured between the end of its first
epoch and the end of its last (``wall_time_s`` in the history, recorded before validation), so its
start-up (preprocessing, model wrapping) is left out as it is for the loop; what remains is the engine's
per-step overhead plus its per-epoch checkpoint, state file, CSV and learning-curve PNG.

``python benchmarks/bench_training.py [--steps 20] [--epochs 3] [--rounds 5] [--patch 80 80 80]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _task(patch: tuple[int, ...]):
    from medsegkit import create_model
    from medsegkit.train import recipe_preprocessing, sample_tissue_data

    train_part, held_out = sample_tissue_data()
    spec = recipe_preprocessing([train_part], patch)
    torch.manual_seed(0)
    model = create_model("UNet3d", out_channels=4, channels=(16, 32, 64, 128), strides=(2, 2, 2), norm="instance")
    return train_part, held_out, spec, model


def engine_steps_per_second(model, train_part, held_out, spec, config, workdir: Path) -> float:
    """Steps/s of :func:`medsegkit.train.train` over epochs 2..N (epoch 1 is warm-up)."""
    from medsegkit.train import train

    result = train(model, [train_part], [held_out], checkpoint=workdir / "engine.safetensors",
                   class_names=["background", "CSF", "GM", "WM"], preprocessing=spec, config=config,
                   progress=False, log=lambda line: None)
    first, last = result.history[0], result.history[-1]
    return (last["step"] - first["step"]) / (last["wall_time_s"] - first["wall_time_s"])


def loop_steps_per_second(model, train_part, spec, config) -> float:
    """Steps/s of a plain PyTorch loop over the same data pipeline, objective, optimiser and schedule."""
    from monai.data import DataLoader, Dataset
    from monai.optimizers import WarmupCosineSchedule
    from monai.transforms import Compose

    from medsegkit.train.data import training_items
    from medsegkit.train.objectives import objective_for
    from medsegkit.transforms import augmentation_configs, instantiate_configs

    items = training_items([train_part], spec)
    transform = Compose(instantiate_configs(augmentation_configs(config.patch_size, level=config.augmentation,
                                                                 num_classes=4)))
    transform.set_random_state(seed=config.seed)
    total = config.epochs * config.steps_per_epoch
    sampler = torch.utils.data.RandomSampler(items, replacement=True, num_samples=total * config.batch_size,
                                             generator=torch.Generator().manual_seed(config.seed))
    loader = DataLoader(Dataset(items, transform=transform), batch_size=config.batch_size, sampler=sampler,
                        num_workers=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=config.steps_per_epoch, t_total=total,
                                     end_lr=config.lr * 0.01, warmup_multiplier=0.5)
    objective = objective_for(model, 4)
    started = None
    for step, batch in enumerate(loader):
        optimizer.zero_grad(set_to_none=True)
        loss = objective(model, batch["image"].as_tensor(), batch["label"].as_tensor())
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step == config.steps_per_epoch - 1:  # the clock starts where the engine's does: after epoch 1
            started = time.perf_counter()
    return (total - config.steps_per_epoch) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per arm (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved engine/loop pairs")
    parser.add_argument("--patch", type=int, nargs=3, default=(80, 80, 80))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from medsegkit.train import TrainConfig

    torch.set_num_threads(args.threads)
    train_part, held_out, spec, model = _task(tuple(args.patch))
    config = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps, patch_size=tuple(args.patch), batch_size=2,
                         val_interval=10_000, augmentation="strong", seed=0, num_threads=args.threads)
    engine, loop = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            # the arms take turns going first, so that a drift of the machine within a round (the first arm's
            # allocations, a neighbour's load) does not always fall on the same one
            workdir = Path(tmp) / str(round_)
            for arm in ("engine", "loop") if round_ % 2 == 0 else ("loop", "engine"):
                if arm == "engine":
                    engine.append(engine_steps_per_second(copy.deepcopy(model), train_part, held_out, spec, config,
                                                          workdir))
                else:
                    loop.append(loop_steps_per_second(copy.deepcopy(model), train_part, spec, config))
            print(f"round {round_ + 1}: engine {engine[-1]:.3f} steps/s, plain loop {loop[-1]:.3f} steps/s",
                  flush=True)
    e, p = statistics.median(engine), statistics.median(loop)
    e_best, p_best = max(engine), max(loop)
    print(f"\nUNet3d 16-128 InstanceNorm, patch {'x'.join(map(str, args.patch))}, batch 2, strong augmentation, "
          f"{args.threads} threads, {args.steps * (args.epochs - 1)} timed steps per arm, {args.rounds} rounds "
          "(best: the least disturbed round of each arm)")
    print("| arm | steps/s median | ratio | steps/s best | ratio |\n|---|---|---|---|---|")
    print(f"| medsegkit engine (SupervisedTrainer + handlers) | {e:.3f} | {e / p:.3f} | {e_best:.3f} | {e_best / p_best:.3f} |")
    print(f"| plain PyTorch loop (peer) | {p:.3f} | 1.000 | {p_best:.3f} | 1.000 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
