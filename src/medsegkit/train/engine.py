"""One training engine for every model family: MONAI's ``SupervisedTrainer`` with medsegkit's handlers.

:func:`train` preprocesses the training volumes with the checkpoint's preprocessing spec (the very
transforms ``segment`` runs on new images, :func:`medsegkit.transforms.preprocessing_configs`), draws
random patches through :func:`medsegkit.transforms.augmentation_configs`, and runs a MONAI
``SupervisedTrainer`` whose iteration is :class:`TrainStep` (the family's objective, AMP from
:mod:`medsegkit.amp`, gradient accumulation, DDP) with these handlers:

* ``LrScheduleHandler`` + ``WarmupCosineSchedule`` (per step: linear warm-up, cosine to 1 % of ``lr``);
* ``StatsHandler`` (epoch loss to the ``medsegkit.train`` logger) and a tqdm bar;
* :class:`ValidateAndSave` (rank 0, every ``val_interval`` epochs and at the end): ``medsegkit.segment``
  of each validation volume on its own grid (preprocessing, sliding windows and restore exactly as a user
  runs it), Dice per class on the scored part, then atomically the checkpoint, the training state
  (``resume=``), the metrics CSV and a learning-curve PNG; and the time budget.

The checkpoint (``.safetensors`` or ``.pt``) is rebuilt by :func:`medsegkit.load_model` and records the
class names, the preprocessing spec and the training settings, so ``predict`` / ``segment`` / napari
preprocess exactly as training did. The state file ``<stem>.state.safetensors`` holds the optimizer
tensors and a JSON record (epoch, step, scheduler, history, random states of the patch sampler, the
random transforms and torch): never pickled.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsegkit._values import is_finite_number, is_whole_number
from medsegkit.amp import amp_choice
from medsegkit.nets.modes import evaluating
from medsegkit.train.data import LabelledVolume, random_states, training_items
from medsegkit.train.step import TrainStep
from medsegkit.weights.checkpoint import CHECKPOINT_SUFFIXES, check_checkpoint_name

__all__ = [
    "TrainConfig",
    "TrainResult",
    "ValidateAndSave",
    "recipe_model_overrides",
    "recipe_preprocessing",
    "state_path_for",
    "train",
    "training_loader",
    "validate",
]

LOGGER = "medsegkit.train"


def _weights(values: Any) -> bool:
    return (isinstance(values, (list, tuple)) and len(values) > 0 and all(is_finite_number(v) and v >= 0 for v in values)
            and any(v > 0 for v in values))


#: TrainConfig's numbers: field -> (accepted?, what is accepted). ``None`` passes where the field allows it.
CONFIG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (lambda v: is_whole_number(v) and v >= 1, ">= 1")
       for name in ("epochs", "steps_per_epoch", "batch_size", "val_interval", "accumulate", "num_threads")},
    **{name: (lambda v: is_whole_number(v) and v >= 0, "a whole number >= 0")
       for name in ("warmup_epochs", "freeze_norm_epochs", "norm_recalibration_batches")},
    "lr": (lambda v: is_finite_number(v) and v > 0, "a positive number"),
    **{name: (lambda v: is_finite_number(v) and v >= 0, "a number >= 0") for name in ("weight_decay", "lambda_dice", "lambda_ce")},
    "time_budget_s": (lambda v: is_finite_number(v) and v >= 0, "a number of seconds >= 0 (0: one epoch)"),
    **{name: (_weights, "numbers >= 0, not all 0") for name in ("class_weights", "class_ratios")},
}
OPTIONAL_FIELDS = ("num_threads", "time_budget_s", "class_weights", "class_ratios")


def config_problem(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str | None:
    """The first of ``values`` (TrainConfig fields) that no run can use, as one line, or ``None``.

    ``names`` words the message (``medsegkit train`` passes its option names: ``{"lr": "--lr", ...}``)."""
    for field_name, (accepted, what) in CONFIG_RULES.items():
        if field_name not in values or (values[field_name] is None and field_name in OPTIONAL_FIELDS):
            continue
        value = values[field_name]
        if not accepted(value):
            shown = list(value) if isinstance(value, tuple) else value
            return f"{(names or {}).get(field_name, field_name)} must be {what}; got {shown}"
    return None


@dataclass
class TrainConfig:
    """Settings of one training run (all recorded in the checkpoint).

    Attributes:
        epochs: number of epochs (each ``steps_per_epoch`` optimiser steps, then validation).
        steps_per_epoch: optimiser steps per epoch.
        time_budget_s: a limit in seconds (``None``: none). After each epoch, the number of epochs that
            fit in it (at the pace of the epochs after the first) replaces ``epochs`` when smaller, and the
            cosine schedule is fitted to them (a plan shrunk by a slow start grows back, up to ``epochs``,
            in its first half: :meth:`_Run.budget_plan`); training also stops after any epoch that ends
            past the budget.
        patch_size: training patch, ``(H, W, D)`` for a 3D model, ``(H, W)`` for a 2D one (a 2D model
            on volumes trains on slices); also the validation window.
        batch_size: patches per optimiser step and process (per micro-batch with ``accumulate``).
        lr: peak learning rate (AdamW), after ``warmup_epochs`` of linear warm-up, cosine-decayed per
            step to ``lr * 0.01`` at ``epochs``.
        weight_decay: AdamW weight decay.
        class_weights: weight per class of both DiceCE terms (``None``: equal; semantic models).
        class_ratios: how often patches are centred on each class (``None``: equal).
        lambda_dice, lambda_ce: weights of the Dice and cross-entropy terms (semantic models).
        augmentation: ``"none"``, ``"light"`` or ``"strong"`` (:func:`medsegkit.transforms.augmentation_configs`).
        val_interval: validate (and save) every this many epochs; the last epoch always is.
        seed: seeds torch, the patch order and the random transforms (rank ``r`` uses ``seed + r``).
        num_threads: ``torch.set_num_threads`` during training (``None``: leave as is).
        device: ``"cpu"``, ``"cuda"``... (under ``torchrun``, ``"cuda"`` means ``cuda:LOCAL_RANK``).
        amp: mixed precision, chosen by :mod:`medsegkit.amp`: bfloat16 autocast where the device has
            native bf16, float16 + gradient scaling on older CUDA GPUs; elsewhere a note and float32.
        accumulate: micro-batches of ``batch_size`` patches per optimiser step.
        freeze_norm_epochs: the last this many epochs (of the run's final plan, after a time budget has
            shortened it) train with the BatchNorm layers in eval mode: their running statistics stop
            moving and the weights learn against the statistics inference will use. With small batches
            (one or two patches) the running statistics otherwise follow the last few patches, and a
            model's validation Dice swings from epoch to epoch. ``0``: never.
        norm_recalibration_batches: when the freeze starts, the BatchNorm statistics are first re-estimated
            as the plain average over this many training batches (no gradient steps), instead of keeping
            the running averages that lean on the last few batches. ``0``: keep them.
    """

    epochs: int = 50
    steps_per_epoch: int = 20
    time_budget_s: float | None = None
    patch_size: tuple[int, ...] = (80, 80, 80)
    batch_size: int = 2
    lr: float = 3e-3
    warmup_epochs: int = 1
    weight_decay: float = 1e-4
    class_weights: tuple[float, ...] | None = None
    class_ratios: tuple[float, ...] | None = None
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    augmentation: str = "strong"
    val_interval: int = 1
    seed: int = 0
    num_threads: int | None = None
    device: str = "cpu"
    amp: bool = False
    accumulate: int = 1
    freeze_norm_epochs: int = 0
    norm_recalibration_batches: int = 0

    def __post_init__(self) -> None:
        problem = config_problem(asdict(self))
        if problem:  # e.g. a NaN lr failed in the optimiser, a negative time budget trained one epoch and stopped
            raise ValueError(f"TrainConfig: {problem}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown TrainConfig fields {unknown}; accepted: {sorted(known)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})


@dataclass
class TrainResult:
    """What :func:`train` returns: the checkpoint, the last validation and the per-epoch history."""

    checkpoint: Path
    state: Path
    epoch: int
    step: int
    wall_time_s: float
    validation: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def run_stem(checkpoint: str | os.PathLike) -> str:
    """The name a run's companion files start with: the checkpoint's name without its checkpoint suffix
    (``unet.lr1e-3.safetensors`` → ``unet.lr1e-3``), so that two runs never share a companion file."""
    name = Path(checkpoint).name
    suffix = next((s for s in CHECKPOINT_SUFFIXES if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)]


def state_path_for(checkpoint: str | os.PathLike) -> Path:
    """The training-state file written beside ``checkpoint`` (``model.safetensors`` → ``model.state.safetensors``,
    ``model.v2.pt`` → ``model.v2.state.safetensors``)."""
    return Path(checkpoint).with_name(f"{run_stem(checkpoint)}.state.safetensors")


#: how :func:`check_training_output` names the outputs and the ways out, in Python and on the command line
API_NAMES = {"output": "checkpoint", "metrics": "metrics_csv", "overwrite": "overwrite=True", "resume": "resume="}
CLI_NAMES = {"output": "--output", "metrics": "--metrics-csv", "overwrite": "--overwrite", "resume": "--resume "}


def check_training_output(checkpoint: str | os.PathLike, *, resume: str | os.PathLike | None, overwrite: bool,
                          metrics_csv: str | os.PathLike | None = None,
                          names: Mapping[str, str] = API_NAMES) -> None:
    """Refuse training outputs that would replace something, before any data are read.

    * ``checkpoint`` must not be a folder, nor exist unless ``overwrite`` is set or ``resume`` is that same
      file (a resumed run continues its own checkpoint);
    * an explicit ``metrics_csv`` must end in ``.csv`` (it is rewritten after every validation: a scan named
      there would be replaced by the table), must not be a folder, nor exist unless ``overwrite`` or
      ``resume`` (a resumed run rewrites its own table).

    ``names`` words the messages (:data:`API_NAMES`, or :data:`CLI_NAMES` for ``medsegkit train``).
    Raises ``IsADirectoryError``, ``FileExistsError`` or ``ValueError``.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise IsADirectoryError(f"{names['output']} {checkpoint} is a folder; give a checkpoint file name such as "
                                f"{checkpoint / 'model.safetensors'}")
    same_run = resume is not None and Path(resume).resolve() == checkpoint.resolve()
    if checkpoint.exists() and not (overwrite or same_run):
        continuing = (f" (it is not the checkpoint being resumed, {resume})" if resume is not None else "")
        raise FileExistsError(f"{checkpoint} exists{continuing}; pass {names['overwrite']} to replace it or "
                              f"{names['resume']}{checkpoint} to continue it")
    if metrics_csv is None:
        return
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.name.lower().endswith(".csv") or metrics_csv.name.lower() == ".csv":
        raise ValueError(f"{names['metrics']} must name a .csv file, got {metrics_csv.name!r}")
    if metrics_csv.is_dir():
        raise IsADirectoryError(f"{names['metrics']} {metrics_csv} is a folder; give a file name such as "
                                f"{metrics_csv / 'metrics.csv'}")
    if metrics_csv.exists() and not overwrite and resume is None:
        raise FileExistsError(f"{names['metrics']} {metrics_csv} exists; pass {names['overwrite']} to replace it")


