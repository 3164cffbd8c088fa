"""Interactive segmentation in the Segment widget: warm worker, progressive Run, Refine / Undo / Reset / Save,
Cancel and a killed worker during Refine, and the viewer's responsiveness (issue 15)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from medsegkit.napari._worker_client import WorkerJob, default_worker, read_output, write_input_array


def _choose(widget, layer, model: str, checkpoint: str | None = None, **options) -> None:
    widget.image.value = layer
    widget.model.value = model
    widget.checkpoint.line_edit.value = checkpoint or ""
    for key, value in options.items():
        getattr(widget, key).value = value


def _one_shot(widget, tmp_path) -> np.ndarray:
    """The same layer and settings through the worker's plain ``segment`` job (no session)."""
    job, _, data = widget.build_job()
    job["action"] = "segment"
    job["predict"]["fast"] = False
    job["input"] = write_input_array(data, tmp_path)
    job["output_dir"] = str(tmp_path / "one_shot")
    return np.asarray(read_output(WorkerJob(job).result()))


def _max_gap_ms(ticks: list[float], start: float, end: float) -> float:
    inside = np.asarray([t for t in ticks if start <= t <= end])
    return float(np.diff(inside).max() * 1000) if len(inside) > 1 else float("nan")


def _paint(widget, corrections, centre, cls: int, size: int = 5) -> np.ndarray:
    """A stroke with the brush of class ``cls`` at ``centre`` (napari order) on the slice on screen; the
    voxels it marked."""
    widget.brush.value = widget.brush.choices[cls]
    assert corrections.selected_label == cls + 1
    before = np.array(corrections.data, copy=True)
    corrections.brush_size = size
    corrections.paint(centre, corrections.selected_label)
    marked = (np.asarray(corrections.data) != before)
    assert marked.any()
    return marked


def test_warm_worker_keeps_the_model_and_a_second_run_does_not_reload(sample_layers, qtbot, errors, wait_for_run):
    viewer, widget, t1 = sample_layers
    qtbot.waitUntil(lambda: widget.warm_info is not None, timeout=300_000)  # started when the widget opened
    assert "error" not in widget.warm_info and default_worker().is_alive()
    pid = default_worker().pid
    widget.image.value = t1  # the demo model is preselected (the one the warm-up loaded)
    runs, layers = [], []
    for _ in range(2):
        widget.run()
        wait_for_run(widget)
        assert errors == []
        runs.append((widget.first_update_seconds, widget.last_run_seconds, widget.last_run_info))
        state = widget._interactive
        layers.append((state.result, state.corrections, np.array(state.result.data, copy=True)))
    assert default_worker().pid == pid  # the same process: no import paid again
    assert runs[0][2]["model_loaded"] is False and runs[1][2]["model_loaded"] is False  # loaded when the widget opened
    assert runs[0][2]["focus"] == {"axis": 2, "index": viewer.dims.current_step[0]}  # the axial slice on screen
    # the second Run of the same model on the same layer wrote into the unrefined result's layers: no new layers
    assert layers[1][0] is layers[0][0] and layers[1][1] is layers[0][1]
    np.testing.assert_array_equal(layers[1][2], layers[0][2])
    assert [layer.name for layer in viewer.layers if layer.name.startswith("MNI152 T1 [unet3d_mni152_tissue]")] == [
        "MNI152 T1 [unet3d_mni152_tissue]", "MNI152 T1 [unet3d_mni152_tissue] corrections"]
    assert "replaced 'MNI152 T1 [unet3d_mni152_tissue]' in place" in widget.status.value
    print(f"\nwarm-up: imports {widget.warm_info['import_seconds']:.2f} s, model load {widget.warm_info['load_seconds']:.2f} s; "
          + "; ".join(f"run {i + 1}: first slice {f:.2f} s, total {t:.2f} s (worker: session {info['session_seconds']:.2f} s, "
                      f"run {info['run_seconds']:.2f} s)" for i, (f, t, info) in enumerate(runs)))


