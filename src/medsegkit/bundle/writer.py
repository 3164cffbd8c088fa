"""Write a MONAI bundle for a registry model.

The bundle follows MONAI's model-zoo layout and runs with MONAI's own tools, unchanged::

    DIR/
      configs/metadata.json        network_data_format (inputs/outputs), versions, changelog
      configs/inference.json       LoadImage -> RAS -> spacing -> intensity -> sliding window -> Invertd -> SaveImaged
      configs/train.json           SupervisedTrainer (DiceCE, foreground-biased crops) + validation
      configs/evaluate.json        SupervisedEvaluator with per-class Dice on labelled data
      configs/multi_gpu_train.json torchrun overrides: DistributedSampler, DDP (gloo on CPU, nccl on GPU)
      configs/logging.conf
      docs/README.md  LICENSE  models/

``network_def`` names our class (``medsegkit.nets.UNet`` etc.) with the model's full constructor
arguments; query models are wrapped in :class:`medsegkit.inference.adapters.SemanticAdapter` so the
network returns a logits-like tensor as MONAI's tools expect. Every default points at the bundled
sample data (MNI152 2 mm T1 and its 4-class tissue labels), so each config runs as is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsegkit._serialize import jsonable

__all__ = ["SAMPLE_CLASS_NAMES", "init_bundle", "network_definition", "sample_data_dir"]

SAMPLE_CLASS_NAMES = ["background", "CSF", "grey matter", "white matter"]
SAMPLE_IMAGE = "mni152_t1_2mm.nii.gz"
SAMPLE_LABEL = "mni152_tissue_2mm.nii.gz"
PREPROCESSING_PRESETS = ("mr", "mr_robust", "ct")
# "intensity" is the earlier name of "light"
AUGMENTATION_PRESETS = ("none", "light", "intensity", "strong")
POSTPROCESSING_STEPS = ("largest_component", "fill_holes")

# Evaluated by MONAI's ConfigParser: the folder holding medsegkit's bundled sample data.
_SAMPLE_DIR_EXPR = "$medsegkit.bundle.sample_data_dir()"


def sample_data_dir() -> str:
    """Folder of the sample volumes shipped inside the medsegkit package."""
    from importlib.resources import files

    return str(files("medsegkit") / "sample_data")


def network_definition(name: str, *, semantic: bool = True, **overrides: Any) -> tuple[dict[str, Any], Any]:
    """``(network_def, info)`` for registry model ``name``: the dotted class with its full arguments.

    Classes that record their constructor arguments (``init_args``) are named directly
    (``{"_target_": "medsegkit.nets.UNet", "spatial_dims": 3, ...}``); others are built through the
    registry (``{"_target_": "medsegkit.create_model", "name": ..., **overrides}``). Universal
    (query) models are wrapped in ``SemanticAdapter`` unless ``semantic=False`` (the label-map bundles
    wrap the plain model in ``LabelMapNetwork`` instead).
    """
    import torch

    from medsegkit.registry import create_model, get_model_spec, model_info

    spec = get_model_spec(name)
    info = model_info(spec.name, **overrides)
    with torch.device("meta"):
        model = create_model(spec.name, **overrides)
    init_args = getattr(model, "init_args", None)
    if init_args is not None:
        cls = type(model)
        module = cls.__module__
        public = f"medsegkit.nets.{cls.__name__}"
        target = public if module.startswith("medsegkit.nets.") else f"{module}.{cls.__qualname__}"
        definition = {"_target_": target, **jsonable(init_args)}
    else:
        definition = {"_target_": "medsegkit.create_model", "name": spec.name, **jsonable(overrides)}
    if spec.task == "universal" and semantic:
        definition = {"_target_": "medsegkit.inference.adapters.SemanticAdapter", "model": definition}
    return definition, info


def _preprocessing(keys: Sequence[str], spec: Mapping[str, Any], rgb: bool) -> list[dict]:
    """Load + the spec's transforms exactly as :func:`medsegkit.transforms.preprocessing_configs` defines
    them (the same configs ``segment`` and training instantiate) + channel repeat for RGB models. The
    bundles' data are volumes (3D models, and 2D models run slice by slice)."""
    from medsegkit.transforms import preprocessing_configs

    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": list(keys), "image_only": False},
        {"_target_": "EnsureChannelFirstd", "keys": list(keys)},
        *preprocessing_configs(spec, keys=["image"], label_keys=[k for k in keys if k != "image"],
                               spatial_ndim=3),
    ]
    if rgb:  # a model that needs 3 channels gets the grey image repeated
        steps.append({"_target_": "RepeatChanneld", "keys": "image", "repeats": 3})
    steps.append({"_target_": "EnsureTyped", "keys": list(keys)})
    return steps


