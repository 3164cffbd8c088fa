"""``predict(..., backend="auto")``: measure the backends on this machine, keep the faithful ones, run the fastest.

The first call for a model on a machine runs **one window batch** of the image (the grid's middle
windows, the shape the run will use) on each available configuration:

==========================  ========================================================================
``torch`` ``float32``       eager PyTorch, the reference
``torch`` ``bf16``          the fast path (BatchNorm folding, channels-last, bf16 autocast); only where
                            :func:`medsegkit.amp.bf16_supported` (native bf16), never for query models
``openvino`` ``float32``    the model converted to ONNX and compiled by OpenVINO (f32 precision hint)
``openvino`` ``int8``       an int8 export of the same model (``medsegkit export --quantize int8``),
                            when one was made on this machine (recorded under ``MEDSEGKIT_HOME``)
``onnxruntime`` ``float32`` the same ONNX graph on ONNX Runtime's CPU provider
==========================  ========================================================================

Each configuration is called once to warm up (oneDNN / OpenVINO set-up), then ``ROUNDS`` times in
turn (interleaved, so a busy machine slows all of them alike); its time is the best round. A
configuration is kept when its labels agree with torch float32 on at least ``MIN_AGREEMENT`` (99.5 %)
of the batch's voxels; the fastest kept one runs the whole image. A configuration that cannot be built
(a package missing, a graph the ONNX exporter refuses) is left out with its reason in the notes.

The choice is cached in ``$MEDSEGKIT_HOME/backend_choices.json`` (default ``~/.cache/medsegkit``;
written atomically) under a key made of the model's hash (class, registry config and every weight),
the CPU model, the thread count and the window batch shape (roi included); later calls with the same key
skip the measurement. The choice and an ETA (batches × measured time) are printed to stderr.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BackendChoice", "MIN_AGREEMENT", "cache_path", "choose_backend", "cpu_name", "model_hash", "on_choice", "open_int8",
           "record_int8_export"]

logger = logging.getLogger("medsegkit.inference")

MIN_AGREEMENT = 0.995
ROUNDS = 2
CACHE_FILE = "backend_choices.json"
INT8_INDEX_FILE = "int8_exports.json"


def medsegkit_home() -> Path:
    """``$MEDSEGKIT_HOME`` (default ``~/.cache/medsegkit``), as the weights cache reads it."""
    from medsegkit.weights.hub import cache_dir

    return cache_dir().parent.expanduser()


def cache_path() -> Path:
    return medsegkit_home() / CACHE_FILE


def cpu_name() -> str:
    """The CPU model as ``/proc/cpuinfo`` names it (else :func:`platform.processor`)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def model_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the class name, the registry config and every state tensor."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "medsegkit_config", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()[:16]


# every (backend, precision) that auto measures: a cached choice outside this list is measured again
CONFIGURATIONS = (("torch", "float32"), ("torch", "bf16"), ("openvino", "float32"), ("openvino", "int8"),
                  ("onnxruntime", "float32"))


@dataclass
class BackendChoice:
    """What ``backend="auto"`` runs: ``backend`` (``torch`` / ``openvino`` / ``onnxruntime``) in ``precision``
    (``float32`` / ``bf16`` / ``int8``), its best time per window batch of ``batch_shape``, every measured
    configuration (``{"torch float32": {"ms": ..., "agreement": ...}, ...}``), the ones left out and why."""

    backend: str
    precision: str
    ms_per_batch: float
    batch_shape: list[int]
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    cached: bool = False
    int8_export: str | None = None
    cpu: str = ""
    threads: int = 0
    measured_at: str = ""

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    def describe(self, batches: int) -> str:
        eta = batches * self.ms_per_batch / 1000
        others = ", ".join(f"{name} {m['ms']:.0f} ms ({100 * m['agreement']:.2f} %)"
                           for name, m in self.measured.items() if name != self.name)
        origin = "cached choice" if self.cached else "measured now"
        return (f"backend auto: {self.name}, {self.ms_per_batch:.0f} ms per window batch {tuple(self.batch_shape)} "
                f"({origin}; {others or 'no other configuration'}); ETA {eta:.1f} s for {batches} batches")