def check_distinct_class_names(names: Sequence[str], what: str) -> None:
    """Refuse a class name given twice: the validation Dice, the metrics CSV and the checkpoint are keyed by
    class name, so two classes of one name would be reported as one."""
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f"{what} must be distinct; {' '.join(repeated)} appears more than once in "
                         f"{' '.join(names)}")


def recipe_preprocessing(
    volumes: Sequence[LabelledVolume],
    patch_size: Sequence[int],
    *,
    intensity: Any = None,
    spacing: float | Sequence[float] | None = None,
    crop_foreground: bool = True,
) -> dict[str, Any]:
    """The default recipe's preprocessing spec for ``volumes`` (what works across scanners).

    * orientation RAS;
    * ``intensity`` default: the 1st..99th percentile → [0, 1], clipped (``"mr_robust"``): independent of a
      scanner's absolute scale, unlike a fixed divisor;
    * crop to the bounding box of the image's nonzero voxels (+4 voxels), so scans with different fields
      of view look alike;
    * ``spacing`` default: isotropic, the coarser of (a) the typical voxel size of the volumes (the median
      over axes of the per-axis median: 2 mm for a 2 × 2 × 3 mm scan, so its in-plane detail is kept) and
      (b) the size at which the median foreground box spans at most 1.25 patches per axis: on a CPU
      budget the network then sees most of the object in every patch (a 217 mm head with 80-voxel
      patches: 2.2 mm).
    """
    from medsegkit.transforms import resolve_preprocessing

    spec: dict[str, Any] = {"preset": "mr_robust", "crop_foreground": crop_foreground}
    if intensity is not None:
        spec["intensity"] = intensity
    if spacing is None and volumes:
        patch = [int(p) for p in patch_size]
        voxel = np.array([np.linalg.norm(v.affine[:3, :3], axis=0)[: v.label.ndim] for v in volumes])
        extents = []
        for v in volumes:
            nonzero = np.argwhere(np.any(v.image != 0, axis=0)) if crop_foreground else None
            lo = nonzero.min(0) if nonzero is not None and len(nonzero) else np.zeros(v.label.ndim)
            hi = (nonzero.max(0) + 1) if nonzero is not None and len(nonzero) else np.array(v.label.shape)
            # RAS extent in mm: voxel extents through the affine, sorted onto the world axes
            world = np.abs(v.affine[: v.label.ndim, : v.label.ndim] * (hi - lo)[None, :]).max(axis=1)
            extents.append(world)
        typical = float(np.median(np.median(voxel, axis=0)))
        median_extent = np.median(np.array(extents), axis=0)
        patch_mm = np.array(patch[: len(median_extent)] + [patch[-1]] * (len(median_extent) - len(patch)))
        fit = float(np.max(median_extent / (1.25 * patch_mm)))
        spacing = round(max(typical, fit), 2)
    if spacing is not None:
        spec["spacing"] = spacing
    return resolve_preprocessing(spec)


