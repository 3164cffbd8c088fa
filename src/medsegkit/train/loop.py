"""Supervised training of semantic segmentation models (MONAI DiceCE loss, class-biased patches).

:func:`train` runs epochs of random patches, validates on whole volumes after each epoch (Dice per
class on the scored part of each validation volume), writes a CSV of metrics, and after each epoch
saves two files atomically:

* ``checkpoint`` (``.safetensors`` or ``.pt``): the model, rebuildable by :func:`medsegkit.load_model`,
  with metadata (class names, preprocessing, training settings, validation Dice);
* ``<checkpoint stem>.state.safetensors``: optimizer tensors + JSON training state (epoch, step,
  history, random states) — what ``resume=`` needs. Never pickled.
"""

from __future__ import annotations

import csv
import json
import math
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

from medsegkit.amp import amp_choice, autocast_as
from medsegkit.nets.layers.padding import pad_to_multiple
from medsegkit.train.data import LabelledVolume, PatchSampler

__all__ = [
    "TrainConfig",
    "TrainResult",
    "predict_volume",
    "recalibrate_batchnorm",
    "state_path_for",
    "train",
    "validate",
]


@dataclass
class TrainConfig:
    """Settings of one training run (all recorded in the checkpoint).

    Attributes:
        epochs: number of epochs (each ``steps_per_epoch`` optimiser steps, then validation).
        steps_per_epoch: optimiser steps per epoch.
        time_budget_s: stop after the first epoch that ends past this many seconds (``None``: no limit).
        patch_size: training patch ``(H, W, D)``; larger than the volume means whole axes.
        batch_size: patches per step.
        lr: peak learning rate (AdamW), cosine-decayed to ``lr * 0.01`` over ``epochs`` after
            ``warmup_epochs`` of linear warm-up.
        weight_decay: AdamW weight decay.
        class_weights: weight per class of both loss terms (MONAI ``DiceCELoss(weight=...)``; ``None``: equal).
        class_ratios: how often patches are centred on each class (``None``: equal).
        lambda_dice, lambda_ce: weights of the Dice and cross-entropy terms of MONAI's ``DiceCELoss``.
        flip_axes: spatial axes randomly flipped.
        intensity_scale, intensity_shift: random intensity augmentation ranges.
        divisible_by: pad patches/volumes to a multiple of this (the network's total stride).
        bn_recalibration: before each validation, re-estimate BatchNorm running statistics as the plain
            average over this many training patches (``0``: keep the momentum estimates, which follow
            the last few patches and make validation jumpy with class-biased patches).
        freeze_bn_from: from this epoch on (1-based), BatchNorm statistics are fixed: re-estimated once
            over ``bn_recalibration`` patches (at least 50) at the start of that epoch, then the
            BatchNorm layers stay in eval mode while everything else trains, so training sees exactly
            the normalisation inference uses (``None``: never).
        seed: seeds torch and the patch sampler.
        num_threads: ``torch.set_num_threads`` during training (``None``: leave as is).
        device: ``"cpu"``, ``"cuda"``... (under ``torchrun``, ``"cuda"`` means ``cuda:LOCAL_RANK``).
        amp: mixed precision, chosen by :mod:`medsegkit.amp`: bfloat16 autocast where the device has
            native bf16 (CPU: AVX-512 BF16 / AMX; CUDA: capability ≥ 8), else float16 autocast + gradient
            scaling on CUDA; elsewhere a note is printed and training stays in float32.
        accumulate: micro-batches of ``batch_size`` patches per optimiser step (gradient accumulation:
            the effective batch is ``accumulate * batch_size`` per process).
    """

    epochs: int = 50
    steps_per_epoch: int = 20
    time_budget_s: float | None = None
    patch_size: tuple[int, ...] = (96, 96, 48)
    batch_size: int = 1
    lr: float = 3e-3
    warmup_epochs: int = 1
    weight_decay: float = 1e-4
    class_weights: tuple[float, ...] | None = None
    class_ratios: tuple[float, ...] | None = None
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    flip_axes: tuple[int, ...] = (0,)
    intensity_scale: float = 0.05
    intensity_shift: float = 0.02
    divisible_by: int = 16
    bn_recalibration: int = 0
    freeze_bn_from: int | None = None
    seed: int = 0
    num_threads: int | None = None
    device: str = "cpu"
    amp: bool = False
    accumulate: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        known = {f for f in cls.__dataclass_fields__}
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


