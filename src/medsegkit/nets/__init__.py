"""Network classes, one module per family. Classes load on first use so that importing
``medsegkit.nets`` stays cheap; ``medsegkit.nets.UNet`` is a valid MONAI bundle ``_target_``."""

from __future__ import annotations

from medsegkit._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports("medsegkit.nets", _CLASSES, globals())
