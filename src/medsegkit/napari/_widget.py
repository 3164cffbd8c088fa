"""The "Segment" dock widget: run any registry model (or a checkpoint, or a MONAI bundle folder) on an image layer.

The widget is a thin client. It never imports torch-side code: the model catalogue comes from a worker
process (:mod:`medsegkit.napari._catalog`), and each Run spawns a worker process
(:mod:`medsegkit.worker`) driven from a ``napari.qt.threading`` generator worker that relays
its progress. The layer's array goes to the worker as a ``.npy`` memory map (or a zarr store for
dask/zarr/multiscale layers), and the result comes back the same way.
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
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
from medsegkit.napari._worker_client import Update, WorkerDied, WorkerJob, read_output, write_input_array

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["SegmentWidget", "parse_roi_size"]

DEMO_PREFIX = "demo: "
LOADING = "(loading the model list…)"
REFRESH_S = 0.1  # the result layer is refreshed at most 10 times a second while a Run streams regions
ACTIVATE_DELAY_MS = 25  # the corrections layer turns active and paints this long after it was added
DISCARD, KEEP = "discard the partial result", "keep what is done"
BACKGROUND_BRUSH = (0.85, 0.85, 0.85, 1.0)  # the colour of "background" strokes when class 0 is transparent
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
        self._preselected_for: Any = None  # the image layer the demo model was last preselected for

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
        self.tta = CheckBox(text="mirror test-time augmentation", value=False,
                            tooltip="averages the mirrored predictions: left-right only when the model's preprocessing "
                                    "reorients the image (MR / CT presets, trained checkpoints), else every axis")
        self.fast = CheckBox(text="fast path (BN folding, channels-last, bf16)", value=False,
                             tooltip="not for MaskFormer / Mask2Former: bf16 changes their labels, so it is refused")
        self.device = ComboBox(label="device", choices=self._device_choices, value="cpu")
        self.task = ComboBox(label="task", choices=["semantic", "instance", "panoptic"], value="semantic",
                             enabled=False, tooltip="for universal (MaskFormer / Mask2Former) models")
        self.output = ComboBox(label="output", choices=["labels", "probabilities"], value="labels")
        self.on_cancel = ComboBox(label="on cancel", choices=[DISCARD, KEEP], value=DISCARD,
                                  tooltip="what a cancelled Run leaves: nothing, or the slices already finished")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = Label(label="status", value="")
        self.quality = Label(label="quality", value="")  # QC flags of the last labels result
        self.last_quality: Any = None  # their table (pandas.DataFrame), one row per structure
        # correct: strokes on the "corrections" layer -> Refine adapts the model in the worker
        self.brush = ComboBox(label="brush", choices=self._brush_choices,
                              tooltip="the class the strokes on the corrections layer mark (0: background)")
        self.seconds = FloatSpinBox(label="adapt seconds", value=2.0, min=0.1, max=60.0, step=0.5,
                                    tooltip="the time budget of one Refine's adaptation")
        self.scope = ComboBox(label="correct", value="auto",
                              choices=[("auto", "auto"), ("everywhere", "global"), ("near the strokes", "local")],
                              tooltip="where Refine updates the result: everywhere the adapted model changes its "
                                      "mind, only near this Refine's strokes (for an error specific to one place), "
                                      "or auto: near the strokes until the strokes confirm that the correction "
                                      "generalises, then also wherever the model was unsure; near the strokes and "
                                      "auto move a voxel only to the class of its nearest stroke")
        self.refine_button = PushButton(text="Refine", enabled=False)
        self.undo_button = PushButton(text="Undo", enabled=False)
        self.reset_button = PushButton(text="Reset", enabled=False)
        self.save_path = FileEdit(label="adapted model", mode="w", filter="*.safetensors",
                                  tooltip="where 'Save adapted model' writes the checkpoint")
        self.save_overwrite = CheckBox(text="replace an existing file", value=False,
                                       tooltip="let 'Save adapted model' write over an existing file (never over "
                                               "the checkpoint the model came from)")
        self.save_button = PushButton(text="Save adapted model", enabled=False)
        self.extend([
            self.image, self.channel_axis, self.model_filter, self.model, self.model_info, self.checkpoint,
            self.bundle, self.pretrained, self.roi_size, self.overlap, self.tta, self.fast, self.device, self.task,
            self.output, self.on_cancel, self.run_button, self.cancel_button, self.progress, self.status, self.quality,
            self.brush, self.seconds, self.scope, self.refine_button, self.undo_button, self.reset_button, self.save_path,
            self.save_overwrite, self.save_button,
        ])
        self._kind = "run"
        self._interactive: _Interactive | None = None
        self._run_target: dict[str, Any] | None = None
        self.refresh_times: list[float] = []  # when the progressive result layer was redrawn
        self.last_run_info: dict[str, Any] | None = None
        self.last_edit_info: dict[str, Any] | None = None
        from qtpy.QtCore import QTimer

        self._refresh_timer = QTimer()
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.timeout.connect(self._flush_when_due)

        for label in (self.model_info, self.status, self.quality):  # long messages wrap instead of widening the dock
            label.native.setWordWrap(True)
        self.model_filter.changed.connect(self._refresh_model_choices)
        self.model.changed.connect(self._on_model_changed)
        self.image.changed.connect(self._on_image_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.brush.changed.connect(self._on_brush_changed)
        self.refine_button.changed.connect(self.refine)
        self.undo_button.changed.connect(self.undo)
        self.reset_button.changed.connect(self.reset)
        self.save_button.changed.connect(self.save_adapted)
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
        self._warm()
        QTimer.singleShot(0, _prime_labels_layers)  # after the dock is shown, while the worker warms

    def _warm(self) -> None:
        """Start the worker process now and have it import torch and the inference modules (and load the
        chosen model when it is a checkpoint), so the first Run pays neither (see ``worker.warm_job``)."""
        from napari.qt.threading import create_worker

        entry = self.entry()
        model = None
        if entry is not None and entry["kind"] == "checkpoint":
            model = {"name": None, "checkpoint": entry["path"], "pretrained": False}
        self.warm_info: dict[str, Any] | None = None
        self._warm_worker = create_worker(
            WorkerJob({"action": "warm", "model": model}).result,
            _connect={"returned": self._warmed, "errored": self._warm_failed})

    def _warmed(self, info: dict[str, Any]) -> None:
        self.warm_info = info
        # One full garbage collection now, while nothing runs: napari's process tracks ~300 k objects, and a
        # full collection that a Run's layer additions trigger (153 ms measured) stalls the viewer mid-Run.
        # After this one, Python starts the next only once the objects that survived it have grown by a
        # quarter (in a bare viewer without it, the sixth add_labels in a row triggered one).
        gc.collect()

    def _warm_failed(self, err: BaseException) -> None:
        self.warm_info = {"error": str(err)}
        self.status.value = f"could not prepare the model worker: {err}"

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
        if layer is self._preselected_for:  # the layer list changed, not the chosen image: keep the user's model
            return
        self._preselected_for = layer
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
        channel_choice = self._channel_choice()
        info = entry.get("info") or {}
        predict: dict[str, Any] = {
            "roi_size": parse_roi_size(self.roi_size.value),
            "overlap": float(self.overlap.value),
            "fast": bool(self.fast.value) and info.get("task") != "universal",
            "device": self.device.value,
        }
        if self.tta.value:  # left-right only where the model's preprocessing reorients the image (segment)
            predict["tta_flips"] = "auto"
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
        if (self.output.value == "labels" and info.get("task", "semantic") == "semantic" and not predict["fast"]
                and isinstance(data, np.ndarray)):
            # progressive, and correctable afterwards: through an interactive session in the worker
            job.update(action="session_run", session=uuid.uuid4().hex, view=self._view_of(layer))
            job["predict"] = {k: v for k, v in predict.items() if k != "fast"}
        return job, layer, data

    def _view_of(self, layer: Any) -> dict[str, Any]:
        """What the viewer shows of ``layer``: the current point in the layer's data coordinates and the
        layer dims on screen (the worker computes the slice on screen first; see ``worker._focus_of``)."""
        dims = self._viewer.dims
        offset = dims.ndim - layer.ndim
        displayed = [int(d) - offset for d in dims.displayed if d >= offset]
        point = np.asarray(layer.world_to_data(dims.point), dtype=float)[-layer.ndim:]
        return {"point": point.tolist(), "displayed": displayed}

    def run(self, *_: Any) -> None:
        """Start a segmentation of the chosen layer (refused, with a message, while a job is running).

        Semantic models giving labels on an in-memory layer run progressively through an interactive
        session in the worker (the slice on screen first; the Labels layer appears at the first region
        and is refreshed in place at most 10 times a second) and can then be corrected (:meth:`refine`).
        Other runs (probabilities, lazy layers, instance and query models, bundles, the fast path) are
        one-shot: the layer appears at the end.
        """
        if self._job is not None:
            self._notify_error("a segmentation is already running; wait for it or press Cancel first")
            return
        try:
            job, layer, data = self.build_job()
        except ValueError as err:
            self._notify_error(str(err))
            return
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=_results_dir()))
        job["output_dir"] = str(folder)
        self._run_target = {"source": layer, "job": job, "layer": None, "refreshes": 0,
                            "reuse": self._replaceable_result(layer, job)}
        self.result_arrived: float | None = None
        self.first_update_seconds: float | None = None  # Run -> the layer shows the slice on screen
        self.exact_focus_seconds: float | None = None  # Run -> that slice is exact (after a preview)
        what = f"bundle {job['label']}" if job["action"] == "bundle" else job["label"]
        scale = tuple(float(v) for v in layer.scale)
        worker_job = WorkerJob(job)
        job = worker_job.job  # the dict the thread completes (its "input"): what a restarted worker rebuilds from
        self._start(worker_job, _drive, (data, folder, scale), "run",
                    lambda result: self._on_result(result, layer, job), f"running {what} on {layer.name}…")

    def _replaceable_result(self, source: Any, job: dict[str, Any]) -> _Interactive | None:
        """The last progressive result when a new Run of ``job`` may write into its layers instead of adding
        two more: the same model on the same image layer, both layers still in the viewer, never refined and
        no strokes painted (nothing the user did is overwritten; napari's cost of adding a Labels layer grows
        with the Labels layers already open, see docs/napari.md)."""
        state = self._interactive
        if job.get("action") != "session_run" or state is None or state.source is not source:
            return None
        if any(state.spec.get(key) != job.get(key) for key in ("model", "label", "channel_axis", "world_affine", "rgb")):
            return None
        layers = self._viewer.layers
        if state.result not in layers or state.corrections not in layers or state.history or state.rounds:
            return None
        return None if np.any(state.corrections.data) else state

    def _start(self, worker_job: WorkerJob, body: Any, args: tuple, kind: str, on_returned: Any, status: str) -> None:
        """Run ``body(worker_job, *args)`` (a generator relaying the worker's messages) in a thread."""
        from napari.qt.threading import create_worker

        self._job = worker_job
        self._kind = kind
        self.last_error = None
        self._started = time.perf_counter()
        thread_worker = create_worker(
            body, worker_job, *args, _start_thread=False,
            _connect={  # errored connected at creation: superqt re-raises otherwise
                "yielded": self._on_progress,
                "returned": on_returned,
                "errored": self._on_error,
                "finished": self._on_finished,
            },
        )
        self._thread_worker = thread_worker
        self._set_running(True)
        self._set_progress(0, 1)
        self.status.value = status
        thread_worker.start()

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        for button in (self.refine_button, self.undo_button, self.reset_button, self.save_button):
            button.enabled = not running and self._interactive is not None

    def cancel(self, *_: Any) -> None:
        """Stop the running job (Run or Refine) at its next window batch or adaptation step (the process
        is ended if it does not stop in time).

        A cancelled progressive Run keeps the finished part or nothing (the "on cancel" choice); a
        cancelled Refine leaves the result, the model and the marks as they were. A bundle run has no
        window batches to stop at: its worker process is terminated after the grace period
        (``WorkerJob.cancel_grace_s``); the next Run starts a fresh one.
        """
        if self._job is None:
            return
        self.status.value = "cancelling…"
        self._job.cancel()

    def _on_progress(self, value: Any) -> None:
        if value and isinstance(value[0], str):  # ("update", region, labels) of a progressive run
            self._on_update(value[2])
            return
        done, total = value
        self._set_progress(int(done), max(int(total), 1))
        if self._kind == "run":
            self.status.value = f"window batch {done} / {total}"
        else:
            self.status.value = f"{self._kind}: {done} %" if int(total) == 100 else f"{self._kind}: {done} / {total}"

    def _set_progress(self, done: int, total: int) -> None:
        """Move the progress bar without a synchronous repaint. ``QProgressBar.setValue`` calls ``repaint()``
        whenever the bar visibly moves; in a window with an OpenGL child (napari's canvas) Qt then composes
        the whole window at once if a frame has passed since the last composition, as it has between
        progress reports seconds apart: 70-160 ms in the viewer's thread on Mesa's software OpenGL
        (measured). With the bar's updates disabled meanwhile, re-enabling them schedules an ordinary
        ``update()``, painted with the next frame."""
        bar = self.progress.native
        bar.setUpdatesEnabled(False)
        try:
            self.progress.max = total
            self.progress.value = min(done, total)
        finally:
            bar.setUpdatesEnabled(True)

    # -- progressive result ---------------------------------------------------------------------------
    def _on_update(self, update: dict[str, Any]) -> None:
        """A region of the progressive run is finished (its labels are already in the layer's array)."""
        target = self._run_target
        if self.exact_focus_seconds is None and not update["info"].get("preview"):
            self.exact_focus_seconds = time.perf_counter() - self._started
        reuse = target.get("reuse")
        if target["layer"] is None and reuse is not None and reuse.result.data.shape == update["labels"].shape \
                and reuse.result.data.dtype == update["labels"].dtype:
            target["previous"] = reuse.result.data  # restored if the Run is cancelled and discarded
            reuse.result.data = update["labels"]
            target["layer"] = reuse.result
            self.first_update_seconds = time.perf_counter() - self._started
            self._last_refresh = time.perf_counter()
            return
        if target["layer"] is None:
            target["reuse"] = None
            source, job = target["source"], target["job"]
            info = update["info"]
            names = _class_names(info)
            geometry = _output_geometry(source, info.get("layer_channel_axis"))
            geometry["colormap"] = _result_colormap(info)
            meta = {"medsegkit": {**_source_meta(source), "model": job["label"], "class_names": info.get("class_names", []),
                                  "task": "semantic"}}
            target["layer"] = self._viewer.add_labels(
                update["labels"], name=f"{source.name} [{job['label']}]", metadata=meta,
                features={"index": list(range(len(names))), "class": names}, **geometry)
            self.first_update_seconds = time.perf_counter() - self._started
            self._last_refresh = time.perf_counter()
            return
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Redraw now, or when ``REFRESH_S`` has passed since the last redraw."""
        self._run_target["dirty"] = True
        if not self._refresh_timer.isActive():
            self._flush_when_due()

    def _flush_when_due(self) -> None:
        """Redraw if ``REFRESH_S`` has passed since the last redraw, else arm the timer for what remains. Also
        the timer's slot: Qt's default (coarse) timers may fire up to 5 % early (a redraw after 98.7 ms in a
        CI run), so the clock decides, not the timer."""
        wait = REFRESH_S - (time.perf_counter() - self._last_refresh)
        if wait > 0:
            self._refresh_timer.start(int(wait * 1000) + 1)
        else:
            self._flush()

    def _flush(self) -> None:
        """Redraw the progressive result layer (at most every ``REFRESH_S``)."""
        target = self._run_target
        if target is None or target.get("layer") is None or not target.get("dirty"):
            return
        if target["layer"] not in self._viewer.layers:  # the user removed it meanwhile
            return
        target["dirty"] = False
        target["layer"].refresh()
        target["refreshes"] += 1
        self._last_refresh = time.perf_counter()
        self.refresh_times.append(self._last_refresh)

    def _on_result(self, result: tuple[dict[str, Any], Any, Any], source: Any, job: dict[str, Any]) -> None:
        info, output, quality = result
        self.result_arrived = time.perf_counter()
        self.last_run_seconds = self.result_arrived - self._started
        self.last_run_info = info
        name = f"{source.name} [{job['label']}]"
        geometry = _output_geometry(source, info.get("layer_channel_axis"))
        meta = {"medsegkit": {**_source_meta(source), "model": job["label"], "class_names": info.get("class_names", []),
                              "task": info.get("task")}}
        if job["action"] == "session_run":
            layer = self._run_target["layer"]
            if layer is None:  # pragma: no cover - a session run always publishes before it returns
                raise RuntimeError("internal error: the progressive run finished without any update")
            self._schedule_flush()  # the last regions (still at most 10 redraws a second)
            reuse = self._run_target.get("reuse")
            self._start_correcting(layer, source, job, info, corrections=None if reuse is None else reuse.corrections)
            if reuse is not None:
                layer.metadata = meta  # the Run's own record (its options may differ from the replaced one's)
                self._set_quality(quality)
                self.status.value = (f"done in {self.last_run_seconds:.1f} s: replaced {layer.name!r} in place "
                                     f"(the same model's unrefined result)")
                return
        elif job["output"] == "labels":
            colors = info.get("label_colors") or []
            if colors and all(len(c) in (3, 4) for c in colors):
                from medsegkit.napari._sample_data import label_colormap

                geometry["colormap"] = label_colormap([tuple(c)[:3] for c in colors])
            self._viewer.add_labels(output, name=name, metadata=meta, **geometry)
        else:
            self._viewer.add_image(output, name=f"{name} probabilities", metadata=meta, channel_axis=0,
                                   blending="additive", **geometry)
        self._set_quality(quality)
        self.status.value = f"done in {self.last_run_seconds:.1f} s: added {name!r}"

    def _set_quality(self, table: Any) -> None:
        self.last_quality = table
        if table is None:
            self.quality.value = ""
            return
        flagged = table[table["flagged"]]
        self.quality.value = ("no QC flags" if flagged.empty else
                              "; ".join(f"{row['class']}: {row['flags']}" for _, row in flagged.iterrows()))

    # -- correct ----------------------------------------------------------------------------------------
    def _start_correcting(self, layer: Any, source: Any, job: dict[str, Any], info: dict[str, Any],
                          corrections: Any = None) -> None:
        """Add the "corrections" Labels layer next to a finished progressive result (same grid, the
        result's class colours, value ``c + 1`` = class ``c``), or keep ``corrections`` (the replaced result's,
        empty), and make it the active layer, in paint mode."""
        names = _class_names(info)
        added = corrections is None
        if added:
            geometry = _output_geometry(source, info.get("layer_channel_axis"))
            dtype = np.uint8 if len(names) < 255 else np.int32
            corrections = self._viewer.add_labels(
                np.zeros(layer.data.shape, dtype), name=f"{layer.name} corrections",
                colormap=_corrections_colormap(layer, len(names)),
                features={"index": list(range(len(names) + 1)), "class": ["unmarked", *names]},
                metadata={"medsegkit": {"corrections_for": layer.name, "class_names": names}}, **geometry)
        state = self._interactive = _Interactive(session=job["session"], spec=job, source=source, result=layer,
                                                 corrections=corrections, class_names=names)
        self.brush.reset_choices()
        default = 1 if len(names) > 1 else 0  # the first foreground class
        self.brush.value = self.brush.choices[default]
        self._on_brush_changed()
        if added:
            from qtpy.QtCore import QTimer

            # paint mode and the selection (~20 ms) a little later, not in the same block as adding the layer
            # (~60 ms of napari's): a 0 ms timer ran before the viewer's next tick and draw
            QTimer.singleShot(ACTIVATE_DELAY_MS, lambda: self._activate_corrections(state))
        else:
            self._activate_corrections(state)

    def _activate_corrections(self, state: _Interactive) -> None:
        """``state``'s corrections layer active, in paint mode (unless another Run replaced ``state`` or the
        user removed the layer meanwhile)."""
        if state is not self._interactive or state.corrections not in self._viewer.layers:
            return
        state.corrections.mode = "paint"
        self._viewer.layers.selection.active = state.corrections

    def _brush_choices(self, *_: Any) -> list[str]:
        state = getattr(self, "_interactive", None)
        if state is None:
            return ["(run a model first)"]
        return [f"{c}: {name}" for c, name in enumerate(state.class_names)]

    def _on_brush_changed(self, *_: Any) -> None:
        """The brush class ``c`` paints value ``c + 1`` on the corrections layer."""
        state = self._interactive
        if state is None or self.brush.value not in self.brush.choices or ":" not in str(self.brush.value):
            return
        state.corrections.selected_label = int(str(self.brush.value).split(":")[0]) + 1

    def _check_correctable(self) -> _Interactive | None:
        if self._job is not None:
            self._notify_error("a job is running; wait for it or press Cancel first")
            return None
        state = self._interactive
        if state is None:
            self._notify_error("nothing to correct yet: Run a semantic model first (Refine corrects its last result)")
            return None
        if state.result not in self._viewer.layers or state.corrections not in self._viewer.layers:
            self._notify_error("the result or its corrections layer was removed: press Run again")
            return None
        return state

    def _edit_job(self, state: _Interactive, action: str, **extra: Any) -> dict[str, Any]:
        """A Refine / Undo / Reset / Save job of ``state``'s session. It runs on every core: unlike a Run,
        which leaves one core to the viewer's progressive redraws, the viewer only moves a progress bar
        meanwhile (on 2 cores: a demo refine 5.4-5.8 s -> 4.2-4.7 s, longest viewer gap 56-61 ms)."""
        return {"action": action, "session": state.session, "spec": state.spec,
                "threads": os.cpu_count() or state.spec.get("threads"), **extra}

    def refine(self, *_: Any) -> None:
        """Adapt the model to the strokes on the corrections layer and update the result (in the worker,
        with progress and Cancel). A failure or a crash is reported and the result stays as it was."""
        state = self._check_correctable()
        if state is None:
            return
        scribbles = np.array(state.corrections.data, copy=True)
        if not scribbles.any():
            self._notify_error("paint strokes on the corrections layer first (choose the class with 'brush'), "
                               "then press Refine")
            return
        job = self._edit_job(state, "session_refine", seconds=float(self.seconds.value), scope=self.scope.value)
        folder = Path(state.spec["output_dir"])
        worker_job = WorkerJob(job, cancel_message="refine cancelled; the previous result is kept")
        self._start(worker_job, _drive_edit, (folder, scribbles, state.result.data), "refine",
                    lambda result: self._on_edited(result, "refine", scribbles), "refining…")

    def undo(self, *_: Any) -> None:
        """Go back to the result, model and marks before the last Refine."""
        state = self._check_correctable()
        if state is not None:
            self._start(WorkerJob(self._edit_job(state, "session_undo")), _drive_edit,
                        (None, None, state.result.data), "undo", lambda result: self._on_edited(result, "undo"), "undoing…")

    def reset(self, *_: Any) -> None:
        """Back to the original model and its result; the corrections layer is cleared."""
        state = self._check_correctable()
        if state is not None:
            self._start(WorkerJob(self._edit_job(state, "session_reset")), _drive_edit,
                        (None, None, state.result.data), "reset", lambda result: self._on_edited(result, "reset"),
                        "resetting…")

    def save_adapted(self, *_: Any) -> None:
        """Write the adapted model as a checkpoint (metadata ``adapted_from``) to the path in 'adapted model'."""
        state = self._check_correctable()
        if state is None:
            return
        text = str(self.save_path.line_edit.value).strip()
        if not text:
            self._notify_error("choose where to save the adapted model ('adapted model': a .safetensors path)")
            return
        path = Path(text).expanduser()
        if path.exists() and not self.save_overwrite.value:
            self._notify_error(f"{path} exists; tick 'replace an existing file' to write over it, or choose another "
                               "path")
            return
        job = self._edit_job(state, "session_save", path=str(path), overwrite=bool(self.save_overwrite.value))
        self._start(WorkerJob(job), _drive_edit, (None, None, None), "save",
                    lambda result: self._on_edited(result, "save"), f"saving the adapted model to {path}…")

    def _on_edited(self, result: tuple[dict[str, Any], Any, Any], kind: str, scribbles: np.ndarray | None = None) -> None:
        info = result[0]
        self.last_edit_info = info
        state = self._interactive
        seconds = time.perf_counter() - self._started
        if kind == "save":
            self.status.value = f"saved the adapted model ({info['rounds']} refine rounds) to {info['path']}"
            return
        state.rounds = int(info.get("rounds") or 0)
        if info.get("rebuilt"):  # the worker had restarted (or ran another layer since): rebuilt from the original model
            state.history.clear()
        state.result.refresh()
        if kind == "refine":
            state.history.append(scribbles)
            where = {"global": "everywhere", "unsure": "near the strokes and where the model was unsure",
                     "local": "near the strokes"}.get(info.get("scope"), "the marks only")
            text = (f"refined in {seconds:.1f} s (round {info['rounds']}, corrected {where}, "
                    f"{info['steps']} fitting iterations)")
        elif kind == "undo":
            if state.history:
                state.history.pop()
            text = f"undone: round {info['rounds']}"
        else:
            state.history.clear()
            text = "reset to the original model's result"
        marks = state.history[-1] if state.history else 0
        state.corrections.data[...] = marks  # the corrections show the marks the session holds
        state.corrections.refresh()
        self.last_edit_seconds = seconds
        if info.get("rebuilt"):
            text += (" (the worker no longer held this result's session, after a restart or another Run: it was "
                     "rebuilt from the original model and all strokes; the undo history starts again)")
        self.status.value = text

    # -- errors and the end of a job ------------------------------------------------------------------
    def _on_error(self, err: BaseException) -> None:
        kind = self._kind
        if kind == "run":
            target = self._run_target or {}
            layer = target.get("layer")
            keep = isinstance(err, Cancelled) and self.on_cancel.value == KEEP
            reuse = target.get("reuse")  # the unrefined result this Run writes into, if any
            if layer is not None and layer in self._viewer.layers:
                if keep:
                    if reuse is not None:  # the layer now holds a partial result its correction session does not know
                        self._interactive = None
                        if reuse.corrections in self._viewer.layers and not np.any(reuse.corrections.data):
                            self._viewer.layers.remove(reuse.corrections)  # empty, and nothing left to correct
                    target["dirty"] = True
                    self._flush()
                else:
                    self._refresh_timer.stop()
                    if reuse is not None:
                        layer.data = target["previous"]  # the replaced result comes back
                    else:
                        self._viewer.layers.remove(layer)
            if isinstance(err, Cancelled):
                self.status.value = ("cancelled; the finished part is kept" if keep and layer is not None
                                     else "cancelled; no layer was added")
                return
            self._notify_error(f"segmentation failed: {err}")
            return
        if isinstance(err, Cancelled):
            self.status.value = f"{err}"
            return
        kept = " (the previous result is kept)" if kind != "save" else ""
        self._notify_error(f"{kind} failed: {err}{kept}")
        if isinstance(err, WorkerDied):
            self.status.value += "; the next action starts a fresh worker"

    def _on_finished(self) -> None:
        self._job = None
        self._thread_worker = None
        self._set_running(False)


def _prime_labels_layers() -> None:
    """Pay napari's one-time costs of the first Labels layer of a process now (the widget calls this once
    it is shown) rather than inside the first Run's ``add_labels``, where they stalled the viewer:
    napari's Labels model imports scikit-image's colour and scipy modules for its colormaps (~40 ms), and
    vispy builds the line dash atlas of the Labels overlays (~60 ms, cached for the process). Measured
    (napari 0.9.2, Mesa): the first ``add_labels`` of a process 131–255 ms before, 54–59 ms after, as
    every later one."""
    from napari.layers import Labels

    Labels(np.zeros((2, 2), np.uint8))
    try:
        from vispy.visuals.line.dash_atlas import DashAtlas
    except ImportError:  # pragma: no cover - another vispy layout: nothing to prime there
        return
    DashAtlas()


@dataclass
class _Interactive:
    """The result the correction buttons act on (the last progressive Run's)."""

    session: str  # the worker's session id
    spec: dict[str, Any]  # the session_run job (a restarted worker rebuilds the session from it)
    source: Any  # the image layer it segments
    result: Any  # the result Labels layer
    corrections: Any  # its corrections Labels layer
    class_names: list[str]
    history: list[np.ndarray] = field(default_factory=list)  # the corrections sent by each refine kept
    rounds: int = 0  # the worker session's refine rounds behind the result (after the last edit)


def _class_names(info: dict[str, Any]) -> list[str]:
    names = list(info.get("class_names") or [])
    count = max(int(info.get("classes") or 0), len(names), 2)
    return [names[c] if c < len(names) else f"class {c}" for c in range(count)]


def _result_colormap(info: dict[str, Any]) -> Any:
    """The checkpoint's ``label_colors`` as a napari colormap, else napari's default cyclic one."""
    colors = info.get("label_colors") or []
    if colors and all(len(c) in (3, 4) for c in colors):
        from medsegkit.napari._sample_data import label_colormap

        return label_colormap([tuple(c)[:3] for c in colors])
    from napari.utils.colormaps import label_colormap as napari_default

    return napari_default()


def _corrections_colormap(result: Any, classes: int) -> dict[int | None, tuple[float, ...]]:
    """Value ``c + 1`` in the result layer's colour of class ``c``; ``1`` (background) in light grey when the
    result draws class 0 transparent; ``0`` (unmarked) transparent."""
    rgba = np.asarray(result.colormap.map(np.arange(classes)), dtype=float).reshape(classes, 4)
    mapping: dict[int | None, tuple[float, ...]] = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for c in range(classes):
        colour = tuple(float(v) for v in rgba[c])
        mapping[c + 1] = BACKGROUND_BRUSH if colour[3] == 0 else colour
    return mapping


def _copy_region(info: dict[str, Any], target: np.ndarray | None) -> np.ndarray:
    """Copy ``info["region"]`` of the worker's labels file (napari order) into ``target`` (made on first use)."""
    shared = np.load(info["path"], mmap_mode="r")
    if target is None:
        target = np.zeros(shared.shape, dtype=shared.dtype)
    if info.get("region") is not None:
        region = tuple(slice(int(a), int(b)) for a, b in info["region"])
        target[region] = shared[region]
    return target


def _quality_table(labels: Any, scale: tuple[float, ...], class_names: list[str]) -> Any:
    """Per-structure QC of a labels result, computed with numpy / scipy / pandas (no torch; run in the job's
    thread, off the viewer's): the fragmentation and border flags of :mod:`medsegkit.qc` (one case: no
    cohort z-score, no mirrored pass). ``None`` for results that are not 2D / 3D integer label maps."""
    from medsegkit.io import Image
    from medsegkit.measurements import stats
    from medsegkit.qc import add_quality_flags

    array = np.asarray(labels)
    if array.ndim not in (2, 3) or array.dtype.kind not in "iub":
        return None
    spacing = list(scale)[-array.ndim:]
    affine = np.eye(4)
    affine[range(array.ndim), range(array.ndim)] = spacing  # voxel volume = product of the layer's scale
    return add_quality_flags(stats(Image(array, affine), class_names=class_names or None))


def _drive(job: WorkerJob, data: Any, folder: Path, scale: tuple[float, ...]):
    """Thread body of a Run: write the input, run the worker process, relay its progress (and, for a
    progressive run, copy each finished region into the result array and yield ``("update", region,
    {"labels", "info"})``), read the output and compute its QC table (off the viewer's thread)."""
    if job.cancel_requested:
        raise Cancelled("cancelled; no layer was added")
    job.job["input"] = write_input_array(data, folder)
    if job.cancel_requested:
        raise Cancelled("cancelled; no layer was added")
    messages = job.run()
    labels: np.ndarray | None = None
    while True:
        try:
            item = next(messages)
        except StopIteration as stop:
            result = stop.value
            break
        if isinstance(item, Update):
            labels = _copy_region(item.info, labels)
            yield ("update", item.info["region"], {"labels": labels, "info": item.info})
        else:
            yield item
    if job.job["action"] == "session_run":
        output = _copy_region({**result, "region": [[0, n] for n in result["shape"]]}, labels)
    else:
        output = read_output(result)
    quality = None
    if result.get("task") in (None, "semantic") and job.job.get("output") == "labels" and isinstance(output, np.ndarray):
        quality = _quality_table(output, scale, result.get("class_names") or [])
    return result, output, quality


def _drive_edit(job: WorkerJob, folder: Path | None, scribbles: np.ndarray | None, labels: np.ndarray | None):
    """Thread body of Refine / Undo / Reset / Save: write the scribbles, run the job, relay its progress and
    copy the changed region of the worker's labels file into ``labels`` (the result layer's array) — only
    once the worker succeeded, so a failure leaves the result as it was."""
    if scribbles is not None:
        job.job["scribbles"] = write_input_array(scribbles, folder, name="scribbles")
    result = yield from job.run()
    if labels is not None and result.get("region") is not None:
        _copy_region(result, labels)
    return result, None, None


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
