"""The model catalogue the Segment widget shows, fetched once per session from a worker process.

``list_models()`` and ``model_info(name)`` import the model families (torch, MONAI, torchvision), which
must never happen in napari's process (see :mod:`medsegkit.worker`), so a spawned worker
answers a ``"describe"`` job and the JSON answer is cached here for the rest of the session.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from medsegkit.napari._worker_client import describe_models

__all__ = ["cached_catalog", "clear_cache", "demo_checkpoint", "fetch_catalog"]

_lock = threading.Lock()
_catalog: dict[str, Any] | None = None


def demo_checkpoint() -> Path | None:
    """The shipped demo checkpoint, or ``None`` when this installation has none."""
    from medsegkit.data import demo_checkpoint_path

    try:
        return demo_checkpoint_path()
    except FileNotFoundError:
        return None


def cached_catalog() -> dict[str, Any] | None:
    """The catalogue if it was fetched already this session, else ``None`` (never blocks)."""
    return _catalog


def fetch_catalog() -> dict[str, Any]:
    """The catalogue: ``{"models": {name: info}, "checkpoints": {path: info}, "devices", "errors"}``.

    Blocks while a worker process imports the registry and describes every model (seconds), the first
    time only; call it from a thread. Thread-safe: concurrent callers wait for one fetch.
    """
    global _catalog
    with _lock:
        if _catalog is None:
            demo = demo_checkpoint()
            _catalog = describe_models([str(demo)] if demo is not None else [])
        return _catalog


def clear_cache() -> None:
    """Forget the catalogue (the next :func:`fetch_catalog` asks a worker again)."""
    global _catalog
    with _lock:
        _catalog = None
