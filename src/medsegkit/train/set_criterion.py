"""Hungarian matching and the set criterion of MaskFormer / Mask2Former (DETR-style training), N-d.

A query model predicts ``Q`` (class, mask) pairs; a target image holds ``M`` objects (``M <= Q``).
:class:`HungarianMatcher` assigns each object one query by minimising class + mask + dice costs
(``scipy.optimize.linear_sum_assignment``); :class:`SetCriterion` then computes

* ``loss_cross_entropy``: class cross-entropy over all queries, unmatched ones towards "no object"
  (that class weighted by ``eos_coef``);
* ``loss_mask`` (sigmoid focal loss as MaskFormer, or binary cross-entropy as Mask2Former) and
  ``loss_dice`` on the matched masks, either on full masks (predictions resized to the target size,
  MaskFormer) or on ``num_points`` sampled points (Mask2Former: importance sampling of uncertain points,
  ``grid_sample`` in 2D or 3D);
* the same for every entry of ``outputs["aux_outputs"]`` (suffix ``_0``, ``_1``, ...),

and ``loss``, their sum weighted by ``weight_dict``. The numbers equal transformers' ``MaskFormerLoss``
(``mask_loss="focal"``, full masks) and ``Mask2FormerLoss`` (``mask_loss="bce"``, points; under the
same random seed, because the sampled points come from ``torch.rand`` in the same order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HungarianMatcher", "SetCriterion", "sample_points"]

MASK_LOSSES = ("focal", "bce")
LOSSES = ("labels", "masks")


def sample_points(inputs: Tensor, coords: Tensor) -> Tensor:
    """Values of ``inputs`` at normalised point coordinates (bi/trilinear, ``align_corners=False``).

    Args:
        inputs: ``(B, C, *spatial)`` with 2 or 3 spatial dims.
        coords: ``(B, P, d)`` coordinates in ``[0, 1]``, ``d = len(spatial)``, ordered as
            ``grid_sample`` reads them (x = last axis first).

    Returns:
        ``(B, C, P)``.
    """
    dims = inputs.ndim - 2
    if coords.shape[-1] != dims:
        raise ValueError(f"coords must have {dims} coordinates per point for {dims}D inputs, got {coords.shape[-1]}")
    grid = (2.0 * coords - 1.0).reshape(coords.shape[0], coords.shape[1], *([1] * (dims - 1)), dims)
    values = F.grid_sample(inputs, grid, align_corners=False)
    return values.reshape(*values.shape[:3])


def _pairwise_dice(inputs: Tensor, labels: Tensor) -> Tensor:
    """``(Q, P)`` logits × ``(M, P)`` binary labels → ``(Q, M)`` dice costs."""
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * torch.matmul(inputs, labels.T)
    denominator = inputs.sum(-1)[:, None] + labels.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def _pairwise_bce(inputs: Tensor, labels: Tensor) -> Tensor:
    """``(Q, P)`` × ``(M, P)`` → ``(Q, M)`` mean binary cross-entropy."""
    count = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return torch.matmul(pos / count, labels.T) + torch.matmul(neg / count, (1 - labels).T)


def _pairwise_focal(inputs: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """``(Q, P)`` × ``(M, P)`` → ``(Q, M)`` mean sigmoid focal loss."""
    count = inputs.shape[1]
    prob = inputs.sigmoid()
    focal_pos = ((1 - prob) ** gamma) * F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    focal_pos *= alpha
    focal_neg = (prob**gamma) * F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    focal_neg *= 1 - alpha
    loss = torch.matmul(focal_pos, labels.T) + torch.matmul(focal_neg, (1 - labels).T)
    return loss / count


def _dice_loss(inputs: Tensor, labels: Tensor, num_masks: Tensor) -> Tensor:
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def _bce_loss(inputs: Tensor, labels: Tensor, num_masks: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(inputs, labels, reduction="none").mean(1).sum() / num_masks


def _focal_loss(inputs: Tensor, labels: Tensor, num_masks: Tensor, alpha: float, gamma: float) -> Tensor:
    probs = inputs.sigmoid()
    loss = F.binary_cross_entropy_with_logits(inputs, labels, reduction="none")
    p_t = probs * labels + (1 - probs) * (1 - labels)
    loss = loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * labels + (1 - alpha) * (1 - labels)) * loss
    return loss.mean(1).sum() / num_masks


def _check_mask_loss(mask_loss: str) -> str:
    if mask_loss not in MASK_LOSSES:
        raise ValueError(f"mask_loss must be 'focal' (MaskFormer) or 'bce' (Mask2Former), got {mask_loss!r}")
    return mask_loss


def _check_outputs(outputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    if not isinstance(outputs, Mapping) or "pred_logits" not in outputs or "pred_masks" not in outputs:
        raise TypeError(
            "outputs must be a query model's dict {'pred_logits': (N, Q, K+1), 'pred_masks': (N, Q, *spatial)}, "
            f"got {sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__}"
        )
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    if logits.ndim != 3 or masks.ndim not in (4, 5) or logits.shape[:2] != masks.shape[:2]:
        raise ValueError(
            f"pred_logits must be (N, Q, K+1) and pred_masks (N, Q, H, W) or (N, Q, D, H, W) with the same N and Q; "
            f"got {tuple(logits.shape)} and {tuple(masks.shape)}"
        )
    return logits, masks


def _check_targets(targets: Sequence[Mapping[str, Tensor]], batch: int, spatial_dims: int, num_classes: int) -> None:
    if not isinstance(targets, Sequence) or len(targets) != batch:
        raise ValueError(
            f"targets must be a list of {batch} dicts (one per image) with 'labels' (M,) and 'masks' (M, *spatial), "
            f"got {type(targets).__name__} of length {len(targets) if isinstance(targets, Sequence) else '?'}"
        )
    for i, target in enumerate(targets):
        if not isinstance(target, Mapping) or "labels" not in target or "masks" not in target:
            raise ValueError(f"targets[{i}] must be a dict with 'labels' (M,) and 'masks' (M, *spatial)")
        labels, masks = target["labels"], target["masks"]
        if labels.ndim != 1 or masks.ndim != spatial_dims + 1 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"targets[{i}]: 'labels' must be (M,) and 'masks' (M, *spatial) with {spatial_dims} spatial dims; "
                f"got {tuple(labels.shape)} and {tuple(masks.shape)}"
            )
        if labels.is_floating_point() or (labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes):
            raise ValueError(
                f"targets[{i}]['labels'] must be integer class ids in [0, {num_classes}), got {labels.tolist()}"
            )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of target objects to queries (transformers' / DETR's matcher).

    The cost of giving object ``m`` to query ``q`` is
    ``cost_mask · mask_cost(q, m) + cost_class · (−p_q(class_m)) + cost_dice · dice(q, m)``.

    Args:
        cost_class: weight of the class cost.
        cost_mask: weight of the mask cost (focal or binary cross-entropy, see ``mask_loss``).
        cost_dice: weight of the dice cost.
        num_points: ``None``: full masks, targets resized (nearest) to the prediction size
            (MaskFormer); an int: both sampled at that many uniformly random points (Mask2Former).
        mask_loss: ``"focal"`` or ``"bce"``; ``None`` picks MaskFormer's focal cost for full masks
            and Mask2Former's BCE for points.
        focal_alpha, focal_gamma: focal-loss parameters.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int | None = None,
        *,
        mask_loss: str | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("cost_class, cost_mask and cost_dice are all 0; at least one must be positive")
        if num_points is not None and (not isinstance(num_points, int) or num_points < 1):
            raise ValueError(f"num_points must be None (full masks) or a positive int, got {num_points!r}")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points
        self.mask_loss = _check_mask_loss(mask_loss or ("focal" if num_points is None else "bce"))
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match.

        Args:
            outputs: ``{"pred_logits": (N, Q, K+1), "pred_masks": (N, Q, *spatial)}``.
            targets: ``N`` dicts ``{"labels": (M,) int64, "masks": (M, *spatial_t)}`` (any target size).

        Returns:
            ``N`` pairs ``(query_indices, target_indices)``, int64 tensors of length ``min(Q, M)``.
        """
        logits, masks = _check_outputs(outputs)
        indices = []
        for item_logits, item_masks, target in zip(logits, masks, targets):
            # late import: scipy is a dependency, but keep it off the import path of medsegkit.train
            from scipy.optimize import linear_sum_assignment

            labels = target["labels"].to(item_logits.device)
            target_masks = target["masks"].to(item_masks)
            cost_class = -item_logits.softmax(-1)[:, labels]
            if self.num_points is None:
                target_masks = F.interpolate(target_masks[:, None], size=item_masks.shape[1:], mode="nearest")[:, 0]
                pred_flat, target_flat = item_masks.flatten(1), target_masks.flatten(1)
            else:
                coords = torch.rand(1, self.num_points, item_masks.ndim - 1, device=item_masks.device)
                target_flat = sample_points(target_masks[:, None], coords.repeat(target_masks.shape[0], 1, 1))[:, 0]
                pred_flat = sample_points(item_masks[:, None], coords.repeat(item_masks.shape[0], 1, 1))[:, 0]
            if self.mask_loss == "focal":
                cost_mask = _pairwise_focal(pred_flat, target_flat, self.focal_alpha, self.focal_gamma)
            else:
                cost_mask = _pairwise_bce(pred_flat, target_flat)
            cost_dice = _pairwise_dice(pred_flat, target_flat)
            cost = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            # NaN / inf costs are assigned only when nothing else is left (as transformers does)
            big = torch.finfo(cost.dtype).max
            cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
            rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
            f"num_points={self.num_points}, mask_loss={self.mask_loss!r}"
        )