def _label_cleanup(steps: Sequence[str], out_channels: int) -> list[dict]:
    """Post-processing on an argmax label map ``pred`` (N=1 channel): largest foreground component, fill holes."""
    foreground = list(range(1, out_channels))
    cleanup: list[dict[str, Any]] = []
    if "largest_component" in steps:  # the largest object made of all foreground classes together
        cleanup.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": foreground,
                        "is_onehot": False, "independent": False})
    if "fill_holes" in steps:  # background voxels enclosed by one class get that class
        cleanup.append({"_target_": "FillHolesd", "keys": "pred", "applied_labels": foreground})
    return cleanup


def _preprocessing_spec(preprocessing: str | Mapping[str, Any], spacing: Sequence[float] | None,
                        crop_foreground: bool | None) -> dict[str, Any]:
    """The bundle's preprocessing spec: a preset name or a spec dict (a checkpoint's recorded recipe), with
    ``spacing`` / ``crop_foreground`` replacing its values when given; checked by
    :func:`medsegkit.transforms.resolve_preprocessing`."""
    from medsegkit.transforms import resolve_preprocessing

    if isinstance(preprocessing, str):
        if preprocessing not in PREPROCESSING_PRESETS:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING_PRESETS} or a spec dict, got {preprocessing!r}")
        spec: dict[str, Any] = {"preset": preprocessing}
    elif isinstance(preprocessing, Mapping):
        spec = jsonable(dict(preprocessing))
    else:
        raise TypeError(f"preprocessing must be a preset name {PREPROCESSING_PRESETS} or a spec dict, "
                        f"got {type(preprocessing).__name__}")
    if spacing is not None:
        spec["spacing"] = [float(v) for v in spacing]
    if crop_foreground is not None:
        spec["crop_foreground"] = bool(crop_foreground)
    resolve_preprocessing(spec)  # a clear error now rather than when the bundle runs
    return spec


def _spec_label(spec: Mapping[str, Any]) -> str:
    """A short name of the spec's intensity step for the metadata ("mr", "percentile", ...)."""
    if "preset" in spec and "intensity" not in spec:
        return str(spec["preset"])
    intensity = spec.get("intensity")
    if isinstance(intensity, Mapping):
        return str(intensity.get("name", "custom"))
    return str(intensity or spec.get("preset", "none"))


