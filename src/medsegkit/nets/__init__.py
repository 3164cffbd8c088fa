"""Network classes, one module per family. Classes load on first use so that importing
``medsegkit.nets`` stays cheap; ``medsegkit.nets.UNet`` is a valid MONAI bundle ``_target_``."""

from __future__ import annotations

import importlib
from typing import Any

# class name -> module that defines it
_CLASSES = {
    "UNet": "medsegkit.nets.unet",
    "ResUNet": "medsegkit.nets.unet",
    "AttentionUNet": "medsegkit.nets.unet",
    "FCN": "medsegkit.nets.fcn",
    "MaskRCNN": "medsegkit.nets.mask_rcnn",
    "MaskFormer": "medsegkit.nets.maskformer",
    "Mask2Former": "medsegkit.nets.mask2former",
    "SemanticAdapter": "medsegkit.inference.adapters",
}

__all__ = sorted(_CLASSES)


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        value = getattr(importlib.import_module(_CLASSES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medsegkit.nets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CLASSES))
