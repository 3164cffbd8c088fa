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

import os
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsegkit._serialize import label_metadata_problem
from medsegkit.files import read_json_object
from medsegkit.nets.modes import evaluating

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


def check_backend(backend: str | None) -> str | None:
    """``backend`` if it is ``None`` (the model's own: PyTorch, or the export format's) or in :data:`BACKENDS`."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


# --------------------------------------------------------------------------------------------------
# writing: the ONNX graph (also OpenVINO's input, and the on-the-fly conversion for predict(backend=...))
def export_onnx(module: nn.Module, path: Path, example: torch.Tensor, *, name: str | None = None) -> Path:
    """Write ``module`` as ONNX for inputs shaped like ``example``: ``torch.export.export`` of the module, then
    ``torch.onnx.export`` of that program (the dynamo exporter, its default opset 18).

    Raises:
        ImportError: onnx / onnxscript missing (the export extra).
        ValueError: torch.onnx's exporter failed; the message names the model (``name``) and the
            innermost cause (the operator or step that could not be converted).
    """
    require_package("onnx")
    require_package("onnxscript")  # torch.onnx's dynamo exporter needs it
    import io
    import logging
    from contextlib import redirect_stdout

    quiet = io.StringIO()  # the exporter prints its steps; keep them out of the user's output
    chatty = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    previous = [log.level for log in chatty]
    for log in chatty:
        log.setLevel(logging.ERROR)
    try:
        with redirect_stdout(quiet):
            # torch.export first, outside no_grad, then ONNX from the program: handing torch.onnx the module
            # (its own export, under no_grad) made MaskFormer's decomposition step fail with an IndexError
            # in torch 2.14, while the program of the same module converts (max |Δ| 1.4e-6 on ORT)
            program = torch.export.export(module, (example,))
            torch.onnx.export(program, (example,), str(path), dynamo=True, input_names=["input"],
                              output_names=["logits"], external_data=False, verbose=False)
    except ImportError:
        raise
    except Exception as err:  # torch.onnx raises its own error types per step; the cause says which op
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = " ".join(str(cause).split())[:300]
        raise ValueError(
            f"{name or type(module).__name__} cannot be written as ONNX: torch.onnx's exporter failed "
            f"({type(err).__name__}; cause: {type(cause).__name__}: {reason}); export it as "
            "exported-program (torch.export) instead"
        ) from err
    finally:
        for log, level in zip(chatty, previous):
            log.setLevel(level)
    return path


# --------------------------------------------------------------------------------------------------
# reading: backend sessions as numpy callables
def _onnxruntime_call(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    ort = require_package("onnxruntime")
    options = ort.SessionOptions()
    threads = torch.get_num_threads()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: unused-initializer notes are not the user's business
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def _openvino_call(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    ov = require_package("openvino")
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"}
    try:
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as err:  # OpenVINO's own error types (OpConversionFailure, RuntimeError)
        raise ValueError(
            f"OpenVINO cannot run {path.name}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from err
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


def open_network(path: Path, fmt: str, backend: str | None) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """``(call, backend)``: the network file ``path`` of format ``fmt`` opened on ``backend``
    (``None`` or ``"auto"``: the format's own backend)."""
    check_backend(backend)
    backend = _DEFAULT_BACKEND[fmt] if backend in (None, "auto") else backend
    if backend not in _FORMAT_BACKENDS[fmt]:
        raise ValueError(
            f"a {fmt} export runs on {' or '.join(_FORMAT_BACKENDS[fmt])}, not backend={backend!r}; "
            f"export the model as {'onnx' if backend != 'torch' else 'exported-program'} for {backend}"
        )
    if backend == "openvino":
        return _openvino_call(path), backend
    try:
        return (_onnxruntime_call(path) if backend == "onnxruntime" else _torch_call(path, fmt)), backend
    except ImportError:
        raise
    except Exception as err:  # ONNX Runtime's and torch's own error types for a damaged or foreign file
        raise ValueError(
            f"{path} is not a readable {fmt} network ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
            f"an export holds the {FORMAT_FILES[fmt]} that `medsegkit export --format {fmt}` writes: export the "
            "model again"
        ) from err


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
        raise ValueError(f"{path.name} is not an exported network; accepted: {', '.join(_SUFFIX_FORMAT)}, an export "
                         "folder or a bioimage.io package (folder or .zip)")
    return path, fmt


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an export folder, a network file with a ``medsegkit.json`` sidecar next to it,
    or a bioimage.io package zip (``medsegkit export --format bioimageio -o OUT.zip``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return (path / SIDECAR).exists()
    if path.suffix.lower() == ".zip" and path.is_file():
        from medsegkit.inference.bioimage_package import is_package

        return is_package(path)
    return path.suffix.lower() in _SUFFIX_FORMAT and (path.parent / SIDECAR).exists()


def read_sidecar(folder: Path) -> dict[str, Any]:
    sidecar_path = folder / SIDECAR
    if not sidecar_path.exists():
        raise FileNotFoundError(
            f"{sidecar_path} is missing: an exported network needs the sidecar `medsegkit export` writes next to it"
        )
    sidecar = read_json_object(sidecar_path, "the export's sidecar", "export the model again")
    problems = _sidecar_problems(sidecar)
    if not problems and sidecar.get("metadata"):
        problems = [f"metadata.{problem}" for problem in [label_metadata_problem(sidecar["metadata"])] if problem]
    if problems:
        raise ValueError(f"{sidecar_path}: {problems[0]}; export the model again")
    return sidecar


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _sidecar_problems(sidecar: dict[str, Any]) -> list[str]:
    """What in an export's sidecar cannot describe a network: the entries :class:`ExportedNetwork` reads."""
    dims = sidecar.get("spatial_dims")
    checks = [
        ("spatial_dims", dims in (2, 3) and not isinstance(dims, bool), "2 or 3"),
        ("in_channels", _count(sidecar.get("in_channels")), "a positive integer"),
        ("batch_size", _count(sidecar.get("batch_size")), "a positive integer"),
        ("roi_size", isinstance(sidecar.get("roi_size"), list) and len(sidecar["roi_size"]) == dims
         and all(_count(r) for r in sidecar["roi_size"]), f"{dims if dims in (2, 3) else 'one'} positive integers"),
        ("metadata", sidecar.get("metadata") is None or isinstance(sidecar["metadata"], dict), "an object"),
        ("model", sidecar.get("model") is None or isinstance(sidecar["model"], dict), "an object"),
    ]
    return [f"{key} = {sidecar[key]!r:.60} is not {accepted}" if key in sidecar else f"{key} is missing ({accepted})"
            for key, ok, accepted in checks if not ok]


def load_exported(path: str | os.PathLike, *, backend: str | None = None) -> ExportedNetwork:
    """Open an export (its folder or its network file) on ``backend`` (``None`` / ``"auto"``: onnx → ONNX Runtime,
    OpenVINO IR → OpenVINO, ``.pt2`` / ``.ts`` → torch).

    Raises:
        FileNotFoundError: no such file, or no sidecar next to it.
        ValueError: a file that is not an exported network, or a backend the format does not run on.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"exported network {path} does not exist")
    if path.suffix.lower() == ".zip" and path.is_file():
        from medsegkit.inference.bioimage_package import is_package, unpacked

        if is_package(path):  # a bioimage.io package, unpacked once
            path = unpacked(path)
    network_path, fmt = _network_file(path)
    sidecar = read_sidecar(network_path.parent)
    call, backend = open_network(network_path, fmt, backend)
    return ExportedNetwork(call, sidecar, backend=backend, path=network_path)


# model -> {(backend, batch shape, weights version): network}: the conversion is made once per model
_CONVERTED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, ExportedNetwork]] = weakref.WeakKeyDictionary()


def _weights_version(model: nn.Module) -> tuple:
    """Changes when a weight is replaced or changed in place (storage pointer and version counter)."""
    return tuple((name, t.data_ptr(), t._version) for name, t in model.state_dict(keep_vars=True).items())


def backend_network(model: nn.Module, backend: str, example_shape: Sequence[int], spatial_dims: int) -> ExportedNetwork:
    """``model`` (eval mode) converted to ONNX in a temporary folder and opened on ``backend``
    (``"onnxruntime"`` / ``"openvino"``), for window batches of ``example_shape = (B, C, *roi)``.

    The conversion costs seconds; it is cached per model (weakly: the cache goes with the model), backend
    and batch shape, and made again when the model's weights change."""
    key = (backend, tuple(int(s) for s in example_shape), _weights_version(model))
    cached = _CONVERTED.get(model, {}).get(key)
    if cached is not None:
        return cached
    network = _convert(model, backend, example_shape, spatial_dims)
    per_model = _CONVERTED.setdefault(model, {})
    for old in [k for k in per_model if k[:2] == key[:2]]:  # older weights of the same configuration
        del per_model[old]
    per_model[key] = network
    return network


def _convert(model: nn.Module, backend: str, example_shape: Sequence[int], spatial_dims: int) -> ExportedNetwork:
    with evaluating(model), tempfile.TemporaryDirectory(prefix="medsegkit-backend-") as folder:
        onnx_path = export_onnx(model, Path(folder) / "model.onnx", torch.zeros(tuple(example_shape)))
        call, backend = open_network(onnx_path, "onnx", backend)
    sidecar = {"spatial_dims": spatial_dims, "in_channels": int(example_shape[1]),
               "roi_size": list(example_shape[2:]), "batch_size": int(example_shape[0]),
               "metadata": getattr(model, "medsegkit_metadata", None) or {}}
    return ExportedNetwork(call, sidecar, backend=backend)
