"""Training: one engine for every family (MONAI ``SupervisedTrainer``), objectives and data helpers (``medsegkit train`` is the command-line front end).

Names are loaded on first use so ``import medsegkit.train`` stays quick.
"""

from __future__ import annotations

from medsegkit._lazy import lazy_exports

_LAZY = {
    "TrainConfig": "medsegkit.train.engine",
    "TrainResult": "medsegkit.train.engine",
    "train": "medsegkit.train.engine",
    "validate": "medsegkit.train.engine",
    "recipe_preprocessing": "medsegkit.train.engine",
    "state_path_for": "medsegkit.train.engine",
    "objective_for": "medsegkit.train.objectives",
    "LabelledVolume": "medsegkit.train.data",
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