def test_progressive_run_streams_into_one_layer_and_ends_equal_to_segment(sample_layers, checkpoints, qtbot, errors,
                                                                          wait_for_run, tmp_path, heartbeat):
    viewer, widget, t1 = sample_layers
    _choose(widget, t1, "UNet3d", checkpoints["unet3d"], roi_size="32", overlap=0.25)
    viewer.dims.set_current_step(0, 20)  # the axial slice z = 20 on screen
    n_layers = len(viewer.layers)
    timer, ticks = heartbeat()
    try:
        widget.run()
        wait_for_run(widget)
    finally:
        timer.stop()
    assert errors == []
    info = widget.last_run_info
    assert info["focus"] == {"axis": 2, "index": 20}
    result = viewer.layers["MNI152 T1 [UNet3d]"]
    assert len(viewer.layers) == n_layers + 2  # the result and its corrections layer, nothing else
    assert widget.model.value == "UNet3d"  # adding layers does not bring back the sample's demo model
    corrections = viewer.layers["MNI152 T1 [UNet3d] corrections"]
    assert widget.first_update_seconds < widget.last_run_seconds
    # the last regions are drawn at most REFRESH_S after the result: a run that ends within REFRESH_S of its
    # first update has its one redraw still pending when the run ends (a CI run asserted before it came)
    from medsegkit.napari._widget import REFRESH_S

    qtbot.waitUntil(lambda: bool(widget.refresh_times) and widget.refresh_times[-1] >= widget.result_arrived,
                    timeout=int(REFRESH_S * 1000) + 2000)
    assert widget.refresh_times[-1] - widget.result_arrived <= REFRESH_S + 1.0
    gaps = np.diff(widget.refresh_times)
    assert (gaps >= 0.099).all()  # at most 10 redraws a second
    np.testing.assert_array_equal(result.data, _one_shot(widget, tmp_path))
    assert len(np.unique(result.data)) == 2
    # the corrections layer: same grid, value c + 1 drawn in the result's colour of class c
    assert corrections.data.shape == result.data.shape and not corrections.data.any()
    np.testing.assert_allclose(corrections.scale, result.scale)
    np.testing.assert_allclose(corrections.colormap.map(np.array([2]))[0], result.colormap.map(np.array([1]))[0])
    assert list(corrections.features["class"]) == ["unmarked", "class0", "class1"]
    print(f"\nprogressive run (tiny UNet3d, roi 32): first slice {widget.first_update_seconds:.2f} s, total "
          f"{widget.last_run_seconds:.2f} s, {len(widget.refresh_times)} redraws; longest 10 ms heartbeat gap "
          f"{_max_gap_ms(ticks, widget._started, widget.result_arrived):.0f} ms")


def test_result_redraws_stay_a_tenth_of_a_second_apart_when_the_timer_fires_early(segment_widget, qtbot):
    """Qt's default timers may fire up to 5 % early (a CI run redrew after 98.7 ms); the refresh timer's
    slot checks the clock and re-arms for what remains."""
    from medsegkit.napari._widget import REFRESH_S

    viewer, widget = segment_widget
    layer = viewer.add_labels(np.zeros((4, 4, 4), np.uint8))
    widget._run_target = {"layer": layer, "dirty": False, "refreshes": 0}
    widget._last_refresh = last = time.perf_counter()
    widget._schedule_flush()  # within REFRESH_S of the last redraw: deferred to the timer
    assert widget.refresh_times == [] and widget._refresh_timer.isActive()
    widget._refresh_timer.stop()
    widget._flush_when_due()  # as if the timer fired right away
    assert widget.refresh_times == [] and widget._refresh_timer.isActive()  # re-armed, not redrawn
    qtbot.waitUntil(lambda: len(widget.refresh_times) == 1, timeout=5_000)
    assert widget.refresh_times[0] - last >= REFRESH_S
    assert widget._run_target["refreshes"] == 1 and not widget._run_target["dirty"]
    widget._run_target = None


def test_cancelled_run_keeps_what_is_done_when_asked(sample_layers, checkpoints, qtbot, errors, wait_for_run, tmp_path):
    viewer, widget, t1 = sample_layers
    _choose(widget, t1, "UNet3d", checkpoints["unet3d"], roi_size="16", overlap=0.75, on_cancel="keep what is done")
    widget.run()
    qtbot.waitUntil(lambda: widget._run_target["layer"] is not None, timeout=120_000)  # a preview of the slice
    qtbot.waitUntil(lambda: widget.exact_focus_seconds is not None, timeout=120_000)  # the exact slice on screen
    widget.cancel()
    wait_for_run(widget, timeout_s=30)
    assert widget.status.value == "cancelled; the finished part is kept" and errors == []
    partial = viewer.layers["MNI152 T1 [UNet3d]"]
    z = viewer.dims.current_step[0]
    np.testing.assert_array_equal(partial.data[z], _one_shot(widget, tmp_path)[z])  # the slice on screen is final
    assert "MNI152 T1 [UNet3d] corrections" not in viewer.layers


