"""Pad a batch so that every spatial axis is a multiple of what an encoder–decoder needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pad_to_multiple"]


def pad_to_multiple(
    x: torch.Tensor,
    multiple: int | Sequence[int],
    *,
    mode: str = "constant",
    value: float = 0.0,
    method: str = "end",
) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial axes of ``x`` up to the next multiple of ``multiple`` (the package's one pad-to-multiple).

    Args:
        x: ``(N, C, *spatial)`` (e.g. ``(N, C, D, H, W)``).
        multiple: one int for every axis, or one per spatial axis (``model.size_multiple`` of a U-Net).
        mode: ``torch.nn.functional.pad`` mode (``"constant"``, ``"reflect"``, ``"replicate"``).
        value: fill value for ``mode="constant"``.
        method: ``"end"`` pads after the data; ``"symmetric"`` splits the padding, the smaller half
            before (MONAI's ``DivisiblePad`` methods).

    Returns:
        ``(padded, crop)``: the padded tensor, and the index that undoes the padding on any tensor with
        the same spatial grid, e.g. the network output: ``model(padded)[crop]`` is ``(N, K, *spatial)``.

    Example::

        padded, crop = pad_to_multiple(image, model.size_multiple)
        logits = model(padded)[crop]
    """
    spatial = tuple(x.shape[2:])
    if x.dim() < 3:
        raise ValueError(f"x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    if isinstance(multiple, int):
        multiples = (multiple,) * len(spatial)
    else:
        multiples = tuple(int(m) for m in multiple)
    if len(multiples) != len(spatial):
        raise ValueError(f"multiple has {len(multiples)} values but x has {len(spatial)} spatial axes")
    if any(m < 1 for m in multiples):
        raise ValueError(f"multiple must be positive, got {multiples}")
    if method not in ("end", "symmetric"):
        raise ValueError(f"method must be 'end' or 'symmetric', got {method!r}")
    extra = [(-size) % m for size, m in zip(spatial, multiples)]
    before = [amount // 2 if method == "symmetric" else 0 for amount in extra]
    crop = (slice(None), slice(None), *(slice(b, b + size) for b, size in zip(before, spatial)))
    if not any(extra):
        return x, crop
    # F.pad lists the last axis first: (last_before, last_after, ..., first_before, first_after)
    pad: list[int] = []
    for amount, start in zip(reversed(extra), reversed(before)):
        pad += [start, amount - start]
    padded = F.pad(x, pad, mode=mode, value=value) if mode == "constant" else F.pad(x, pad, mode=mode)
    return padded, crop
