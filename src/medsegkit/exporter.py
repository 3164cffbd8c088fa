"""Export the whole segmentation pipeline: :func:`export` (public as ``medsegkit.export``).

An export is a folder::

    OUT/
      model.onnx | model.xml + model.bin | model.pt2 | model.ts    the network, float32
      medsegkit.json                                               the sidecar (what `segment` needs)
      test_input.npy, test_output.npy                              one window batch and PyTorch's logits

The sidecar holds the checkpoint's preprocessing (orientation, spacing, intensity), the window settings
(roi size, overlap, blending mode), class names and colours, post-processing, input channels,
``spatial_dims``, the exported batch size and the verification figures. ``segment``, ``predict`` and
``medsegkit predict`` take the folder or its network file as the model
(:func:`medsegkit.inference.backends.load_exported`).

After writing, the exported network is run on the test input on its own backend and compared with
PyTorch: logits max |Δ| ≤ 1e-4 and identical labels (a label may differ only at a near-tie, where
PyTorch's two largest logits are closer than 2e-4: within the tolerance either class is right), else
:class:`ExportMismatchError` and nothing is left at ``OUT`` (everything is written into a temporary folder next to ``OUT`` and renamed at the end).

Not yet: ``quantize="int8"`` (OpenVINO NNCF) and the ``bioimageio`` format (refused with a clear error).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsegkit.errors import MedsegkitError
from medsegkit.inference.backends import FORMAT_FILES, SIDECAR, export_onnx, load_exported

__all__ = ["FORMATS", "ExportMismatchError", "export"]

logger = logging.getLogger("medsegkit.export")

FORMATS = tuple(FORMAT_FILES)  # onnx, openvino, exported-program, torchscript
PLANNED_FORMATS = ("bioimageio",)
LOGIT_TOLERANCE = 1e-4


class ExportMismatchError(MedsegkitError, ValueError):
    """The exported network's output differs from PyTorch's on the test input."""


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _labels(logits: np.ndarray) -> np.ndarray:
    """``(B, K, *roi)`` → ``(B, *roi)``: argmax over classes, ``> 0`` for one class (as ``predict``)."""
    return (logits[:, 0] > 0).astype(np.uint8) if logits.shape[1] == 1 else logits.argmax(1)


def _margin(logits: np.ndarray) -> np.ndarray:
    """``(B, K, *roi)`` → ``(B, *roi)``: the gap between the two largest logits (``|logit|`` for one class)."""
    if logits.shape[1] == 1:
        return np.abs(logits[:, 0])
    top_two = np.partition(logits, -2, axis=1)
    return top_two[:, -1] - top_two[:, -2]


def _network_for_export(model: nn.Module) -> nn.Module:
    """The dense ``(B, C, *roi)`` → ``(B, K, *roi)`` network to export, or a clear refusal."""
    from medsegkit.inference.adapters import SemanticAdapter

    task = getattr(model, "medsegkit_task", "semantic")
    if task == "semantic":
        return model
    if task == "universal":
        return SemanticAdapter(model).eval()  # MaskFormer / Mask2Former: the semantic scores
    raise ValueError(
        f"{type(model).__name__} is a detection model (medsegkit_task={task!r}): its output is a list of "
        "detections (boxes, scores, masks) whose number depends on the image, and the windows are linked "
        "by torchvision's NMS in PyTorch; export covers dense semantic networks (U-Net family, FCN, "
        "MaskFormer / Mask2Former semantic scores). Run it with predict(..., backend='torch')"
    )


def _onnx(network: nn.Module, target: Path, example: torch.Tensor, name: str) -> Path:
    """:func:`export_onnx`, a converter failure turned into an error naming the model and the step."""
    try:
        return export_onnx(network, target, example)
    except ImportError:
        raise
    except Exception as err:  # torch.onnx raises its own error types per step; the cause says which op
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = " ".join(str(cause).split())[:300]
        raise ValueError(
            f"{name} cannot be written as ONNX: torch.onnx's exporter failed ({type(err).__name__}; cause: "
            f"{type(cause).__name__}: {reason}); export it as exported-program (torch.export) instead"
        ) from err


def _write_network(network: nn.Module, folder: Path, fmt: str, example: torch.Tensor, name: str) -> Path:
    target = folder / FORMAT_FILES[fmt]
    if fmt == "onnx":
        return _onnx(network, target, example, name)
    if fmt == "openvino":
        from medsegkit.inference.backends import require_package

        ov = require_package("openvino")
        onnx_path = _onnx(network, folder / "intermediate.onnx", example, name)
        try:
            ov.save_model(ov.convert_model(str(onnx_path)), str(target), compress_to_fp16=False)
        finally:
            onnx_path.unlink()
        return target
    if fmt == "exported-program":
        with torch.no_grad():
            program = torch.export.export(network, (example,))
        torch.export.save(program, str(target))
        return target
    with torch.no_grad():
        traced = torch.jit.trace(network, (example,), check_trace=False)
    torch.jit.save(traced, str(target))
    return target


def _sidecar(model: nn.Module, network: nn.Module, fmt: str, roi: tuple[int, ...], batch_size: int,
             in_channels: int, out_channels: int, overlap: float, mode: str, source: str) -> dict[str, Any]:
    from medsegkit import __version__
    from medsegkit.inference.segment import preprocessing_for
    from medsegkit.inference.windows import model_spatial_dims

    metadata = _jsonable(getattr(model, "medsegkit_metadata", None) or {})
    config = getattr(model, "medsegkit_config", None)
    return {
        "format_version": 1,
        "medsegkit_version": __version__,
        "torch_version": torch.__version__,
        "format": fmt,
        "network": FORMAT_FILES[fmt],
        "source": source,
        "model": _jsonable(dict(config)) if isinstance(config, dict) else None,
        "task": "semantic",
        "spatial_dims": model_spatial_dims(network),
        "in_channels": in_channels,
        "out_channels": out_channels,
        "roi_size": list(roi),
        "batch_size": batch_size,
        "overlap": overlap,
        "mode": mode,
        "preprocessing": _jsonable(preprocessing_for(model, None)),
        "class_names": metadata.get("class_names"),
        "label_colors": metadata.get("label_colors"),
        "postprocessing": {"labels": "argmax over classes" if out_channels > 1 else "logit > 0",
                           "probabilities": "softmax" if out_channels > 1 else "sigmoid"},
        "metadata": metadata,
        "test": {"input": "test_input.npy", "output": "test_output.npy"},
    }


def export(
    model_or_checkpoint: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    format: str,
    quantize: str | None = None,
    overwrite: bool = False,
    roi_size: tuple[int, ...] | None = None,
    batch_size: int = 1,
    overlap: float = 0.5,
    mode: str = "gaussian",
    log: Callable[[str], Any] | None = print,
) -> Path:
    """Export a model with everything ``segment`` needs, and prove the export gives PyTorch's result.

    Args:
        model_or_checkpoint: a model, a checkpoint path / URL, or a registry name with weights.
        path: the export folder ``OUT`` to create.
        format: ``"onnx"``, ``"openvino"`` (IR, converted from the ONNX graph), ``"exported-program"``
            (``torch.export``, ``.pt2``) or ``"torchscript"`` (traced, ``.ts``).
        quantize: ``None`` (float32); ``"int8"`` is not implemented yet (refused).
        overwrite: replace an existing ``OUT``.
        roi_size: the window size the network is exported for (default: the model's registered roi,
            else 96³ / 256²); exported networks take windows of exactly this size.
        batch_size: windows per network call ``B`` (input ``(B, C, *roi)``); larger window batches are
            split, the last part zero-padded.
        overlap, mode: the window overlap and blending recorded for ``segment``.
        log: where the verification figures are printed (``None``: only logged).

    Returns:
        ``OUT``.

    Raises:
        ValueError: an unknown format, a detection model (Mask R-CNN), a bad roi / batch size.
        FileExistsError: ``OUT`` exists and ``overwrite`` is false.
        ExportMismatchError: the exported network's logits differ by more than 1e-4 or its labels differ.
    """
    from medsegkit.inference.segment import resolve_model
    from medsegkit.inference.windows import check_overlap, default_roi, model_in_channels, model_spatial_dims

    if format == "bioimageio":
        raise ValueError("format 'bioimageio' is not implemented yet; accepted: " + ", ".join(FORMATS))
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if quantize is not None:
        raise ValueError(f"quantize={quantize!r} is not implemented yet (OpenVINO NNCF int8 is planned); "
                         "export float32 with quantize=None")
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    check_overlap(overlap)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"export {out} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")

    source = os.fspath(model_or_checkpoint) if isinstance(model_or_checkpoint, (str, os.PathLike)) else type(
        model_or_checkpoint).__name__
    model = resolve_model(model_or_checkpoint)
    network = _network_for_export(model)
    was_training = [(module, module.training) for module in network.modules()]
    network.eval()
    dims = model_spatial_dims(network)
    roi = tuple(int(r) for r in (roi_size if roi_size is not None else default_roi(model, dims)))
    if len(roi) != dims or any(r < 1 for r in roi):
        raise ValueError(f"roi_size must be {dims} positive ints for this {dims}D model, got {roi_size!r}")
    in_channels = model_in_channels(network) or 1
    generator = torch.Generator().manual_seed(0)
    # uniform [0, 1): inside what every preprocessing gives (scaled to [0, 1], or z-scored). Unit normal
    # noise drove the demo model's logits to ±275, where float32 steps are 3e-5 and the 1e-4 tolerance
    # is 3 ulp; on this input (and on the sample's own windows) its logits stay within ±40
    test_input = torch.rand((batch_size, in_channels, *roi), generator=generator)

    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    partial.mkdir()
    try:
        with torch.no_grad():
            expected = network(test_input).float().numpy()
        _write_network(network, partial, format, test_input, type(model).__name__)
        np.save(partial / "test_input.npy", test_input.numpy())
        np.save(partial / "test_output.npy", expected)
        sidecar = _sidecar(model, network, format, roi, batch_size, in_channels, int(expected.shape[1]),
                           float(overlap), mode, source)
        (partial / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        exported = load_exported(partial / FORMAT_FILES[format])
        got = exported(test_input).numpy()
        max_diff = float(np.abs(got - expected).max())
        differ = _labels(got) != _labels(expected)
        # logits within the tolerance can only swap two classes whose margin is below twice the tolerance
        unexplained = int((differ & (_margin(expected) >= 2 * LOGIT_TOLERANCE)).sum())
        figures = (f"export {format} ({exported.backend}): logits max |Δ| {max_diff:.2e} (tolerance "
                   f"{LOGIT_TOLERANCE:.0e}), labels differ at {int(differ.sum())} of {differ.size} voxels "
                   f"({unexplained} outside near-ties, top-two margin < {2 * LOGIT_TOLERANCE:.0e}) on a "
                   f"{tuple(test_input.shape)} test batch")
        same = 1.0 - float(differ.mean())
        logger.info(figures)
        if log is not None:
            log(figures)
        if not (max_diff <= LOGIT_TOLERANCE and unexplained == 0):
            raise ExportMismatchError(f"the exported network differs from PyTorch: {figures}; nothing written to {out}")
        sidecar["verification"] = {"backend": exported.backend, "max_abs_logit_diff": max_diff,
                                   "label_agreement": same, "labels_differing": int(differ.sum()),
                                   "tolerance": LOGIT_TOLERANCE}
        (partial / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        del exported  # release the backend's file handles before the rename
        if out.exists():
            old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(out, old)
            os.replace(partial, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        for module, training in was_training:
            module.training = training
    return out