# --------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:  # a damaged cache is re-measured, not fatal
        logger.warning("ignoring unreadable %s (%s); it will be rewritten", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_entry(path: Path, key: str, value: Any) -> None:
    from medsegkit.files import atomic_write

    data = _read_json(path)
    data[key] = value
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def record_int8_export(model: nn.Module, network_path: Path, batch_shape: Sequence[int]) -> None:
    """Remember (under ``MEDSEGKIT_HOME``) that ``network_path`` is an int8 export of ``model`` for
    window batches of ``batch_shape``: ``backend="auto"`` then measures it too."""
    _write_json_entry(medsegkit_home() / INT8_INDEX_FILE, f"{model_hash(model)}|{list(batch_shape)}",
                      str(Path(network_path).resolve()))


def _int8_export_for(model_key: str, batch_shape: Sequence[int]) -> Path | None:
    path = _read_json(medsegkit_home() / INT8_INDEX_FILE).get(f"{model_key}|{list(batch_shape)}")
    return Path(path) if isinstance(path, str) and path and Path(path).exists() else None


# (int8 network file, its and its weights' mtimes) -> the network compiled by OpenVINO: compiling costs
# about a second, which a cached auto run would otherwise pay on every call
_OPENED_INT8: dict[tuple[str, int, int], Any] = {}
_OPENED_INT8_MAX = 4


def open_int8(path: str | Path) -> Any:
    """The int8 export ``path`` (``model.xml``) opened on OpenVINO, compiled once per process and file
    version (a rewritten export is opened again)."""
    from medsegkit.inference.backends import load_exported

    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns, path.with_suffix(".bin").stat().st_mtime_ns)
    network = _OPENED_INT8.get(key)
    if network is None:
        network = load_exported(path, backend="openvino")
        for old in [k for k in _OPENED_INT8 if k[0] == key[0]]:  # an older version of the same file
            del _OPENED_INT8[old]
        while len(_OPENED_INT8) >= _OPENED_INT8_MAX:  # the oldest opened first
            del _OPENED_INT8[next(iter(_OPENED_INT8))]
        _OPENED_INT8[key] = network
    return network


def _labels(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0) if logits.shape[1] == 1 else logits.argmax(1)


def choice_key(model_key: str, batch_shape: Sequence[int]) -> str:
    return f"{model_key}|{cpu_name()}|threads={torch.get_num_threads()}|batch={list(batch_shape)}"


