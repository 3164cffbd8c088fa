"""The "Segment" dock widget: run any registry model (or a checkpoint, or a MONAI bundle folder) on an image layer.

The widget is a thin client. It never imports torch-side code: the model catalogue comes from a worker
process (:mod:`medsegkit.napari._catalog`), and each Run spawns a worker process
(:mod:`medsegkit.worker`) driven from a ``napari.qt.threading`` generator worker that relays
its progress. The layer's array goes to the worker as a ``.npy`` memory map (or a zarr store for
dask/zarr/multiscale layers), and the result comes back the same way.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    create_widget,
)

from medsegkit.errors import Cancelled
from medsegkit.io.geometry import drop_axis
from medsegkit.napari import _catalog
from medsegkit.napari._geometry import data_to_world_matrix
from medsegkit.napari._worker_client import WorkerJob, read_output, write_input_array

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["SegmentWidget", "parse_roi_size"]

DEMO_PREFIX = "demo: "
LOADING = "(loading the model list…)"
_session_dir: Path | None = None


def _results_dir() -> Path:
    """A folder for this session's job files; zarr-backed results must outlive their job, so it is
    removed when Python exits."""
    global _session_dir
    if _session_dir is None or not _session_dir.exists():
        _session_dir = Path(tempfile.mkdtemp(prefix="medsegkit-napari-"))
        atexit.register(shutil.rmtree, _session_dir, True)
    return _session_dir


def parse_roi_size(text: str) -> int | tuple[int, ...] | None:
    """``"auto"``/empty → ``None``; ``"96"`` → ``96``; ``"96, 96, 64"`` → ``(96, 96, 64)`` (napari axis order)."""
    text = text.strip().lower()
    if text in ("", "auto", "default"):
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"roi size {text!r} is not understood; write 'auto', one size (96) or one per axis (96, 96, 64)"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"roi size must be positive integers, got {text!r}")
    return values[0] if len(values) == 1 else values


class SegmentWidget(Container):
    """Dock widget: image layer, model, weights, inference options, Run / Cancel, progress."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self._entries: dict[str, dict[str, Any]] = {}  # choice text -> entry
        self._catalog: dict[str, Any] | None = None
        self._job: WorkerJob | None = None
        self._thread_worker: Any = None
        self.last_error: str | None = None
        self.last_run_seconds: float | None = None

        import napari.layers

        self.image = create_widget(annotation=napari.layers.Image, label="image")
        # Choices are callables of the widget state: napari calls reset_choices() on docked widgets
        # whenever layers change, which re-reads them (a static list would be reset to its first value).
        self.channel_axis = ComboBox(label="channel axis", choices=self._channel_choices, value="auto",
                                     tooltip="which axis holds the channels when the layer has one more axis "
                                             "than the model's spatial dims ('auto' decides when unambiguous)")
        self.model_filter = LineEdit(label="filter", tooltip="shell-style or plain text filter on model names")
        self.model = ComboBox(label="model", choices=self._model_choices)
        self.model_info = Label(label="", value="")
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.safetensors *.pt *.pth *.ckpt",
                                   tooltip="weights for the chosen model (medsegkit checkpoint or state dict)")
        self.bundle = FileEdit(label="bundle folder", mode="d",
                               tooltip="a MONAI bundle folder (configs/, models/): when set, Run runs the bundle's "
                                       "inference.json (its network, pre- and post-processing) instead of the model")
        self.pretrained = CheckBox(text="registered pretrained weights", value=False, enabled=False)
        self.roi_size = LineEdit(label="roi size", value="auto",
                                 tooltip="window size: 'auto' (the model's default), 96, or one per axis (z, y, x)")
        self.overlap = FloatSpinBox(label="overlap", value=0.5, min=0.0, max=0.95, step=0.05)
        self.tta = CheckBox(text="mirror test-time augmentation", value=False)
        self.fast = CheckBox(text="fast path (BN folding, channels-last, bf16)", value=False,
                             tooltip="not for MaskFormer / Mask2Former: bf16 changes their labels, so it is refused")
        self.device = ComboBox(label="device", choices=self._device_choices, value="cpu")
        self.task = ComboBox(label="task", choices=["semantic", "instance", "panoptic"], value="semantic",
                             enabled=False, tooltip="for universal (MaskFormer / Mask2Former) models")
        self.output = ComboBox(label="output", choices=["labels", "probabilities"], value="labels")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = Label(label="status", value="")
        self.quality = Label(label="quality", value="")  # QC flags of the last labels result
        self.last_quality: Any = None  # their table (pandas.DataFrame), one row per structure
        self.extend([
            self.image, self.channel_axis, self.model_filter, self.model, self.model_info, self.checkpoint,
            self.bundle, self.pretrained, self.roi_size, self.overlap, self.tta, self.fast, self.device, self.task,
            self.output, self.run_button, self.cancel_button, self.progress, self.status, self.quality,
        ])

        for label in (self.model_info, self.status, self.quality):  # long messages wrap instead of widening the dock
            label.native.setWordWrap(True)
        self.model_filter.changed.connect(self._refresh_model_choices)
        self.model.changed.connect(self._on_model_changed)
        self.image.changed.connect(self._on_image_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)

        self._add_demo_entry()
        self._refresh_model_choices()
        self._on_image_changed()
        cached = _catalog.cached_catalog()
        if cached is not None:
            self._set_catalog(cached)
        else:
            self._fetch_catalog()

    # -- catalogue ------------------------------------------------------------------------------------
    def _add_demo_entry(self) -> None:
        demo = _catalog.demo_checkpoint()
        if demo is not None:
            key = DEMO_PREFIX + demo.stem
            self._entries[key] = {"kind": "checkpoint", "path": str(demo), "label": demo.stem, "info": None}

    def _fetch_catalog(self) -> None:
        from napari.qt.threading import create_worker

        self.status.value = "asking a worker process for the model list…"
        # errored connected at creation: superqt re-raises otherwise
        self._catalog_worker = create_worker(
            _catalog.fetch_catalog, _connect={"returned": self._set_catalog, "errored": self._catalog_failed}
        )

    def _catalog_failed(self, err: BaseException) -> None:
        from napari.utils.notifications import show_error

        self.status.value = f"could not load the model list: {err}"
        show_error(f"medsegkit: could not load the model list: {err}")

    def _set_catalog(self, catalog: dict[str, Any]) -> None:
        self._catalog = catalog
        for path, info in catalog.get("checkpoints", {}).items():
            for entry in self._entries.values():
                if entry["kind"] == "checkpoint" and entry["path"] == path:
                    entry["info"] = info
        for name, info in catalog.get("models", {}).items():
            self._entries[name] = {"kind": "registry", "name": name, "label": name, "info": info}
        self.device.reset_choices()
        self.device.value = "cuda" if "cuda" in self.device.choices else "cpu"
        if catalog.get("errors"):
            self.status.value = "some entries could not be described: " + "; ".join(
                f"{k}: {v}" for k, v in catalog["errors"].items())
        else:
            self.status.value = f"{len(catalog.get('models', {}))} models available"
        self._refresh_model_choices()

    def _model_choices(self, *_: Any) -> list[str]:
        pattern = self.model_filter.value.strip().lower() if hasattr(self, "model_filter") else ""
        names = [k for k in self._entries if k.startswith(DEMO_PREFIX)]
        names += sorted(k for k in self._entries if not k.startswith(DEMO_PREFIX))
        if pattern:
            import fnmatch

            wild = any(c in pattern for c in "*?[")
            names = [n for n in names if (fnmatch.fnmatch(n.lower(), pattern) if wild else pattern in n.lower())]
        if self._catalog is None:
            names.append(LOADING)
        return names or ["(no model matches the filter)"]

    def _device_choices(self, *_: Any) -> list[str]:
        return list((self._catalog or {}).get("devices", ["cpu"]))

    def _channel_choices(self, *_: Any) -> list[str]:
        layer = self.image.value if hasattr(self, "image") else None
        return ["auto", "none", *[str(a) for a in range(layer.ndim if layer is not None else 0)]]

    def _refresh_model_choices(self, *_: Any) -> None:
        self.model.reset_choices()
        self._on_model_changed()

    def entry(self) -> dict[str, Any] | None:
        """The selected model entry (``{"kind": "registry" | "checkpoint", ...}``) or ``None``."""
        return self._entries.get(self.model.value)

    def _on_model_changed(self, *_: Any) -> None:
        entry = self.entry()
        info = entry.get("info") if entry else None
        has_weights = bool(info and info.get("has_weights")) and entry["kind"] == "registry"
        self.pretrained.enabled = has_weights
        if not has_weights:
            self.pretrained.value = False
        self.task.enabled = bool(info and info.get("task") == "universal")
        # the fast path is refused for query models (medsegkit.inference.adapters.refuse_fast)
        self.fast.enabled = not self.task.enabled
        if self.task.enabled:
            self.fast.value = False
        if entry is None:
            self.model_info.value = ""
            return
        if info is None:
            self.model_info.value = f"checkpoint {Path(entry['path']).name}" if entry["kind"] == "checkpoint" else ""
            return
        classes = info.get("out_channels") or info.get("num_classes")
        text = (f"{info.get('family', '?')}, {info.get('task')}, {info.get('spatial_dims')}D, "
                f"{info.get('num_params', 0):,} params, in {info.get('in_channels')} / out {classes}")
        if entry["kind"] == "checkpoint":
            text = f"shipped weights ({info.get('name')}): " + text
        elif not info.get("has_weights"):
            text += " — no registered weights: choose a checkpoint"
        self.model_info.value = text

    # -- layers -----------------------------------------------------------------------------------------
    def _on_layers_changed(self, *_: Any) -> None:
        self.image.reset_choices()
        self._on_image_changed()

    def _on_image_changed(self, *_: Any) -> None:
        layer = self.image.value
        if layer is None:
            return
        self.channel_axis.reset_choices()
        self.channel_axis.enabled = not layer.rgb
        meta = (layer.metadata or {}).get("medsegkit", {}) if isinstance(layer.metadata, dict) else {}
        demo = meta.get("demo_checkpoint")
        if demo:
            for key, entry in self._entries.items():
                if entry["kind"] == "checkpoint" and entry["path"] == demo and key in self.model.choices:
                    self.model.value = key

    # -- run ----------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._job is not None

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.last_error = message
        self.status.value = message
        show_error(message)

    def checkpoint_path(self) -> str | None:
        """The checkpoint file typed or picked, or ``None`` when the field is empty."""
        text = str(self.checkpoint.line_edit.value).strip()
        return str(Path(text).expanduser()) if text else None

    def bundle_path(self) -> str | None:
        """The bundle folder typed or picked, or ``None`` when the field is empty."""
        text = str(self.bundle.line_edit.value).strip()
        return str(Path(text).expanduser()) if text else None

    def _channel_choice(self) -> Any:
        choice: Any = self.channel_axis.value
        if choice == "none":
            return None
        return choice if choice == "auto" else int(choice)

    def _build_bundle_job(self, bundle: str, layer: Any) -> dict[str, Any]:
        if not Path(bundle).is_dir():
            raise ValueError(f"bundle folder {bundle} does not exist or is not a folder")
        if self.output.value != "labels":
            raise ValueError("a bundle writes a label map (its post-processing decides the output): "
                             "choose output 'labels'")
        return {
            "action": "bundle",
            "bundle": bundle,
            "rgb": bool(layer.rgb),
            "channel_axis": self._channel_choice(),
            "world_affine": data_to_world_matrix(layer).tolist(),
            "output": "labels",
            "threads": max(1, (os.cpu_count() or 2) - 1),
            "label": Path(bundle).resolve().name,
        }

    def build_job(self) -> tuple[dict[str, Any], Any, Any]:
        """The worker job for the current settings, the source layer and its data (full resolution).

        With a bundle folder set, the job runs that bundle (``"action": "bundle"``) and the model list is
        ignored.

        Raises:
            ValueError: nothing to run, or a model without weights (the message says what to choose).
        """
        layer = self.image.value
        if layer is None:
            raise ValueError("choose an image layer to segment (open an image or File > Open Sample)")
        data = layer.data[0] if layer.multiscale else layer.data
        bundle = self.bundle_path()
        if bundle is not None:
            return self._build_bundle_job(bundle, layer), layer, data
        entry = self.entry()
        if entry is None:
            raise ValueError("choose a model (the list is still loading)" if self._catalog is None
                             else "choose a model from the list")
        checkpoint = self.checkpoint_path()
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ValueError(f"checkpoint {checkpoint} does not exist or is not a file")
        if entry["kind"] == "checkpoint":
            model = {"name": None, "checkpoint": checkpoint or entry["path"], "pretrained": False}
            label = Path(checkpoint).stem if checkpoint else entry["label"]
        else:
            pretrained = bool(self.pretrained.value)
            if checkpoint is None and not pretrained:
                raise ValueError(
                    f"{entry['name']} has no weights loaded: choose a checkpoint file"
                    + (" or tick 'registered pretrained weights'" if self.pretrained.enabled else "")
                    + " (segmenting with random weights would be meaningless)"
                )
            model = {"name": entry["name"], "checkpoint": checkpoint, "pretrained": pretrained and not checkpoint}
            label = entry["name"]
        ndim = layer.ndim
        channel_choice = self._channel_choice()
        info = entry.get("info") or {}
        predict: dict[str, Any] = {
            "roi_size": parse_roi_size(self.roi_size.value),
            "overlap": float(self.overlap.value),
            "fast": bool(self.fast.value) and info.get("task") != "universal",
            "device": self.device.value,
        }
        n_spatial = info.get("spatial_dims") or min(ndim, 3)
        if self.tta.value:
            predict["tta_flips"] = list(range(n_spatial if ndim >= n_spatial else ndim))
        if info.get("task") == "universal":
            predict["task"] = self.task.value
        job = {
            "action": "segment",
            "model": model,
            "rgb": bool(layer.rgb),
            "channel_axis": channel_choice,
            "world_affine": data_to_world_matrix(layer).tolist(),
            "predict": predict,
            "output": self.output.value,
            "threads": max(1, (os.cpu_count() or 2) - 1),
            "label": label,
        }
        return job, layer, data

    def run(self, *_: Any) -> None:
        """Start a segmentation of the chosen layer (refused, with a message, while one is running)."""
        if self._job is not None:
            self._notify_error("a segmentation is already running; wait for it or press Cancel first")
            return
        try:
            job, layer, data = self.build_job()
        except ValueError as err:
            self._notify_error(str(err))
            return
        from napari.qt.threading import create_worker

        folder = Path(tempfile.mkdtemp(prefix="job-", dir=_results_dir()))
        job["output_dir"] = str(folder)
        worker_job = WorkerJob(job)
        self._job = worker_job
        self.last_error = None
        self._started = time.perf_counter()
        self.result_arrived: float | None = None
        thread_worker = create_worker(
            _drive, worker_job, data, folder, _start_thread=False,
            _connect={  # errored connected at creation: superqt re-raises otherwise
                "yielded": self._on_progress,
                "returned": lambda result: self._on_result(result, layer, job),
                "errored": self._on_error,
                "finished": self._on_finished,
            },
        )
        self._thread_worker = thread_worker
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max = 1
        self.progress.value = 0
        what = f"bundle {job['label']}" if job["action"] == "bundle" else job["label"]
        self.status.value = f"running {what} on {layer.name}…"
        thread_worker.start()

    def cancel(self, *_: Any) -> None:
        """Stop the running job at its next window batch (the process is ended if it does not stop).

        A bundle run has no window batches to stop at: its worker process is terminated after the grace
        period (``WorkerJob.cancel_grace_s``); the next Run starts a fresh one.
        """
        if self._job is None:
            return
        self.status.value = "cancelling…"
        self._job.cancel()

    def _on_progress(self, value: tuple[int, int]) -> None:
        done, total = value
        self.progress.max = max(int(total), 1)
        self.progress.value = min(int(done), self.progress.max)
        self.status.value = f"window batch {done} / {total}"

    def _on_result(self, result: tuple[dict[str, Any], Any], source: Any, job: dict[str, Any]) -> None:
        info, output = result
        self.result_arrived = time.perf_counter()
        self.last_run_seconds = self.result_arrived - self._started
        name = f"{source.name} [{job['label']}]"
        geometry = _output_geometry(source, info.get("layer_channel_axis"))
        meta = {"medsegkit": {**_source_meta(source), "model": job["label"], "class_names": info.get("class_names", []),
                              "task": info.get("task")}}
        if job["output"] == "labels":
            colors = info.get("label_colors") or []
            if colors and all(len(c) in (3, 4) for c in colors):
                from medsegkit.napari._sample_data import label_colormap

                geometry["colormap"] = label_colormap([tuple(c)[:3] for c in colors])
            self._viewer.add_labels(output, name=name, metadata=meta, **geometry)
            if info.get("task") in (None, "semantic") and isinstance(output, np.ndarray):
                self._show_quality(output, geometry, info.get("class_names") or [])
        else:
            self._viewer.add_image(output, name=f"{name} probabilities", metadata=meta, channel_axis=0,
                                   blending="additive", **geometry)
        self.status.value = f"done in {self.last_run_seconds:.1f} s: added {name!r}"

    def _show_quality(self, labels: Any, geometry: dict[str, Any], class_names: list[str]) -> None:
        """Per-structure QC of a labels result, computed here with numpy / scipy / pandas (no torch): the
        fragmentation and border flags of :mod:`medsegkit.qc` (one case: no cohort z-score, no mirrored pass)."""
        from medsegkit.io import Image
        from medsegkit.measurements import stats
        from medsegkit.qc import add_quality_flags

        array = np.asarray(labels)
        if array.ndim not in (2, 3) or array.dtype.kind not in "iub":
            self.last_quality, self.quality.value = None, ""
            return
        scale = [float(s) for s in geometry.get("scale", (1.0,) * array.ndim)][-array.ndim:]
        affine = np.eye(4)
        affine[range(array.ndim), range(array.ndim)] = scale  # voxel volume = product of the layer's scale
        table = add_quality_flags(stats(Image(array, affine), class_names=class_names or None))
        self.last_quality = table
        flagged = table[table["flagged"]]
        self.quality.value = ("no QC flags" if flagged.empty else
                              "; ".join(f"{row['class']}: {row['flags']}" for _, row in flagged.iterrows()))

    def _on_error(self, err: BaseException) -> None:
        if isinstance(err, Cancelled):
            self.status.value = f"{err}"
            return
        self._notify_error(f"segmentation failed: {err}")

    def _on_finished(self) -> None:
        self._job = None
        self._thread_worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False


