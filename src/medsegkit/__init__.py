"""medsegkit: segmentation models for medical and biological volumes.

``import medsegkit`` is quick: the public names below are loaded on first use (PEP 562), so the
napari process can import the package without importing torch-side modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medsegkit._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "create_model": "medsegkit.registry",
    "list_models": "medsegkit.registry",
    "model_info": "medsegkit.registry",
    "register_model": "medsegkit.registry",
    "ModelInfo": "medsegkit.registry",
    "WeightsSpec": "medsegkit.registry",
    "Cancelled": "medsegkit.errors",
    "CheckpointError": "medsegkit.errors",
    "MedsegkitError": "medsegkit.errors",
    "ImageReadError": "medsegkit.errors",
    "predict": "medsegkit.inference",
    "segment": "medsegkit.inference",
    "read_image": "medsegkit.io",
    "write_image": "medsegkit.io",
    "Image": "medsegkit.io",
    "evaluate": "medsegkit.metrics",
    "evaluate_cohort": "medsegkit.metrics",
    "stats": "medsegkit.measurements",
    "segment_many": "medsegkit.cohort",
    "show": "medsegkit.viz",
    "view": "medsegkit.viz",
    "convert": "medsegkit.registry",
    "load_checkpoint": "medsegkit.weights",
    "load_model": "medsegkit.registry",
    "save_checkpoint": "medsegkit.weights",
    "export": "medsegkit.exporter",
}
_SUBMODULES = {"nets", "weights", "inference", "io", "postprocess", "metrics", "transforms", "train", "bundle",
               "data", "qc", "interactive"}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from medsegkit.errors import Cancelled, CheckpointError, ImageReadError, MedsegkitError  # noqa: F401
    from medsegkit.registry import ModelInfo, create_model, list_models, model_info, register_model  # noqa: F401


__getattr__, __dir__ = lazy_exports("medsegkit", _LAZY, globals(), submodules=_SUBMODULES)