class _Checkpoint:
    """A checkpoint read once: its weights, and the model name, constructor overrides and metadata it
    records (``None``, ``{}``, ``{}`` for a plain state dict)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from medsegkit.weights.checkpoint import read_checkpoint

        self.path = os.fspath(path)
        self.state, record = read_checkpoint(path)
        record = record or {}
        model = record.get("model") or {}
        self.model_name: str | None = model.get("name")
        self.overrides: dict[str, Any] = dict(model.get("overrides") or {})
        self.metadata: dict[str, Any] = dict(record.get("metadata") or {})


def _fitted_weights(network_def: Mapping[str, Any], checkpoint: _Checkpoint, prefix: str = "") -> dict[str, Any]:
    """The checkpoint's weights as the state dict of the bundle's network (each key under ``prefix``), loaded
    into that network strictly, as the bundle's ``CheckpointLoader`` will: a checkpoint of another
    architecture is refused here, not at run time."""
    from monai.bundle import ConfigParser

    network = ConfigParser({"imports": ["$import medsegkit"], "network_def": dict(network_def)}).get_parsed_content(
        "network_def")
    state = {prefix + key: value for key, value in checkpoint.state.items()}
    from medsegkit.weights.checkpoint import check_weights

    check_weights(network, state, f"checkpoint {checkpoint.path}")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        from medsegkit.weights.checkpoint import state_mismatch

        raise ValueError(f"the weights in {checkpoint.path} do not fit the bundle's network "
                         f"({network_def['_target_']}): {state_mismatch(error, lines=2)}; pass the "
                         "constructor arguments the checkpoint was trained with (--set KEY=VALUE)") from None
    return state


def _metadata(name: str, info: Any, in_channels: int, out_channels: int, roi: Sequence[int],
              class_names: Sequence[str], spec: Mapping[str, Any],
              label_map_task: str | None = None) -> dict[str, Any]:
    import monai
    import numpy
    import torch

    from medsegkit import __version__

    preset = _spec_label(spec)
    multiple = 16 if info.spatial_dims == 3 else 32
    channel_def = {str(i): n for i, n in enumerate(class_names)} if len(class_names) == out_channels else {
        str(i): f"class {i}" for i in range(out_channels)}
    if label_map_task is not None:
        channel_def = {"0": f"{label_map_task} id (0 = background)"}
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"bundle written by medsegkit {__version__} for {name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"medsegkit": __version__},
        "name": f"medsegkit {name}",
        "task": f"{info.task} segmentation with {name}",
        "description": f"{name} ({info.family}, {info.num_params:,} parameters) as a MONAI bundle; "
                       "defaults segment medsegkit's MNI152 sample volume into background, CSF, GM and WM.",
        "authors": "medsegkit developers",
        "copyright": "medsegkit developers; sample data: Copyright (C) 1993-2009 Louis Collins, McConnell "
                     "Brain Imaging Centre, Montreal Neurological Institute, McGill University",
        "references": [info.reference] if info.reference else [],
        "intended_use": "research only",
        "data_source": "MNI ICBM152 2009a (medsegkit sample_data)",
        "data_type": "nifti",
        "image_classes": f"{in_channels} channel(s), {preset} intensities",
        "label_classes": ", ".join(f"{i}: {n}" for i, n in channel_def.items()),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "CT" if preset == "ct" else "MR",
                    "num_channels": in_channels,
                    "spatial_shape": [f"{multiple}*n"] * info.spatial_dims,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): "image" for i in range(in_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": out_channels,
                    "spatial_shape": [f"{multiple}*n"] * info.spatial_dims,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": channel_def,
                }
            },
        },
        "medsegkit": {"model": name, "roi_size": list(roi), "preprocessing": dict(spec),
                      "inference_only": label_map_task is not None, "output": label_map_task or "semantic"},
    }
    if label_map_task is not None:
        metadata["network_data_format"]["outputs"]["pred"]["format"] = "labels"
    return metadata


def _common(network_def: dict, spacing: Sequence[float] | None) -> dict[str, Any]:
    return {
        "imports": ["$import glob", "$import os", "$import torch",
                    "$import medsegkit"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": _SAMPLE_DIR_EXPR,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "spacing": list(spacing) if spacing is not None else None,
    }


def _inference_config(network_def: dict, roi: Sequence[int], spec: Mapping[str, Any], rgb: bool,
                      out_channels: int, cleanup: Sequence[str] = (), label_maps: bool = False) -> dict:
    config = _common(network_def, spec.get("spacing"))
    config.update({
        "datalist": f"$[os.path.join(@dataset_dir, '{SAMPLE_IMAGE}')]",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(["image"], spec, rgb)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi), "sw_batch_size": 2,
                    "overlap": 0.5, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            *_label_cleanup(cleanup, out_channels),
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "_disabled_": "$not os.path.exists(@ckpt_path)",
             "load_path": "@ckpt_path", "load_dict": {"model": "@network"}, "strict": True},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    })
    if label_maps:  # the network already returns instance / panoptic ids: no softmax, no argmax, no blending
        config["inferer"] = {"_target_": "SimpleInferer"}
        config["postprocessing"]["transforms"] = [
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "meta_key_postfix": "meta_dict", "nearest_interp": True, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.int32", "resample": False, "separate_folder": False},
        ]
    config["imports"].append("$import numpy")
    config["imports"].append("$import monai")
    return config


def _train_config(network_def: dict, roi: Sequence[int], spec: Mapping[str, Any], rgb: bool,
                  out_channels: int, augmentation: str = "light", cleanup: Sequence[str] = ()) -> dict:
    config = _common(network_def, spec.get("spacing"))
    keys = ["image", "label"]
    sample = {"image": f"$os.path.join(@dataset_dir, '{SAMPLE_IMAGE}')",
              "label": f"$os.path.join(@dataset_dir, '{SAMPLE_LABEL}')"}
    from medsegkit.transforms import augmentation_configs

    # the random transforms medsegkit.train uses, from the same definition (two patches per volume visit)
    random = augmentation_configs(roi, level="light" if augmentation == "intensity" else augmentation,
                                  num_classes=out_channels, samples=2)
    config.update({
        "imports": config["imports"] + ["$import monai", "$import ignite"],
        "ckpt_dir": "$@bundle_root + '/models'",
        "train_files": [{"image": sample["image"], "label": sample["label"]}],
        "val_files": [{"image": sample["image"], "label": sample["label"]}],
        "max_epochs": 5,
        "val_interval": 1,
        "learning_rate": 0.001,
        "num_classes": out_channels,
        # the objective and iteration of medsegkit.train's engine: DiceCE on the logits (deep supervision when
        # the network has it), MetaTensor batches as plain tensors, a non-finite loss stops with its step
        "objective": {"_target_": "medsegkit.train.objectives.SemanticObjective"},
        "loss": "$@objective.loss",
        "optimizer": {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()", "lr": "@learning_rate",
                      "weight_decay": 1e-5},
        # the schedule of medsegkit.train: linear warm-up over the first epoch, cosine to 1 % of the rate, per step
        "lr_scheduler": {"_target_": "monai.optimizers.WarmupCosineSchedule", "optimizer": "@optimizer",
                         "warmup_steps": "$len(@train_files)", "t_total": "$@max_epochs * len(@train_files)",
                         "end_lr": "$@learning_rate * 0.01", "warmup_multiplier": 0.5},
        "train": {
            "deterministic_transforms": _preprocessing(keys, spec, rgb),
            "random_transforms": random,
            "preprocessing": {"_target_": "Compose",
                              "transforms": "$@train#deterministic_transforms + @train#random_transforms"},
            "dataset": {"_target_": "CacheDataset", "data": "@train_files", "transform": "@train#preprocessing",
                        "cache_rate": 1.0, "num_workers": 0},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 1,
                           "shuffle": True, "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            "step": {"_target_": "medsegkit.train.step.TrainStep", "network": "@network", "objective": "@objective",
                     "outputs": True},
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False],
                 "to_onehot": "$[@num_classes, @num_classes]"},
            ]},
            "handlers": [
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "epoch_level": False,
                 "print_lr": False},
                {"_target_": "StatsHandler", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
            ],
            "key_metric": {"train_dice": {"_target_": "MeanDice", "include_background": False,
                                          "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@max_epochs", "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@objective",
                        "optimizer": "@optimizer", "inferer": "@train#inferer", "iteration_update": "@train#step",
                        "postprocessing": "@train#postprocessing", "key_train_metric": "@train#key_metric",
                        "train_handlers": "@train#handlers", "amp": False},
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
            "dataset": {"_target_": "CacheDataset", "data": "@val_files", "transform": "@validate#preprocessing",
                        "cache_rate": 1.0, "num_workers": 0},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1,
                           "shuffle": False, "num_workers": 0},
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi), "sw_batch_size": 2,
                        "overlap": 0.25},
            "postprocessing": "%train#postprocessing" if not cleanup else {"_target_": "Compose", "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                *_label_cleanup(cleanup, out_channels),
                {"_target_": "AsDiscreted", "keys": ["pred", "label"], "to_onehot": "$[@num_classes, @num_classes]"},
            ]},
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
                 "save_key_metric": True, "key_metric_filename": "model.pt"},
                {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": ["val_mean_dice"],
                 "metric_details": ["val_mean_dice"], "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
                 "summary_ops": "*"},
            ],
            "key_metric": {"val_mean_dice": {"_target_": "MeanDice", "include_background": False,
                                             "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "postprocessing": "@validate#postprocessing",
                          "key_val_metric": "@validate#key_metric", "val_handlers": "@validate#handlers",
                          "amp": False},
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
    })
    return config


def _evaluate_config(out_channels: int) -> dict:
    """Overrides on top of train.json (MONAI convention: run with both files)."""
    return {
        "validate#handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'",
             "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": ["val_mean_dice"],
             "metric_details": ["val_mean_dice"], "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
             "summary_ops": "*"},
        ],
        "run": ["$@validate#evaluator.run()"],
    }


def _multi_gpu_config() -> dict:
    """Overrides on top of train.json for ``torchrun``: DistributedSampler + DDP, rank-0 saving."""
    return {
        "device": "$torch.device('cuda:' + os.environ['LOCAL_RANK'] if torch.cuda.is_available() else 'cpu')",
        "network": {"_target_": "torch.nn.parallel.DistributedDataParallel", "module": "$@network_def.to(@device)",
                    "device_ids": "$[@device] if torch.cuda.is_available() else None"},
        "train#sampler": {"_target_": "DistributedSampler", "dataset": "@train#dataset", "even_divisible": True,
                          "shuffle": True},
        "train#dataloader#sampler": "@train#sampler",
        "train#dataloader#shuffle": False,
        "train#step#distributed": True,
        "train#trainer#train_handlers": "$@train#handlers[: -1 if dist.get_rank() > 0 else None]",
        # even_divisible: the default validation list (the sample volume) has fewer items than ranks
        "validate#sampler": {"_target_": "DistributedSampler", "dataset": "@validate#dataset",
                             "even_divisible": True, "shuffle": False},
        "validate#dataloader#sampler": "@validate#sampler",
        # rank 0 logs and saves; MetricsSaver (a collective across ranks) is left out of DDP validation
        "validate#evaluator#val_handlers": "$None if dist.get_rank() > 0 else @validate#handlers[:2]",
        "initialize": [
            "$import torch.distributed as dist",
            "$import medsegkit.train.distributed",
            "$dist.is_initialized() or dist.init_process_group(backend='nccl' if torch.cuda.is_available() "
            "else 'gloo')",
            "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
            "$monai.utils.set_determinism(seed=123)",
        ],
        "run": ["$@train#trainer.run()"],
        # barrier, destroy the process group, then end the worker with os._exit after the atexit handlers and
        # flushed logs: gloo's native threads outlive destroy_process_group() and abort the process if one
        # needs the GIL during interpreter shutdown (docs/bundles.md, "Multi-GPU training")
        "finalize": ["$medsegkit.train.distributed.cleanup_distributed()",
                     "$medsegkit.train.distributed.end_worker_process(0)"],
    }


_LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _readme(name: str, info: Any, roi: Sequence[int]) -> str:
    return f"""# medsegkit bundle: {name}

