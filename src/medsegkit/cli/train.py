"""``medsegkit train``: train a registered model on labelled volumes (or the sample data) with the one
training engine (:mod:`medsegkit.train.engine`) and the default recipe."""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a segmentation model (MONAI DiceCE loss, class-biased patches)",
        description=(
            "Train a registered semantic model on labelled volumes and write a checkpoint that "
            "`medsegkit predict` and `medsegkit.load_model` use directly. With --sample, trains the "
            "four-class tissue task on the shipped MNI152 volume (k < 55 training, k >= 55 held out)."
        ),
    )
    data = p.add_argument_group("data")
    data.add_argument("--sample", action="store_true", help="use the shipped MNI152 tissue sample (held-out slab k >= 55)")
    data.add_argument("--image", action="append", default=[], metavar="PATH", help="training image (repeat for several)")
    data.add_argument("--label", action="append", default=[], metavar="PATH", help="its label map (same order as --image)")
    data.add_argument("--val-image", action="append", default=[], metavar="PATH", help="validation image (repeatable)")
    data.add_argument("--val-label", action="append", default=[], metavar="PATH", help="validation label map (repeatable)")
    data.add_argument("--split-axial", type=int, metavar="K",
                      help="instead of --val-*: train on the axial slices k < K of each volume and validate on k >= K "
                           "(k counts axial slices from the inferior end, whatever the file's voxel order)")
    data.add_argument("--class-names", nargs="+", metavar="NAME", help="class names, background first (default: class0..)")
    data.add_argument("--intensity", metavar="SPEC",
                      help="intensity normalisation: 'percentile' (1st..99th percentile -> 0..1, the default: "
                           "independent of the scanner's scale), 'zscore' (over nonzero voxels), 'scale:D' (x / D) "
                           "or 'none'")
    data.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                      help="voxel size the data are resampled to for training and inference (default: isotropic, "
                           "the coarser of the data's typical voxel size (median over axes) and the size at which the object spans 1.25 patches)")
    data.add_argument("--no-crop-foreground", action="store_true",
                      help="keep each scan's whole field of view (default: crop to the nonzero voxels + 4)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="UNet3d", help="registered model name (default %(default)s)")
    model.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="constructor override, e.g. --set channels=[16,32,64] (Python literal values); U-Nets "
                            "default to norm=instance (independent of a scanner's intensities)")
    run = p.add_argument_group("training")
    run.add_argument("-o", "--output", required=True, type=Path, help="checkpoint to write (.safetensors or .pt)")
    run.add_argument("--resume", type=Path, help="continue a run from its checkpoint (optimizer state included)")
    run.add_argument("--epochs", type=int, default=50)
    run.add_argument("--steps-per-epoch", type=int, default=20)
    run.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop after the epoch that passes this")
    run.add_argument("--patch-size", type=int, nargs="+",
                     help="training patch and validation window (default 80 per axis for 3D models, 192 for 2D)")
    run.add_argument("--batch-size", type=int, default=2)
    run.add_argument("--lr", type=float, default=3e-3)
    run.add_argument("--weight-decay", type=float, default=1e-4)
    run.add_argument("--class-weights", type=float, nargs="+", help="weight per class of the Dice and cross-entropy terms")
    run.add_argument("--class-ratios", type=float, nargs="+", help="how often patches centre on each class")
    run.add_argument("--augmentation", default="strong", choices=("none", "light", "strong"),
                     help="random transforms (default %(default)s: affine, flips, bias field, contrast, "
                          "resolution, noise)")
    run.add_argument("--val-interval", type=int, default=1, metavar="N", help="validate and save every N epochs")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--device", default="cpu", help="cpu, cuda (under torchrun: one GPU per process)...")
    run.add_argument("--amp", action="store_true",
                     help="mixed precision: float16 + gradient scaling on CUDA, bfloat16 on CPUs with AVX-512 BF16 "
                          "(elsewhere a note is printed and training stays in float32)")
    run.add_argument("--accumulate", type=int, default=1, metavar="N",
                     help="gradient accumulation: N micro-batches of --batch-size per optimiser step")
    run.add_argument("--freeze-norm-epochs", type=int, default=0, metavar="N",
                     help="train the last N epochs with BatchNorm statistics frozen (steadier small-batch "
                          "BatchNorm models; default 0)")
    run.add_argument("--norm-recalibration", type=int, default=0, metavar="BATCHES",
                     help="with --freeze-norm-epochs: first re-estimate the BatchNorm statistics over BATCHES "
                          "training batches (default 0: keep the running averages)")
    run.add_argument("--metrics-csv", type=Path, help="per-epoch metrics (default: <output stem>.metrics.csv)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output checkpoint")
    p.set_defaults(func=run_train)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["channels=[8,16]", "norm=batch"]`` → ``{"channels": (8, 16), "norm": "batch"}``."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as batch or PRELU
        overrides[key.strip()] = tuple(value) if isinstance(value, list) else value
    return overrides


