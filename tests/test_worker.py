"""The GUI worker's child side, in-process: the one layer → model-input prelude and a segment job.

No napari here: the worker is core (it imports :mod:`medsegkit.io.geometry`, never the napari package).
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest
import torch

from medsegkit.io import Image
from medsegkit.io.geometry import image_affine_from_world, world_from_image_affine
from medsegkit.worker import _layer_input, segment_job


def _world(scale_zyx, translate_zyx, channel_dim=None):
    """A napari data → world matrix (z, y, x) with scale and translate, with an extra identity dim if asked."""
    n = len(scale_zyx)
    world = np.eye(n + 1)
    world[:n, :n] = np.diag(scale_zyx)
    world[:n, n] = translate_zyx
    if channel_dim is None:
        return world
    full = np.eye(n + 2)
    keep = [a for a in range(n + 2) if a != channel_dim]
    full[np.ix_(keep, keep)] = world
    return full


def test_channel_axis_moves_first_and_the_world_becomes_the_voxel_affine():
    data = np.zeros((2, 8, 9, 10), np.float32)  # (C, z, y, x): channel first, as the model takes 2
    job = {"channel_axis": "auto", "world_affine": _world((3.0, 2.0, 0.5), (7.0, -4.0, 1.5), channel_dim=0).tolist()}
    layer = _layer_input(job, data, model_dims=3, in_channels=2)
    assert layer.has_channels and layer.n_spatial == 3 and layer.layer_channel_axis == 0
    assert layer.data.shape == (2, 8, 9, 10)
    expected = np.eye(4)
    expected[:3, :3] = np.diag((0.5, 2.0, 3.0))  # (i, j, k) = (x, y, z): spacing reversed
    expected[:3, 3] = (1.5, -4.0, 7.0)
    np.testing.assert_allclose(layer.affine, expected)
    np.testing.assert_allclose(world_from_image_affine(layer.affine, 3), _world((3.0, 2.0, 0.5), (7.0, -4.0, 1.5)))


def test_channel_last_layer_and_no_world():
    data = np.arange(8 * 9 * 10 * 2, dtype=np.float32).reshape(8, 9, 10, 2)
    layer = _layer_input({}, data, model_dims=3, in_channels=2)
    assert layer.layer_channel_axis == 3 and layer.data.shape == (2, 8, 9, 10)
    np.testing.assert_array_equal(layer.data[1], data[..., 1])
    np.testing.assert_array_equal(layer.affine, np.eye(4))


def test_rgba_loses_alpha_and_its_colour_axis_is_not_a_layer_dim():
    data = np.zeros((8, 9, 4), np.uint8)
    layer = _layer_input({"rgb": True, "world_affine": _world((2.0, 1.0), (0.0, 0.0)).tolist()}, data,
                         model_dims=2, in_channels=3)
    assert layer.data.shape == (3, 8, 9) and layer.layer_channel_axis is None and layer.n_spatial == 2
    np.testing.assert_allclose(np.diag(layer.affine), (1.0, 2.0, 1.0, 1.0))
    kept = _layer_input({"rgb": True}, data, model_dims=2, in_channels=4)
    assert kept.data.shape == (4, 8, 9)


def test_lazy_input_stays_lazy():
    zarr = pytest.importorskip("zarr")
    store = zarr.zeros((8, 9, 10, 2), chunks=(4, 9, 10, 2), dtype="f4")
    layer = _layer_input({}, store, model_dims=3, in_channels=2)
    assert type(layer.data).__module__.startswith("dask") and layer.data.shape == (2, 8, 9, 10)


def test_four_spatial_axes_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^the layer has 4 spatial axes \(array shape \(2, 3, 4, 5\)\); 2D and 3D "
                                         r"images are supported: choose the channel axis"):
        _layer_input({"channel_axis": None}, np.zeros((2, 3, 4, 5)), model_dims=3, in_channels=1)


def _tiny_layer_job(tmp_path, metadata: dict | None = None, **predict):
    """A tiny UNet3d checkpoint and a (12, 16, 20) float layer (napari order) saved as .npy, with the
    segment job that runs one on the other: ``(model, layer, world affine, job)``."""
    from medsegkit import create_model
    from medsegkit.weights import save_checkpoint

    torch.manual_seed(0)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,)).eval()
    checkpoint = save_checkpoint(model, tmp_path / "tiny.safetensors", metadata=metadata)
    layer = np.random.default_rng(0).random((12, 16, 20), dtype=np.float32)  # napari order (z, y, x)
    np.save(tmp_path / "layer.npy", layer)
    world = _world((2.0, 1.0, 0.5), (10.0, -3.0, 4.0))
    job = {"model": {"checkpoint": str(checkpoint)}, "input": {"format": "npy", "path": str(tmp_path / "layer.npy")},
           "world_affine": world.tolist(), "predict": {"roi_size": [8, 16, 16], **predict},
           "output_dir": str(tmp_path / "out")}
    return model, layer, world, job


def test_segment_job_equals_segment_on_the_same_image(tmp_path):
    from medsegkit import segment

    model, layer, world, job = _tiny_layer_job(tmp_path)
    messages: queue.Queue = queue.Queue()
    result = segment_job(job, messages, threading.Event())
    out = np.load(result["path"])
    assert out.shape == layer.shape and result["layer_channel_axis"] is None
    assert len(np.unique(out)) == 2  # both classes appear: the comparison below is not between constants
    image = Image(np.ascontiguousarray(layer.transpose(2, 1, 0)), image_affine_from_world(world), {}, None)
    reference = segment(model, image, roi_size=(16, 16, 8))  # per-axis options in voxel order (i, j, k)
    np.testing.assert_array_equal(out, np.asarray(reference.array).transpose(2, 1, 0))
    assert not messages.empty()  # progress was reported


def test_segment_job_auto_tta_mirrors_left_right_of_a_reorienting_checkpoint(tmp_path):
    """The widget's TTA sends "auto" (no axes to reorder); the checkpoint reorients to RAS, so the job
    mirrors the left-right axis of the preprocessed grid, as segment(..., tta_flips=(0,)) does."""
    from medsegkit import segment

    model, layer, world, job = _tiny_layer_job(tmp_path, {"preprocessing": {"orientation": "RAS"}}, tta_flips="auto")
    job["output"] = "probabilities"
    out = np.load(segment_job(job, queue.Queue(), threading.Event())["path"])
    image = Image(np.ascontiguousarray(layer.transpose(2, 1, 0)), image_affine_from_world(world), {}, None)
    kwargs = {"roi_size": (16, 16, 8), "output": "probabilities", "preprocessing": {"orientation": "RAS"}}
    expected = np.asarray(segment(model, image, tta_flips=(0,), **kwargs).array)
    np.testing.assert_array_equal(out, expected.transpose(0, 3, 2, 1))
    every_axis = np.asarray(segment(model, image, tta_flips=(0, 1, 2), **kwargs).array)
    assert np.abs(expected - every_axis).max() > 1e-4


def _drain(messages: queue.Queue) -> list[tuple]:
    out = []
    while not messages.empty():
        out.append(messages.get())
    return out


def test_session_jobs_run_progressively_refine_undo_reset_save_and_rebuild(tmp_path):
    """The worker's interactive session: the slice on screen first, the final labels file equal to a
    segment job's output, the kept model reused, refine / undo / reset through the shared labels file, and
    a session rebuilt from its spec after a restart."""
    from medsegkit import create_model, worker
    from medsegkit.weights import read_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=3).eval()
    checkpoint = save_checkpoint(model, tmp_path / "tiny.safetensors", metadata={"class_names": ["bg", "a", "b"]})
    layer = np.random.default_rng(0).random((20, 24, 28), dtype=np.float32)  # napari order (z, y, x)
    np.save(tmp_path / "layer.npy", layer)
    base = {"model": {"checkpoint": str(checkpoint)}, "input": {"format": "npy", "path": str(tmp_path / "layer.npy")},
            "world_affine": _world((2.0, 1.0, 1.0), (0.0, 0.0, 0.0)).tolist(), "predict": {"roi_size": [8, 16, 16]}}
    reference = np.load(segment_job({**base, "output_dir": str(tmp_path / "ref")}, queue.Queue(), threading.Event())["path"])
    assert len(np.unique(reference)) >= 2

    messages: queue.Queue = queue.Queue()
    # the 2D view of napari showing z = 13: dims (y, x) on screen
    run = {**base, "action": "session_run", "session": "s1", "output_dir": str(tmp_path / "run"),
           "view": {"point": [13.2, 5.0, 6.0], "displayed": [1, 2]}}
    result = worker.session_job(run, messages, threading.Event())
    assert result["focus"] == {"axis": 2, "index": 13}  # voxel order (i, j, k) = (x, y, z)
    assert result["model_loaded"] is False  # segment_job above loaded it: kept
    updates = [m[1] for m in _drain(messages) if m[0] == "update"]
    assert len(updates) >= 2 and updates[0]["region"] == [[13, 14], [0, 24], [0, 28]]  # the slice on screen first
    labels = np.load(result["path"])
    np.testing.assert_array_equal(labels, reference)
    assert result["class_names"] == ["bg", "a", "b"] and result["classes"] == 3

    # refine: mark a block of class 2 where the model says something else
    scribbles = np.zeros_like(labels, dtype=np.uint8)
    scribbles[4:7, 5:9, 6:10] = 2 + 1
    np.save(tmp_path / "scribbles.npy", scribbles)
    refine = {"action": "session_refine", "session": "s1", "spec": run, "seconds": 0.5,
              "scribbles": {"format": "npy", "path": str(tmp_path / "scribbles.npy")}}
    result = worker.session_job(refine, messages, threading.Event())
    refined = np.load(result["path"])
    assert (refined[scribbles > 0] == 2).all() and result["rounds"] == 1 and not result["rebuilt"]
    changed = np.argwhere(refined != labels)
    box = result["region"]
    assert all(lo <= changed[:, a].min() and changed[:, a].max() < hi for a, (lo, hi) in enumerate(box))
    with pytest.raises(ValueError, match="^no new marks: paint strokes on the corrections layer"):
        worker.session_job(refine, messages, threading.Event())  # the same strokes again: nothing new
    # negative values were dropped without a word until 2026-12-08 (only -1 painted: "no new marks")
    for painted in (-1, 1 + 1):
        negative = scribbles.astype(np.int16)
        negative[10:12, 10:12, 10:12] = -1
        negative[12:14, 10:12, 10:12] = painted
        np.save(tmp_path / "negative.npy", negative)
        with pytest.raises(ValueError, match=r"^the corrections must be >= 0 \(0 = unmarked, c \+ 1 = class c\), got -1$"):
            worker.session_job({**refine, "scribbles": {"format": "npy", "path": str(tmp_path / "negative.npy")}},
                               messages, threading.Event())
    assert worker._sessions["s1"].session.rounds == 1

    result = worker.session_job({"action": "session_undo", "session": "s1"}, messages, threading.Event())
    np.testing.assert_array_equal(np.load(result["path"]), reference)
    assert result["rounds"] == 0
    worker.session_job(refine, messages, threading.Event())
    saved = worker.session_job({"action": "session_save", "session": "s1", "path": str(tmp_path / "adapted.safetensors")},
                               messages, threading.Event())
    _, record = read_checkpoint(saved["path"])
    assert record["metadata"]["adapted_from"] == str(checkpoint) and saved["rounds"] == 1
    result = worker.session_job({"action": "session_reset", "session": "s1"}, messages, threading.Event())
    np.testing.assert_array_equal(np.load(result["path"]), reference)

    # a restarted worker holds no session: it is rebuilt from the spec, and the whole map is published
    worker._sessions.clear()
    with pytest.raises(ValueError, match="holds no session 's1' and the job gives no spec"):
        worker.session_job({"action": "session_undo", "session": "s1"}, messages, threading.Event())
    result = worker.session_job(refine, messages, threading.Event())
    assert result["rebuilt"] and result["region"] == [[0, 20], [0, 24], [0, 28]] and result["rounds"] == 1
    assert (np.load(result["path"])[scribbles > 0] == 2).all()


@pytest.mark.parametrize("action", ["session_refine", "session_undo", "session_reset"])
def test_session_jobs_after_a_cancelled_run_finish_the_run_first(tmp_path, action):
    """Until 2026-12-08 a session whose session_run was cancelled failed every later job with
    AttributeError: 'NoneType' object has no attribute 'copy' (its labels did not exist yet)."""
    from medsegkit import Cancelled, create_model, worker
    from medsegkit.weights import save_checkpoint

    torch.manual_seed(0)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=3).eval()
    checkpoint = save_checkpoint(model, tmp_path / "tiny.safetensors")
    layer = np.random.default_rng(0).random((12, 16, 20), dtype=np.float32)
    np.save(tmp_path / "layer.npy", layer)
    base = {"model": {"checkpoint": str(checkpoint)}, "input": {"format": "npy", "path": str(tmp_path / "layer.npy")},
            "predict": {"roi_size": [8, 16, 16]}}
    reference = np.load(segment_job({**base, "output_dir": str(tmp_path / "ref")}, queue.Queue(), threading.Event())["path"])
    run = {**base, "action": "session_run", "session": "s1", "output_dir": str(tmp_path / "run")}
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled, match="cancelled after 0 of"):
        worker.session_job(run, queue.Queue(), cancel)
    scribbles = np.zeros(layer.shape, np.uint8)
    scribbles[4:7, 5:9, 6:10] = 2 + 1
    np.save(tmp_path / "scribbles.npy", scribbles)
    job = {"action": action, "session": "s1", "spec": run, "seconds": 0.5,
           "scribbles": {"format": "npy", "path": str(tmp_path / "scribbles.npy")}}
    if action == "session_undo":
        with pytest.raises(ValueError, match="^nothing to undo"):
            worker.session_job(job, queue.Queue(), threading.Event())
        np.testing.assert_array_equal(np.load(tmp_path / "run" / "labels.npy"), reference)
        return
    result = worker.session_job(job, queue.Queue(), threading.Event())
    labels = np.load(result["path"])
    assert not result["rebuilt"] and result["region"] == [[0, 12], [0, 16], [0, 20]]
    if action == "session_reset":
        np.testing.assert_array_equal(labels, reference)
    else:
        assert result["rounds"] == 1 and (labels[scribbles > 0] == 2).all()
        from medsegkit.io.geometry import reverse_spatial

        np.testing.assert_array_equal(labels, reverse_spatial(worker._sessions["s1"].session.labels, 3))


def test_focus_is_the_hidden_spatial_axis_only_in_a_2d_view():
    from medsegkit.worker import _focus_of

    volume = _layer_input({}, np.zeros((2, 8, 9, 10), np.float32), model_dims=3, in_channels=2)  # channels at dim 0
    assert _focus_of({"point": [1, 6.6, 2, 3], "displayed": [2, 3]}, volume) == {"axis": 2, "index": 7}
    assert _focus_of({"point": [1, 3, 4.4, 3], "displayed": [1, 3]}, volume) == {"axis": 1, "index": 4}
    assert _focus_of({"point": [0, 50, 0, 0], "displayed": [2, 3]}, volume) == {"axis": 2, "index": 7}  # clipped
    assert _focus_of({"point": [0, 3, 4, 5], "displayed": [1, 2, 3]}, volume) is None  # the 3D view
    flat = _layer_input({}, np.zeros((8, 9), np.float32), model_dims=2, in_channels=1)
    assert _focus_of({"point": [3, 4], "displayed": [0, 1]}, flat) is None
    assert _focus_of(None, volume) is None