{info.family} network (`{info.dotted_path}`, {info.num_params:,} parameters), written by
`medsegkit bundle init`. Defaults use medsegkit's bundled MNI152 2 mm sample volume (4 classes:
background, CSF, grey matter, white matter), so every config runs as is.

## Commands (MONAI's own bundle tools; run inside this folder)

```bash
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json
python -m monai.bundle run --config_file configs/train.json            # short training on the sample
python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']"
python -m monai.bundle run --config_file configs/inference.json        # writes eval/*_seg.nii.gz
torchrun --nproc_per_node 2 -m monai.bundle run --config_file "['configs/train.json','configs/multi_gpu_train.json']"
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath schema.json   # needs internet
```

Your own data: override `train_files` / `val_files` (lists of `{{"image": ..., "label": ...}}`) and
`datalist` (inference), e.g. `--datalist "['scan.nii.gz']"`. Sliding-window roi: {list(roi)}.
medsegkit's own runner: `medsegkit bundle run . scan.nii.gz -o labels.nii.gz`.
"""


def init_bundle(
    model: str,
    directory: str | os.PathLike,
    *,
    in_channels: int | None = None,
    out_channels: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike | None = None,
    roi_size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    preprocessing: str | Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    augmentation: str = "light",
    postprocessing: Sequence[str] = (),
    crop_foreground: bool | None = None,
    task: str | None = None,
) -> Path:
    """Write a MONAI bundle for registry model ``model`` into ``directory``.

    Args:
        model: a registry name. Semantic and universal models get a full bundle (train, evaluate,
            inference, multi-GPU); instance models, and universal models with ``task="instance"`` or
            ``"panoptic"``, get an inference-only bundle whose network returns label maps.
        directory: the bundle folder; an existing non-empty folder is refused unless ``overwrite``.
        in_channels / out_channels: network channels; ``out_channels`` defaults to the sample task's
            4 classes (universal models: ``num_classes``).
        overrides: further constructor arguments.
        checkpoint: a medsegkit or plain state-dict checkpoint copied to ``models/model.pt``. A medsegkit
            checkpoint also gives the defaults of what it records: its constructor arguments (under
            ``overrides``), its preprocessing recipe, window (``roi_size``) and class names, so the bundle
            preprocesses exactly as training did and as ``segment`` runs the checkpoint. The weights are
            loaded into the bundle's network (strictly) before anything is written: a checkpoint of another
            architecture or model is refused.
        roi_size: sliding-window / training crop size (default: the checkpoint's, else the model's
            ``default_roi_size``).
        spacing: target voxel spacing in mm (default: the checkpoint's recipe, else none: keep the image's).
        preprocessing: ``"mr"`` (z-score over non-zero voxels), ``"mr_robust"`` (1st-99th percentile
            to 0..1, for full-head scans from different scanners), ``"ct"`` (window -1000..1000) or a
            spec dict (:func:`medsegkit.transforms.resolve_preprocessing`). Default: the checkpoint's
            recorded recipe, else ``"mr"``.
        class_names: names of the output channels (default: the checkpoint's).
        augmentation: training-time random transforms in ``train.json``, the levels of
            :func:`medsegkit.transforms.augmentation_configs` (the ones ``medsegkit train`` uses): ``"none"``
            (class-balanced crops), ``"light"`` (+ flips, intensity scale/shift; ``"intensity"`` is its
            earlier name) or ``"strong"`` (adds random affine, MR bias field, gamma, histogram shift, low
            resolution, blur and noise: for models that must generalise to other scanners and subjects).
        postprocessing: label clean-up steps for inference and validation, any of ``"largest_component"``
            (keep the largest connected foreground object) and ``"fill_holes"``.
        crop_foreground: crop every volume to the bounding box of its non-zero voxels (plus a 4-voxel
            margin) after resampling, so scans with different fields of view look alike; inference
            pads the prediction back to the input grid (default: the checkpoint's recipe, else no crop).

        task: for universal models, ``"semantic"`` (default), ``"instance"`` or ``"panoptic"``.

    Returns:
        The bundle directory.
    """
    from medsegkit.registry import get_model_spec

    spec = get_model_spec(model)
    label_map_task = _label_map_task(spec, task)
    loaded = _Checkpoint(checkpoint) if checkpoint is not None else None
    recorded_name = loaded.model_name if loaded is not None else None
    recorded_args = loaded.overrides if loaded is not None else {}
    recorded = loaded.metadata if loaded is not None else {}
    if recorded_name is not None and get_model_spec(recorded_name).name != spec.name:
        raise ValueError(f"{loaded.path} holds a {recorded_name} model, not {spec.name}; "
                         f"write the bundle for {recorded_name}")
    if preprocessing is None:
        preprocessing = recorded.get("preprocessing") or ("mr_robust" if label_map_task is not None else "mr")
    elif label_map_task is not None and preprocessing == "mr":
        preprocessing = "mr_robust"  # detection models expect intensities in [0, 1]: the percentile scaling
    pre_spec = _preprocessing_spec(preprocessing, spacing, crop_foreground)
    roi_size = roi_size or recorded.get("roi_size")
    class_names = class_names or recorded.get("class_names")
    if augmentation not in AUGMENTATION_PRESETS:
        raise ValueError(f"augmentation must be one of {AUGMENTATION_PRESETS}, got {augmentation!r}")
    if isinstance(postprocessing, str):
        postprocessing = [postprocessing]
    unknown = [step for step in postprocessing if step not in POSTPROCESSING_STEPS]
    if unknown:
        raise ValueError(f"postprocessing steps must be among {POSTPROCESSING_STEPS}, got {unknown}")
    directory = Path(directory)
    _check_bundle_output(directory, overwrite, checkpoint)
    args = {**recorded_args, **(overrides or {})}  # the caller's arguments win over the checkpoint's
    if label_map_task is not None:
        return _init_label_map_bundle(spec, directory, label_map_task, args, in_channels, out_channels, loaded,
                                      roi_size, pre_spec)
    class_key = "num_classes" if spec.task == "universal" else "out_channels"
    if out_channels is not None:
        args[class_key] = out_channels
    elif class_key not in args:
        args[class_key] = len(SAMPLE_CLASS_NAMES)
    if in_channels is not None:
        args["in_channels"] = in_channels
    network_def, info = network_definition(spec.name, **args)
    n_in = info.in_channels or 1
    n_out = int(args[class_key])  # SemanticAdapter returns one score map per class, like out_channels
    rgb = n_in == 3
    roi = list(roi_size or spec.default_roi_size or ([96] * info.spatial_dims))
    names = list(class_names) if class_names else (SAMPLE_CLASS_NAMES if n_out == 4 else [])

    files: dict[str, str] = {
        "configs/metadata.json": json.dumps(_metadata(spec.name, info, n_in, n_out, roi, names, pre_spec),
                                            indent=2),
        "configs/inference.json": json.dumps(_inference_config(network_def, roi, pre_spec, rgb, n_out,
                                                               postprocessing), indent=2),
        "configs/train.json": json.dumps(_train_config(network_def, roi, pre_spec, rgb, n_out,
                                                       augmentation, postprocessing), indent=2),
        "configs/evaluate.json": json.dumps(_evaluate_config(n_out), indent=2),
        "configs/multi_gpu_train.json": json.dumps(_multi_gpu_config(), indent=2),
        "configs/logging.conf": _LOGGING_CONF,
        "docs/README.md": _readme(spec.name, info, roi),
        "LICENSE": _license_text(),
    }
    return _write_bundle(directory, files, None if loaded is None else _fitted_weights(network_def, loaded))


def _label_map_task(spec: Any, task: str | None) -> str | None:
    """``None`` for a trainable semantic bundle, else the label-map task of an inference-only bundle."""
    if spec.task == "instance":
        if task not in (None, "instance"):
            raise ValueError(f"{spec.name} is an instance model; task must be 'instance', got {task!r}")
        return "instance"
    if task in (None, "semantic"):
        return None
    if spec.task != "universal" or task not in ("instance", "panoptic"):
        raise ValueError(f"task={task!r} is not available for {spec.name} ({spec.task} model); "
                         "universal models accept 'semantic', 'instance' or 'panoptic'")
    from medsegkit.registry import list_models, model_info

    if model_info(spec.name).spatial_dims == 2:
        volume_variant = f"{spec.name}_3d" if f"{spec.name}_3d" in list_models() else None
        raise ValueError(
            f"{spec.name} is a 2D query model: medsegkit.predict gives its {task} output for 2D images only, not "
            f"slice by slice on the volumes a bundle reads; bundle it with task='semantic'"
            + (f", or use {volume_variant} for {task} label maps of volumes" if volume_variant else ""))
    return task


def _init_label_map_bundle(spec: Any, directory: Path, task: str, args: dict[str, Any], in_channels: int | None,
                           num_classes: int | None, checkpoint: _Checkpoint | None, roi_size,
                           pre_spec: Mapping[str, Any]) -> Path:
    """Inference-only bundle whose network returns instance / panoptic ids (:class:`LabelMapNetwork`)."""
    if num_classes is not None:
        args["num_classes"] = num_classes
    if in_channels is not None:
        args["in_channels"] = in_channels
    inner, info = network_definition(spec.name, semantic=False, **args)
    roi = list(roi_size) if roi_size else None
    network_def = {"_target_": "medsegkit.bundle.components.LabelMapNetwork", "model": inner, "task": task,
                   "roi_size": roi}
    n_in = info.in_channels or 3
    files = {
        "configs/metadata.json": json.dumps(_metadata(spec.name, info, n_in, 1, roi or [], [], pre_spec,
                                                      label_map_task=task), indent=2),
        "configs/inference.json": json.dumps(_inference_config(network_def, roi or [], pre_spec, False, 1,
                                                               label_maps=True), indent=2),
        "configs/logging.conf": _LOGGING_CONF,
        "docs/README.md": _label_map_readme(spec.name, info, task),
        "LICENSE": _license_text(),
    }
    # LabelMapNetwork holds the model as .model: its weights go under "model."
    weights = None if checkpoint is None else _fitted_weights(network_def, checkpoint, prefix="model.")
    return _write_bundle(directory, files, weights)


def _label_map_readme(name: str, info: Any, task: str) -> str:
    return f"""# medsegkit bundle: {name} ({task} label maps)

Inference-only bundle written by `medsegkit bundle init`: `network_def` wraps `{info.dotted_path}`
({info.num_params:,} parameters) in `medsegkit.bundle.components.LabelMapNetwork`, which runs
`medsegkit.inference.predict(..., task="{task}")` (slice-wise detection on volumes, tiling, merging of
instances across windows) and returns one id per {task} segment (0 = background). Training such models
needs their own losses (`model(images, targets)` for Mask R-CNN, `medsegkit.train.set_criterion` for
query models), so this bundle has no train.json.

```bash
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json
python -m monai.bundle run --config_file configs/inference.json --datalist "['scan.nii.gz']"
medsegkit bundle run . scan.nii.gz -o out/
```
"""


def _check_bundle_output(directory: Path, overwrite: bool, checkpoint: str | os.PathLike | None) -> None:
    """Refuse a ``directory`` that holds files unless ``overwrite``; even then, refuse a folder that is not a
    bundle (no ``configs/metadata.json``: its files are not ours to replace) and one holding the checkpoint
    being bundled (its ``models/model.pt`` would be replaced by the plain state dict, losing the record)."""
    from medsegkit.files import same_file

    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder; choose another bundle folder")
    if not any(directory.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; pass --overwrite to replace the bundle files")
    if not (directory / "configs" / "metadata.json").is_file():
        raise FileExistsError(f"{directory} is not empty and is not a MONAI bundle (no configs/metadata.json); "
                              "--overwrite replaces only an earlier bundle's files: choose another folder")
    if checkpoint is not None and same_file(Path(checkpoint).expanduser(), directory / "models" / "model.pt"):
        raise ValueError(f"bundle {directory} holds the checkpoint it bundles ({checkpoint}) as models/model.pt; "
                         "choose another folder (overwrite never applies to inputs)")


def _write_bundle(directory: Path, files: Mapping[str, str], weights: Mapping[str, Any] | None) -> Path:
    """Write each ``files`` entry (relative path -> text), ``models/`` and ``weights`` (the state dict of the
    bundle's network) as ``models/model.pt``, a plain state dict (what MONAI's CheckpointLoader reads).

    Everything is written into a temporary folder next to ``directory`` first: a new bundle is that folder
    renamed, so a failure leaves nothing at ``directory``; an earlier bundle (``overwrite``) gets each file
    renamed into place only once all of them are written, and keeps the files the bundle does not write."""
    import shutil
    import uuid

    import torch

    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        for rel, text in files.items():
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            (partial / rel).write_text(text)
        (partial / "models").mkdir(parents=True, exist_ok=True)
        if weights is not None:
            torch.save(dict(weights), partial / "models" / "model.pt")
        if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
            if directory.exists():
                directory.rmdir()
            os.replace(partial, directory)
            return directory
        written = [*files, *(["models/model.pt"] if weights is not None else [])]
        for rel in written:
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial / rel, directory / rel)
        (directory / "models").mkdir(exist_ok=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def _license_text() -> str:
    return (
        "Code and configuration: Apache License 2.0 (medsegkit developers).\n\n"
        "Default data: MNI ICBM152 2009a, shipped in medsegkit's sample_data.\n"
        "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,\n"
        "McGill University. Permission to use, copy, modify, and distribute this software and its documentation\n"
        "for any purpose and without fee is hereby granted, provided that the above copyright notice appear in\n"
        "all copies. The authors and McGill University make no representations about the suitability of this\n"
        "software for any purpose. It is provided \"as is\" without express or implied warranty.\n"
    )
