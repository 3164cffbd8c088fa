"""The process a GUI runs models in: spawned, fed through files, reporting through a queue.

Why a separate process: once napari holds a GL context on Mesa (Xvfb, many Linux desktops), importing
``triton`` segfaults the process, and ``monai.networks.nets``, ``torchvision.ops`` and
``torch._dynamo`` all import it. So the napari process imports no torch-side module at all; every
model (and the model catalogue the widget shows) lives in a fresh process started with the ``spawn``
method. A crash or an out-of-memory kill there ends that process only.

The conversation has two sides:

- parent side (napari's process, no torch): :mod:`medsegkit.napari._worker_client` (``WorkerJob``,
  ``write_input_array``, ``read_output``, ``describe_models``);
- child side (this module): :func:`serve`, the loop the spawned process runs (imports torch, MONAI,
  the registry, :mod:`medsegkit.inference` and :mod:`medsegkit.bundle`), one job after another.

Place in the architecture: an application on top of the core, beside :mod:`medsegkit.cli` (it drives
both inference and bundles, so it lives above both, not inside :mod:`medsegkit.inference`); it uses the
core's layer geometry (:mod:`medsegkit.io.geometry`) and never imports the napari package.

Protocol. A job is a JSON-able ``dict``. Arrays travel as files in the job's folder, never pickled:
an in-memory array as a ``.npy`` file (written and read through ``numpy.lib.format.open_memmap``), a
lazy array (dask, zarr) as a zarr store read window by window. Requests ``(job_id, job)`` arrive on
one ``multiprocessing`` queue (``None`` ends the process); the child answers on another with tuples
tagged by the job id::

    ("started", job_id, {"pid": int, "device": str})
    ("progress", job_id, done, total)                  # after every window batch
    ("result", job_id, {...})                          # where the output lies (see the job kinds)
    ("error", job_id, "TypeName: one-line message")    # the core's exception, first line
    ("cancelled", job_id)

and checks a ``multiprocessing.Event`` between window batches (``predict(..., cancel=event)``).
A child that dies without a final message (segfault, ``os._exit``, the kernel's OOM killer) is reported
by the parent as :class:`WorkerDied` naming the exit code or signal.

Job kinds (``job["action"]``):

``"describe"``
    ``{"action": "describe", "checkpoints": [path, ...]}`` → ``{"models": {name: info}, "checkpoints":
    {path: info}, "devices": [...], "errors": {name_or_path: message}}`` where ``info`` is
    ``model_info(...).to_dict()`` (for a checkpoint: of the recorded name and arguments, plus
    ``"checkpoint_metadata"``).
``"segment"``
    see :func:`segment_job` for the keys; result ``{"path", "format", "shape", "dtype", "class_names"}``.
``"warm"``
    ``{"action": "warm", "model": {...} | None}``: import torch and the inference modules now and, when
    a model is named, load it and keep it (so the first Run pays neither); see :func:`warm_job`.
``"session_run"``, ``"session_refine"``, ``"session_undo"``, ``"session_reset"``, ``"session_save"``
    progressive Run and correction by scribbles through :class:`medsegkit.interactive.Session`, kept in
    this process between jobs: see :func:`session_job`. A ``session_run`` also sends
    ``("update", job_id, {"path", "shape", "dtype", "region", "class_names", ...})`` messages as regions finish (the labels
    are in the ``.npy`` file ``path``; ``region`` is ``[[start, stop], ...]`` in napari axis order).
``"bundle"``
    run a MONAI bundle folder (its network, pre- and post-processing) on the layer: see
    :func:`bundle_job`; same result as ``"segment"``. A bundle run has no cancel points: Cancel ends
    the process (the parent's terminate path).

Test hook (tests only): the environment variable ``MEDSEGKIT_WORKER_TEST_CRASH`` set to ``"start"`` or
``"progress"`` makes the child end itself with ``os._exit(86)`` at that point, as a segfault or an
OOM kill would, so the parent's crash handling can be tested without crashing anything else;
``"hang"`` makes it sleep at the start of every job without checking ``cancel`` (for the terminate path);
``"block-refine"`` makes a ``"session_refine"`` job wait, after its first adaptation step, until
``cancel`` is set (or 120 s pass), so a test can cancel or kill a refine while it is certainly running.
The variable is read by the child, so it must be set before the worker process is spawned.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsegkit.errors import Cancelled

__all__ = ["bundle_job", "describe_job", "run_job", "segment_job", "serve", "session_job", "warm_job"]

TEST_CRASH_ENV = "MEDSEGKIT_WORKER_TEST_CRASH"
TEST_CRASH_EXIT_CODE = 86
SESSION_ACTIONS = ("session_run", "session_refine", "session_undo", "session_reset", "session_save")
ACTIONS = ("describe", "segment", "bundle", "warm", *SESSION_ACTIONS)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) and text.startswith(("'", '"')) and text.endswith(("'", '"')):
        text = text[1:-1]  # KeyError repr-quotes its message
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _maybe_test_crash(point: str) -> None:
    value = os.environ.get(TEST_CRASH_ENV)
    if value == point:
        os._exit(TEST_CRASH_EXIT_CODE)
    if value == "hang" and point == "start":  # a worker that never reaches a cancel check
        import time

        time.sleep(3600)


def serve(requests: Any, messages: Any, cancel: Any) -> None:
    """Entry point of the spawned process: run ``(job_id, job)`` requests until ``None`` arrives.

    Every message carries the job id: ``(kind, job_id, *payload)``.
    """
    with contextlib.suppress(OSError):  # leave the CPU to the viewer first
        os.nice(5)
    try:
        while True:
            request = requests.get()
            if request is None:
                break
            job_id, job = request
            run_job(job_id, job, messages, cancel)
    finally:
        messages.close()
        messages.join_thread()


def run_job(job_id: int, job: Mapping[str, Any], messages: Any, cancel: Any) -> None:
    """Run one job, reporting ``started`` and then ``result``, ``error`` or ``cancelled``."""

    class _Tagged:
        def put(self, message: tuple) -> None:
            messages.put((message[0], job_id, *message[1:]))

    tagged = _Tagged()
    try:
        tagged.put(("started", {"pid": os.getpid(), "device": job.get("predict", {}).get("device") or "cpu"}))
        _maybe_test_crash("start")
        action = job.get("action")
        if action == "describe":
            result = describe_job(job)
        elif action == "segment":
            result = segment_job(job, tagged, cancel)
        elif action == "bundle":
            result = bundle_job(job, tagged, cancel)
        elif action == "warm":
            result = warm_job(job)
        elif action in SESSION_ACTIONS:
            result = session_job(job, tagged, cancel)
        else:
            raise ValueError(f"unknown worker action {action!r}; expected one of {list(ACTIONS)}")
        tagged.put(("result", result))
    except Cancelled:
        tagged.put(("cancelled",))
    except Exception as err:  # every failure becomes one message; the parent shows it to the user
        tagged.put(("error", _one_line(err)))


def _devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.device_count() > 1 else []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def _checkpoint_info(path: str) -> dict[str, Any]:
    from medsegkit.registry import model_info
    from medsegkit.weights import read_checkpoint

    _, record = read_checkpoint(path, map_location="cpu")
    model = record.get("model") or {}
    if "name" not in model:
        raise ValueError(f"checkpoint {path} does not record a registry model name")
    info = model_info(model["name"], **model.get("overrides", {})).to_dict()
    info["has_weights"] = True
    info["overrides"] = model.get("overrides", {})
    info["checkpoint_metadata"] = record.get("metadata", {})
    return info


def describe_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """``model_info(name).to_dict()`` for every registered name and every checkpoint given, plus devices."""
    from medsegkit.registry import list_models, model_info

    models: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in list_models():
        try:
            models[name] = model_info(name).to_dict()
        except Exception as err:  # one broken entry must not hide the others; reported to the user
            errors[name] = _one_line(err)
    checkpoints: dict[str, Any] = {}
    for path in job.get("checkpoints", []):
        try:
            checkpoints[str(path)] = _checkpoint_info(str(path))
        except Exception as err:
            errors[str(path)] = _one_line(err)
    return {"models": models, "checkpoints": checkpoints, "devices": _devices(), "errors": errors}


_model_cache: dict[str, Any] = {}


def _model_key(spec: Mapping[str, Any]) -> str:
    checkpoint = spec.get("checkpoint")
    stamp = None
    if checkpoint and os.path.isfile(checkpoint):
        st = os.stat(checkpoint)
        stamp = (st.st_size, st.st_mtime_ns)
    return repr((spec.get("name"), checkpoint, stamp, bool(spec.get("pretrained"))))


def _load_model(spec: Mapping[str, Any]):
    """The model a job names (the last one is kept loaded while the same file / name is asked for)."""
    return _load_model_timed(spec)[0]


def _load_model_timed(spec: Mapping[str, Any]) -> tuple[Any, bool, float]:
    """``(model, loaded, seconds)``: ``loaded`` is ``False`` when the kept model was reused (``seconds`` 0)."""
    import time

    key = _model_key(spec)
    if key in _model_cache:
        return _model_cache[key], False, 0.0
    start = time.perf_counter()
    _model_cache.clear()
    _model_cache[key] = _build_model(spec)
    return _model_cache[key], True, time.perf_counter() - start


def _build_model(spec: Mapping[str, Any]):
    """Build the model a job names: a checkpoint file, or a registry name with ``pretrained``."""
    checkpoint = spec.get("checkpoint")
    name = spec.get("name")
    if checkpoint:
        from medsegkit.registry import create_model, load_model
        from medsegkit.weights import load_checkpoint, read_checkpoint

        _, record = read_checkpoint(checkpoint, map_location="cpu")
        if "name" in (record.get("model") or {}) or "target" in (record.get("model") or {}) or not name:
            return load_model(checkpoint)
        return load_checkpoint(create_model(name), checkpoint).eval()
    if not name:
        raise ValueError("the job names no model: give a registry name or a checkpoint path")
    if not spec.get("pretrained"):
        raise ValueError(
            f"{name} has no weights loaded: choose a checkpoint file (or pretrained weights where the model "
            "has them) instead of segmenting with random weights"
        )
    from medsegkit.registry import create_model

    return create_model(name, pretrained=True).eval()


def _open_input(spec: Mapping[str, Any]) -> Any:
    if spec["format"] == "npy":
        return np.load(spec["path"], mmap_mode="r")
    if spec["format"] == "zarr":
        import zarr

        return zarr.open_array(spec["path"], mode="r")
    raise ValueError(f"unknown input format {spec['format']!r}; expected 'npy' or 'zarr'")


@dataclass
class _Layer:
    """A layer's array as a model sees it, with the geometry the core needs (see :func:`_layer_input`)."""

    data: Any  # channels first when ``has_channels``; spatial axes in napari order (z, y, x)
    has_channels: bool
    n_spatial: int
    layer_channel_axis: int | None  # the layer dim that held the channels (None: none, or RGB's colour axis)
    affine: np.ndarray  # 4x4 RAS affine of the voxel-order array ``reverse_spatial(data)``


