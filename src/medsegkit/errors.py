"""Error types users catch. Each message says what was given, what is accepted and how to fix it."""

from __future__ import annotations

__all__ = ["Cancelled", "CheckpointError", "MedsegkitError"]


class MedsegkitError(Exception):
    """Base class of medsegkit's own errors."""


class Cancelled(MedsegkitError):
    """Raised when a run is stopped through its ``cancel`` event; no partial result is kept."""


class CheckpointError(MedsegkitError, ValueError):
    """A checkpoint is unreadable, unsafe (pickled code), or made for another architecture."""
