"""What each model family learns from a batch of patches: its targets and its loss.

:func:`objective_for` picks one for a model; the training engine calls it on every micro-batch::

    loss = objective(network, images, labels)      # images (N, C, *spatial), labels (N, 1, *spatial) int64

* semantic models (U-Net family, FCN): MONAI ``DiceCELoss`` on the logits, wrapped in
  ``DeepSupervisionLoss`` when the model returns ``{"out": ..., "aux": [...]}`` in training;
* query models (MaskFormer / Mask2Former): one target mask per class present in the patch (background
  included, it is a class of a semantic task) and the :class:`~medsegkit.train.set_criterion.SetCriterion`
  of the family (full masks + focal loss for MaskFormer, sampled points + BCE for Mask2Former);
* Mask R-CNN: instances are the connected components of each foreground class of the label patch (boxes,
  masks, class), and the loss is the sum of the model's own losses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["DetectionObjective", "QueryObjective", "SemanticObjective", "instance_targets", "objective_for",
           "query_targets"]


def _family(model: nn.Module) -> str:
    task = getattr(model, "medsegkit_task", None) or getattr(getattr(model, "module", None), "medsegkit_task", None)
    if task in ("instance",):
        return "detection"
    if task in ("universal",):
        return "query"
    return "semantic"


class SemanticObjective:
    """DiceCE on logits ``(N, K, *spatial)``; deep-supervision outputs weighted by MONAI's ``"exp"`` mode.

    ``last_output``: with ``keep_output`` set (:class:`~medsegkit.train.step.TrainStep` sets it when a
    train metric reads the logits), the main head's logits of the last call, detached; else ``None``, so
    that one batch of logits is not held past its step.
    """

    family = "semantic"

    def __init__(self, *, class_weights: Sequence[float] | None = None, lambda_dice: float = 1.0,
                 lambda_ce: float = 1.0) -> None:
        from monai.losses import DeepSupervisionLoss, DiceCELoss

        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight, lambda_dice=lambda_dice,
                               lambda_ce=lambda_ce)
        self.deep = DeepSupervisionLoss(self.loss, weight_mode="exp")
        self.keep_output = False
        self.last_output: torch.Tensor | None = None

    def __call__(self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = network(images)
        if isinstance(out, Mapping):
            heads = [out["out"], *out.get("aux", [])]
            self.last_output = heads[0].detach() if self.keep_output else None
            return self.deep([h.float() for h in heads], labels)
        self.last_output = out.detach() if self.keep_output else None
        return self.loss(out.float(), labels)


def query_targets(labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Label patches ``(N, 1, *spatial)`` → one ``{"labels": (M,), "masks": (M, *spatial)}`` per patch:
    a binary mask for each class present (class ``c`` → label ``c``)."""
    targets = []
    for label in labels[:, 0]:
        present = torch.unique(label)
        targets.append({"labels": present.long(), "masks": (label[None] == present.view(-1, *[1] * label.ndim)).float()})
    return targets


class QueryObjective:
    """MaskFormer / Mask2Former on a semantic task: class masks as targets, the family's set criterion."""

    family = "query"

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        from medsegkit.train.set_criterion import SetCriterion

        points = "mask2former" in type(model).__name__.lower()
        self.criterion = SetCriterion(num_classes, num_points=12544 if points else None)

    def __call__(self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        outputs = network(images)
        outputs = {k: ([{kk: vv.float() for kk, vv in a.items()} for a in v] if k == "aux_outputs" else v.float())
                   for k, v in outputs.items()}
        return self.criterion(outputs, query_targets(labels))["loss"]


def instance_targets(labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """2D label patches ``(N, 1, H, W)`` → torchvision detection targets: each connected component of each
    foreground class is one instance (``boxes`` ``(M, 4)`` xyxy in pixels, ``labels`` ``(M,)`` = its class,
    ``masks`` ``(M, H, W)`` uint8)."""
    from scipy import ndimage

    targets = []
    for label in labels[:, 0].cpu().numpy():
        boxes, classes, masks = [], [], []
        for cls in np.unique(label):
            if cls == 0:
                continue
            components, count = ndimage.label(label == cls)
            for index, box in enumerate(ndimage.find_objects(components), start=1):
                if box is None:
                    continue
                rows, cols = box
                boxes.append([cols.start, rows.start, cols.stop, rows.stop])
                classes.append(int(cls))
                masks.append(components == index)
        device = labels.device
        height, width = label.shape
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4),
            "labels": torch.tensor(classes, dtype=torch.int64, device=device),
            "masks": torch.from_numpy(np.asarray(masks, dtype=np.uint8).reshape(-1, height, width)).to(device),
        })
    return targets


class DetectionObjective:
    """Mask R-CNN: instance targets from the label patch, the sum of the model's losses."""

    family = "detection"

    def __call__(self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"Mask R-CNN trains on 2D patches (N, C, H, W); got {tuple(images.shape)}")
        losses = network(images, instance_targets(labels))
        return sum(v.float() for v in losses.values())


def objective_for(model: nn.Module, num_classes: int, *, class_weights: Sequence[float] | None = None,
                  lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> Any:
    """The objective of ``model``'s family (see the module docstring)."""
    family = _family(model)
    if family == "query":
        return QueryObjective(model, num_classes)
    if family == "detection":
        return DetectionObjective()
    return SemanticObjective(class_weights=class_weights, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
