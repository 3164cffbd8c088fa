"""Training: loops, losses and data helpers (``medsegkit train`` is the command-line front end).

Names are loaded on first use so ``import medsegkit.train`` stays quick.
"""

from __future__ import annotations

from medsegkit._lazy import lazy_exports

_LAZY = {
    "TrainConfig": "medsegkit.train.loop",
    "TrainResult": "medsegkit.train.loop",
    "train": "medsegkit.train.loop",
    "validate": "medsegkit.train.loop",
    "predict_volume": "medsegkit.train.loop",
    "state_path_for": "medsegkit.train.loop",
    "LabelledVolume": "medsegkit.train.data",
    "PatchSampler": "medsegkit.train.data",
    "load_labelled_volume": "medsegkit.train.data",
    "sample_tissue_data": "medsegkit.train.data",
    "split_axial": "medsegkit.train.data",
    "nearest_class_mean_baseline": "medsegkit.train.baseline",
    "HungarianMatcher": "medsegkit.train.set_criterion",
    "SetCriterion": "medsegkit.train.set_criterion",
    "sample_points": "medsegkit.train.set_criterion",
    "DistributedContext": "medsegkit.train.distributed",
    "setup_distributed": "medsegkit.train.distributed",
    "cleanup_distributed": "medsegkit.train.distributed",
    "end_worker_process": "medsegkit.train.distributed",
    "is_main_process": "medsegkit.train.distributed",
    "barrier": "medsegkit.train.distributed",
    "wrap_model": "medsegkit.train.distributed",
    "shard": "medsegkit.train.distributed",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports("medsegkit.train", _LAZY, globals())
