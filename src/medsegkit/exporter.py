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

``quantize="int8"`` (OpenVINO only) quantizes the OpenVINO model with NNCF's post-training quantization,
calibrated on the checkpoint's own sample / validation volumes (or ``calibration=``); it is verified by
label agreement (≥ 99.5 % of the calibration voxels) instead of the float32 logit tolerance, and recorded
under ``MEDSEGKIT_HOME`` so that ``predict(..., backend="auto")`` measures it too.

``format="bioimageio"`` writes a bioimage.io model package (:mod:`medsegkit.inference.bioimage_package`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsegkit.errors import MedsegkitError
from medsegkit.inference.backends import FORMAT_FILES, SIDECAR, export_onnx, is_exported, load_exported
from medsegkit.nets.modes import evaluating

__all__ = ["FORMATS", "ExportMismatchError", "export"]

logger = logging.getLogger("medsegkit.export")

FORMATS = (*FORMAT_FILES, "bioimageio")  # onnx, openvino, exported-program, torchscript, bioimageio
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
    """:func:`export_onnx`; a converter failure is a ``ValueError`` naming the model and the failing step."""
    return export_onnx(network, target, example, name=name)


def _write_network(network: nn.Module, folder: Path, fmt: str, example: torch.Tensor, name: str,
                   calibration: np.ndarray | None = None) -> Path:
    """Write the network file of ``fmt`` into ``folder``; with ``calibration`` (``(W, B, C, *roi)`` window
    batches) the OpenVINO model is quantized to int8 by NNCF first."""
    target = folder / FORMAT_FILES[fmt]
    if fmt == "onnx":
        return _onnx(network, target, example, name)
    if fmt == "openvino":
        from medsegkit.inference.backends import require_package

        ov = require_package("openvino")
        ov_model = _openvino_model(ov, network, folder, example, name)
        if calibration is not None:
            ov_model = _quantize_int8(ov_model, calibration)
        ov.save_model(ov_model, str(target), compress_to_fp16=False)
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


def _openvino_model(ov: Any, network: nn.Module, folder: Path, example: torch.Tensor, name: str) -> Any:
    """The OpenVINO model of ``network``: converted from its ONNX graph; where ONNX or OpenVINO's ONNX
    frontend fails (Mask2Former: its ``ReduceSum`` / ``Slice`` on booleans), from its ``torch.export``
    program by OpenVINO's PyTorch frontend. Both failing is a ``ValueError`` naming the model and both causes."""
    onnx_path = folder / "intermediate.onnx"
    try:
        _onnx(network, onnx_path, example, name)
        return ov.convert_model(str(onnx_path))
    except ImportError:
        raise
    except Exception as err:  # torch.onnx's or OpenVINO's own error types; the fallback below decides
        onnx_failure = " ".join(str(err).split())[:300]
        logger.info("openvino: converting %s from ONNX failed (%s); converting its torch.export program", name,
                    onnx_failure)
    finally:
        onnx_path.unlink(missing_ok=True)
    try:
        program = torch.export.export(network, (example,))
        return ov.convert_model(program)
    except Exception as err:  # OpenVINO's PyTorch frontend raises its own error types
        raise ValueError(
            f"{name} cannot be written as OpenVINO IR: from ONNX: {onnx_failure}; from its torch.export program: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:300]}; export it as exported-program instead"
        ) from err


def _quantize_int8(ov_model: Any, calibration: np.ndarray) -> Any:
    """NNCF post-training quantization of an OpenVINO model on ``calibration`` ``(W, B, C, *roi)``:
    the ``MIXED`` preset (symmetric weights, asymmetric activations: PReLU / softmax inputs are not
    centred on zero), every calibration batch used, NNCF's full bias correction: the fast one left the
    shipped demo model's labels agreeing on 98.76 % of the calibration voxels, the full one on 99.78 %."""
    from medsegkit.inference.backends import require_package

    nncf = require_package("nncf")
    logging.getLogger("nncf").setLevel(logging.WARNING)  # NNCF logs every step at INFO
    dataset = nncf.Dataset(list(calibration))
    return nncf.quantize(ov_model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(calibration),
                         fast_bias_correction=False)


def _recorded_volumes(model: nn.Module) -> list[Path]:
    """The checkpoint's own sample / validation volumes: file names recorded in its training metadata
    (``metadata["training"]["data"]["images"]``) that are shipped sample files."""
    from medsegkit.data import SAMPLE_FILES, sample_path

    training = (getattr(model, "medsegkit_metadata", None) or {}).get("training") or {}
    names = ((training.get("data") or {}).get("images") or []) if isinstance(training, dict) else []
    shipped = {file: name for name, file in SAMPLE_FILES.items()}
    return [sample_path(shipped[Path(n).name]) for n in names if Path(str(n)).name in shipped]


def calibration_windows(model: nn.Module, volumes: Sequence[Any] | None, roi: tuple[int, ...], batch_size: int,
                        in_channels: int, overlap: float, limit: int = 300) -> tuple[np.ndarray, list[str]]:
    """Int8 calibration data: ``(W, B, C, *roi)`` window batches of the volumes, preprocessed as
    ``segment`` does (the model's recorded preprocessing), cut by the same sliding-window grid as
    inference (``overlap``; at most ``limit`` batches, evenly spaced), and the volumes' names.

    ``volumes``: image paths or :class:`~medsegkit.io.Image` s; ``None``: the checkpoint's own sample /
    validation volumes (for the demo model the shipped MNI152 T1).
    """
    from medsegkit.inference.segment import preprocessing_for
    from medsegkit.inference.windows import WindowGrid, as_source
    from medsegkit.io import Image, read_image
    from medsegkit.transforms import preprocess

    if volumes is None:
        volumes = _recorded_volumes(model)
        if not volumes:
            raise ValueError(
                "quantize='int8' needs calibration volumes: this checkpoint records no sample or validation "
                "volumes; pass calibration=[image paths] (--calibration FILE ...)"
            )
    spec = preprocessing_for(model, None)
    windows, names = [], []
    for volume in volumes:
        image = volume if isinstance(volume, Image) else read_image(volume)
        names.append(Path(str(volume)).name if not isinstance(volume, Image) else "image")
        tensor, _ = preprocess(image, spec)
        source, _ = as_source(tensor.as_tensor()[None], len(roi), in_channels, None)
        grid = WindowGrid(source.spatial, roi, (overlap,) * len(roi))
        windows += [grid.read(source, 0, window, 0.0).numpy() for window in grid.slices]
    if len(windows) % batch_size:  # whole batches: repeat the first windows
        windows += windows[:batch_size - len(windows) % batch_size]
    batches = np.stack(windows).reshape(-1, batch_size, *windows[0].shape).astype(np.float32)
    if len(batches) > limit:
        batches = batches[np.linspace(0, len(batches) - 1, limit).round().astype(int)]
    return batches, names


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


def _check_replaceable(out: Path, source: Any) -> None:
    """Refuse ``overwrite`` where replacing ``out`` would delete what is not an earlier export: a folder of
    other files, any other file, or the checkpoint being exported (``out`` is it, or holds it)."""
    from medsegkit.files import same_file

    if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().exists():
        checkpoint = Path(source).expanduser()
        if same_file(checkpoint, out) or out.resolve() in checkpoint.resolve().parents:
            raise ValueError(f"export {out} holds the model it exports ({source}); choose another output "
                             "(overwrite never applies to inputs)")
    empty_folder = out.is_dir() and not any(out.iterdir())
    if not (empty_folder or is_exported(out)):
        raise FileExistsError(f"{out} exists and is not a medsegkit export (no {SIDECAR}); overwrite replaces only "
                              "an earlier export or an empty folder, never other files: choose another output")


def export(
    model_or_checkpoint: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    format: str,
    quantize: str | None = None,
    calibration: Sequence[Any] | None = None,
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
        path: the export folder ``OUT`` to create (``bioimageio``: a folder, or a ``.zip`` file).
        format: ``"onnx"``, ``"openvino"`` (IR, converted from the ONNX graph), ``"exported-program"``
            (``torch.export``, ``.pt2``), ``"torchscript"`` (traced, ``.ts``) or ``"bioimageio"`` (a
            bioimage.io model package: ``rdf.yaml``, ONNX weights (TorchScript where ONNX cannot hold the
            graph), test tensors, the sidecar as an attachment).
        quantize: ``None`` (float32) or ``"int8"`` (``format="openvino"`` only): NNCF post-training
            quantization calibrated on ``calibration``.
        calibration: int8 calibration volumes (image paths or :class:`~medsegkit.io.Image` s), cut into
            windows as inference does; default: the checkpoint's own sample / validation volumes.
        overwrite: replace an existing ``OUT`` that is an earlier export (or an empty folder); never a
            folder of other files, another file, or the checkpoint being exported.
        roi_size: the window size the network is exported for (default: the model's registered roi,
            else 96³ / 256²); exported networks take windows of exactly this size.
        batch_size: windows per network call ``B`` (input ``(B, C, *roi)``); larger window batches are
            split, the last part zero-padded.
        overlap, mode: the window overlap and blending recorded for ``segment``.
        log: where the verification figures are printed (``None``: only logged).

    Returns:
        ``OUT``.

    Raises:
        ValueError: an unknown format, a detection model (Mask R-CNN), a bad roi / batch size, int8 for
            another format than openvino, int8 without calibration volumes.
        FileExistsError: ``OUT`` exists and ``overwrite`` is false, or ``OUT`` is not an earlier export.
        ValueError: ``OUT`` is (or holds) the checkpoint being exported.
        ExportMismatchError: float32: the exported network's logits differ by more than 1e-4 or its labels
            differ; int8: its labels agree with PyTorch's on less than 99.5 % of the calibration voxels.
    """
    from medsegkit.inference.segment import resolve_model
    from medsegkit.inference.windows import (
        MODES,
        check_overlap,
        default_roi,
        model_in_channels,
        model_spatial_dims,
    )

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize == "int8" and format != "openvino":
        raise ValueError(f"quantize='int8' is OpenVINO's post-training quantization (NNCF); use format='openvino', "
                         f"not {format!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    check_overlap(overlap)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if format == "bioimageio":
        if batch_size != 1:
            raise ValueError(f"format 'bioimageio' takes batch_size=1 (bioimage.io runs batches of 1 and the exported "
                             f"network's batch is fixed), got {batch_size}")
        from medsegkit.inference.bioimage_package import check_bioimageio

        check_bioimageio()  # before any work: a missing or broken bioimageio install is an ImportError
    out = Path(path).expanduser()
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"export {out} exists; pass overwrite=True (--overwrite) to replace it")
        _check_replaceable(out, model_or_checkpoint)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    as_zip = format == "bioimageio" and out.suffix.lower() == ".zip"

    source = os.fspath(model_or_checkpoint) if isinstance(model_or_checkpoint, (str, os.PathLike)) else type(
        model_or_checkpoint).__name__
    model = resolve_model(model_or_checkpoint)
    network = _network_for_export(model)
    with evaluating(network):  # every module's own mode comes back, also when this raises
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
        windows = names = None
        if quantize == "int8":
            windows, names = calibration_windows(model, calibration, roi, batch_size, in_channels, float(overlap))

        partial = out.with_name(f".{out.stem}.{uuid.uuid4().hex[:8]}.partial")
        partial.mkdir()
        try:
            with torch.no_grad():
                expected = network(test_input).float().numpy()
            network_format = format
            if format == "bioimageio":
                from medsegkit.inference.bioimage_package import weights_format

                network_format = weights_format(network, partial, test_input, type(model).__name__, _write_network)
            else:
                _write_network(network, partial, format, test_input, type(model).__name__, windows)
            np.save(partial / "test_input.npy", test_input.numpy())
            np.save(partial / "test_output.npy", expected)
            sidecar = _sidecar(model, network, network_format, roi, batch_size, in_channels, int(expected.shape[1]),
                               float(overlap), mode, source)
            if quantize == "int8":
                sidecar["quantize"] = {"precision": "int8", "method": "NNCF post-training quantization, MIXED preset",
                                       "calibration": names, "calibration_batches": len(windows)}
            (partial / SIDECAR).write_text(json.dumps(sidecar, indent=2))
            exported = load_exported(partial / FORMAT_FILES[network_format])
            if quantize == "int8":
                sidecar["verification"] = _verify_int8(exported, network, windows, test_input, out, log)
            else:
                sidecar["verification"] = _verify_float32(exported, network_format, expected, test_input, out, log)
            if format == "bioimageio":
                sidecar["format"] = "bioimageio"
            (partial / SIDECAR).write_text(json.dumps(sidecar, indent=2))
            del exported  # release the backend's file handles before the rename
            if format == "bioimageio":
                from medsegkit.inference.bioimage_package import RDF, validate_package, write_package

                write_package(partial, sidecar, model)
                failed, figures = validate_package(partial / RDF)
                if failed:
                    raise ExportMismatchError(f"bioimage.io validation failed: {' | '.join(failed)[:1500]}; nothing written to {out}")
                _report(figures, log)
            if as_zip:
                from medsegkit.inference.bioimage_package import zip_package

                zipped = zip_package(partial, out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial.zip"))
                shutil.rmtree(partial)
                partial = zipped
            if out.exists():
                old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
                os.replace(out, old)
                os.replace(partial, out)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            else:
                os.replace(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
            raise
    if quantize == "int8":
        from medsegkit.inference.autobackend import record_int8_export

        record_int8_export(model, out / FORMAT_FILES[format], (batch_size, in_channels, *roi))
    return out


def _report(figures: str, log: Callable[[str], Any] | None) -> None:
    logger.info(figures)
    if log is not None:
        log(figures)


def _verify_float32(exported: Any, fmt: str, expected: np.ndarray, test_input: torch.Tensor, out: Path,
                    log: Callable[[str], Any] | None) -> dict[str, Any]:
    got = exported(test_input).numpy()
    max_diff = float(np.abs(got - expected).max())
    differ = _labels(got) != _labels(expected)
    # logits within the tolerance can only swap two classes whose margin is below twice the tolerance
    unexplained = int((differ & (_margin(expected) >= 2 * LOGIT_TOLERANCE)).sum())
    figures = (f"export {fmt} ({exported.backend}): logits max |Δ| {max_diff:.2e} (tolerance "
               f"{LOGIT_TOLERANCE:.0e}), labels differ at {int(differ.sum())} of {differ.size} voxels "
               f"({unexplained} outside near-ties, top-two margin < {2 * LOGIT_TOLERANCE:.0e}) on a "
               f"{tuple(test_input.shape)} test batch")
    _report(figures, log)
    if not (max_diff <= LOGIT_TOLERANCE and unexplained == 0):
        raise ExportMismatchError(f"the exported network differs from PyTorch: {figures}; nothing written to {out}")
    return {"backend": exported.backend, "max_abs_logit_diff": max_diff, "label_agreement": 1.0 - float(differ.mean()),
            "labels_differing": int(differ.sum()), "tolerance": LOGIT_TOLERANCE}


def _verify_int8(exported: Any, network: nn.Module, windows: np.ndarray, test_input: torch.Tensor, out: Path,
                 log: Callable[[str], Any] | None) -> dict[str, Any]:
    """Int8 cannot meet the float32 logit tolerance: its labels must agree with PyTorch's float32 labels
    on ≥ 99.5 % of the calibration windows' voxels (the share ``backend="auto"`` and the fast path keep)."""
    from medsegkit.inference.autobackend import MIN_AGREEMENT

    same = total = 0
    max_diff = 0.0
    with torch.no_grad():
        for batch in windows:
            batch = torch.from_numpy(batch)
            reference = network(batch).float().numpy()
            got = exported(batch).numpy()
            same += int((_labels(got) == _labels(reference)).sum())
            total += reference.shape[0] * int(np.prod(reference.shape[2:]))
            max_diff = max(max_diff, float(np.abs(got - reference).max()))
    agreement = same / total
    figures = (f"export openvino int8 ({exported.backend}): labels agree with PyTorch float32 on {100 * agreement:.3f} % "
               f"of {total} calibration voxels ({len(windows)} window batches; minimum {100 * MIN_AGREEMENT} %), "
               f"logits max |Δ| {max_diff:.3g}")
    _report(figures, log)
    if agreement < MIN_AGREEMENT:
        raise ExportMismatchError(f"the int8 network differs from PyTorch: {figures}; nothing written to {out}")
    return {"backend": exported.backend, "precision": "int8", "label_agreement": agreement,
            "calibration_voxels": total, "max_abs_logit_diff": max_diff, "min_agreement": MIN_AGREEMENT}