def state_path_for(checkpoint: str | os.PathLike) -> Path:
    """The training-state file written beside ``checkpoint`` (``model.safetensors`` → ``model.state.safetensors``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.name.split('.')[0]}.state.safetensors")


@torch.no_grad()
def predict_volume(model: nn.Module, image: np.ndarray | torch.Tensor, *, divisible_by: int = 16) -> np.ndarray:
    """Class indices for a whole normalised volume in one forward pass.

    Args:
        image: ``(C, H, W, D)``; zero-padded symmetrically to multiples of ``divisible_by``.

    Returns:
        ``(H, W, D)`` int64 labels (argmax over the model's classes).
    """
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None].to(device)
    x, crop = pad_to_multiple(x, divisible_by, method="symmetric")
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        model.train(was_training)
    if isinstance(logits, Mapping):
        logits = logits["out"]
    return logits[crop].argmax(1)[0].cpu().numpy()


def validate(
    model: nn.Module,
    volumes: Sequence[LabelledVolume],
    *,
    class_names: Sequence[str],
    divisible_by: int = 16,
    predictor: Callable[[nn.Module, np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Dice per foreground class on the scored part of each volume (voxels pooled over volumes).

    Returns:
        ``{"dice": {class_name: float}, "mean_foreground_dice": float}``.
    """
    from medsegkit.metrics import dice_per_class

    predictor = predictor or (lambda m, img: predict_volume(m, img, divisible_by=divisible_by))
    preds, refs = [], []
    for volume in volumes:
        pred = predictor(model, volume.image)
        preds.append(pred[..., volume.score_from :].ravel())
        refs.append(volume.label[..., volume.score_from :].ravel())
    pred = np.concatenate(preds)[:, None]
    ref = np.concatenate(refs)[:, None]
    labels = range(1, len(class_names))
    dice = dice_per_class(pred, ref, labels)
    named = {class_names[k]: round(float(v), 6) for k, v in dice.items()}
    return {"dice": named, "mean_foreground_dice": round(float(np.mean(list(named.values()))), 6)}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, sampler: PatchSampler, num_patches: int, *, batch_size: int = 1,
                          device: torch.device | str = "cpu") -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the cumulative average over
    ``num_patches`` batches from ``sampler`` (train-mode forward passes, no gradients).

    Returns:
        The number of BatchNorm layers updated (0: the model has none and nothing was run).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or num_patches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every patch counts equally
    model.train()
    try:
        for _ in range(num_patches):
            images, _ = sampler.sample(batch_size)
            model(torch.from_numpy(images).to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


def _freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (fixed running statistics); the rest keeps its mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _lr_factor(epoch: int, config: TrainConfig) -> float:
    """Learning-rate multiplier for (0-based) ``epoch``: linear warm-up then cosine to 1 %."""
    if epoch < config.warmup_epochs:
        return (epoch + 1) / (config.warmup_epochs + 1)
    span = max(config.epochs - config.warmup_epochs, 1)
    progress = min((epoch - config.warmup_epochs) / span, 1.0)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


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


def _rng_tensors() -> dict[str, torch.Tensor]:
    return {"rng.torch": torch.get_rng_state()}


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


def train(
    model: nn.Module,
    train_volumes: Sequence[LabelledVolume],
    val_volumes: Sequence[LabelledVolume],
    *,
    checkpoint: str | os.PathLike,
    class_names: Sequence[str],
    config: TrainConfig | None = None,
    metadata: Mapping[str, Any] | None = None,
    resume: str | os.PathLike | None = None,
    metrics_csv: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``model`` on random patches of ``train_volumes``, validating on ``val_volumes`` each epoch.

    Args:
        model: a semantic model taking ``(N, C, H, W, D)`` and returning logits ``(N, K, H, W, D)``
            (build it with :func:`medsegkit.create_model` so the checkpoint records how to rebuild it).
        train_volumes, val_volumes: :class:`~medsegkit.train.data.LabelledVolume` cases (validation
            scores each volume from its ``score_from`` slice on).
        checkpoint: output model file (``.safetensors`` recommended), rewritten atomically after every
            epoch; the training state goes to :func:`state_path_for` ``(checkpoint)``.
        class_names: one name per class (``K`` names, background first).
        config: :class:`TrainConfig` (ignored when resuming: the saved one is used, except ``epochs``,
            ``time_budget_s``, ``num_threads`` and ``device``, which may be raised/changed).
        metadata: extra checkpoint metadata (label colours, preprocessing, data, command...).
        resume: a checkpoint written by this function; training continues after its last epoch with
            the saved optimizer state, learning-rate schedule and random states.
        metrics_csv: CSV of per-epoch metrics (default: ``<checkpoint stem>.metrics.csv``).
        progress: tqdm progress bar on stderr.
        log: where the per-epoch validation line goes (default: ``tqdm.write`` to stderr).

    Distributed data parallel: launched by ``torchrun`` (``WORLD_SIZE > 1``), every process joins the
    process group (gloo on CPU, nccl on GPU), the model is wrapped by
    :func:`medsegkit.train.distributed.wrap_model` (DDP; SyncBatchNorm on GPUs), each rank draws its own
    patches (sampler seeded with ``seed + rank``, so one optimiser step sees ``world_size * batch_size *
    accumulate`` patches), and rank 0 alone validates, logs and writes the checkpoint, state and CSV
    while the others wait at a barrier. ``train_loss`` is the mean over all ranks. Resuming needs the
    same number of processes (each rank's patch sequence is restored).

    Returns:
        :class:`TrainResult` (last epoch's validation, history, paths; on ranks other than 0 the
        validation and history are empty).
    """
    from medsegkit.weights.checkpoint import read_checkpoint

    checkpoint = Path(checkpoint)
    state_file = state_path_for(checkpoint)
    metrics_csv = Path(metrics_csv) if metrics_csv else checkpoint.with_name(f"{checkpoint.name.split('.')[0]}.metrics.csv")
    config = config or TrainConfig()
    class_names = list(class_names)
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError(f"class_names needs at least two classes (background first); got {class_names}")
    out_channels = getattr(model, "out_channels", None) or getattr(model, "num_classes", None)
    if out_channels is not None and int(out_channels) != num_classes:
        raise ValueError(f"model has {out_channels} output channels but {num_classes} class names were given")
    for volume in [*train_volumes, *val_volumes]:
        if volume.label.max() >= num_classes:
            raise ValueError(f"{volume.name}: label {int(volume.label.max())} >= number of classes {num_classes}")

    start_epoch, step, history, elapsed_before = 0, 0, [], 0.0
    resume_info: dict[str, Any] | None = None
    resume_tensors: dict[str, torch.Tensor] = {}
    if resume is not None:
        resume = Path(resume)
        model_state, _ = read_checkpoint(resume)
        model.load_state_dict(model_state)
        resume_state = state_path_for(resume)
        if not resume_state.exists():
            raise FileNotFoundError(f"cannot resume: training state {resume_state} (written beside {resume}) is missing")
        resume_tensors, record = read_checkpoint(resume_state)
        resume_info = record["metadata"]["training_state"]
        saved = TrainConfig.from_dict(resume_info["config"])
        # a resumed run may go longer, on other hardware, and enter a fixed-BatchNorm fine-tuning phase
        config = TrainConfig(**{**asdict(saved), "epochs": max(config.epochs, saved.epochs),
                                "time_budget_s": config.time_budget_s, "num_threads": config.num_threads,
                                "device": config.device,
                                "freeze_bn_from": config.freeze_bn_from if config.freeze_bn_from is not None
                                else saved.freeze_bn_from,
                                "bn_recalibration": config.bn_recalibration or saved.bn_recalibration})
        start_epoch, step = resume_info["epoch"], resume_info["step"]
        history = list(resume_info["history"])
        elapsed_before = float(resume_info["wall_time_s"])

    if config.accumulate < 1:
        raise ValueError(f"accumulate must be >= 1 (micro-batches per optimiser step); got {config.accumulate}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    context, owns_group = _distributed_context(config.device)
    finished = False
    try:
        result = _run(model, train_volumes, val_volumes, context=context, checkpoint=checkpoint,
                    state_file=state_file, metrics_csv=metrics_csv, class_names=class_names, config=config,
                    metadata=metadata, resume=resume, resume_info=resume_info, resume_tensors=resume_tensors,
                    start_epoch=start_epoch, step=step, history=history, elapsed_before=elapsed_before,
                    progress=progress, log=log)
        finished = True
        return result
    finally:
        if owns_group:
            from medsegkit.train.distributed import cleanup_distributed

            cleanup_distributed(barrier=finished)


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


def _amp_settings(requested: bool, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """``(autocast dtype or None, note to print or None)`` for ``--amp`` on ``device``."""
    dtype, reason = amp_choice(device, requested)  # the package's one AMP choice (medsegkit.amp)
    return dtype, (None if reason is None else f"--amp: {reason}; training in float32")


def _gather(obj: Any, context) -> list[Any]:
    """``obj`` of every rank (rank order); ``[obj]`` in a single process."""
    if not context.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * context.world_size
    dist.all_gather_object(out, obj)
    return out


def _run(model, train_volumes, val_volumes, *, context, checkpoint, state_file, metrics_csv, class_names, config,
         metadata, resume, resume_info, resume_tensors, start_epoch, step, history, elapsed_before, progress,
         log) -> TrainResult:
    """The epochs of :func:`train` (arguments checked and resume state read there)."""
    import contextlib

    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from medsegkit.train.distributed import barrier, wrap_model
    from medsegkit.weights.checkpoint import save_checkpoint

    num_classes = len(class_names)
    main = context.is_main
    torch.manual_seed(config.seed)
    device = context.device
    net = wrap_model(model, context)  # DDP (+ SyncBatchNorm on GPUs) under torchrun; model.to(device) otherwise
    model.train()
    sampler = PatchSampler(
        train_volumes,
        patch_size=config.patch_size,
        num_classes=num_classes,
        class_ratios=config.class_ratios,
        flip_axes=config.flip_axes,
        intensity_scale=config.intensity_scale,
        intensity_shift=config.intensity_shift,
        divisible_by=config.divisible_by,
        seed=config.seed + context.rank,  # every rank draws its own patches: global batch = world * batch
    )
    weight = torch.tensor(config.class_weights, dtype=torch.float32, device=device) if config.class_weights else None
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight,
                           lambda_dice=config.lambda_dice, lambda_ce=config.lambda_ce)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if resume_info is not None:
        _load_optimizer(optimizer, resume_tensors, resume_info["optimizer"])
        samplers = resume_info.get("samplers") or [resume_info["sampler"]]
        if len(samplers) != context.world_size:
            raise ValueError(f"checkpoint {resume} was trained by {len(samplers)} process(es) but this run has "
                             f"{context.world_size}; resume with the same number of torchrun processes")
        sampler.load_state(samplers[context.rank])
        torch.set_rng_state(resume_tensors["rng.torch" if context.rank == 0 else f"rng.torch.{context.rank}"])

    write = log or (lambda line: tqdm.write(line, file=sys.stderr))
    if not main:
        write = lambda line: None  # noqa: E731 - rank 0 logs for everyone
    amp_dtype, amp_note = _amp_settings(config.amp, device)
    if amp_note:
        write(amp_note)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    if scaler is not None and resume_info is not None and resume_info.get("grad_scaler"):
        scaler.load_state_dict(resume_info["grad_scaler"])
    started = time.perf_counter()
    validation: dict[str, Any] = history[-1]["validation"] if history else {}
    epoch = start_epoch
    if start_epoch >= config.epochs:
        raise ValueError(f"checkpoint {resume} already finished epoch {start_epoch} of {config.epochs}; raise epochs")
    for epoch in range(start_epoch + 1, config.epochs + 1):
        lr = config.lr * _lr_factor(epoch - 1, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        frozen = config.freeze_bn_from is not None and epoch >= config.freeze_bn_from
        if frozen and epoch == config.freeze_bn_from:
            recalibrate_batchnorm(model, sampler, max(config.bn_recalibration, 50), batch_size=config.batch_size,
                                  device=device)
        model.train()
        if frozen:
            _freeze_batchnorm(model)
        losses = []
        bar = tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}",
                   disable=not (progress and main), leave=False, file=sys.stderr, dynamic_ncols=True)
        for _ in bar:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(config.accumulate):
                images, labels = sampler.sample(config.batch_size)
                x = torch.from_numpy(images).to(device)
                y = torch.from_numpy(labels).to(device)
                # DDP averages gradients across ranks once per optimiser step (on the last micro-batch)
                last = micro == config.accumulate - 1
                sync = contextlib.nullcontext() if last or not context.is_distributed else net.no_sync()
                with sync:
                    with autocast_as(device, amp_dtype):
                        out = net(x)
                    if isinstance(out, Mapping):
                        out = out["out"]
                    loss = loss_fn(out.float(), y)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"loss became {float(loss)} at step {step}; lower the learning rate (lr={lr:g})")
                    scaled = loss / config.accumulate
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                step_loss += float(loss.detach()) / config.accumulate
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            losses.append(step_loss)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if config.bn_recalibration and not frozen:
            recalibrate_batchnorm(model, sampler, config.bn_recalibration, batch_size=config.batch_size, device=device)
        # the epoch's loss is the mean over every rank's patches
        epoch_loss = float(np.mean([float(np.mean(rank_losses)) for rank_losses in _gather(losses, context)]))
        samplers = _gather(sampler.state(), context)
        rngs = _gather(torch.get_rng_state(), context)
        stop = False
        if main:
            validation = validate(model, val_volumes, class_names=class_names, divisible_by=config.divisible_by)
            wall = elapsed_before + time.perf_counter() - started
            row = {"epoch": epoch, "step": step, "wall_time_s": round(wall, 1), "lr": lr,
                   "train_loss": round(epoch_loss, 6),
                   **{f"val_dice_{k}": v for k, v in validation["dice"].items()},
                   "val_mean_foreground_dice": validation["mean_foreground_dice"]}
            history.append({**row, "validation": validation})
            write(
                f"epoch {epoch}/{config.epochs} step {step} loss {row['train_loss']:.4f} | val Dice "
                + " ".join(f"{k} {v:.3f}" for k, v in validation["dice"].items())
                + f" | mean {validation['mean_foreground_dice']:.3f} | {wall:.0f} s"
            )
            training_meta = {
                "epochs_done": epoch,
                "steps_done": step,
                "wall_time_s": round(wall, 1),
                "config": config.to_dict(),
                "train_data": [v.name for v in train_volumes],
                "validation_data": [v.name for v in val_volumes],
                "validation": validation,
            }
            if context.is_distributed:
                training_meta["world_size"] = context.world_size
            meta = dict(metadata or {})
            meta["class_names"] = class_names
            meta["training"] = {**meta.get("training", {}), **training_meta}
            save_checkpoint(model, checkpoint, metadata=meta)
            opt_tensors, opt_info = _optimizer_tensors(optimizer)
            training_state = {
                "epoch": epoch, "step": step, "wall_time_s": wall, "config": config.to_dict(),
                "history": history, "optimizer": opt_info, "sampler": samplers[0],
            }
            if context.is_distributed:
                training_state["samplers"] = samplers
            if scaler is not None:
                training_state["grad_scaler"] = scaler.state_dict()
            state_record = {
                "format": "medsegkit-training-state",
                "version": 1,
                "model": {},
                "metadata": {"training_state": training_state},
            }
            extra = {f"rng.torch.{r}": t for r, t in enumerate(rngs) if r > 0}
            save_checkpoint({**opt_tensors, **_rng_tensors(), **extra}, state_file,
                            record=json.loads(json.dumps(state_record)))
            _write_csv(metrics_csv, [{k: v for k, v in h.items() if k != "validation"} for h in history])
            if config.time_budget_s is not None and time.perf_counter() - started >= config.time_budget_s:
                write(f"time budget of {config.time_budget_s:g} s reached after epoch {epoch}")
                stop = True
        # rank 0 decides (validation, files, time budget); the others wait for it here
        barrier()
        if context.is_distributed:
            stop = _gather(stop, context)[0]
        if stop:
            break
    if not main:  # only rank 0 validates and keeps the history
        validation, history = {}, []
    return TrainResult(checkpoint=checkpoint, state=state_file, epoch=epoch, step=step,
                       wall_time_s=elapsed_before + time.perf_counter() - started,
                       validation=validation, history=[{k: v for k, v in h.items() if k != "validation"} for h in history])
