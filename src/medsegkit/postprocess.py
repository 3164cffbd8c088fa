"""Query-model outputs → semantic, instance and panoptic maps.

MaskFormer and Mask2Former return ``{"pred_logits": (N, Q, K+1), "pred_masks": (N, Q, *spatial)}``:
``Q`` queries, each with class logits over ``K`` classes plus "no object" (last column) and one mask
logit map. The functions here turn that into label maps with the same rules, and the same numbers, as
transformers' ``MaskFormerImageProcessor.post_process_semantic_segmentation`` /
``post_process_instance_segmentation`` / ``post_process_panoptic_segmentation`` — but N-d: a 3D model's
``pred_masks`` ``(N, Q, D, H, W)`` is handled by the same code (trilinear instead of bilinear resizing).

Conventions kept from transformers so that results compare exactly:

* :func:`semantic_map` takes the argmax over the ``K`` classes (there is no background class: train
  with background as one of the classes if you want one in the map).
* :func:`instance_map`: background is ``-1``, instance ids count from ``0``; a later query overwrites
  an earlier one where they overlap.
* :func:`panoptic_map`: background is ``0``, segment ids count from ``1``; an image without any segment
  above ``threshold`` gives a map of ``-1`` (as transformers does).

``outputs`` may be our dict or a transformers output object (``class_queries_logits``,
``masks_queries_logits``). :func:`medsegkit.inference.adapters.predict_query` converts the per-window
results to medsegkit's label convention (``0`` = background, objects from ``1``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from medsegkit._values import is_finite_number, is_whole_number

__all__ = [
    "instance_map",
    "linear_interp_mode",
    "panoptic_map",
    "semantic_map",
    "semantic_probabilities",
]

Segments = list[dict[str, Any]]


def linear_interp_mode(spatial_dims: int) -> str:
    """The ``F.interpolate`` mode for linear resizing in ``spatial_dims`` dimensions."""
    modes = {1: "linear", 2: "bilinear", 3: "trilinear"}
    if spatial_dims not in modes:
        raise ValueError(f"masks must have 1, 2 or 3 spatial dims, got {spatial_dims}")
    return modes[spatial_dims]


def _unpack(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred_logits (N, Q, K+1), pred_masks (N, Q, *spatial))`` from our dict or a transformers output."""
    if isinstance(outputs, Mapping) and "pred_logits" in outputs and "pred_masks" in outputs:
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    elif hasattr(outputs, "class_queries_logits") and hasattr(outputs, "masks_queries_logits"):
        logits, masks = outputs.class_queries_logits, outputs.masks_queries_logits
    else:
        given = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise TypeError(
            "outputs must be a query model's dict with 'pred_logits' (N, Q, K+1) and 'pred_masks' "
            f"(N, Q, *spatial), or a transformers output with class_queries_logits/masks_queries_logits; got {given}"
        )
    if not isinstance(logits, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise TypeError(f"pred_logits and pred_masks must be torch tensors, got {type(logits).__name__} and "
                        f"{type(masks).__name__}")
    if not (logits.is_floating_point() and masks.is_floating_point()) or logits.dtype != masks.dtype:
        raise ValueError(f"pred_logits and pred_masks must be logits of one floating dtype, got {logits.dtype} and "
                         f"{masks.dtype}")
    if logits.device != masks.device:
        raise ValueError(f"pred_logits and pred_masks must be on one device, got {logits.device} and {masks.device}")
    if logits.ndim != 3 or masks.ndim not in (4, 5) or logits.shape[:2] != masks.shape[:2]:
        raise ValueError(
            f"pred_logits must be (N, Q, K+1) and pred_masks (N, Q, H, W) or (N, Q, D, H, W) with the same N "
            f"and Q; got {tuple(logits.shape)} and {tuple(masks.shape)}"
        )
    if logits.shape[-1] < 2:
        raise ValueError(f"pred_logits needs at least one class plus 'no object', got {logits.shape[-1]} columns")
    for name, values in (("pred_logits", logits), ("pred_masks", masks)):
        if not bool(torch.isfinite(values).all()):  # softmax / sigmoid of NaN: an empty or all-class-0 map
            raise ValueError(f"{name} contains NaN or Inf values; the maps would be meaningless (check the model)")
    return logits, masks


MAX_TARGET_VOXELS = 2**31 - 1  # a (N, K or Q, *target_size) float32 tensor is made at the target size


def _check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in ``[0, 1]`` (a probability or a fraction), else one ``ValueError`` line."""
    if not (is_finite_number(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_size(target_size: Sequence[int] | None, spatial_dims: int) -> tuple[int, ...] | None:
    if target_size is None:
        return None
    given = tuple(target_size) if isinstance(target_size, Sequence) and not isinstance(target_size, str) else ()
    if len(given) != spatial_dims or not all(is_whole_number(s) and s >= 1 for s in given):
        raise ValueError(
            f"target_size must give {spatial_dims} positive sizes (one per spatial dim of pred_masks), got {target_size!r}"
        )
    size = tuple(int(s) for s in given)
    if math.prod(size) > MAX_TARGET_VOXELS:
        raise ValueError(f"target_size {size} is {math.prod(size):,} voxels; at most {MAX_TARGET_VOXELS:,} (2**31 - 1)")
    return size


def semantic_probabilities(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Per-class scores ``softmax(class)[..., :-1] · sigmoid(mask)``, summed over queries.

    Args:
        pred_logits: ``(N, Q, K+1)`` class logits, last column "no object".
        pred_masks: ``(N, Q, *spatial)`` mask logits.

    Returns:
        ``(N, K, *spatial)`` scores in ``[0, Q]`` (not normalised; their argmax is the semantic map).
    """
    classes = pred_logits.softmax(dim=-1)[..., :-1]
    probs = pred_masks.sigmoid()
    # flattening the spatial dims makes this the same batched matmul as transformers' "bqc, bqhw -> bchw"
    scores = torch.einsum("bqc, bqs -> bcs", classes, probs.flatten(2))
    return scores.reshape(*scores.shape[:2], *pred_masks.shape[2:])


def semantic_map(outputs: Any, target_size: Sequence[int] | None = None) -> torch.Tensor:
    """Semantic label map: argmax over classes of :func:`semantic_probabilities`.

    Args:
        outputs: ``{"pred_logits": (N, Q, K+1), "pred_masks": (N, Q, *spatial)}``.
        target_size: output spatial size ``(H, W)`` or ``(D, H, W)``; scores are resized (bi/trilinear,
            ``align_corners=False``) before the argmax. ``None`` keeps the mask size.

    Returns:
        ``(N, *spatial)`` int64 class indices in ``[0, K)``.
    """
    logits, masks = _unpack(outputs)
    size = _check_size(target_size, masks.ndim - 2)
    scores = semantic_probabilities(logits, masks)
    if size is not None:
        scores = F.interpolate(scores, size=size, mode=linear_interp_mode(len(size)), align_corners=False)
    return scores.argmax(dim=1)


def _logit(p: float) -> float:
    if not (is_finite_number(p) and 0.0 < p < 1.0):
        raise ValueError(f"mask_threshold must lie strictly between 0 and 1, got {p!r}")
    return math.log(p / (1.0 - p))


def instance_map(
    outputs: Any,
    *,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    target_size: Sequence[int] | None = None,
) -> list[tuple[torch.Tensor, Segments]]:
    """Instance maps, one per batch item, as transformers' ``post_process_instance_segmentation``.

    The ``Q`` best (query, class) pairs by class probability are kept; each pair's mask is
    ``sigmoid(mask) > mask_threshold`` and its score is class probability × mean mask probability
    inside the mask. Pairs with an empty mask or ``score < threshold`` are dropped; the others are
    painted in order, later ones over earlier ones.

    Args:
        outputs: ``{"pred_logits": (N, Q, K+1), "pred_masks": (N, Q, *spatial)}``.
        threshold: minimum instance score.
        mask_threshold: mask probability threshold (0.5 is transformers' ``mask > 0``; it has no such
            argument for instances).
        target_size: output spatial size; binary masks are resized with ``nearest``.

    Returns:
        A list of ``(segmentation, segments_info)``: ``segmentation`` ``(*spatial)`` int32 with ``-1``
        for background and instance ids ``0, 1, ...``; ``segments_info`` one dict per instance
        ``{"id", "label_id", "was_fused" (False), "score" (rounded to 6 digits)}``.
    """
    logits, masks = _unpack(outputs)
    size = _check_size(target_size, masks.ndim - 2)
    cut = _logit(mask_threshold)
    threshold = _check_fraction("threshold", threshold)
    num_queries, num_classes = logits.shape[1], logits.shape[2] - 1
    labels = torch.arange(num_classes, device=logits.device).repeat(num_queries)
    results = []
    for item_logits, item_masks in zip(logits, masks):
        scores = item_logits.softmax(dim=-1)[:, :-1]
        top_scores, top_indices = scores.flatten().topk(num_queries, sorted=False)
        top_labels = labels[top_indices]
        mask_logits = item_masks[torch.div(top_indices, num_classes, rounding_mode="floor")]
        binary = (mask_logits > cut).float()
        mask_scores = (mask_logits.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        pred_scores = top_scores * mask_scores
        if size is not None and size != tuple(binary.shape[1:]):  # (same size: nearest is the identity)
            binary = F.interpolate(binary.unsqueeze(0), size=size, mode="nearest")[0]
        segmentation = torch.full(binary.shape[1:], -1, dtype=torch.int32, device=binary.device)
        segments: Segments = []
        for j in range(num_queries):
            score = pred_scores[j].item()
            mask = binary[j] == 1
            if score >= threshold and bool(mask.any()):
                segmentation[mask] = len(segments)
                segments.append(
                    {"id": len(segments), "label_id": int(top_labels[j]), "was_fused": False, "score": round(score, 6)}
                )
        results.append((segmentation, segments))
    return results


def panoptic_map(
    outputs: Any,
    *,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Iterable[int] | None = None,
    target_size: Sequence[int] | None = None,
) -> list[tuple[torch.Tensor, Segments]]:
    """Panoptic maps, one per batch item, as transformers' ``post_process_panoptic_segmentation``.

    Queries predicting "no object" or with class probability ``<= threshold`` are dropped. Each pixel
    goes to the query with the largest ``class probability × mask probability``; a query keeps its
    segment if it wins some pixels, has some ``score-weighted probability >= mask_threshold`` and the
    pixels it wins are more than ``overlap_mask_area_threshold`` of the latter. Classes in
    ``label_ids_to_fuse`` ("stuff") get one segment id per class.

    Args:
        outputs: ``{"pred_logits": (N, Q, K+1), "pred_masks": (N, Q, *spatial)}``.
        threshold: minimum class probability of a query.
        mask_threshold: threshold on the score-weighted mask probability.
        overlap_mask_area_threshold: minimum fraction of its own mask a query must win.
        label_ids_to_fuse: class ids whose segments are fused into one.
        target_size: output spatial size; mask probabilities are resized bi/trilinearly.

    Returns:
        A list of ``(segmentation, segments_info)``: ``segmentation`` ``(*spatial)`` int32, ``0`` for
        unassigned pixels and segment ids from ``1`` (all ``-1`` when no query passes ``threshold``);
        ``segments_info`` one dict per kept query ``{"id", "label_id", "was_fused", "score"}`` (fused
        classes list one entry per query, sharing the id).

    Equal to transformers' result except for one case: after a fused segment transformers numbers the
    next new segment from the fused segment's id, which can give two segments the same id; here ids
    are always distinct (the same as transformers' whenever it does not collide).
    """
    logits, masks = _unpack(outputs)
    size = _check_size(target_size, masks.ndim - 2)
    threshold = _check_fraction("threshold", threshold)
    mask_threshold = _check_fraction("mask_threshold", mask_threshold)
    overlap_mask_area_threshold = _check_fraction("overlap_mask_area_threshold", overlap_mask_area_threshold)
    fuse_ids = () if label_ids_to_fuse is None else label_ids_to_fuse
    if isinstance(fuse_ids, (str, bytes)) or not isinstance(fuse_ids, Iterable) or not all(is_whole_number(i) for i in fuse_ids):
        # a string "12" was taken as classes 1 and 2, 1.7 as class 1
        raise ValueError(f"label_ids_to_fuse must be class ids (ints), got {label_ids_to_fuse!r}")
    fuse = {int(i) for i in fuse_ids}
    num_classes = logits.shape[-1] - 1
    probs = masks.sigmoid()
    scores, labels = logits.softmax(dim=-1).max(-1)
    results = []
    for item_probs, item_scores, item_labels in zip(probs, scores, labels):
        keep = item_labels.ne(num_classes) & (item_scores > threshold)
        item_probs, item_scores, item_labels = item_probs[keep], item_scores[keep], item_labels[keep]
        out_size = size if size is not None else tuple(item_probs.shape[1:])
        if item_probs.shape[0] == 0:
            results.append((torch.full(out_size, -1, dtype=torch.int32, device=item_probs.device), []))
            continue
        if size is not None:
            item_probs = F.interpolate(
                item_probs.unsqueeze(0), size=size, mode=linear_interp_mode(len(size)), align_corners=False
            )[0]
        weighted = item_probs * item_scores.view(-1, *([1] * (item_probs.ndim - 1)))
        owner = weighted.argmax(0)
        segmentation = torch.zeros(out_size, dtype=torch.int32, device=item_probs.device)
        segments: Segments = []
        stuff_ids: dict[int, int] = {}
        next_id = 1
        for k in range(item_labels.shape[0]):
            label = int(item_labels[k])
            won = owner == k
            won_area = won.sum()
            own_area = (weighted[k] >= mask_threshold).sum()
            if not (won_area > 0 and own_area > 0 and (won_area / own_area).item() > overlap_mask_area_threshold):
                continue
            if label in stuff_ids:
                current_id = stuff_ids[label]
            else:
                # transformers continues counting from the fused id here and can hand out an id twice
                current_id, next_id = next_id, next_id + 1
            segmentation[won] = current_id
            segments.append(
                {"id": current_id, "label_id": label, "was_fused": label in fuse, "score": round(item_scores[k].item(), 6)}
            )
            if label in fuse:
                stuff_ids[label] = current_id
        results.append((segmentation, segments))
    return results
