"""napari plugin tests: they need a display (Xvfb in CI) and run in their own pytest process.

Run them with ``xvfb-run -a pytest tests/napari``. Without a display the folder is skipped with a
message, unless ``MEDSEGKIT_REQUIRE_DISPLAY=1`` (set in CI), where a missing display fails instead.

This process must stay free of torch-side imports (after napari has a GL context, importing triton
crashes it on Mesa), so the checkpoints the tests need are written by a separate Python process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

NO_DISPLAY = (
    "no display: the napari plugin tests need an X server. Install xvfb "
    "(apt-get install -y xvfb libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-cursor0 ...) "
    "and run them under `xvfb-run -a pytest tests/napari`"
)


@pytest.fixture(autouse=True)
def _display_required():
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    if os.environ.get("MEDSEGKIT_REQUIRE_DISPLAY") == "1":
        pytest.fail(NO_DISPLAY + " (MEDSEGKIT_REQUIRE_DISPLAY=1 turns this skip into a failure)")
    pytest.skip(NO_DISPLAY)


_MAKE_CHECKPOINTS = r"""
import json, sys
import medsegkit as m
folder = sys.argv[1]
made = {}
def save(key, name, **overrides):
    model = m.create_model(name, **overrides)
    path = f"{folder}/{key}.safetensors"
    m.save_checkpoint(model, path, metadata={"class_names": [f"class{i}" for i in range(model.out_channels)]})
    made[key] = path
save("unet3d", "UNet3d", channels=(4, 8), strides=(2,))
save("unet3d_2ch", "UNet3d", channels=(4, 8), strides=(2,), in_channels=2, out_channels=3)
save("unet2d", "UNet2d", channels=(4, 8), strides=(2,))
save("unet2d_rgb", "UNet2d", channels=(4, 8), strides=(2,), in_channels=3)
# a small Mask R-CNN whose heads are biased to detect "class 1" objects with full masks everywhere, so
# random weights still give several instances
import torch
torch.manual_seed(0)
rcnn = m.create_model("mask_rcnn_resnet_50_fpn", depth=18, fpn_channels=16, representation_size=32,
                      mask_layers=(8,), min_size=64, max_size=128)
with torch.no_grad():
    params = dict(rcnn.named_parameters())
    params["roi_heads.box_predictor.cls_score.bias"][:] = torch.tensor([-5.0, 5.0, -5.0])
    params["roi_heads.mask_predictor.mask_fcn_logits.bias"][:] = 3.0
made["rcnn"] = str(m.save_checkpoint(rcnn, f"{folder}/rcnn.safetensors"))
print(json.dumps(made))
"""


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints (U-Nets ``unet3d``, ``unet3d_2ch``, ``unet2d``, ``unet2d_rgb``; Mask R-CNN ``rcnn``),
    written by a subprocess."""
    folder = tmp_path_factory.mktemp("checkpoints")
    done = subprocess.run([sys.executable, "-c", _MAKE_CHECKPOINTS, str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def catalog():
    """The model catalogue (fetched once per session from the worker process)."""
    from medsegkit.napari import _catalog

    return _catalog.fetch_catalog()


@pytest.fixture
def segment_widget(make_napari_viewer, catalog, qtbot):
    """A viewer with the Segment widget docked; returns ``(viewer, widget)``."""
    from medsegkit.napari._widget import SegmentWidget

    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    assert widget._catalog is not None
    yield viewer, widget
    if widget.running:
        widget.cancel()
        qtbot.waitUntil(lambda: not widget.running, timeout=30_000)


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    """Messages passed to ``napari.utils.notifications.show_error`` during the test."""
    seen: list[str] = []
    import napari.utils.notifications as notifications

    monkeypatch.setattr(notifications, "show_error", lambda message: seen.append(str(message)))
    return seen


@pytest.fixture
def wait_for_run(qtbot):
    """``wait_for_run(widget, timeout_s=120)``: wait until the widget's run has finished; returns the seconds waited."""

    def wait(widget, timeout_s: float = 120.0) -> float:
        start = time.perf_counter()
        qtbot.waitUntil(lambda: not widget.running, timeout=int(timeout_s * 1000))
        return time.perf_counter() - start

    return wait


@pytest.fixture
def sample_layers(segment_widget):
    viewer, widget = segment_widget
    viewer.open_sample("medsegkit", "mni152")
    return viewer, widget, viewer.layers["MNI152 T1"]


@pytest.fixture
def heartbeat():
    """``timer, ticks = heartbeat()``: a started 10 ms QTimer recording its tick times (the viewer's event
    loop is free when it ticks on time); stop the timer when done."""
    from qtpy.QtCore import QTimer

    def start():
        ticks: list[float] = []
        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start()
        return timer, ticks

    return start


@pytest.fixture
def restart_worker():
    """``restart_worker()``: stop the session's worker process; the next job spawns a fresh one that sees
    the current environment. The worker is restarted again after the test."""
    from medsegkit.napari._worker_client import default_worker

    yield default_worker().stop
    default_worker().stop()


SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"
