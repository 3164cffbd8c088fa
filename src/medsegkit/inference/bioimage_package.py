"""bioimage.io model packages: ``medsegkit export --format bioimageio`` writes one, ``predict`` / ``segment`` read one.

A package is the export folder (:mod:`medsegkit.exporter`) plus what bioimage.io needs::

    OUT/  (or OUT.zip with the same files at its root)
      rdf.yaml          the model description (bioimage.io spec 0.5): axes, test tensors, weights, attachments
      README.md         the documentation rdf.yaml points to
      model.onnx        the weights (``model.ts``, TorchScript, where ONNX cannot hold the graph)
      test_input.npy    one window batch ``(B, C, *roi)``, the network's input (preprocessed)
      test_output.npy   PyTorch's float32 logits ``(B, K, *roi)`` for it
      medsegkit.json    our sidecar (preprocessing, windows, classes), listed as an attachment

The network takes **preprocessed windows**: orientation, spacing and intensity scaling are medsegkit's
(recorded in the sidecar), not bioimage.io processing steps, because resampling to a target spacing has
no bioimage.io equivalent. Labels are the argmax of the logits over the channel axis.

After writing, :func:`medsegkit.export` validates the package **offline** with
``bioimageio.core.test_model`` (:func:`validate_package`: format checks and the test tensors run through
bioimage.io's own prediction; every file is local, nothing is downloaded); a failed check is an
:class:`~medsegkit.exporter.ExportMismatchError` listing it.

A zip is unpacked once into ``$MEDSEGKIT_HOME/bioimageio/<sha256 prefix>/`` to be opened.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["RDF", "is_package", "unpacked", "validate_package", "weights_format", "write_package", "zip_package"]

RDF = "rdf.yaml"
_AXES = {2: ("y", "x"), 3: ("z", "y", "x")}


def weights_format(network: nn.Module, folder: Path, example: torch.Tensor, name: str,
                   write_network: Callable[..., Path]) -> str:
    """Write the package's weights into ``folder``: ONNX, or TorchScript where the ONNX exporter refuses
    the graph (MaskFormer / Mask2Former); returns the format written."""
    try:
        write_network(network, folder, "onnx", example, name)
        return "onnx"
    except ValueError as err:
        import logging

        logging.getLogger("medsegkit.export").info("bioimageio: ONNX failed (%s); writing TorchScript weights", err)
        write_network(network, folder, "torchscript", example, name)
        return "torchscript"


def _identifier(text: str, fallback: str) -> str:
    """A bioimage.io identifier (letters, digits, underscore; not starting with a digit)."""
    cleaned = re.sub(r"\W", "_", str(text)).strip("_")
    return cleaned if cleaned and not cleaned[0].isdigit() else f"{fallback}_{cleaned}".strip("_")


def _rdf(sidecar: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    from bioimageio.spec.model.v0_5 import ModelDescr

    from medsegkit import __version__

    dims = int(sidecar["spatial_dims"])
    roi = [int(r) for r in sidecar["roi_size"]]
    classes = sidecar.get("class_names") or [f"class{k}" for k in range(int(sidecar["out_channels"]))]
    config = sidecar.get("model") or {}
    name = f"medsegkit {config.get('name', type(model).__name__)} {dims}D segmentation"

    def axes(channel_names: list[str], output: bool) -> list[dict[str, Any]]:
        spatial = [{"type": "space", "id": axis, "size": size} for axis, size in zip(_AXES[dims], roi)]
        if output:
            spatial = [{"type": "space", "id": axis, "size": {"tensor_id": "input", "axis_id": axis}}
                       for axis in _AXES[dims]]
        batch = {"type": "batch", "size": 1} if int(sidecar["batch_size"]) == 1 else {"type": "batch"}
        return [batch,
                {"type": "channel", "channel_names": channel_names}, *spatial]

    weights: dict[str, Any]
    if sidecar["network"].endswith(".onnx"):
        weights = {"onnx": {"source": sidecar["network"], "opset_version": 18}}
    else:
        weights = {"torchscript": {"source": sidecar["network"], "pytorch_version": torch.__version__.split("+")[0]}}
    return {
        "type": "model",
        "format_version": str(ModelDescr.implemented_format_version),
        "name": name,
        "description": (f"{name} exported by medsegkit {__version__}: logits for {len(classes)} classes "
                        f"({', '.join(map(str, classes))}) of one window batch; the input is preprocessed as "
                        "medsegkit.json says (orientation, spacing, intensity)"),
        "authors": [{"name": "medsegkit developers"}],
        "cite": [{"text": "MONAI: An open-source framework for deep learning in healthcare",
                  "doi": "10.48550/arXiv.2211.02701"}],
        "license": "Apache-2.0",
        "documentation": {"source": "README.md"},
        "tags": ["medsegkit", "segmentation", f"{dims}d", "semantic-segmentation"],
        "inputs": [{"id": "input", "axes": axes([_identifier(f"channel{c}", "channel")
                                                 for c in range(int(sidecar["in_channels"]))], False),
                    "test_tensor": {"source": "test_input.npy"}, "data": {"type": "float32"},
                    "description": "one batch of preprocessed windows (medsegkit.json: preprocessing)"}],
        "outputs": [{"id": "logits", "axes": axes([_identifier(c, "class") for c in classes], True),
                     "test_tensor": {"source": "test_output.npy"}, "data": {"type": "float32"},
                     "description": "class logits; labels = argmax over the channel axis"}],
        "weights": weights,
        "attachments": [{"source": "medsegkit.json"}],
        "config": {"medsegkit": {"sidecar": "medsegkit.json", "version": __version__}},
    }


def write_package(folder: Path, sidecar: dict[str, Any], model: nn.Module) -> None:
    """Write ``rdf.yaml`` and ``README.md`` into the export ``folder`` (validate it with :func:`validate_package`)."""
    import yaml

    rdf = _rdf(sidecar, model)
    (folder / "README.md").write_text(
        f"# {rdf['name']}\n\n{rdf['description']}.\n\n"
        "Run it with medsegkit (`medsegkit predict THIS_FOLDER image.nii.gz -o labels.nii.gz`), which applies "
        "the preprocessing recorded in `medsegkit.json`, slides the windows and inverts the preprocessing; "
        "or with any bioimage.io consumer on preprocessed windows of the recorded size.\n"
    )
    (folder / RDF).write_text(yaml.safe_dump(rdf, sort_keys=False))


def check_bioimageio() -> None:
    """Import bioimage.io's packages, or a clear ``ImportError``: missing, or the known broken pair.

    bioimageio.core 0.11 pins bioimageio.spec 0.5.12, whose file serializer calls pydantic's wrap handler
    as ``handler(value, info)``; pydantic 2.14 (pydantic-core 2.50) takes that second argument as an
    ``index_key`` and raises ``TypeError`` in every validation (fixed in bioimageio.spec 0.5.14, which no
    bioimageio.core release accepts yet). The export extra therefore installs ``pydantic<2.14``."""
    from importlib.metadata import version

    try:
        import bioimageio.core  # noqa: F401
    except ImportError as err:
        raise ImportError("bioimageio.core is not installed; install the export extra: pip install 'medsegkit[export]'") from err
    spec, pydantic = version("bioimageio.spec"), version("pydantic")
    if _release(spec) < (0, 5, 14) and _release(pydantic) >= (2, 14):
        raise ImportError(
            f"bioimageio.spec {spec} (pinned by bioimageio.core {version('bioimageio.core')}) cannot validate under "
            f"pydantic {pydantic} (its file serializer calls pydantic's wrap handler with an argument pydantic 2.14 "
            "rejects); install pydantic<2.14: pip install 'medsegkit[export]'"
        )


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def validate_package(rdf_path: Path) -> tuple[list[str], str]:
    """Validate a package offline with ``bioimageio.core.test_model`` (format and test tensors):
    ``(failed checks, summary line)``."""
    check_bioimageio()
    from bioimageio.core import __version__ as core_version
    from bioimageio.core import test_model
    from bioimageio.spec import settings

    previous = settings.log_warnings
    settings.log_warnings = False
    try:
        summary = test_model(str(rdf_path), devices=["cpu"])
    finally:
        settings.log_warnings = previous
    failed = [d.name + ": " + "; ".join(e.msg + " at " + ".".join(map(str, e.loc)) for e in d.errors)
              for d in summary.details if d.status == "failed"]
    if summary.status != "passed" and not failed:
        failed = [f"status {summary.status}"]
    return failed, (f"bioimageio: {rdf_path.name} validated offline by bioimageio.core {core_version} "
                    f"({len(summary.details)} checks, test tensors reproduced by its own prediction)")


def zip_package(folder: Path, target: Path) -> Path:
    """The package folder as a zip (its files at the zip's root)."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, path.name)
    return target


def is_package(path: Path) -> bool:
    """A package folder (``rdf.yaml`` next to ``medsegkit.json``) or a zip holding ``rdf.yaml``."""
    if path.is_dir():
        return (path / RDF).exists()
    if path.suffix.lower() == ".zip" and path.is_file():
        if not zipfile.is_zipfile(path):  # a damaged or foreign file: not a package (the caller's error names it)
            return False
        with zipfile.ZipFile(path) as archive:
            return RDF in archive.namelist()
    return False


def unpacked(path: Path) -> Path:
    """The folder of a package: itself, or for a zip its copy unpacked once under
    ``$MEDSEGKIT_HOME/bioimageio/<sha256 prefix of the zip>/`` (unpacked into a temporary folder and
    renamed, so a half-unpacked copy is never used)."""
    if path.is_dir():
        return path
    from medsegkit.weights.hub import cache_dir

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = cache_dir().parent.expanduser() / "bioimageio" / digest
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{digest}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if Path(member).name != member:  # flat packages only: no folders, no ../ paths
                    raise ValueError(f"{path.name} holds {member!r}; a medsegkit bioimage.io zip holds files at its root")
            archive.extractall(partial)
        if not (partial / "medsegkit.json").exists():
            raise ValueError(f"{path.name} is a bioimage.io package without medsegkit.json; medsegkit opens the "
                             "packages `medsegkit export --format bioimageio` writes")
        try:
            os.replace(partial, target)
        except OSError:  # another process unpacked it first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
