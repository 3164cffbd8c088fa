"""Exported networks and the backends that run them (ONNX Runtime, OpenVINO, torch.export, TorchScript).

An export (:func:`medsegkit.export`) is a folder holding the network file (``model.onnx``, ``model.xml`` +
``.bin``, ``model.pt2`` or ``model.ts``) and ``medsegkit.json``, the sidecar with everything
:func:`medsegkit.inference.segment` needs (preprocessing, roi size, overlap, blending mode, classes,
input channels, spatial dims). :func:`load_exported` opens one (the folder or the network file) as an
:class:`ExportedNetwork`: an ``nn.Module`` with the attributes the window engine reads
(``spatial_dims``, ``in_channels``, ``default_roi_size``, ``medsegkit_metadata``), whose forward calls
the backend. The window engine (:func:`medsegkit.inference.windows.prepared_runner`) runs it as a
:class:`BackendRunner` instead of preparing it as a PyTorch model.

Exported networks take window batches of a fixed shape ``(B, C, *roi)`` (``B`` = the export's
``batch_size``): no dynamic shapes, so every format exports every convolutional network the same way.
The runner splits a larger batch and zero-pads the last part.

The backends' packages (``onnxruntime``, ``openvino``, ``onnx``, ``onnxscript``) are the ``export`` extra
and are imported only here, inside functions.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "BACKENDS", "FORMAT_FILES", "SIDECAR", "BackendRunner", "ExportedNetwork", "backend_network", "export_onnx",
    "is_exported", "load_exported",
]

SIDECAR = "medsegkit.json"
BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
# format -> network file inside the export folder
FORMAT_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "exported-program": "model.pt2", "torchscript": "model.ts"}
_SUFFIX_FORMAT = {".onnx": "onnx", ".xml": "openvino", ".pt2": "exported-program", ".ts": "torchscript"}
# the backend each format runs on by default, and the ones it can run on
_DEFAULT_BACKEND = {"onnx": "onnxruntime", "openvino": "openvino", "exported-program": "torch", "torchscript": "torch"}
_FORMAT_BACKENDS = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",),
                    "exported-program": ("torch",), "torchscript": ("torch",)}


def require_package(package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"{package} is not installed; install the export extra: pip install 'medsegkit[export]'"
        ) from err


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


# --------------------------------------------------------------------------------------------------
# writing: the ONNX graph (also OpenVINO's input, and the on-the-fly conversion for predict(backend=...))
def export_onnx(module: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """Write ``module`` as ONNX (torch.export-based exporter, opset 18) for inputs shaped like ``example``."""
    require_package("onnx")
    require_package("onnxscript")  # torch.onnx's dynamo exporter needs it
    import io
    import logging
    from contextlib import redirect_stdout

    quiet = io.StringIO()  # the exporter prints its steps; keep them out of the user's output
    previous = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with redirect_stdout(quiet), torch.no_grad():
            torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["input"],
                              output_names=["logits"], external_data=False, verbose=False)
    finally:
        logging.getLogger("torch.onnx").setLevel(previous)
    return path


# --------------------------------------------------------------------------------------------------
# reading: backend sessions as numpy callables
def _onnxruntime_call(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    ort = require_package("onnxruntime")
    options = ort.SessionOptions()
    threads = torch.get_num_threads()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def _openvino_call(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    ov = require_package("openvino")
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def call(batch: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: batch})[output], copy=True)  # the request reuses its buffer

    return call


def _torch_call(path: Path, fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu").eval()
    else:
        module = torch.export.load(str(path)).module()

    def call(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).float().numpy()

    return call


def open_network(path: Path, fmt: str, backend: str) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """``(call, backend)``: the network file ``path`` of format ``fmt`` opened on ``backend``
    (``"auto"``: the format's own backend)."""
    check_backend(backend)
    backend = _DEFAULT_BACKEND[fmt] if backend == "auto" else backend
    if backend not in _FORMAT_BACKENDS[fmt]:
        raise ValueError(
            f"a {fmt} export runs on {' or '.join(_FORMAT_BACKENDS[fmt])}, not backend={backend!r}; "
            f"export the model as {'onnx' if backend != 'torch' else 'exported-program'} for {backend}"
        )
    if backend == "onnxruntime":
        return _onnxruntime_call(path), backend
    if backend == "openvino":
        return _openvino_call(path), backend
    return _torch_call(path, fmt), backend


# --------------------------------------------------------------------------------------------------
class ExportedNetwork(nn.Module):
    """An exported network as a semantic model: ``(B', C, *roi)`` float32 → ``(B', K, *roi)`` float32.

    Attributes:
        spatial_dims, in_channels, default_roi_size: from the sidecar (what the window engine reads).
        medsegkit_metadata: the checkpoint's metadata (preprocessing, class names, colours) plus the
            sidecar's inference settings.
        batch_size: the exported batch ``B``; any ``B'`` is run in parts of ``B`` (the last zero-padded).
        backend: ``"onnxruntime"``, ``"openvino"`` or ``"torch"``; path: the network file.
    """

    medsegkit_task = "semantic"

    def __init__(self, call: Callable[[np.ndarray], np.ndarray], sidecar: dict[str, Any], *, backend: str,
                 path: Path | None = None) -> None:
        super().__init__()
        self.call = call
        self.sidecar = sidecar
        self.backend = backend
        self.path = path
        self.spatial_dims = int(sidecar["spatial_dims"])
        self.in_channels = int(sidecar["in_channels"])
        self.default_roi_size = tuple(int(r) for r in sidecar["roi_size"])
        self.batch_size = int(sidecar["batch_size"])
        metadata = dict(sidecar.get("metadata") or {})
        for key in ("preprocessing", "class_names", "label_colors"):
            if sidecar.get(key) is not None:
                metadata[key] = sidecar[key]
        self.medsegkit_metadata = metadata
        if sidecar.get("model") is not None:
            self.medsegkit_config = dict(sidecar["model"])

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        shape = (self.in_channels, *self.default_roi_size)
        if tuple(batch.shape[1:]) != shape:
            raise ValueError(
                f"this exported network takes windows (N, {', '.join(map(str, shape))}); got {tuple(batch.shape)}. "
                "Leave roi_size unset (the export's roi is used) or export again with another roi"
            )
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        parts = []
        for first in range(0, array.shape[0], self.batch_size):
            part = array[first:first + self.batch_size]
            used = part.shape[0]
            if used < self.batch_size:
                part = np.concatenate([part, np.zeros((self.batch_size - used, *part.shape[1:]), part.dtype)])
            parts.append(np.asarray(self.call(part), dtype=np.float32)[:used])
        return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def extra_repr(self) -> str:
        return f"backend={self.backend}, roi={self.default_roi_size}, path={self.path}"


class BackendRunner:
    """The window engine's runner for an :class:`ExportedNetwork` (same contract as
    :class:`medsegkit.inference.windows.Runner`: ``(B, C, *roi)`` → float32 ``(B, K, *roi)`` on the CPU)."""

    def __init__(self, network: ExportedNetwork) -> None:
        self.network = network
        self.call = None
        self.notes = [f"backend {network.backend}"]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.network(batch)


# --------------------------------------------------------------------------------------------------
def _network_file(path: Path) -> tuple[Path, str]:
    if path.is_dir():
        for fmt, name in FORMAT_FILES.items():
            if (path / name).exists():
                return path / name, fmt
        raise FileNotFoundError(
            f"{path} holds no exported network ({', '.join(FORMAT_FILES.values())}); "
            "make one with `medsegkit export`"
        )
    fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path.name} is not an exported network; accepted: {', '.join(_SUFFIX_FORMAT)} or an export folder")
    return path, fmt


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an export folder or a network file with a ``medsegkit.json`` sidecar next to it."""
    path = Path(path).expanduser()
    if path.is_dir():
        return (path / SIDECAR).exists()
    return path.suffix.lower() in _SUFFIX_FORMAT and (path.parent / SIDECAR).exists()


def read_sidecar(folder: Path) -> dict[str, Any]:
    sidecar_path = folder / SIDECAR
    if not sidecar_path.exists():
        raise FileNotFoundError(
            f"{sidecar_path} is missing: an exported network needs the sidecar `medsegkit export` writes next to it"
        )
    return json.loads(sidecar_path.read_text())


def load_exported(path: str | os.PathLike, *, backend: str = "auto") -> ExportedNetwork:
    """Open an export (its folder or its network file) on ``backend`` (``"auto"``: onnx → ONNX Runtime,
    OpenVINO IR → OpenVINO, ``.pt2`` / ``.ts`` → torch).

    Raises:
        FileNotFoundError: no such file, or no sidecar next to it.
        ValueError: a file that is not an exported network, or a backend the format does not run on.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"exported network {path} does not exist")
    network_path, fmt = _network_file(path)
    sidecar = read_sidecar(network_path.parent)
    call, backend = open_network(network_path, fmt, backend)
    return ExportedNetwork(call, sidecar, backend=backend, path=network_path)


def backend_network(model: nn.Module, backend: str, example_shape: Sequence[int], spatial_dims: int) -> ExportedNetwork:
    """``model`` (eval mode) converted to ONNX in a temporary folder and opened on ``backend``
    (``"onnxruntime"`` / ``"openvino"``), for window batches of ``example_shape = (B, C, *roi)``; the
    conversion costs seconds, once per call."""
    was_training = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="medsegkit-backend-") as folder:
            onnx_path = export_onnx(model, Path(folder) / "model.onnx", torch.zeros(tuple(example_shape)))
            call, backend = open_network(onnx_path, "onnx", backend)
    finally:
        for module, mode in was_training:
            module.training = mode
    sidecar = {"spatial_dims": spatial_dims, "in_channels": int(example_shape[1]),
               "roi_size": list(example_shape[2:]), "batch_size": int(example_shape[0]),
               "metadata": getattr(model, "medsegkit_metadata", None) or {}}
    return ExportedNetwork(call, sidecar, backend=backend)
