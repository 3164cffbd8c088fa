"""Take the screenshots of docs/napari.md: ``xvfb-run -a python scripts/napari_screenshots.py``.

Opens napari with the MNI152 sample, docks the Segment widget (the shipped demo model preselected),
runs it, and saves:

- ``docs/images/napari_segment_widget.png``: the window with the widget, before Run;
- ``docs/images/napari_segmented_sample.png``: the window after Run (the model's labels over the T1);
- ``docs/images/napari_segmented_3d.png``: the labels in the 3D view.

It also prints the longest gap of a 10 ms ``QTimer`` heartbeat during the run (responsiveness).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1] / "docs" / "images"  # where docs/napari.md finds them


def _wait(app, condition, timeout_s: float) -> None:
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s")
        app.processEvents()
        time.sleep(0.01)


def _settle(app, seconds: float) -> None:
    """Let Qt draw for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def main(argv: list[str]) -> int:
    import napari
    from napari.settings import get_settings
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from medsegkit.napari._widget import SegmentWidget

    get_settings().application.gui_notification_level = "error"  # no toast over the canvas
    viewer = napari.Viewer(title="medsegkit: Segment")
    viewer.window.resize(1400, 860)
    viewer.open_sample("medsegkit", "mni152")
    widget = SegmentWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Segment", area="right")
    dock.setMaximumWidth(480)
    app = QApplication.instance()
    _wait(app, lambda: widget._catalog is not None, 600)
    widget.image.value = viewer.layers["MNI152 T1"]
    if argv:  # a dry run with another checkpoint: python napari_screenshots.py UNet3d path.safetensors
        widget.model.value, widget.checkpoint.line_edit.value = argv[0], argv[1]
    elif not widget.model.value.startswith("demo: "):
        print("the shipped demo checkpoint is missing: no demo model to preselect", file=sys.stderr)
        return 1
    reference = viewer.layers["MNI152 tissue (reference)"]
    reference.visible = False
    viewer.camera.orientation2d = ("up", "right")  # anterior up, as radiology viewers show axial slices
    viewer.dims.set_current_step(0, 36)  # an axial slice through the ventricles (z = 36 of 95)
    viewer.reset_view()
    _settle(app, 1.0)
    viewer.screenshot(str(HERE / "napari_segment_widget.png"), canvas_only=False)

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    widget.run()
    _wait(app, lambda: not widget.running, 600)
    timer.stop()
    if widget.last_error:
        print(f"run failed: {widget.last_error}", file=sys.stderr)
        return 1
    gaps = np.diff(ticks) * 1000
    print(f"run {widget.last_run_seconds:.1f} s; heartbeat: {len(ticks)} ticks, longest gap {gaps.max():.0f} ms, "
          f"99th percentile {np.percentile(gaps, 99):.0f} ms")
    labels = viewer.layers[-1]
    labels.opacity = 0.55
    _settle(app, 1.0)
    viewer.screenshot(str(HERE / "napari_segmented_sample.png"), canvas_only=False)

    viewer.dims.ndisplay = 3
    viewer.layers["MNI152 T1"].visible = False
    labels.opacity = 1.0
    viewer.camera.angles = (0.0, -60.0, 135.0)
    viewer.camera.zoom = viewer.camera.zoom * 1.2
    _settle(app, 1.0)
    viewer.screenshot(str(HERE / "napari_segmented_3d.png"), canvas_only=True)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