def _layer_input(job: Mapping[str, Any], data: Any, *, model_dims: int, in_channels: Any) -> _Layer:
    """The one layer → model-input prelude of :func:`segment_job` and :func:`bundle_job`.

    Finds the channel axis (``job["rgb"]``, ``job["channel_axis"]``; see
    :func:`medsegkit.io.geometry.resolve_channel_axis`) and moves it first (RGBA loses alpha unless
    the model takes 4 channels), checks that 2 or 3 spatial axes remain, and turns the layer's
    ``job["world_affine"]`` (napari order, channel dim dropped) into the voxel-order RAS affine.
    A zarr input stays lazy (a dask array once the channel axis moves).
    """
    from medsegkit.io.geometry import drop_axis, image_affine_from_world, resolve_channel_axis

    channel_axis = resolve_channel_axis(
        tuple(data.shape), rgb=bool(job.get("rgb")), choice=job.get("channel_axis", "auto"),
        model_dims=model_dims, in_channels=in_channels if isinstance(in_channels, int) else None,
    )
    if channel_axis is not None:
        if isinstance(data, np.ndarray):
            data = np.moveaxis(data, channel_axis, 0)
        else:
            import dask.array as da

            data = da.from_zarr(data) if not isinstance(data, da.Array) else data
            data = data.transpose((channel_axis, *[a for a in range(data.ndim) if a != channel_axis]))
        if job.get("rgb") and data.shape[0] == 4 and in_channels != 4:
            data = data[:3]  # RGBA: the model sees RGB
    has_channels = channel_axis is not None
    n_spatial = data.ndim - (1 if has_channels else 0)
    if n_spatial not in (2, 3):
        raise ValueError(
            f"the layer has {n_spatial} spatial axes (array shape {tuple(data.shape)}); 2D and 3D images are "
            "supported: choose the channel axis, or take one time point / one plane first"
        )
    world = job.get("world_affine")
    layer_channel_axis = None if job.get("rgb") else channel_axis  # RGB's colour axis is not a layer dim
    if world is not None and layer_channel_axis is not None:
        world = drop_axis(np.asarray(world, dtype=float), layer_channel_axis)
    affine = image_affine_from_world(world) if world is not None else np.eye(4)
    return _Layer(data, has_channels, n_spatial, layer_channel_axis, affine)