class SetCriterion(nn.Module):
    """MaskFormer / Mask2Former training loss for a query model's outputs.

    Args:
        num_classes: ``K``, the number of classes (``pred_logits`` has ``K + 1`` columns).
        matcher: a :class:`HungarianMatcher`; default: one with costs ``weight_dict``'s weights and this
            criterion's ``num_points`` and ``mask_loss``.
        eos_coef: cross-entropy weight of the "no object" class.
        weight_dict: weights of ``loss_cross_entropy``, ``loss_mask``, ``loss_dice`` in ``loss`` (also
            applied to the auxiliary ``loss_*_i``); default Mask2Former's ``{2.0, 5.0, 5.0}``.
        losses: which losses to compute: ``"labels"`` (class CE) and / or ``"masks"`` (mask + dice).
        num_points: ``None``: mask losses on full masks, predictions resized bi/trilinearly to the
            target size (MaskFormer); an int: on that many points per mask (Mask2Former: 12544), chosen
            by importance sampling.
        oversample_ratio: points drawn per kept point before picking the most uncertain ones.
        importance_sample_ratio: fraction of kept points that are the most uncertain; the rest are
            uniformly random.
        mask_loss: ``"focal"`` (MaskFormer) or ``"bce"`` (Mask2Former); ``None``: focal for full
            masks, BCE for points.
        focal_alpha, focal_gamma: focal-loss parameters.

    ``forward(outputs, targets)`` takes ``outputs = {"pred_logits": (N, Q, K+1), "pred_masks": (N, Q,
    *spatial)[, "aux_outputs": [...]]}`` and ``targets``, ``N`` dicts ``{"labels": (M,) int64 in
    [0, K), "masks": (M, *spatial_t)}`` (binary; target sizes may differ, they are zero-padded to the
    largest), and returns a dict of scalar losses with ``"loss"``, the weighted total, to backpropagate.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        matcher: HungarianMatcher | None = None,
        eos_coef: float = 0.1,
        weight_dict: Mapping[str, float] | None = None,
        losses: Sequence[str] = LOSSES,
        num_points: int | None = None,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        mask_loss: str | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        unknown = [name for name in losses if name not in LOSSES]
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {tuple(losses)}")
        weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
        if weight_dict is not None:
            extra = set(weight_dict) - set(weights)
            if extra:
                raise ValueError(f"weight_dict keys must be among {sorted(weights)}, got unknown {sorted(extra)}")
            weights.update(weight_dict)
        if num_points is not None and (not isinstance(num_points, int) or num_points < 1):
            raise ValueError(f"num_points must be None (full masks) or a positive int, got {num_points!r}")
        if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ValueError(
                f"oversample_ratio must be >= 1 and importance_sample_ratio in [0, 1], got {oversample_ratio} "
                f"and {importance_sample_ratio}"
            )
        self.num_classes = num_classes
        self.eos_coef = eos_coef
        self.weight_dict = weights
        self.losses = tuple(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_loss = _check_mask_loss(mask_loss or ("focal" if num_points is None else "bce"))
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.matcher = matcher or HungarianMatcher(
            cost_class=weights["loss_cross_entropy"],
            cost_mask=weights["loss_mask"],
            cost_dice=weights["loss_dice"],
            num_points=num_points,
            mask_loss=self.mask_loss,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
        )
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # ------------------------------------------------------------------------------------------
    def loss_labels(self, logits: Tensor, targets: Sequence[Mapping[str, Tensor]], indices: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Class cross-entropy over all ``(N, Q)`` queries; unmatched queries target "no object"."""
        batch, queries, columns = logits.shape
        if columns != self.num_classes + 1:
            raise ValueError(
                f"pred_logits has {columns} columns but this criterion has num_classes={self.num_classes} "
                f"(expects num_classes + 1 = {self.num_classes + 1})"
            )
        batch_idx, query_idx = self._query_indices(indices)
        matched = torch.cat([t["labels"][j].to(logits.device) for t, (_, j) in zip(targets, indices)])
        classes = torch.full((batch, queries), self.num_classes, dtype=torch.int64, device=logits.device)
        classes[batch_idx, query_idx] = matched.long()
        return F.cross_entropy(logits.transpose(1, 2), classes, weight=self.empty_weight.to(logits.dtype))

    def loss_masks(
        self, masks: Tensor, targets: Sequence[Mapping[str, Tensor]], indices: list[tuple[Tensor, Tensor]], num_masks: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(loss_mask, loss_dice)`` of the matched masks."""
        batch_idx, query_idx = self._query_indices(indices)
        if query_idx.numel() == 0:  # no objects in the batch: zero, but still part of the graph
            zero = masks.sum() * 0.0
            return zero, zero
        pred = masks[batch_idx, query_idx][:, None]  # (R, 1, *spatial)
        target = self._padded_targets(targets, masks)
        target = target[batch_idx, torch.cat([j for _, j in indices]).to(masks.device)][:, None]
        if self.num_points is None:
            mode = {2: "bilinear", 3: "trilinear"}[pred.ndim - 2]
            pred_flat = F.interpolate(pred, size=target.shape[2:], mode=mode, align_corners=False)[:, 0].flatten(1)
            target_flat = target.flatten(1)
        else:
            with torch.no_grad():
                coords = self._importance_points(pred)
                target_flat = sample_points(target, coords)[:, 0]
            pred_flat = sample_points(pred, coords)[:, 0]
        if self.mask_loss == "focal":
            loss_mask = _focal_loss(pred_flat, target_flat, num_masks, self.focal_alpha, self.focal_gamma)
        else:
            loss_mask = _bce_loss(pred_flat, target_flat, num_masks)
        return loss_mask, _dice_loss(pred_flat, target_flat, num_masks)

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Losses of the final prediction and of every ``aux_outputs`` entry; ``"loss"`` is their weighted sum."""
        logits, masks = _check_outputs(outputs)
        _check_targets(targets, logits.shape[0], masks.ndim - 2, self.num_classes)
        num_masks = self._num_masks(targets, logits.device)
        losses = self._losses(logits, masks, targets, num_masks)
        aux = outputs.get("aux_outputs") or []
        for i, aux_outputs in enumerate(aux):
            aux_logits, aux_masks = _check_outputs(aux_outputs)
            losses.update({f"{k}_{i}": v for k, v in self._losses(aux_logits, aux_masks, targets, num_masks).items()})
        total = 0.0
        for key, value in losses.items():
            base = key.rsplit("_", 1)[0] if key[-1].isdigit() else key  # loss_mask_3 -> loss_mask
            total = total + self.weight_dict[base] * value
        losses["loss"] = total
        return losses

    # ------------------------------------------------------------------------------------------
    def _losses(self, logits: Tensor, masks: Tensor, targets: Sequence[Mapping[str, Tensor]], num_masks: Tensor) -> dict[str, Tensor]:
        indices = self.matcher({"pred_logits": logits, "pred_masks": masks}, targets)
        losses = {}
        if "masks" in self.losses:
            losses["loss_mask"], losses["loss_dice"] = self.loss_masks(masks, targets, indices, num_masks)
        if "labels" in self.losses:
            losses["loss_cross_entropy"] = self.loss_labels(logits, targets, indices)
        return losses

    @staticmethod
    def _query_indices(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch_idx, torch.cat([src for src, _ in indices])

    @staticmethod
    def _padded_targets(targets: Sequence[Mapping[str, Tensor]], like: Tensor) -> Tensor:
        """``(N, M_max, *max_spatial)`` target masks, zero-padded after each axis."""
        shapes = [tuple(t["masks"].shape) for t in targets]
        size = [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
        padded = torch.zeros((len(targets), *size), dtype=like.dtype, device=like.device)
        for out, target in zip(padded, targets):
            out[tuple(slice(0, s) for s in target["masks"].shape)] = target["masks"].to(like)
        return padded

    def _importance_points(self, logits: Tensor) -> Tensor:
        """``(R, P, d)`` point coordinates: the most uncertain (|logit| smallest) of
        ``oversample_ratio × P`` random points, plus uniformly random ones."""
        count, dims = logits.shape[0], logits.ndim - 2
        drawn = int(self.num_points * self.oversample_ratio)
        coords = torch.rand(count, drawn, dims, device=logits.device)
        uncertainty = -sample_points(logits, coords).abs()
        uncertain = int(self.importance_sample_ratio * self.num_points)
        random = self.num_points - uncertain
        idx = torch.topk(uncertainty[:, 0, :], k=uncertain, dim=1)[1]
        idx += drawn * torch.arange(count, dtype=torch.long, device=logits.device)[:, None]
        coords = coords.view(-1, dims)[idx.view(-1), :].view(count, uncertain, dims)
        if random > 0:
            coords = torch.cat([coords, torch.rand(count, random, dims, device=logits.device)], dim=1)
        return coords

    @staticmethod
    def _num_masks(targets: Sequence[Mapping[str, Tensor]], device: torch.device) -> Tensor:
        """Average number of target masks per process (all-reduced under torch.distributed), at least 1."""
        num = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num)
            world = torch.distributed.get_world_size()
        return torch.clamp(num / world, min=1)