def choose_backend(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    spatial_dims: int,
    allow_bf16: bool = True,
    use_cache: bool = True,
    rounds: int = ROUNDS,
    log: Callable[[str], Any] | None = None,
) -> BackendChoice:
    """Measure ``batch`` (``(B, C, *roi)``, float32, CPU) on each configuration and return the fastest
    whose labels agree ≥ 99.5 % with torch float32 (cached per model, CPU, threads and batch shape).

    Args:
        model: the dense PyTorch model ``(B, C, *roi)`` → ``(B, K, *roi)``.
        batch: one real window batch of the image.
        spatial_dims: the model's spatial dims.
        allow_bf16: consider the bf16 fast path (false for query models, where it is refused).
        use_cache: read and write the cache.
        rounds: timed rounds after the warm-up.
        log: where progress lines of the measurement go (``None``: the logger only).
    """
    from medsegkit.amp import bf16_supported
    from medsegkit.inference.backends import BackendRunner, backend_network
    from medsegkit.inference.windows import prepared_runner

    shape = list(batch.shape)
    model_key = model_hash(model)
    key = choice_key(model_key, shape)
    if use_cache:
        entry = _read_json(cache_path()).get(key)
        if isinstance(entry, dict):
            try:
                choice = BackendChoice(**entry)
                if (choice.backend, choice.precision) not in CONFIGURATIONS or not isinstance(
                        choice.ms_per_batch, (int, float)) or not isinstance(choice.measured, dict):
                    raise TypeError(f"{choice.backend!r} {choice.precision!r} is not a configuration auto measures")
            except TypeError as err:
                logger.warning("ignoring a cached backend choice of another layout (%s)", err)
            else:
                choice.cached = True
                if choice.backend == "openvino" and choice.precision == "int8" and not (
                        choice.int8_export and Path(choice.int8_export).exists()):
                    logger.info("the cached int8 export %s is gone; measuring again", choice.int8_export)
                else:
                    return choice

    say = log or (lambda text: None)
    skipped: dict[str, str] = {}
    int8_path = _int8_export_for(model_key, shape)
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    # the conversions first: torch.onnx's exporter cannot run inside the runners' inference_mode
    converted: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for backend in ("openvino", "onnxruntime"):
        name = f"{backend} float32"
        try:
            converted[name] = BackendRunner(backend_network(model, backend, shape, spatial_dims))
        except (ImportError, ValueError) as err:  # package missing, or a graph ONNX cannot hold
            skipped[name] = " ".join(str(err).split())[:200]
    if int8_path is not None:
        try:
            converted["openvino int8"] = BackendRunner(open_int8(int8_path))
        except (ImportError, ValueError, FileNotFoundError) as err:
            skipped["openvino int8"] = " ".join(str(err).split())[:200]
    else:
        skipped["openvino int8"] = "no int8 export of this model (medsegkit export --quantize int8)"
    cpu = torch.device("cpu")
    with contextlib.ExitStack() as stack:
        runners["torch float32"] = stack.enter_context(
            prepared_runner(model, device=cpu, fast=False, amp=False, example_shape=tuple(shape)))
        if not allow_bf16:
            skipped["torch bf16"] = "the bf16 fast path is refused for this model"
        elif not bf16_supported("cpu"):
            skipped["torch bf16"] = "this CPU has no native bf16 (AVX-512 BF16 / AMX)"
        else:
            runners["torch bf16"] = stack.enter_context(
                prepared_runner(model, device=cpu, fast=True, amp=False, example_shape=tuple(shape)))
        runners.update(converted)

        labels: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for name, run in runners.items():  # warm-up: first-call set-up is not what a window costs
                say(f"backend auto: warming up {name}")
                labels[name] = _labels(run(batch).float())
            best = {name: float("inf") for name in runners}
            for _ in range(max(1, rounds)):
                for name, run in runners.items():
                    started = time.perf_counter()
                    run(batch)
                    best[name] = min(best[name], 1000 * (time.perf_counter() - started))
    reference = labels["torch float32"]
    measured = {name: {"ms": round(best[name], 2),
                       "agreement": float((labels[name] == reference).float().mean())} for name in runners}
    for name, figures in measured.items():
        say(f"backend auto: {name} {figures['ms']:.1f} ms, labels agree {100 * figures['agreement']:.3f} %")
    faithful = [name for name, figures in measured.items() if figures["agreement"] >= MIN_AGREEMENT]
    for name in set(measured) - set(faithful):
        skipped[name] = f"labels agree {100 * measured[name]['agreement']:.2f} % < {100 * MIN_AGREEMENT} % with torch float32"
    fastest = min(faithful, key=lambda name: measured[name]["ms"])
    backend, precision = fastest.split()
    choice = BackendChoice(backend=backend, precision=precision, ms_per_batch=measured[fastest]["ms"],
                           batch_shape=shape, measured=measured, skipped=skipped,
                           int8_export=str(int8_path) if fastest == "openvino int8" else None,
                           cpu=cpu_name(), threads=torch.get_num_threads(),
                           measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if use_cache:
        record = asdict(choice)
        record.pop("cached")
        try:
            _write_json_entry(cache_path(), key, record)
        except OSError as err:  # a read-only home still runs, measuring again next time
            logger.warning("could not cache the backend choice in %s: %s", cache_path(), err)
    return choice


# callbacks told of each choice as it is made (the CLI's progress bar shows it): see :func:`on_choice`
_LISTENERS: list[Callable[[BackendChoice], Any]] = []


@contextlib.contextmanager
def on_choice(callback: Callable[[BackendChoice], Any]):
    """While the ``with`` block runs, ``callback(choice)`` is called for every ``backend="auto"`` choice
    before its run starts (``medsegkit predict --backend auto`` writes it into the progress bar)."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)


def announce(choice: BackendChoice, batches: int) -> None:
    """Print the choice and its ETA for ``batches`` window batches to stderr (and the log), and tell the
    :func:`on_choice` listeners."""
    text = choice.describe(batches)
    logger.info(text)
    print(text, file=sys.stderr, flush=True)
    for callback in list(_LISTENERS):
        callback(choice)


def measurement_batch(grid, source, batch_size: int, slice_axis: int | None, cval: float) -> torch.Tensor:
    """``(B, C, *model_roi)``: the grid's middle ``batch_size`` windows of image 0 (repeated when the grid
    has fewer), as the runner receives them (the slice axis squeezed for a 2D model on a volume)."""
    count = len(grid.slices)
    first = max(0, count // 2 - batch_size // 2)
    indices = [(first + i) % count for i in range(batch_size)]
    batch = torch.stack([grid.read(source, 0, grid.slices[i], cval) for i in indices])
    if slice_axis is not None:
        batch = batch.squeeze(2 + slice_axis)
    return batch.contiguous()