def _to_voxel_order(kwargs: dict[str, Any], n_spatial: int) -> dict[str, Any]:
    """Per-axis options given in napari axis order ``(z, y, x)`` → the voxel order ``(i, j, k)``."""
    kwargs = dict(kwargs)
    if kwargs.get("roi_size") is not None and not isinstance(kwargs["roi_size"], int):
        kwargs["roi_size"] = tuple(reversed(tuple(kwargs["roi_size"])))
    if kwargs.get("tta_flips") and not isinstance(kwargs["tta_flips"], str):  # "auto" names no axis
        kwargs["tta_flips"] = tuple(n_spatial - 1 - int(a) for a in kwargs["tta_flips"])
    if kwargs.get("slice_axis") is not None:
        kwargs["slice_axis"] = n_spatial - 1 - int(kwargs["slice_axis"])
    return kwargs


def segment_job(job: Mapping[str, Any], messages: Any, cancel: Any) -> dict[str, Any]:
    """Run one model on one array (child side) and write the result into ``job["output_dir"]``.

    Keys of ``job``:
        ``model``: ``{"name": str | None, "checkpoint": path | None, "pretrained": bool}``.
        ``input``: ``{"format": "npy" | "zarr", "path": str}``: the layer's array in napari's axis
            order (multiscale: the full-resolution level).
        ``rgb``: napari's ``layer.rgb`` (colour axis last; RGBA loses alpha unless the model takes 4).
        ``channel_axis``: ``"auto"`` (default), ``None`` or an axis index: see
            :func:`medsegkit.io.geometry.resolve_channel_axis`.
        ``world_affine``: the layer's ``(ndim+1, ndim+1)`` data → world matrix (napari order; a channel
            axis among the layer's dims is dropped here), or ``None`` for the identity.
        ``predict``: keyword arguments for :func:`medsegkit.inference.segment` / ``predict``, per-axis
            ones (``roi_size``, ``tta_flips``, ``slice_axis``) in napari axis order: ``overlap``,
            ``fast``, ``device``, ``task``, ``sw_batch_size``, ...
        ``output``: ``"labels"`` or ``"probabilities"``.
        ``output_dir``: folder to write the result into.
        ``threads``: torch CPU threads (optional).

    In-memory input (``.npy``) goes through :func:`medsegkit.inference.segment` (the checkpoint's
    preprocessing and its inverse) on an :class:`~medsegkit.io.Image` built from the layer's geometry,
    with the spatial axes reversed to the core's ``(i, j, k)`` order and back. Lazy input (zarr) goes
    through :func:`medsegkit.inference.predict` window by window into a zarr store, in napari's axis
    order (no preprocessing: a lazy volume is never resampled whole).

    Returns:
        ``{"format": "npy" | "zarr", "path", "shape", "dtype", "class_names", "task", "layer_channel_axis"}``
        (the layer dim that held the channels, ``None`` if none or RGB); the output is
        ``(*spatial)`` labels or ``(K, *spatial)`` float32 probabilities, in napari axis order.
    """
    import torch

    from medsegkit.io.geometry import reverse_spatial

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    output = job.get("output", "labels")
    if output not in ("labels", "probabilities"):
        raise ValueError(f"output must be 'labels' or 'probabilities', got {output!r}")
    model = _load_model(job["model"])
    data = _open_input(job["input"])
    model_dims = int(getattr(model, "spatial_dims", 0) or 0) or (2 if data.ndim == 2 else 3)
    layer = _layer_input(job, data, model_dims=model_dims, in_channels=getattr(model, "in_channels", None))
    data, has_channels, n_spatial = layer.data, layer.has_channels, layer.n_spatial
    metadata = getattr(model, "medsegkit_metadata", {}) or {}
    common = {"class_names": list(metadata.get("class_names", []) or []),
              "layer_channel_axis": layer.layer_channel_axis,
              "label_colors": [list(c) for c in metadata.get("label_colors", []) or []],
              "task": job.get("predict", {}).get("task") or getattr(model, "medsegkit_task", "semantic")}

    def progress(done: int, total: int) -> None:
        messages.put(("progress", int(done), int(total)))
        _maybe_test_crash("progress")

    output_dir = Path(job["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(job.get("predict", {}))

    if job["input"]["format"] == "zarr":
        from medsegkit.inference import predict

        if model_dims == 2 and n_spatial == 3 and kwargs.get("slice_axis") is None:
            kwargs["slice_axis"] = 0  # napari's slider axis (z), the axis segment() slices along too

        path = output_dir / "output.zarr"
        out = predict(model, data, output=output, out=str(path), progress=progress, cancel=cancel, **kwargs)
        return {"format": "zarr", "path": str(path), "shape": list(out.shape), "dtype": str(out.dtype), **common}

    from medsegkit.inference import segment
    from medsegkit.io import Image

    voxels = reverse_spatial(np.asarray(data), n_spatial)
    image = Image(voxels, layer.affine, {"source": "napari layer"}, 0 if has_channels else None)
    result = segment(model, image, output=output, progress=progress, cancel=cancel,
                     **_to_voxel_order(kwargs, n_spatial))
    array = np.asarray(getattr(result, "array", result))
    array = np.ascontiguousarray(reverse_spatial(array, n_spatial))
    path = output_dir / "output.npy"
    target = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    target[...] = array
    target.flush()
    del target
    return {"format": "npy", "path": str(path), "shape": list(array.shape), "dtype": str(array.dtype), **common}


def _write_npy(array: np.ndarray, path: Path) -> None:
    target = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    target[...] = array
    target.flush()
    del target


def bundle_job(job: Mapping[str, Any], messages: Any, cancel: Any) -> dict[str, Any]:
    """Run a MONAI bundle folder's ``configs/inference.json`` on one layer (child side).

    The layer is written, with its geometry, to a temporary ``.nii.gz`` (:func:`medsegkit.io.write_image`),
    :func:`medsegkit.bundle.run_bundle` runs the bundle on it (its network, preprocessing and
    post-processing, whose ``Invertd`` brings the result back onto the input's grid), and the
    ``<name>_seg.nii.gz`` it writes is read back (:func:`medsegkit.io.read_image`).

    Keys of ``job``: ``bundle`` (the bundle folder), and ``input``, ``rgb``, ``channel_axis``,
    ``world_affine``, ``output_dir``, ``threads`` as for :func:`segment_job` (the bundle's
    ``network_data_format`` gives the input channels and spatial dims). ``cancel`` is checked before and
    after the run only: a bundle run cannot stop between windows.

    Returns:
        As :func:`segment_job`: ``{"format": "npy", "path", "shape", "dtype", "class_names", "task",
        "layer_channel_axis"}``; the output is a ``(*spatial)`` label map in napari axis order on the
        layer's grid. ``class_names`` come from the bundle's ``channel_def``.

    Raises:
        FileNotFoundError: the folder is not a bundle (no ``configs/metadata.json``).
        ValueError: the layer does not fit the bundle, or the bundle's output is not on the layer's grid.
    """
    import tempfile

    import torch

    from medsegkit.bundle.runner import run_bundle
    from medsegkit.files import read_json_object
    from medsegkit.io import Image, read_image, write_image
    from medsegkit.io.geometry import reverse_spatial

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    bundle = Path(job["bundle"]).expanduser()
    meta_file = bundle / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{bundle} is not a MONAI bundle folder: configs/metadata.json is missing "
            "(choose the bundle's top folder, the one holding configs/ and models/)"
        )
    fmt = read_json_object(meta_file, "bundle metadata", "fix it or export the bundle again").get("network_data_format", {})
    image_fmt = fmt.get("inputs", {}).get("image", {})
    in_channels = image_fmt.get("num_channels")
    model_dims = len(image_fmt.get("spatial_shape") or [0, 0, 0])
    channel_def = fmt.get("outputs", {}).get("pred", {}).get("channel_def", {}) or {}
    class_names = [str(channel_def[k]) for k in sorted(channel_def, key=lambda k: int(k) if str(k).isdigit() else 0)]

    layer = _layer_input(job, np.asarray(_open_input(job["input"])),
                         model_dims=model_dims if model_dims in (2, 3) else 3, in_channels=in_channels)
    has_channels, n_spatial, layer_channel_axis = layer.has_channels, layer.n_spatial, layer.layer_channel_axis
    voxels = np.ascontiguousarray(reverse_spatial(layer.data, n_spatial))
    if voxels.dtype.kind == "b":
        voxels = voxels.astype(np.uint8)
    if cancel.is_set():
        raise Cancelled("cancelled; no layer was added")

    output_dir = Path(job["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bundle-", dir=output_dir) as tmp:
        source = write_image(Image(voxels, layer.affine, {"source": "napari layer"}, 0 if has_channels else None),
                             Path(tmp) / "layer.nii.gz")
        written = run_bundle(bundle, [source], Path(tmp) / "out")
        if cancel.is_set():
            raise Cancelled("cancelled; no layer was added")
        result = read_image(written[0])
    array = result.array
    if result.channel_axis is not None:
        if array.shape[result.channel_axis] != 1:
            raise ValueError(
                f"the bundle wrote {array.shape[result.channel_axis]} channels; a label map (one channel) is "
                "expected: its post-processing should end with an argmax (AsDiscreted argmax=True)"
            )
        array = np.take(array, 0, axis=result.channel_axis)
    spatial = voxels.shape[1:] if has_channels else voxels.shape
    if tuple(array.shape) != tuple(spatial):
        raise ValueError(
            f"the bundle's output has shape {tuple(array.shape)}, not the layer's {tuple(spatial)} (i, j, k): "
            "its post-processing must invert the preprocessing (Invertd) so the result lies on the input's grid"
        )
    if array.dtype.kind == "f":
        array = np.rint(array).astype(np.int32)
    array = np.ascontiguousarray(reverse_spatial(array, n_spatial))
    path = output_dir / "output.npy"
    _write_npy(array, path)
    return {"format": "npy", "path": str(path), "shape": list(array.shape), "dtype": str(array.dtype),
            "class_names": class_names, "label_colors": [], "layer_channel_axis": layer_channel_axis,
            "task": "semantic"}


# ---------------------------------------------------------------------------------------------------
# warm-up and interactive sessions


def warm_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Import torch and the inference modules now and, when ``job["model"]`` names a model, load it and
    keep it (:func:`_load_model`), so that the first Run pays neither.

    Returns:
        ``{"import_seconds", "model_loaded", "load_seconds"}``.
    """
    import time

    start = time.perf_counter()
    import torch  # noqa: F401  (the import is the point)

    import medsegkit.inference.segment  # noqa: F401
    import medsegkit.interactive  # noqa: F401

    imported = time.perf_counter() - start
    loaded, load_seconds = False, 0.0
    if job.get("model"):
        _, loaded, load_seconds = _load_model_timed(job["model"])
    return {"import_seconds": imported, "model_loaded": loaded, "load_seconds": load_seconds}


@dataclass
class _SessionEntry:
    """A :class:`medsegkit.interactive.Session` kept in this process, and where its labels are published."""

    session: Any
    spec: Mapping[str, Any]  # the session_run job that made it (what a restarted worker rebuilds it from)
    n_spatial: int
    path: Path  # <output_dir>/labels.npy: the labels in napari axis order, shared with the parent
    labels: Any = None  # that file's memory map, made at the first update

    def publish(self, region: tuple[slice, ...] | None) -> list[list[int]] | None:
        """Copy ``region`` (voxel order) of the session's labels into the shared file; the region in
        napari order as ``[[start, stop], ...]`` (``None`` for nothing)."""
        labels = self.session.labels
        if region is None or labels is None:
            return None
        from medsegkit.io.geometry import reverse_spatial

        if self.labels is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.labels = np.lib.format.open_memmap(self.path, mode="w+", dtype=labels.dtype,
                                                    shape=tuple(reversed(labels.shape)))
        napari_region = tuple(reversed(region))
        self.labels[napari_region] = reverse_spatial(labels[region], self.n_spatial)
        return [[s.start, s.stop] for s in napari_region]

    def file_info(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": "npy", "shape": list(self.labels.shape),
                "dtype": str(self.labels.dtype)}


_sessions: dict[str, _SessionEntry] = {}


def _focus_of(view: Mapping[str, Any] | None, layer: _Layer) -> dict[str, int] | None:
    """The slice on screen as a :meth:`Session.run` focus (voxel order), or ``None`` for the whole volume.

    ``view`` is ``{"point": [...], "displayed": [...]}``: the viewer's current point in the layer's data
    coordinates (one per layer dim) and the layer dims on screen. A 3D image with exactly one spatial
    dim off screen (napari's 2D view) gives that slice; the 3D view or a 2D image gives ``None``.
    """
    if not view or layer.n_spatial != 3:
        return None
    point, displayed = list(view["point"]), {int(d) for d in view["displayed"]}
    dims = [d for d in range(len(point)) if d != layer.layer_channel_axis]  # the spatial layer dims
    if len(dims) != layer.n_spatial:
        return None
    hidden = [i for i, d in enumerate(dims) if d not in displayed]
    if len(hidden) != 1:
        return None
    axis = hidden[0]  # napari order among the spatial axes
    size = int(layer.data.shape[-layer.n_spatial:][axis])
    index = int(np.clip(round(float(point[dims[axis]])), 0, size - 1))
    return {"axis": layer.n_spatial - 1 - axis, "index": index}


def _new_session(spec: Mapping[str, Any]) -> tuple[_SessionEntry, dict[str, Any], _Layer]:
    """A Session on the job's layer and model (the model kept loaded is reused); timings in the info."""
    import time

    from medsegkit.interactive import Session
    from medsegkit.io import Image
    from medsegkit.io.geometry import reverse_spatial

    model, loaded, load_seconds = _load_model_timed(spec["model"])
    data = _open_input(spec["input"])
    model_dims = int(getattr(model, "spatial_dims", 0) or 0) or (2 if data.ndim == 2 else 3)
    layer = _layer_input(spec, np.asarray(data), model_dims=model_dims,
                         in_channels=getattr(model, "in_channels", None))
    start = time.perf_counter()
    voxels = reverse_spatial(np.asarray(layer.data), layer.n_spatial)
    image = Image(voxels, layer.affine, {"source": "napari layer"}, 0 if layer.has_channels else None)
    session = Session(model, image, **_to_voxel_order(dict(spec.get("predict", {})), layer.n_spatial))
    # saved adapted models name the file (or registry name) the user chose, not the class
    session.source_name = str(spec["model"].get("checkpoint") or spec["model"].get("name") or session.source_name)
    info = {"model_loaded": loaded, "load_seconds": load_seconds, "session_seconds": time.perf_counter() - start}
    _sessions.clear()  # one session at a time: each keeps every window's output
    entry = _SessionEntry(session, dict(spec), layer.n_spatial, Path(spec["output_dir"]) / "labels.npy")
    _sessions[str(spec["session"])] = entry
    return entry, info, layer


def _session_common(entry: _SessionEntry, layer: _Layer | None = None) -> dict[str, Any]:
    session = entry.session
    metadata = getattr(session.original, "medsegkit_metadata", {}) or {}
    common = {"class_names": list(metadata.get("class_names", []) or []),
              "label_colors": [list(c) for c in metadata.get("label_colors", []) or []],
              "task": "semantic", "classes": session.num_classes,
              "rounds": session.rounds}
    if layer is not None:
        common["layer_channel_axis"] = layer.layer_channel_axis
    return common


def session_job(job: Mapping[str, Any], messages: Any, cancel: Any) -> dict[str, Any]:
    """Interactive segmentation jobs on a :class:`medsegkit.interactive.Session` kept in this process.

    ``"session_run"``: the keys of :func:`segment_job` (``model``, ``input``, ``rgb``, ``channel_axis``,
    ``world_affine``, ``predict`` — only the options :class:`Session` takes —, ``output_dir``,
    ``threads``) plus ``session`` (an id the parent chooses), ``view`` (see :func:`_focus_of`): the
    slice on screen is computed first, and ``preview`` (default ``True``: that slice is first labelled
    approximately from a thin slab, see :meth:`Session.run`). Each finished region is copied into
    ``<output_dir>/labels.npy`` (napari order) and announced with an ``("update", {"path", "format",
    "shape", "dtype", "region", "preview", ...})`` message. The model kept loaded is reused
    (``model_loaded`` says whether this job loaded it); ``first_update_seconds`` and
    ``exact_focus_seconds`` time the first region and the exact slice from the start of the run.

    ``"session_refine"`` (``scribbles``: an input spec of an integer array in napari order, ``0``
    unmarked, ``c + 1`` class ``c``; ``seconds``), ``"session_undo"``, ``"session_reset"`` and
    ``"session_save"`` (``path``) act on the session ``job["session"]``; when this process does not hold
    it (it was restarted after a crash), it is rebuilt from ``job["spec"]`` (the ``session_run`` job)
    and run whole first, and its whole label map is published; so is a session whose ``session_run`` was
    cancelled, before a refine, undo or reset (until 2026-12-08 these failed with ``AttributeError:
    'NoneType' object has no attribute 'copy'``). A refine passes only the marks that are
    new (differ from the session's marks) to :meth:`Session.refine`, so the parent may send its whole
    corrections layer each time.

    Returns:
        ``{"path", "format", "shape", "dtype", "region", "class_names", "label_colors", "task",
        "classes", "rounds", ...}``; ``region`` (napari order ``[[start, stop], ...]`` or ``None``) is
        what changed in the shared labels file; ``"session_save"`` returns ``{"path", "rounds"}``.
    """
    import time

    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    action = job["action"]
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        messages.put(("progress", int(done), int(total)))
        _maybe_test_crash("progress")

    if action == "session_run":
        entry, info, layer = _new_session(job)
        focus = _focus_of(job.get("view"), layer)
        first: list[float] = []
        common: dict[str, Any] = {}
        run_start = time.perf_counter()

        def on_update(region: tuple[slice, ...], _labels: np.ndarray) -> None:
            napari_region = entry.publish(region)
            preview = bool(entry.session.previewing)
            if not first:
                first.append(time.perf_counter() - run_start)
                common.update(_session_common(entry, layer))  # class names and colours for the new layer
            if not preview and not exact:
                exact.append(time.perf_counter() - run_start)
            messages.put(("update", {**entry.file_info(), "region": napari_region, "preview": preview, **common}))

        exact: list[float] = []
        entry.session.run(focus=focus, on_update=on_update, progress=progress, cancel=cancel,
                          preview=bool(job.get("preview", True)))
        info.update(run_seconds=time.perf_counter() - run_start, first_update_seconds=first[0] if first else None,
                    exact_focus_seconds=exact[0] if exact else None, job_seconds=time.perf_counter() - started)
        full = [[0, n] for n in entry.labels.shape]
        return {**entry.file_info(), "region": full, "focus": focus, **_session_common(entry, layer), **info}

    key = str(job.get("session"))
    entry = _sessions.get(key)
    rebuilt = entry is None
    if rebuilt:
        spec = job.get("spec")
        if not spec:
            raise ValueError(f"this worker process holds no session {key!r} and the job gives no spec to rebuild it")
        entry, _, _ = _new_session(spec)
    session = entry.session
    everything = tuple(slice(0, n) for n in session.image.spatial_shape)
    # rebuilt, or its session_run was cancelled (a save needs no labels): run it whole first
    completed = not session.finished and (rebuilt or action != "session_save")
    if completed:
        session.run(progress=progress, cancel=cancel)
        entry.publish(everything)

    if action == "session_save":
        path = session.save(job["path"], overwrite=bool(job.get("overwrite")))
        return {"path": str(path), "rounds": session.rounds, "rebuilt": rebuilt}

    before = session.labels.copy()
    steps = scope = None
    if action == "session_refine":
        from medsegkit.io.geometry import reverse_spatial

        scribbles = np.asarray(_open_input(job["scribbles"]))
        if scribbles.shape != entry.labels.shape:
            raise ValueError(f"the corrections have shape {scribbles.shape}, the result {tuple(entry.labels.shape)}: "
                             "paint on the corrections layer made for this result")
        scribbles = np.ascontiguousarray(reverse_spatial(scribbles, entry.n_spatial))
        if scribbles.dtype.kind not in "iu":
            raise ValueError(f"the corrections must be integer labels (0 = unmarked, c + 1 = class c), "
                             f"got {scribbles.dtype}")
        if scribbles.size and scribbles.min() < 0:  # Session.refine's rule: negatives would be dropped here
            raise ValueError(f"the corrections must be >= 0 (0 = unmarked, c + 1 = class c), got {scribbles.min()}")
        new = (scribbles > 0) & (scribbles != session.marks)
        if not new.any():
            raise ValueError("no new marks: paint strokes on the corrections layer (label c + 1 marks class c, "
                             "1 marks background) before pressing Refine")
        delta = np.where(new, scribbles, 0).astype(np.int32)
        blocking = {"armed": os.environ.get(TEST_CRASH_ENV) == "block-refine"}

        def refine_progress(done: int, total: int) -> None:
            progress(done, total)
            if blocking["armed"] and done < 70:  # test hook: hold the refine until cancel is set
                blocking["armed"] = False
                cancel.wait(120)

        progress(0, 100)
        session.refine(delta, seconds=job.get("seconds"), progress=refine_progress, cancel=cancel,
                       scope=job.get("scope", "auto"))
        steps, scope = session.last_steps, session.last_scope
    elif action == "session_undo":
        session.undo()
    elif action == "session_reset":
        session.reset()
    else:  # pragma: no cover - SESSION_ACTIONS is checked by run_job
        raise ValueError(f"unknown session action {action!r}")
    from medsegkit.interactive import bounding_box

    region = everything if completed else bounding_box(before != session.labels)
    napari_region = entry.publish(region)
    return {**entry.file_info(), "region": napari_region, "rebuilt": rebuilt, "steps": steps, "scope": scope,
            "seconds": time.perf_counter() - started, **_session_common(entry)}