def recipe_model_overrides(spec: Any) -> dict[str, Any]:
    """The default recipe's constructor arguments for a registry spec: U-Nets normalise with
    InstanceNorm, which normalises each patch by itself (BatchNorm's running statistics describe the
    training scanner, and after a few hundred steps they are far from any other). ``--set norm=batch``
    overrides it."""
    return {"norm": "instance"} if getattr(spec, "family", None) == "unet" else {}


def validate(
    model: nn.Module | None,
    volumes: Sequence[LabelledVolume],
    *,
    class_names: Sequence[str],
    preprocessing: Mapping[str, Any] | None = None,
    roi_size: Sequence[int] | None = None,
    predictor: Callable[[LabelledVolume], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Dice per foreground class on the scored part of each volume (voxels pooled over volumes), with the
    prediction made by ``medsegkit.segment`` on the volume's own grid (or by ``predictor(volume)``).

    Returns:
        ``{"dice": {class_name: float}, "mean_foreground_dice": float}``.
    """
    from medsegkit.metrics import dice_per_class

    if predictor is None:
        from medsegkit.inference.segment import segment

        instances = getattr(model, "medsegkit_task", None) == "instance"
        if instances and len(class_names) != 2:
            raise ValueError("validation of an instance model scores one foreground class; give two class names "
                             f"(background, object), got {list(class_names)}")

        def predictor(volume: LabelledVolume) -> np.ndarray:
            result = segment(model, volume.as_image(), preprocessing=preprocessing, roi_size=roi_size, fast=False)
            labels = np.asarray(result.array)
            return (labels > 0).astype(np.int64) if instances else labels  # instance ids -> the object class

    preds, refs = [], []
    for volume in volumes:
        pred = predictor(volume)
        preds.append(pred[..., volume.score_from :].ravel())
        refs.append(volume.label[..., volume.score_from :].ravel())
    dice = dice_per_class(np.concatenate(preds)[:, None], np.concatenate(refs)[:, None], range(1, len(class_names)))
    named = {class_names[k]: round(float(v), 6) for k, v in dice.items()}
    return {"dice": named, "mean_foreground_dice": round(float(np.mean(list(named.values()))), 6)}


class ValidateAndSave:
    """Trainer handler: validation, checkpoint + state + CSV + learning curve, time budget (rank 0 decides)."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        run = self.run
        epoch = engine.state.epoch
        losses = run.epoch_losses
        run.epoch_losses = []
        epoch_loss = float(np.mean([float(np.mean(r)) for r in run.gather(losses) if r]))
        samplers = run.gather(run.sampler_state())
        rngs = run.gather(torch.get_rng_state())
        wall = run.elapsed_before + time.perf_counter() - run.started
        over_budget = run.config.time_budget_s is not None and time.perf_counter() - run.started >= run.config.time_budget_s
        stop, plan = False, None
        if run.context.is_main:
            plan = run.budget_plan(epoch, engine.state.max_epochs)
            if plan is not None:
                run.fit_schedule(engine, plan)
        due = epoch % max(run.config.val_interval, 1) == 0 or epoch == engine.state.max_epochs or over_budget
        if run.context.is_main:
            row: dict[str, Any] = {"epoch": epoch, "step": engine.state.iteration, "wall_time_s": round(wall, 1),
                                   "lr": engine.optimizer.param_groups[0]["lr"], "train_loss": round(epoch_loss, 6)}
            if due and run.val_volumes:
                run.validation = run.validate_now()
                row.update({f"val_dice_{k}": v for k, v in run.validation["dice"].items()})
                row["val_mean_foreground_dice"] = run.validation["mean_foreground_dice"]
            run.history.append({**row, "validation": run.validation} if due else row)
            line = f"epoch {epoch}/{engine.state.max_epochs} step {engine.state.iteration} loss {row['train_loss']:.4f}"
            if "val_mean_foreground_dice" in row:
                line += (" | val Dice " + " ".join(f"{k} {v:.3f}" for k, v in run.validation["dice"].items())
                         + f" | mean {run.validation['mean_foreground_dice']:.3f}")
            run.write(line + f" | {wall:.0f} s")
            if plan is not None and plan > epoch:
                run.write(f"time budget of {run.config.time_budget_s:g} s: {plan} epochs in all, the "
                          "learning-rate schedule fitted to them")
            if due:  # checkpoint, training state, CSV and curve follow each validation (and the last epoch)
                run.save(engine, wall, samplers, rngs)
            if over_budget and epoch < engine.state.max_epochs:
                run.write(f"time budget of {run.config.time_budget_s:g} s reached after epoch {epoch}")
                stop = True
        if run.context.is_distributed:
            from medsegkit.train.distributed import barrier

            barrier()  # rank 0 validated and wrote; the others wait here
            stop, plan = run.gather((stop, plan))[0]
            if plan is not None and not run.context.is_main:
                run.fit_schedule(engine, plan)
        if stop:
            engine.terminate()


class _Run:
    """Everything one :func:`train` call shares between its handlers."""

    def __init__(self, *, model, network, context, config, class_names, preprocessing, train_volumes, val_volumes,
                 checkpoint, state_file, metrics_csv, metadata, history, elapsed_before, log, transform,
                 generator) -> None:
        self.model, self.network, self.context, self.config = model, network, context, config
        self.class_names, self.preprocessing = class_names, preprocessing
        self.train_volumes, self.val_volumes = train_volumes, val_volumes
        self.checkpoint, self.state_file, self.metrics_csv = checkpoint, state_file, metrics_csv
        self.metadata, self.history, self.elapsed_before, self.write = metadata, history, elapsed_before, log
        self.transform, self.generator = transform, generator
        self.validation: dict[str, Any] = next((h["validation"] for h in reversed(history) if "validation" in h), {})
        self.epoch_losses: list[float] = []
        self.started = time.perf_counter()
        self.start_epoch = 0  # the epoch this run resumed after
        self.requested_epochs = config.epochs  # a time budget's plan may shrink below it and grow back to it
        self.epoch_ends: list[float] = []  # seconds since ``started`` at the end of each of this run's epochs
        self.scheduler: Any = None
        self.optimizer: Any = None
        self.grad_scaler: Any = None  # float16 training's loss scale (CUDA), saved so a resume keeps it

    def budget_plan(self, epoch: int, max_epochs: int) -> int | None:
        """After each epoch of a run with a time budget: the number of epochs in all that fit, when it
        differs from the current plan ``max_epochs`` (``None``: no budget, or the plan stands).

        Each further epoch is assumed to take as long as this run's epochs after its first one did on
        average (the first also pays for start-up and may have shared the machine; it is the estimate only
        while it is the one epoch done). The plan ends at or before the budget, so a budget-limited run
        still finishes its cosine schedule (learning rate down to 1 % of ``lr``) instead of stopping at its
        peak. It shrinks whenever epochs become slower, and grows back towards the requested ``epochs``
        when they become faster, but only in the first half of the plan: later the learning rate has
        decayed too far to be raised again. A slow first epoch (a busy machine) then no longer leaves most
        of the budget unused.
        """
        budget = self.config.time_budget_s
        if budget is None or epoch <= self.start_epoch:
            return None
        spent = time.perf_counter() - self.started
        self.epoch_ends.append(spent)
        durations = np.diff([0.0, *self.epoch_ends])
        per_epoch = float(np.mean(durations[1:] if len(durations) > 1 else durations))
        fits = max(epoch, epoch + int((budget - spent) // per_epoch)) if per_epoch > 0 else self.requested_epochs
        planned = min(fits, self.requested_epochs)
        if planned < max_epochs or (planned > max_epochs and 2 * epoch <= max_epochs):
            return planned
        return None

    def fit_schedule(self, engine: Any, epochs: int) -> None:
        """End the run after ``epochs`` epochs and stretch the cosine schedule over them; recorded as the
        run's ``epochs`` (checkpoint metadata, resume)."""
        from dataclasses import replace

        self.config = replace(self.config, epochs=epochs)
        engine.state.max_epochs = epochs
        self.scheduler.t_total = max(epochs * self.config.steps_per_epoch, self.scheduler.warmup_steps + 1)

    def gather(self, obj: Any) -> list[Any]:
        if not self.context.is_distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.context.world_size
        dist.all_gather_object(out, obj)
        return out

    def sampler_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().tolist(),
                "transforms": [_rs_state(t.R) for t in random_states(self.transform)]}

    def load_sampler_state(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        for t, s in zip(random_states(self.transform), state["transforms"]):
            _rs_load(t.R, s)

    def validate_now(self) -> dict[str, Any]:
        roi = list(self.config.patch_size)
        with evaluating(self.model):  # frozen layers (eval inside a training model) stay frozen
            return validate(self.model, self.val_volumes, class_names=self.class_names,
                            preprocessing=self.preprocessing, roi_size=roi)

    def save(self, engine: Any, wall: float, samplers: list[Any], rngs: list[torch.Tensor]) -> None:
        from medsegkit.weights.checkpoint import save_checkpoint

        epoch, step = engine.state.epoch, engine.state.iteration
        training_meta = {
            "epochs_done": epoch, "steps_done": step, "wall_time_s": round(wall, 1),
            "config": self.config.to_dict(),
            "train_data": [v.name for v in self.train_volumes],
            "validation_data": [v.name for v in self.val_volumes],
            "validation": self.validation,
            "engine": "monai.engines.SupervisedTrainer",
        }
        if self.context.is_distributed:
            training_meta["world_size"] = self.context.world_size
        meta = dict(self.metadata or {})
        meta["class_names"] = self.class_names
        meta["preprocessing"] = self.preprocessing
        meta["roi_size"] = list(self.config.patch_size)  # predict's default window: the training patch
        meta["training"] = {**meta.get("training", {}), **training_meta}
        save_checkpoint(self.model, self.checkpoint, metadata=meta, overwrite=True)  # train() checked it
        opt_tensors, opt_info = _optimizer_tensors(self.optimizer)
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        training_state = {
            "epoch": epoch, "step": step, "wall_time_s": wall, "config": self.config.to_dict(),
            "history": self.history, "optimizer": opt_info, "scheduler": scheduler, "samplers": samplers,
        }
        if self.grad_scaler is not None:
            training_state["grad_scaler"] = self.grad_scaler.state_dict()
        record = {"format": "medsegkit-training-state", "version": 2, "model": {},
                  "metadata": {"training_state": training_state}}
        rng = {("rng.torch" if r == 0 else f"rng.torch.{r}"): t for r, t in enumerate(rngs)}
        save_checkpoint({**opt_tensors, **rng}, self.state_file, record=json.loads(json.dumps(record)),
                        overwrite=True)
        rows = [{k: v for k, v in h.items() if k != "validation"} for h in self.history]
        _write_csv(self.metrics_csv, rows)
        _plot_learning_curve(self.metrics_csv.with_name(f"{run_stem(self.checkpoint)}.learning_curve.png"),
                             rows, self.class_names)


def train(
    model: nn.Module,
    train_volumes: Sequence[LabelledVolume],
    val_volumes: Sequence[LabelledVolume],
    *,
    checkpoint: str | os.PathLike,
    class_names: Sequence[str],
    preprocessing: str | Mapping[str, Any] | None = None,
    config: TrainConfig | None = None,
    metadata: Mapping[str, Any] | None = None,
    resume: str | os.PathLike | None = None,
    metrics_csv: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``model`` on random patches of ``train_volumes``, validating on ``val_volumes``.

    Args:
        model: any registered family, built with :func:`medsegkit.create_model` so the checkpoint
            records how to rebuild it: semantic ``(N, C, *spatial)`` → logits ``(N, K, *spatial)``,
            MaskFormer / Mask2Former (semantic task, ``num_classes = K``) or Mask R-CNN (2D; instances
            are the connected components of each class). :func:`medsegkit.train.objectives.objective_for`
            picks the loss.
        train_volumes, val_volumes: :class:`~medsegkit.train.data.LabelledVolume` cases on their own
            grids (validation scores each volume from its ``score_from`` slice on).
        checkpoint: output model file (``.safetensors`` recommended; ``.pt``, ``.pth``, ``.ckpt``; any other name
            raises ``ValueError`` before anything runs), rewritten atomically after each
            validation; the training state goes to :func:`state_path_for` ``(checkpoint)``, the metrics to
            ``<stem>.metrics.csv``, the learning curve to ``<stem>.learning_curve.png``.
        class_names: one name per class (``K`` names, background first).
        preprocessing: preset name or spec dict (:mod:`medsegkit.transforms`) applied to training and
            validation volumes and recorded for inference; default :func:`recipe_preprocessing`.
        config: :class:`TrainConfig` (when resuming, the saved one is used, except ``epochs``,
            ``time_budget_s``, ``num_threads`` and ``device``).
        metadata: extra checkpoint metadata (label colours, training data, command...).
        resume: a checkpoint written by this function; training continues after its last saved epoch with
            the saved optimizer, schedule and random states (the same curve as an uninterrupted run).
        metrics_csv: CSV of per-epoch metrics (default: ``<checkpoint stem>.metrics.csv``).
        progress: tqdm progress bar on stderr.
        log: where the per-epoch line goes (default: ``tqdm.write`` to stderr).
        overwrite: replace an existing ``checkpoint`` (and its companion files). Without it an existing
            ``checkpoint`` raises ``FileExistsError`` before anything runs, unless ``resume`` is that same file
            (a resumed run continues its own checkpoint).

    Distributed data parallel: under ``torchrun`` (``WORLD_SIZE > 1``) every process joins the group
    (gloo on CPU, nccl on GPU), the model is wrapped by :func:`medsegkit.train.distributed.wrap_model`,
    each rank draws its own patches (seeded ``seed + rank``: one optimiser step sees ``world_size *
    batch_size * accumulate`` patches), and rank 0 alone validates and writes while the others wait.

    Returns:
        :class:`TrainResult` (on ranks other than 0 the validation and history are empty).
    """
    from medsegkit.transforms import resolve_preprocessing
    from medsegkit.weights.checkpoint import read_checkpoint

    checkpoint = check_checkpoint_name(checkpoint)
    check_training_output(checkpoint, resume=resume, overwrite=overwrite, metrics_csv=metrics_csv)
    state_file = state_path_for(checkpoint)
    metrics_csv = Path(metrics_csv) if metrics_csv else checkpoint.with_name(f"{run_stem(checkpoint)}.metrics.csv")
    config = config or TrainConfig()
    class_names = list(class_names)
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError(f"class_names needs at least two classes (background first); got {class_names}")
    check_distinct_class_names(class_names, "class_names")
    detection = getattr(model, "medsegkit_task", None) == "instance"
    out_channels = getattr(model, "out_channels", None) or getattr(model, "num_classes", None)
    if detection and out_channels is not None:
        out_channels = int(out_channels) + 1  # Mask R-CNN counts foreground classes (background added inside)
    if out_channels is not None and int(out_channels) != num_classes:
        raise ValueError(f"model has {out_channels} output classes but {num_classes} class names were given")
    if not train_volumes:
        raise ValueError("train needs at least one training volume")
    for volume in [*train_volumes, *val_volumes]:
        if volume.label.max() >= num_classes:
            raise ValueError(f"{volume.name}: label {int(volume.label.max())} >= number of classes {num_classes}")

    history: list[dict[str, Any]] = []
    elapsed_before = 0.0
    resume_info: dict[str, Any] | None = None
    resume_tensors: dict[str, torch.Tensor] = {}
    if resume is not None:
        resume = Path(resume)
        model_state, record = read_checkpoint(resume)
        model.load_state_dict(model_state)
        resume_state = state_path_for(resume)
        if not resume_state.exists():
            legacy = resume.with_name(f"{resume.name.split('.')[0]}.state.safetensors")  # the name before 2026-12-07
            hint = (f"; {legacy.name} beside it may be it (until 2026-12-07 the state was named after the checkpoint's "
                    f"name up to its first dot, shared by every {legacy.name.split('.')[0]}.* run): rename it to "
                    f"{resume_state.name} if it is this run's" if legacy != resume_state and legacy.exists() else "")
            raise FileNotFoundError(f"cannot resume: training state {resume_state} (written beside {resume}) is "
                                    f"missing{hint}")
        resume_tensors, state_record = read_checkpoint(resume_state)
        resume_info = state_record["metadata"]["training_state"]
        if "scheduler" not in resume_info:
            raise ValueError(f"{resume} was written by the earlier training loop; its state cannot be resumed by this "
                             "engine (start a new run, or fine-tune with --set and its weights)")
        saved = TrainConfig.from_dict(resume_info["config"])
        config = TrainConfig(**{**asdict(saved), "epochs": max(config.epochs, saved.epochs),
                                "time_budget_s": config.time_budget_s, "num_threads": config.num_threads,
                                "device": config.device})
        preprocessing = record.get("metadata", {}).get("preprocessing", preprocessing)
        history = list(resume_info["history"])
        elapsed_before = float(resume_info["wall_time_s"])
        if resume_info["epoch"] >= config.epochs:
            raise ValueError(f"checkpoint {resume} already finished epoch {resume_info['epoch']} of {config.epochs}; "
                             "raise epochs")
    spec = (recipe_preprocessing(train_volumes, config.patch_size) if preprocessing is None
            else resolve_preprocessing(preprocessing))
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    context, owns_group = _distributed_context(config.device)
    finished = False
    try:
        result = _train(model, train_volumes, val_volumes, context=context, checkpoint=checkpoint,
                        state_file=state_file, metrics_csv=metrics_csv, class_names=class_names, config=config,
                        spec=spec, metadata=metadata, resume=resume, resume_info=resume_info,
                        resume_tensors=resume_tensors, history=history, elapsed_before=elapsed_before,
                        progress=progress, log=log)
        finished = True
        return result
    finally:
        if owns_group:
            from medsegkit.train.distributed import cleanup_distributed

            cleanup_distributed(barrier=finished)


def training_loader(items: Sequence[Mapping[str, Any]], transform: Any, config: TrainConfig,
                    context: Any) -> tuple[Any, torch.Generator]:
    """The training patches of this process: ``steps_per_epoch × batch_size × accumulate`` draws per epoch
    (volumes with replacement, by ``generator``, seeded ``seed + rank``), each through the random ``transform``.

    MONAI's ``DataLoader`` (``num_workers=0``) re-seeds the dataset's transforms from torch's generator,
    which every torchrun process seeded alike, so under torchrun rank ``r``'s transforms are seeded
    ``seed + r`` after it: otherwise every rank would draw the same crops and augmentations (one process
    keeps the loader's seeding).

    Returns:
        ``(loader, generator)``: the generator is the sampler's (its state goes into the training state).
    """
    from monai.data import DataLoader, Dataset

    generator = torch.Generator().manual_seed(config.seed + context.rank)
    per_step = config.batch_size * config.accumulate
    sampler = torch.utils.data.RandomSampler(items, replacement=True, num_samples=config.steps_per_epoch * per_step,
                                             generator=generator)
    loader = DataLoader(Dataset(items, transform=transform), batch_size=per_step, sampler=sampler, num_workers=0)
    if context.is_distributed:
        transform.set_random_state(seed=config.seed + context.rank)
    return loader, generator


def _train(model, train_volumes, val_volumes, *, context, checkpoint, state_file, metrics_csv, class_names, config,
           spec, metadata, resume, resume_info, resume_tensors, history, elapsed_before, progress, log) -> TrainResult:
    """Build the data, the trainer and its handlers, and run it (arguments checked by :func:`train`)."""
    from monai.engines import SupervisedTrainer
    from monai.handlers import LrScheduleHandler, StatsHandler, from_engine
    from monai.optimizers import WarmupCosineSchedule
    from monai.transforms import Compose
    from tqdm.auto import tqdm

    from medsegkit.train.distributed import wrap_model
    from medsegkit.train.objectives import objective_for
    from medsegkit.transforms import augmentation_configs, instantiate_configs

    torch.manual_seed(config.seed)
    device = context.device
    write = log or (lambda line: tqdm.write(line, file=sys.stderr))
    if not context.is_main:
        write = lambda line: None  # noqa: E731 - rank 0 logs for everyone
    amp_dtype, reason = amp_choice(device, config.amp)  # the package's one AMP choice (medsegkit.amp)
    if reason is not None:
        write(f"--amp: {reason}; training in float32")

    spatial_dims = getattr(model, "spatial_dims", len(config.patch_size))
    if len(config.patch_size) != spatial_dims:
        raise ValueError(f"patch_size needs {spatial_dims} values for this {spatial_dims}D model; got "
                         f"{list(config.patch_size)}")
    data_dims = train_volumes[0].label.ndim
    items = training_items(train_volumes, spec)
    transform = Compose(instantiate_configs(augmentation_configs(
        config.patch_size, level=config.augmentation, num_classes=len(class_names),
        class_ratios=config.class_ratios, slice_volumes=spatial_dims == 2 and data_dims == 3)))
    loader, generator = training_loader(items, transform, config, context)

    network = wrap_model(model, context)  # DDP (+ SyncBatchNorm on GPUs) under torchrun; model.to(device) otherwise
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    objective = objective_for(model, len(class_names), class_weights=config.class_weights,
                              lambda_dice=config.lambda_dice, lambda_ce=config.lambda_ce)
    if hasattr(objective, "loss") and getattr(objective.loss, "cross_entropy", None) is not None:
        objective.loss.to(device)
    total_steps = config.epochs * config.steps_per_epoch
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=config.warmup_epochs * config.steps_per_epoch,
                                     t_total=total_steps, end_lr=config.lr * 0.01, warmup_multiplier=1.0 / (config.warmup_epochs + 1))
    step = TrainStep(network, objective, micro_batch=config.batch_size, amp_dtype=amp_dtype,
                     distributed=context.is_distributed, in_channels=getattr(model, "in_channels", None),
                     freeze_norm_epochs=config.freeze_norm_epochs,
                     norm_recalibration_batches=config.norm_recalibration_batches)
    run = _Run(model=model, network=network, context=context, config=config, class_names=class_names,
               preprocessing=spec, train_volumes=train_volumes, val_volumes=val_volumes, checkpoint=checkpoint,
               state_file=state_file, metrics_csv=metrics_csv, metadata=metadata, history=history,
               elapsed_before=elapsed_before, log=write, transform=transform, generator=generator)
    run.optimizer, run.scheduler, run.grad_scaler = optimizer, scheduler, step.scaler
    trainer = SupervisedTrainer(device=device, max_epochs=config.epochs, train_data_loader=loader, network=network,
                                optimizer=optimizer, loss_function=objective, epoch_length=config.steps_per_epoch,
                                iteration_update=step, amp=False, decollate=False)
    LrScheduleHandler(scheduler, epoch_level=False, print_lr=False).attach(trainer)
    StatsHandler(name=LOGGER, iteration_log=False, tag_name="train_loss",
                 output_transform=from_engine(["loss"], first=True)).attach(trainer)
    _attach_progress(trainer, run, config, enabled=progress and context.is_main)
    ValidateAndSave(run).attach(trainer)

    if resume_info is not None:
        _load_optimizer(optimizer, resume_tensors, resume_info["optimizer"])
        scheduler.load_state_dict({**resume_info["scheduler"], "lr_lambdas": [None]})
        samplers = resume_info["samplers"]
        if len(samplers) != context.world_size:
            raise ValueError(f"checkpoint {resume} was trained by {len(samplers)} process(es) but this run has "
                             f"{context.world_size}; resume with the same number of torchrun processes")
        run.load_sampler_state(samplers[context.rank])
        torch.set_rng_state(resume_tensors["rng.torch" if context.rank == 0 else f"rng.torch.{context.rank}"])
        trainer.state.epoch = int(resume_info["epoch"])
        trainer.state.iteration = int(resume_info["step"])
        run.start_epoch = trainer.state.epoch
        scheduler.t_total = total_steps  # the cosine runs to this run's epochs (they may have been raised)
    if step.scaler is not None and resume_info is not None and resume_info.get("grad_scaler"):
        step.scaler.load_state_dict(resume_info["grad_scaler"])
    trainer.run()
    validation, history = (run.validation, run.history) if context.is_main else ({}, [])
    return TrainResult(checkpoint=checkpoint, state=state_file, epoch=trainer.state.epoch,
                       step=trainer.state.iteration, wall_time_s=elapsed_before + time.perf_counter() - run.started,
                       validation=validation,
                       history=[{k: v for k, v in h.items() if k != "validation"} for h in history])


def _attach_progress(trainer: Any, run: _Run, config: TrainConfig, *, enabled: bool) -> None:
    """A tqdm bar per epoch (rank 0) and the per-step losses the epoch line averages."""
    from ignite.engine import Events
    from tqdm.auto import tqdm

    bar: dict[str, Any] = {}

    @trainer.on(Events.EPOCH_STARTED)
    def _open(engine: Any) -> None:
        bar["bar"] = tqdm(total=config.steps_per_epoch, desc=f"epoch {engine.state.epoch}/{engine.state.max_epochs}",
                          disable=not enabled, leave=False, file=sys.stderr, dynamic_ncols=True)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step(engine: Any) -> None:
        loss = engine.state.output["loss"]
        run.epoch_losses.append(loss)
        bar["bar"].update(1)
        bar["bar"].set_postfix(loss=f"{loss:.4f}")

    @trainer.on(Events.EPOCH_COMPLETED | Events.TERMINATE)
    def _close(engine: Any) -> None:
        if "bar" in bar:
            bar.pop("bar").close()


def _distributed_context(device: str):
    """``(context, whether this call initialised the process group)``: the torchrun context when
    ``WORLD_SIZE > 1``, else a plain single-process context on ``device``."""
    import torch.distributed as dist

    from medsegkit.train.distributed import DistributedContext, setup_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device(device)), False
    already = dist.is_available() and dist.is_initialized()
    # "cuda" under torchrun: one GPU per process (cuda:LOCAL_RANK); "cpu": gloo
    return setup_distributed(device=None if device == "cuda" else device), not already


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state dict into tensors + JSON (so no pickle is needed)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer.state."):
            continue
        index, key = name[len("optimizer.state.") :].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entries in info.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def _rs_state(rs: np.random.RandomState) -> list[Any]:
    kind, keys, pos, has_gauss, cached = rs.get_state()
    return [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]


def _rs_load(rs: np.random.RandomState, state: Sequence[Any]) -> None:
    kind, keys, pos, has_gauss, cached = state
    rs.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _write_csv(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    from medsegkit.files import atomic_write

    columns: list[str] = []
    for row in history:
        columns += [c for c in row if c not in columns]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def _plot_learning_curve(path: Path, rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> None:
    """Training loss and validation Dice per epoch, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from medsegkit.files import atomic_write

    figure = Figure(figsize=(7, 3.2), dpi=110)
    loss_axis, dice_axis = figure.subplots(1, 2)
    loss_axis.plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], marker=".", color="tab:red")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="loss")
    validated = [r for r in rows if "val_mean_foreground_dice" in r]
    for name in class_names[1:]:
        key = f"val_dice_{name}"
        dice_axis.plot([r["epoch"] for r in validated], [r.get(key, np.nan) for r in validated], marker=".", label=name)
    dice_axis.plot([r["epoch"] for r in validated], [r["val_mean_foreground_dice"] for r in validated], color="k",
                   lw=2, label="mean")
    dice_axis.set(xlabel="epoch", ylabel="Dice", title="validation", ylim=(0, 1))
    dice_axis.legend(fontsize=7, loc="lower right")
    for axis in (loss_axis, dice_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


logging.getLogger(LOGGER).addHandler(logging.NullHandler())