def parse_intensity(spec: str | None) -> dict[str, Any] | None:
    """``"scale:255"`` → ``{"name": "scale", "divisor": 255.0}``; ``"zscore"`` → z-score over nonzero voxels;
    ``"percentile"`` → 1st..99th percentile to 0..1 (clipped); ``"none"``; ``None`` → the recipe's default."""
    if spec is None:
        return None
    name, _, arg = spec.partition(":")
    if name == "scale":
        try:
            divisor = float(arg)
        except ValueError:
            raise ValueError(f"--intensity scale needs a divisor, e.g. scale:255; got {spec!r}") from None
        if divisor == 0:
            raise ValueError("--intensity scale divisor must not be 0")
        return {"name": "scale", "divisor": divisor}
    if not arg:
        if name == "zscore":
            return {"name": "zscore", "nonzero": True}
        if name == "percentile":
            return {"name": "percentile", "lower": 1.0, "upper": 99.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
        if name == "none":
            return {"name": "none"}
    raise ValueError(f"unknown --intensity {spec!r}; accepted: 'percentile', 'zscore', 'scale:D', 'none'")


def command_line(args: argparse.Namespace) -> str:
    """The full ``medsegkit train`` command that reproduces this run (every setting spelled out)."""
    parts = ["medsegkit", "train"]
    if args.sample:
        parts.append("--sample")
    for flag, values in (("--image", args.image), ("--label", args.label), ("--val-image", args.val_image),
                         ("--val-label", args.val_label)):
        for value in values:
            parts += [flag, str(value)]
    if args.split_axial is not None:
        parts += ["--split-axial", str(args.split_axial)]
    if args.class_names:
        parts += ["--class-names", *args.class_names]
    if args.intensity:
        parts += ["--intensity", args.intensity]
    if args.spacing:
        parts += ["--spacing", *map(str, args.spacing)]
    if args.no_crop_foreground:
        parts.append("--no-crop-foreground")
    parts += ["--model", args.model]
    for item in args.overrides:
        parts += ["--set", item]
    parts += ["--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch)]
    if args.time_budget is not None:
        parts += ["--time-budget", f"{args.time_budget:g}"]
    if args.patch_size:
        parts += ["--patch-size", *map(str, args.patch_size)]
    parts += ["--batch-size", str(args.batch_size),
              "--lr", f"{args.lr:g}", "--weight-decay", f"{args.weight_decay:g}"]
    if args.class_weights:
        parts += ["--class-weights", *(f"{w:g}" for w in args.class_weights)]
    if args.class_ratios:
        parts += ["--class-ratios", *(f"{r:g}" for r in args.class_ratios)]
    parts += ["--augmentation", args.augmentation, "--val-interval", str(args.val_interval)]
    if args.amp:
        parts.append("--amp")
    if args.accumulate != 1:
        parts += ["--accumulate", str(args.accumulate)]
    if args.freeze_norm_epochs:
        parts += ["--freeze-norm-epochs", str(args.freeze_norm_epochs)]
    if args.norm_recalibration:
        parts += ["--norm-recalibration", str(args.norm_recalibration)]
    parts += ["--seed", str(args.seed)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    parts += ["--device", args.device, "-o", str(args.output)]
    if args.resume is not None:
        parts += ["--resume", str(args.resume)]
    return shlex.join(parts)


#: the TrainConfig field each option sets, for config_problem's messages
OPTION_OF_FIELD = {
    "epochs": "--epochs", "steps_per_epoch": "--steps-per-epoch", "batch_size": "--batch-size",
    "val_interval": "--val-interval", "accumulate": "--accumulate", "num_threads": "--threads", "lr": "--lr",
    "weight_decay": "--weight-decay", "time_budget_s": "--time-budget", "class_weights": "--class-weights",
    "class_ratios": "--class-ratios", "freeze_norm_epochs": "--freeze-norm-epochs",
    "norm_recalibration_batches": "--norm-recalibration",
}


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse counts, rates and times that no run can use, before the data are read (``ValueError``,
    :func:`medsegkit.train.engine.config_problem` worded with the options)."""
    from medsegkit.train.engine import config_problem

    values = {field: getattr(args, option[2:].replace("-", "_")) for field, option in OPTION_OF_FIELD.items()}
    problem = config_problem(values, OPTION_OF_FIELD)
    if problem:
        raise ValueError(problem)


def _load_data(args: argparse.Namespace):
    from medsegkit.train.data import load_labelled_volume, sample_tissue_data, split_axial

    if args.sample:
        if args.image or args.val_image or args.split_axial is not None:
            raise ValueError("--sample uses the shipped MNI152 data; drop --image/--label/--val-*/--split-axial")
        from medsegkit.data import MNI_CLASS_NAMES, MNI_HELD_OUT_START, MNI_LABEL_COLORS, SAMPLE_FILES

        train_volume, val_volume = sample_tissue_data()
        names = list(args.class_names or MNI_CLASS_NAMES)
        data = {
            "name": "MNI ICBM152 2009a symmetric, 2 mm (medsegkit sample data)",
            "images": [SAMPLE_FILES["mni152_t1"]],
            "labels": [SAMPLE_FILES["mni152_tissue"]],
            "split": f"axial slabs of the 2 mm grid: training k < {MNI_HELD_OUT_START}, held out k >= {MNI_HELD_OUT_START}",
        }
        return [train_volume], [val_volume], names, [list(c) for c in MNI_LABEL_COLORS], data
    if not args.image:
        raise ValueError("give training data: --sample, or --image IMG --label LABELS (repeatable)")
    if len(args.image) != len(args.label):
        raise ValueError(f"{len(args.image)} --image but {len(args.label)} --label; give one label map per image")
    if len(args.val_image) != len(args.val_label):
        raise ValueError(f"{len(args.val_image)} --val-image but {len(args.val_label)} --val-label")
    volumes = [load_labelled_volume(i, lab) for i, lab in zip(args.image, args.label)]
    if args.split_axial is not None:
        if args.val_image:
            raise ValueError("use either --split-axial or --val-image/--val-label, not both")
        pairs = [split_axial(v, args.split_axial) for v in volumes]
        train_volumes, val_volumes = [p[0] for p in pairs], [p[1] for p in pairs]
        split = f"axial: training k < {args.split_axial}, validation k >= {args.split_axial}"
    elif args.val_image:
        train_volumes = volumes
        val_volumes = [load_labelled_volume(i, lab) for i, lab in zip(args.val_image, args.val_label)]
        split = "separate validation volumes"
    else:
        raise ValueError("give validation data: --val-image/--val-label, or --split-axial K")
    num_classes = int(max(v.label.max() for v in [*train_volumes, *val_volumes])) + 1
    names = list(args.class_names or [f"class{k}" for k in range(num_classes)])
    if len(names) < num_classes:
        raise ValueError(f"--class-names gives {len(names)} names but the labels go up to {num_classes - 1}")
    data = {"images": [str(p) for p in args.image], "labels": [str(p) for p in args.label],
            "val_images": [str(p) for p in args.val_image], "val_labels": [str(p) for p in args.val_label],
            "split": split}
    return train_volumes, val_volumes, names, None, data


def run_train(args: argparse.Namespace) -> int:
    import torch

    from medsegkit.registry import create_model, get_model_spec
    from medsegkit.train.baseline import nearest_class_mean_baseline
    from medsegkit.train.engine import (
        CLI_NAMES,
        TrainConfig,
        check_distinct_class_names,
        check_training_output,
        recipe_model_overrides,
        recipe_preprocessing,
        train,
    )
    from medsegkit.weights.checkpoint import check_checkpoint_name

    check_checkpoint_name(args.output, "--output")  # before the data are read; train() checks it too
    check_training_output(args.output, resume=args.resume, overwrite=args.overwrite, metrics_csv=args.metrics_csv,
                          names=CLI_NAMES)
    if args.resume is not None and not args.resume.exists():
        raise FileNotFoundError(f"--resume checkpoint {args.resume} does not exist")
    check_numbers(args)
    intensity = parse_intensity(args.intensity)
    train_volumes, val_volumes, names, colors, data = _load_data(args)
    check_distinct_class_names(names, "--class-names")  # before the baseline and the model are built
    for option, values in (("--class-weights", args.class_weights), ("--class-ratios", args.class_ratios)):
        if values and len(values) != len(names):
            raise ValueError(f"{option} needs one value per class ({len(names)}: {' '.join(names)}); got {len(values)}")
    spec = get_model_spec(args.model)
    overrides = {**recipe_model_overrides(spec), **parse_overrides(args.overrides)}
    if spec.task == "instance":  # Mask R-CNN counts foreground classes; background is added inside
        overrides.setdefault("num_classes", len(names) - 1)
    else:
        overrides.setdefault("num_classes" if spec.task == "universal" else "out_channels", len(names))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the initial weights too: the same command and seed give the same model
    model = create_model(args.model, **overrides)
    spatial_dims = getattr(model, "spatial_dims", 3)
    patch = tuple(args.patch_size or ([80] * 3 if spatial_dims == 3 else [192] * 2))
    if len(patch) != spatial_dims:
        raise ValueError(f"--patch-size needs {spatial_dims} values for {args.model}; got {list(patch)}")
    preprocessing = recipe_preprocessing(train_volumes, patch, intensity=intensity,
                                         spacing=list(args.spacing) if args.spacing else None,
                                         crop_foreground=not args.no_crop_foreground)
    config = TrainConfig(
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, time_budget_s=args.time_budget,
        patch_size=patch, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        class_weights=tuple(args.class_weights) if args.class_weights else None,
        class_ratios=tuple(args.class_ratios) if args.class_ratios else None,
        augmentation=args.augmentation, val_interval=args.val_interval, seed=args.seed,
        num_threads=args.threads, device=args.device, amp=args.amp, accumulate=args.accumulate,
        freeze_norm_epochs=args.freeze_norm_epochs, norm_recalibration_batches=args.norm_recalibration,
    )
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    commands = [command_line(args)]
    if args.resume is not None:  # the run so far: its own command(s) first
        from medsegkit.weights import read_checkpoint

        previous = read_checkpoint(args.resume)[1].get("metadata", {}).get("training", {})
        earlier = previous.get("commands") or ([previous["command"]] if previous.get("command") else [])
        commands = [*earlier, *commands]
    baseline: dict[str, Any] = {}
    if main_process:  # the other torchrun ranks write nothing, so they skip the reference numbers
        baseline = nearest_class_mean_baseline(train_volumes, val_volumes, names)
        print("intensity baseline (nearest class mean) Dice: "
              + " ".join(f"{k} {v:.3f}" for k, v in baseline["dice"].items())
              + f" | mean {baseline['mean_foreground_dice']:.3f}", file=sys.stderr)
        print(f"preprocessing: {preprocessing}", file=sys.stderr)
    metadata: dict[str, Any] = {
        "class_names": names,
        "task": "semantic",
        "training": {"command": " && ".join(commands), "commands": commands, "data": data,
                     "baseline_nearest_class_mean": baseline},
    }
    if colors:
        metadata["label_colors"] = colors
    result = train(model, train_volumes, val_volumes, checkpoint=args.output, class_names=names, config=config,
                   preprocessing=preprocessing, metadata=metadata, resume=args.resume, metrics_csv=args.metrics_csv,
                   progress=not args.no_progress, overwrite=args.overwrite)
    if main_process:
        dice = result.validation["dice"]
        print(f"wrote {result.checkpoint} after epoch {result.epoch} ({result.step} steps, {result.wall_time_s:.0f} s)")
        print("validation Dice: " + " ".join(f"{k} {v:.3f}" for k, v in dice.items()))
        print(f"mean foreground Dice: {result.validation['mean_foreground_dice']:.3f}")
    from medsegkit.train.distributed import end_worker_process

    end_worker_process(0)  # a torchrun worker ends here, past gloo's threads (docs/training.md); else returns
    return 0
