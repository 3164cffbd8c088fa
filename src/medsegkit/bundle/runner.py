"""Check and run MONAI bundles (ours, or model-zoo bundles whose network is a medsegkit class)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsegkit.files import read_json_object

__all__ = ["REQUIRED_METADATA", "bundle_network", "check_metadata", "run_bundle", "verify_bundle"]

# Fields MONAI's meta schema marks as required (checked here because `verify_metadata` downloads the
# schema, which offline machines cannot).
REQUIRED_METADATA = (
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
_IO_FIELDS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
              "channel_def")


def _configs(directory: Path) -> Path:
    configs = directory / "configs"
    if not (configs / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory} is not a MONAI bundle: configs/metadata.json is missing")
    return configs


def check_metadata(metadata: dict[str, Any]) -> list[str]:
    """Problems with ``metadata`` (empty list when it has every required field)."""
    problems = [f"missing field {key!r}" for key in REQUIRED_METADATA if key not in metadata]
    problems += [f"{key} = {metadata[key]!r:.40} is not an object" for key in ("network_data_format", "changelog",
                                                                               "medsegkit")
                 if key in metadata and not isinstance(metadata[key], dict)]
    fmt = _object(metadata.get("network_data_format"))
    for side, key in (("inputs", "image"), ("outputs", "pred")):
        entry = _object(fmt.get(side)).get(key)
        if not isinstance(entry, dict):
            problems.append(f"network_data_format.{side}.{key} is " + ("missing" if entry is None else "not an object"))
            continue
        problems += [f"network_data_format.{side}.{key}.{f} is missing" for f in _IO_FIELDS if f not in entry]
    version = metadata.get("version")
    if isinstance(version, str) and version not in _object(metadata.get("changelog")):
        problems.append(f"changelog has no entry for version {version!r}")
    return problems


def _object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else ``{}`` (its problem is reported once, by the caller)."""
    return value if isinstance(value, dict) else {}


def _parser(directory: Path, config_files: Sequence[str], **overrides: Any):
    from monai.bundle import ConfigParser

    configs = _configs(directory)
    for name in config_files:  # MONAI's own error names neither the file nor what is accepted
        read_json_object(configs / name, "bundle config", "fix it or write the bundle again")
    parser = ConfigParser()
    parser.read_config([str(configs / f) for f in config_files])
    parser.read_meta(str(configs / "metadata.json"))
    parser["bundle_root"] = str(directory)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def bundle_network(directory: str | os.PathLike, *, load_weights: bool = True):
    """The bundle's ``network_def`` instantiated, with ``models/model.pt`` loaded when present.

    Raises:
        CheckpointError: ``models/model.pt`` is unreadable, holds pickled code, or does not fit ``network_def``.
        ValueError: a config is not a JSON object.
    """
    directory = Path(directory)
    parser = _parser(directory, ["inference.json"])
    network = parser.get_parsed_content("network_def")
    weights = directory / "models" / "model.pt"
    if load_weights and weights.is_file():
        from medsegkit.errors import CheckpointError
        from medsegkit.weights.checkpoint import check_weights, read_checkpoint, state_mismatch

        state, _ = read_checkpoint(weights)  # weights only: MONAI's {"model": ...} or a plain state dict
        check_weights(network, state, f"bundle weights {weights}")
        try:
            network.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"bundle weights {weights} do not fit the bundle's network_def: "
                                  f"{state_mismatch(err)}") from None
    return network


def verify_bundle(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a bundle: metadata fields, MONAI's ``verify_net_in_out``, and a dry run of every config.

    The dry run parses each config and instantiates its network, transforms and data loaders without
    running an engine. Returns a report dict; raises ``ValueError`` listing every problem found.
    """
    from monai.bundle import verify_net_in_out

    directory = Path(directory)
    configs = _configs(directory)
    problems: list[str] = []
    metadata = read_json_object(configs / "metadata.json", "bundle metadata", "fix it or export the bundle again")
    problems += check_metadata(metadata)
    report: dict[str, Any] = {"bundle": str(directory), "configs": []}
    try:
        verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                          config_file=str(configs / "inference.json"), device="cpu", n=1, any=1)
        report["verify_net_in_out"] = "ok"
    except Exception as err:  # reported with the others, the message names the failing check
        problems.append(f"verify_net_in_out failed: {err}")
    inference_only = bool(_object(metadata.get("medsegkit")).get("inference_only"))
    dry_runs = {"inference.json": ["inference.json"]}
    if not inference_only:
        dry_runs.update({"train.json": ["train.json"], "evaluate.json": ["train.json", "evaluate.json"]})
    for name, files in dry_runs.items():
        if not (configs / name).is_file():
            problems.append(f"configs/{name} is missing")
            continue
        try:
            parser = _parser(directory, files)
            for key in ("network_def", "preprocessing", "train#preprocessing", "validate#preprocessing"):
                if key in parser:
                    parser.get_parsed_content(key)
            report["configs"].append(name)
        except Exception as err:
            problems.append(f"configs/{name} does not parse: {err}")
    if not inference_only and not (configs / "multi_gpu_train.json").is_file():
        problems.append("configs/multi_gpu_train.json is missing")
    if problems:
        raise ValueError(f"bundle {directory} has {len(problems)} problem(s): " + "; ".join(problems))
    return report


def run_bundle(
    directory: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Run the bundle's ``inference.json`` (its network, pre- and post-processing) on ``images``.

    Results are written by the bundle's ``SaveImaged`` into ``output_dir`` as ``<name>_seg.nii.gz``.
    Existing outputs are refused unless ``overwrite``. Refused always, before anything runs: two images
    whose results would have the same name (``a/case.nii.gz`` and ``b/case.nii.gz``: the second would
    replace the first), and a result that would replace one of the ``images``.
    """
    from monai.bundle import run

    from medsegkit.files import same_file

    directory = Path(directory).resolve()
    configs = _configs(directory)
    for name in ("inference.json", "metadata.json"):  # MONAI's own error names neither the file nor what is accepted
        read_json_object(configs / name, "bundle config", "fix it or write the bundle again")
    output_dir = Path(output_dir)
    images = [Path(i).resolve() for i in images]
    for image in images:
        if not image.exists():
            raise FileNotFoundError(f"input image {image} does not exist")
    expected = [output_dir / f"{_stem(i)}_seg.nii.gz" for i in images]
    first_image_of: dict[str, Path] = {}
    for image, result in zip(images, expected):
        earlier = first_image_of.setdefault(result.name, image)
        if earlier != image:
            raise ValueError(f"{earlier} and {image} would both be written to {result}; run them into separate "
                             "output folders, or rename one")
    for image, result in zip(images, expected):
        replaced = next((other for other in images if same_file(result, other)), None)
        if replaced is not None:
            raise ValueError(f"the result of {image} would replace the input {replaced}; choose another output "
                             "folder")
    existing = [p for p in expected if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it")
    output_dir.mkdir(parents=True, exist_ok=True)
    run(
        config_file=str(configs / "inference.json"),
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf") if (configs / "logging.conf").is_file() else None,
        bundle_root=str(directory),
        datalist=[str(i) for i in images],
        output_dir=str(output_dir.resolve()),
    )
    missing = [p for p in expected if not p.exists()]
    if missing:
        raise RuntimeError(f"the bundle ran but did not write {missing[0]}; check its SaveImaged settings")
    return expected


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