def test_paint_refine_undo_reset_and_save(sample_layers, checkpoints, qtbot, errors, wait_for_run, tmp_path):
    viewer, widget, t1 = sample_layers
    _choose(widget, t1, "UNet3d", checkpoints["unet3d"], roi_size="32", overlap=0.25)
    widget.run()
    wait_for_run(widget)
    result = viewer.layers["MNI152 T1 [UNet3d]"]
    corrections = viewer.layers["MNI152 T1 [UNet3d] corrections"]
    # active in paint mode from the next turn of the event loop (not in the same block as adding it)
    qtbot.waitUntil(lambda: viewer.layers.selection.active is corrections and corrections.mode == "paint")
    original = np.array(result.data, copy=True)
    z = viewer.dims.current_step[0]
    centre = (z, 60, 50)
    cls = 1 - int(original[centre])  # the class the model does not give there
    marked = _paint(widget, corrections, centre, cls)
    assert (original[marked] != cls).any()

    widget.seconds.value = 0.5
    widget.scope.value = "local"  # "near the strokes" whatever the round (auto: tests/test_interactive.py)
    widget.refine()
    wait_for_run(widget)
    assert errors == [] and widget.status.value.startswith("refined in")
    refined = np.array(result.data, copy=True)
    assert (refined[marked] == cls).all()  # marked voxels keep their marked class
    changed = np.argwhere(refined != original)
    assert len(changed) >= marked.sum() // 2
    # only near the strokes: within 8 preprocessed voxels (2 mm) -> 8 voxels of this 2 mm grid
    assert np.abs(changed - np.asarray(centre)).max() <= 8 + 3
    assert widget.last_edit_info["rounds"] == 1

    widget.undo()
    wait_for_run(widget)
    np.testing.assert_array_equal(result.data, original)
    assert not corrections.data.any()  # the strokes of the undone round are gone too

    _paint(widget, corrections, centre, cls)
    widget.refine()
    wait_for_run(widget)
    assert (result.data[marked] == cls).all() and widget.last_edit_info["rounds"] == 1
    path = tmp_path / "adapted.safetensors"
    widget.save_path.value = str(path)
    widget.save_adapted()
    wait_for_run(widget)
    assert path.is_file() and widget.status.value == f"saved the adapted model (1 refine rounds) to {path}"
    saved = path.read_bytes()
    widget.save_adapted()  # the file exists now: refused in the viewer, no job, the file as it was
    assert not widget.running and errors[-1].startswith(f"{path} exists; tick 'replace an existing file'")
    assert path.read_bytes() == saved
    widget.save_overwrite.value = True
    widget.save_adapted()
    wait_for_run(widget)
    assert widget.status.value == f"saved the adapted model (1 refine rounds) to {path}"
    errors.clear()
    widget.reset()
    wait_for_run(widget)
    np.testing.assert_array_equal(result.data, original)
    assert not corrections.data.any() and errors == []

    widget.refine()  # nothing painted: refused with a message, no job
    assert not widget.running and errors[-1].startswith("paint strokes on the corrections layer first")

    # a refined result is never overwritten: Run again adds a new result (and corrections) layer
    _paint(widget, corrections, centre, cls)
    widget.refine()
    wait_for_run(widget)
    refined = np.array(result.data, copy=True)
    n_layers = len(viewer.layers)
    widget.run()
    wait_for_run(widget)
    assert len(viewer.layers) == n_layers + 2 and widget._interactive.result is not result
    np.testing.assert_array_equal(result.data, refined)
    np.testing.assert_array_equal(widget._interactive.result.data, original)


def test_run_again_replaces_an_unrefined_result_and_cancel_brings_it_back(sample_layers, checkpoints, qtbot, errors,
                                                                           wait_for_run):
    viewer, widget, t1 = sample_layers
    _choose(widget, t1, "UNet3d", checkpoints["unet3d"], roi_size="32", overlap=0.25)
    widget.run()
    wait_for_run(widget)
    result = viewer.layers["MNI152 T1 [UNet3d]"]
    original = np.array(result.data, copy=True)
    n_layers = len(viewer.layers)
    # the same model with other options (a slow run), cancelled after its first update: the result comes back
    _choose(widget, t1, "UNet3d", checkpoints["unet3d"], roi_size="16", overlap=0.75)
    widget.run()
    qtbot.waitUntil(lambda: widget._run_target["layer"] is not None, timeout=120_000)
    assert widget._run_target["layer"] is result and len(viewer.layers) == n_layers
    widget.cancel()
    wait_for_run(widget, timeout_s=30)
    assert errors == [] and len(viewer.layers) == n_layers
    np.testing.assert_array_equal(result.data, original)
    assert widget._interactive.result is result and widget.refine_button.enabled
    # kept partial result: the layer keeps it, but it can no longer be refined (its session never finished)
    widget.on_cancel.value = "keep what is done"
    widget.run()
    qtbot.waitUntil(lambda: widget._run_target["layer"] is not None, timeout=120_000)
    widget.cancel()
    wait_for_run(widget, timeout_s=30)
    assert widget.status.value == "cancelled; the finished part is kept" and errors == []
    assert widget._interactive is None and not widget.refine_button.enabled
    assert "MNI152 T1 [UNet3d] corrections" not in viewer.layers and len(viewer.layers) == n_layers - 1