def _drive(job: WorkerJob, data: Any, folder: Path):
    """Thread worker body: write the input, run the worker process, relay its progress, read the output."""
    if job.cancel_requested:
        raise Cancelled("cancelled; no layer was added")
    job.job["input"] = write_input_array(data, folder)
    if job.cancel_requested:
        raise Cancelled("cancelled; no layer was added")
    result = yield from job.run()
    return result, read_output(result)


def _source_meta(layer: Any) -> dict[str, Any]:
    meta = layer.metadata.get("medsegkit", {}) if isinstance(layer.metadata, dict) else {}
    return {k: v for k, v in meta.items() if k in ("source_affine", "orientation", "spacing", "path")}


def _output_geometry(layer: Any, channel_axis: int | None) -> dict[str, Any]:
    """The source layer's ``scale``, ``translate``, ``rotate``, ``shear`` and ``affine`` for the output.

    When one of the layer's dims was the channel axis, that axis is dropped (its rotation/shear part,
    if any, is folded into ``affine``).
    """
    if channel_axis is None:
        return {"scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate,
                "shear": layer.shear, "affine": layer.affine}
    keep = [a for a in range(layer.ndim) if a != channel_axis]
    matrix = drop_axis(data_to_world_matrix(layer), channel_axis)
    scale = np.asarray(layer.scale, dtype=float)[keep]
    translate = np.asarray(layer.translate, dtype=float)[keep]
    n = len(keep)
    scale_translate = np.eye(n + 1)
    scale_translate[:n, :n] = np.diag(scale)
    scale_translate[:n, n] = translate
    return {"scale": scale, "translate": translate, "affine": matrix @ np.linalg.inv(scale_translate)}
