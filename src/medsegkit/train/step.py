"""The training engine's iteration: one optimiser step of a model family's objective.

Its own module so that both the engine (:mod:`medsegkit.train.engine`) and the distributed self-check
(:mod:`medsegkit.train.distributed`) run the very same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medsegkit.amp import autocast_as

__all__ = ["TrainStep"]


class TrainStep:
    """The trainer's iteration: one optimiser step over ``accumulate`` micro-batches.

    A batch from the loader holds ``accumulate * batch_size`` patches; each micro-batch runs the family's
    objective under :func:`medsegkit.amp.autocast_as`, DDP synchronises gradients on the last one only,
    and a non-finite loss stops training with the step and learning rate. In the last
    ``freeze_norm_epochs`` epochs of the engine's plan (``engine.state.max_epochs``) the BatchNorm layers
    run in eval mode (frozen running statistics, affine weights still trained); with
    ``norm_recalibration_batches`` the statistics are first re-estimated over that many loader batches.

    It returns ``{"loss": float}``; with ``outputs=True`` (the bundles' ``train.json``, whose train metric
    needs them) also ``"pred"``, the logits ``(N, K, *spatial)`` of the semantic objective, and ``"label"``
    ``(N, 1, *spatial)``, and it fires MONAI's ``IterationEvents.MODEL_COMPLETED`` (the trainer's
    decollate and postprocessing run there) as MONAI's own iteration does. ``micro_batch=None`` takes the
    whole batch at once.
    """

    def __init__(self, network: nn.Module, objective: Any, *, micro_batch: int | None = None,
                 amp_dtype: torch.dtype | None = None, distributed: bool = False, in_channels: int | None = None,
                 freeze_norm_epochs: int = 0, norm_recalibration_batches: int = 0, outputs: bool = False) -> None:
        if freeze_norm_epochs < 0 or norm_recalibration_batches < 0:
            raise ValueError(f"freeze_norm_epochs and norm_recalibration_batches must be >= 0; got "
                             f"{freeze_norm_epochs} and {norm_recalibration_batches}")
        self.network = network
        self.objective = objective
        self.micro_batch = micro_batch
        self.amp_dtype = amp_dtype
        self.distributed = distributed
        self.in_channels = in_channels
        self.freeze_norm_epochs = freeze_norm_epochs
        self.norm_recalibration_batches = norm_recalibration_batches
        self.outputs = outputs
        if outputs and not hasattr(objective, "keep_output"):
            raise ValueError(f"outputs=True needs an objective that keeps its logits (SemanticObjective), "
                             f"got {type(objective).__name__}")
        if outputs:
            objective.keep_output = True
        self.recalibrated_at: int | None = None  # the epoch whose first iteration re-estimated the statistics
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def _images(self, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        images = _plain_tensor(batch["image"]).to(device, torch.float32)
        if self.in_channels and images.shape[1] == 1 and self.in_channels > 1:
            images = images.expand(-1, self.in_channels, *images.shape[2:])  # a grey image for an RGB model
        return images

    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> dict[str, float]:
        device = engine.state.device
        images = self._images(batch, device)
        labels = _plain_tensor(batch["label"]).to(device).round().long()
        engine.network.train()
        if self.norms_frozen(engine):
            first_frozen = engine.state.max_epochs - self.freeze_norm_epochs + 1
            if self.norm_recalibration_batches and engine.state.epoch == first_frozen and self.recalibrated_at is None:
                self.recalibrate(engine)
                self.recalibrated_at = engine.state.epoch
            for module in _batch_norms(engine.network):
                module.eval()
        engine.optimizer.zero_grad(set_to_none=True)
        size = self.micro_batch or len(images)
        parts = list(zip(images.split(size), labels.split(size)))
        total, predictions = 0.0, []
        for index, (x, y) in enumerate(parts):
            last = index == len(parts) - 1
            sync = contextlib.nullcontext() if last or not self.distributed else self.network.no_sync()
            with sync:
                with autocast_as(x.device, self.amp_dtype):
                    loss = self.objective(self.network, x, y)
                if self.outputs:
                    predictions.append(self.objective.last_output.float())
                if not torch.isfinite(loss):
                    lr = engine.optimizer.param_groups[0]["lr"]
                    raise FloatingPointError(
                        f"loss became {float(loss)} at step {engine.state.iteration}; lower the learning rate (lr={lr:g})")
                scaled = loss / len(parts)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += float(loss.detach()) / len(parts)
        if self.scaler is not None:
            self.scaler.step(engine.optimizer)
            self.scaler.update()
        else:
            engine.optimizer.step()
        if self.outputs:
            from monai.engines.utils import IterationEvents

            # as MONAI's own iteration: the output is in place when MODEL_COMPLETED fires, which runs the
            # trainer's decollate and postprocessing (argmax, one-hot) before its metrics read them
            engine.state.output = {"loss": total, "pred": torch.cat(predictions), "label": labels}
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            return engine.state.output
        return {"loss": total}

    def recalibrate(self, engine: Any) -> None:
        """Re-estimate every BatchNorm's running statistics as the plain mean over
        ``norm_recalibration_batches`` batches of the engine's loader (train-mode forwards, no gradients)."""
        norms = _batch_norms(engine.network)
        momenta = [module.momentum for module in norms]
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # cumulative average
        try:
            batches = iter(engine.state.dataloader)
            with torch.no_grad():
                for _ in range(self.norm_recalibration_batches):
                    try:
                        batch = next(batches)
                    except StopIteration:
                        batches = iter(engine.state.dataloader)
                        batch = next(batches)
                    with autocast_as(engine.state.device, self.amp_dtype):
                        engine.network(self._images(batch, engine.state.device))
        finally:
            for module, momentum in zip(norms, momenta):
                module.momentum = momentum

    def norms_frozen(self, engine: Any) -> bool:
        """Whether this iteration trains with frozen BatchNorm statistics (epochs are counted from 1)."""
        if not self.freeze_norm_epochs:
            return False
        return engine.state.epoch > engine.state.max_epochs - self.freeze_norm_epochs


def _batch_norms(network: nn.Module) -> list[nn.Module]:
    return [module for module in network.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def _plain_tensor(value: Any) -> torch.Tensor:
    """A batch entry as a plain tensor: MONAI's ``MetaTensor`` (what its loaders collate) would route every
    operation of the forward and backward pass through ``__torch_function__`` (about 15 % of a step)."""
    as_tensor = getattr(value, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else torch.as_tensor(value)
