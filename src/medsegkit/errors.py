"""Error types users catch. Each message says what was given, what is accepted and how to fix it."""

from __future__ import annotations

__all__ = ["Cancelled", "CheckpointError", "ImageReadError", "MedsegkitError"]


class MedsegkitError(Exception):
    """Base class of medsegkit's own errors."""


class Cancelled(MedsegkitError):
    """Raised when a run is stopped through its ``cancel`` event; no partial result is kept."""


class CheckpointError(MedsegkitError, ValueError):
    """A checkpoint is unreadable, unsafe (pickled code), or made for another architecture."""


class ImageReadError(MedsegkitError, ValueError):
    """An image file or DICOM series cannot be read: truncated or corrupt data, a damaged or impossible
    header (sizes the file cannot hold, zero / negative / non-finite spacing, a singular or non-finite
    orientation, an unknown voxel type) or an inconsistent DICOM series. The message is one line: the
    path, what was wrong, and what is accepted."""