@pytest.mark.slow  # two fresh worker processes (torch + MONAI imports)
def test_cancel_and_killed_worker_during_refine(sample_layers, checkpoints, qtbot, errors, monkeypatch, wait_for_run,
                                                restart_worker):
    viewer, widget, t1 = sample_layers
    monkeypatch.setenv("MEDSEGKIT_WORKER_TEST_CRASH", "block-refine")  # each refine waits for cancel (or a kill)
    restart_worker()
    _choose(widget, t1, "UNet3d", checkpoints["unet3d"], roi_size="32", overlap=0.25)
    widget.run()
    wait_for_run(widget)
    result = viewer.layers["MNI152 T1 [UNet3d]"]
    corrections = viewer.layers["MNI152 T1 [UNet3d] corrections"]
    original = np.array(result.data, copy=True)
    centre = (viewer.dims.current_step[0], 60, 50)
    cls = 1 - int(original[centre])
    marked = _paint(widget, corrections, centre, cls)
    strokes = np.array(corrections.data, copy=True)

    # Cancel during Refine: the result (and the strokes) stay as they were; the worker honours it
    pid = default_worker().pid
    widget.refine()
    qtbot.waitUntil(lambda: widget._job is not None and bool(widget._job.info), timeout=60_000)
    widget.cancel()
    wait_for_run(widget, timeout_s=30)
    assert widget.status.value == "refine cancelled; the previous result is kept" and errors == []
    np.testing.assert_array_equal(result.data, original)
    np.testing.assert_array_equal(corrections.data, strokes)
    assert default_worker().pid == pid

    # the worker killed during Refine (as the OOM killer does): reported, the result stays
    widget.refine()
    qtbot.waitUntil(lambda: widget._job is not None and bool(widget._job.info), timeout=60_000)
    os.kill(widget._job.info["pid"], signal.SIGKILL)
    wait_for_run(widget, timeout_s=60)
    assert len(errors) == 1 and errors[0].startswith("refine failed: the model worker process was killed (SIGKILL")
    assert "(the previous result is kept)" in errors[0]
    np.testing.assert_array_equal(result.data, original)

    # the next Refine starts a fresh worker, which rebuilds the session and applies every stroke
    monkeypatch.delenv("MEDSEGKIT_WORKER_TEST_CRASH")
    widget.refine()
    wait_for_run(widget, timeout_s=300)
    assert len(errors) == 1, errors
    assert widget.last_edit_info["rebuilt"] and "it was rebuilt from the original model" in widget.status.value
    assert (result.data[marked] == cls).all()
    assert default_worker().pid not in (None, pid)


@pytest.mark.slow
def test_viewer_never_stalls_during_run_and_refine(sample_layers, qtbot, errors, wait_for_run, heartbeat):
    """The longest gap between 10 ms QTimer ticks during a progressive Run and a Refine of the demo model
    on the 2 mm MNI sample (figures printed; the issue's target is 100 ms)."""
    viewer, widget, t1 = sample_layers
    widget.image.value = t1
    qtbot.waitUntil(lambda: widget.warm_info is not None, timeout=300_000)
    timer, ticks = heartbeat()
    try:
        widget.run()
        wait_for_run(widget)
        corrections = viewer.layers["MNI152 T1 [unet3d_mni152_tissue] corrections"]
        qtbot.waitUntil(lambda: viewer.layers.selection.active is corrections and corrections.mode == "paint")
        # the result handler (corrections layer) and the corrections layer's activation included
        run_window = (widget._started, time.perf_counter())
        z = viewer.dims.current_step[0]
        _paint(widget, corrections, (z, 58, 49), 3)
        widget.refine()
        refine_started = time.perf_counter()
        wait_for_run(widget)
        refine_window = (refine_started, time.perf_counter())
    finally:
        timer.stop()
    assert errors == []
    run_gap, refine_gap = _max_gap_ms(ticks, *run_window), _max_gap_ms(ticks, *refine_window)
    print(f"\nlongest 10 ms heartbeat gap: run {run_gap:.0f} ms ({widget.last_run_seconds:.1f} s, first slice "
          f"{widget.first_update_seconds:.2f} s), refine {refine_gap:.0f} ms ({widget.last_edit_seconds:.1f} s); "
          f"load average {os.getloadavg()[0]:.2f}")
    assert run_gap < 1000 and refine_gap < 1000, "the viewer froze for more than a second"
