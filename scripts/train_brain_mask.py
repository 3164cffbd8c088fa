"""Generalisation proof: train a brain-mask UNet3d on one subject, evaluate on another.

Uses a medsegkit-written MONAI bundle's ``configs/train.json`` unchanged in structure, only overriding
its data lists, learning rate, crops per iteration and validation interval: training on the Colin27 head
(Debian ``mricron-data``: ``ch2.nii.gz``, brain mask = ``ch2bet.nii.gz > 0``, 1 mm), validation on the
*other* subject, the ITK example head in ``sample_data/`` (LSA orientation, 2×2×3 mm). Prints Dice, wall
and CPU time per validation and writes a learning curve PNG, a CSV and summary.json.

Default recipe (see docs/brain_mask_proof.md): RAS, 2 mm, crop to the head's bounding box, 1st-99th
percentile intensities; the bundle's "strong" augmentation (random affine, flips, bias field, gamma,
histogram shift, blur, noise); 80³ crops and sliding windows; UNet3d (8..128 channels, InstanceNorm);
AdamW 3e-3; largest connected component + fill holes after validation/inference.

    python scripts/train_brain_mask.py --out runs/brain_mask --minutes 10
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

COLIN = Path("/usr/share/mricron/templates")
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def colin_files(work: Path) -> dict[str, str]:
    image = COLIN / "ch2.nii.gz"
    brain = COLIN / "ch2bet.nii.gz"
    if not image.exists() or not brain.exists():
        sys.exit(f"{image} not found: install Debian's mricron-data (apt-get install -y mricron-data)")
    mask_path = work / "ch2_brain_mask.nii.gz"
    if not mask_path.exists():
        bet = nib.load(brain)
        mask = (np.asarray(bet.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, bet.affine), mask_path)
    return {"image": str(image), "label": str(mask_path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/brain_mask")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time budget for training")
    parser.add_argument("--max-epochs", type=int, default=400)
    parser.add_argument("--roi", type=int, nargs=3, default=(80, 80, 80),
                        help="training crop and sliding-window size (80 voxels = 16 cm at 2 mm: most of a head)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=(8, 16, 32, 64, 128))
    parser.add_argument("--res-units", type=int, default=1)
    parser.add_argument("--norm", default="instance", help="instance (scanner-independent) or batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--samples", type=int, default=2, help="random crops per iteration")
    parser.add_argument("--val-interval", type=int, default=5, help="validate every N epochs")
    parser.add_argument("--augmentation", default="strong", choices=("intensity", "strong"))
    parser.add_argument("--post", nargs="*", default=("largest_component", "fill_holes"),
                        help="label clean-up in the bundle's validation/inference post-processing")
    parser.add_argument("--no-crop-foreground", action="store_true",
                        help="keep each scan's full field of view instead of cropping to the head")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from medsegkit.bundle import init_bundle

    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {"channels": list(args.channels), "strides": [2] * (len(args.channels) - 1),
                 "num_res_units": args.res_units, "norm": args.norm}
    bundle = init_bundle("UNet3d", out / "bundle", out_channels=2, roi_size=args.roi, spacing=(2.0, 2.0, 2.0),
                         preprocessing="mr_robust", class_names=["background", "brain"], overwrite=True,
                         overrides=overrides, augmentation=args.augmentation, postprocessing=list(args.post),
                         crop_foreground=not args.no_crop_foreground)
    start = time.perf_counter()  # the clock includes loading/caching both subjects and every validation
    cpu_start = time.process_time()  # CPU seconds of this process: less sensitive to other jobs on the machine
    config = ConfigParser()
    config.read_config(str(bundle / "configs" / "train.json"))
    config.read_meta(str(bundle / "configs" / "metadata.json"))
    config["bundle_root"] = str(bundle)
    config["train_files"] = [colin_files(out)]
    config["val_files"] = [{"image": str(SAMPLE / "itk_head_t1.nii.gz"),
                            "label": str(SAMPLE / "itk_head_brain_mask.nii.gz")}]
    config["max_epochs"] = args.max_epochs
    config["val_interval"] = args.val_interval
    config["learning_rate"] = args.lr
    config["train#random_transforms"][0]["num_samples"] = args.samples
    trainer = config.get_parsed_content("train#trainer")
    evaluator = config.get_parsed_content("validate#evaluator")

    history: list[dict[str, float]] = []
    val_started = {"t": 0.0, "last": 0.0}

    @evaluator.on(Events.EPOCH_STARTED)
    def val_clock(engine) -> None:
        val_started["t"] = time.perf_counter()

    @evaluator.on(Events.EPOCH_COMPLETED)
    def record(engine) -> None:
        dice = float(engine.state.metrics["val_mean_dice"])
        now = time.perf_counter()
        val_started["last"] = now - val_started["t"]
        elapsed = now - start
        cpu = time.process_time() - cpu_start
        history.append({"epoch": trainer.state.epoch, "seconds": round(elapsed, 1), "cpu_seconds": round(cpu, 1),
                        "val_dice": round(dice, 4)})
        print(f"epoch {trainer.state.epoch:4d}  {elapsed:7.1f} s wall  {cpu:7.1f} s CPU  "
              f"held-out subject Dice {dice:.4f}  load {os.getloadavg()[0]:.1f}", flush=True)

    epoch_clock = {"t": start, "last": 0.0}

    @trainer.on(Events.EPOCH_COMPLETED)
    def stop_on_budget(engine) -> None:
        # stop early enough that one more epoch or the closing validation still fits in the budget
        now = time.perf_counter()
        epoch_clock["last"], epoch_clock["t"] = now - epoch_clock["t"], now
        if now - start + max(epoch_clock["last"], val_started["last"]) > args.minutes * 60:
            engine.terminate()

    trainer.run()
    if not history or history[-1]["epoch"] != trainer.state.epoch:
        evaluator.run(trainer.state.epoch)  # the closing validation of the last weights
    total = time.perf_counter() - start
    best = max(history, key=lambda h: h["val_dice"]) if history else None
    with open(out / "learning_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "seconds", "cpu_seconds", "val_dice"])
        writer.writeheader()
        writer.writerows(history)
    summary = {"wall_seconds": round(total, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
               "epochs": trainer.state.epoch, "best": best,
               "last": history[-1] if history else None, "threads": args.threads,
               "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
               "load_average": list(os.getloadavg())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([h["seconds"] / 60 for h in history], [h["val_dice"] for h in history], marker="o", ms=3)
    ax.axhline(0.907, color="grey", ls="--", lw=1, label="reference plain U-Net, 150 s (0.907)")
    ax.set_xlabel("CPU wall time (min, 2 threads)")
    ax.set_ylabel("Dice on the other subject")
    ax.set_title("Brain mask: train Colin27, evaluate ITK head")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
