"""Network classes, one module per family. Classes load on first use so that importing
``medsegkit.nets`` stays cheap; ``medsegkit.nets.UNet`` is a valid MONAI bundle ``_target_``."""

from __future__ import annotations

import importlib
from typing import Any

# class name -> module (relative to medsegkit.nets)
_CLASSES = {
    "UNet": "unet",
    "ResUNet": "unet",
    "AttentionUNet": "unet",
    "FCN": "fcn",
    "MaskRCNN": "mask_rcnn",
    "MaskFormer": "maskformer",
    "Mask2Former": "mask2former",
    "SemanticAdapter": "maskformer",
}

__all__ = sorted(_CLASSES)


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        value = getattr(importlib.import_module(f"medsegkit.nets.{_CLASSES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medsegkit.nets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CLASSES))
