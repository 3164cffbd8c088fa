"""Which share of the work this process does: its rank among ``torchrun``'s processes, and :func:`shard`.

Torch-free and at the bottom of the package, so that inference (folder and cohort runs) and training
(:mod:`medsegkit.train.distributed`) shard their work the same way without depending on each other.
A process group can only be initialised once ``torch.distributed`` was imported, so this module asks
it only then (and never imports torch itself).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["process_rank", "shard"]

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process.

    From the ``torch.distributed`` process group when one is initialised, else from torchrun's ``RANK`` /
    ``WORLD_SIZE`` environment variables, else ``(0, 1)`` (a plain single process).
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """Items ``rank, rank + world_size, ...`` of ``items`` (every item on exactly one rank).

    ``rank`` / ``world_size`` default to :func:`process_rank` (both are read when either is missing).

    Raises:
        ValueError: ``rank`` is outside ``0 .. world_size - 1``.
    """
    if rank is None or world_size is None:
        rank, world_size = process_rank()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(items[rank::world_size])
