"""medsegkit.interactive.Session: progressive run == segment, refine by scribbles, undo / reset / save."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from medsegkit import Cancelled, create_model
from medsegkit.errors import CheckpointError
from medsegkit.inference import segment
from medsegkit.interactive import (
    FAR,
    MARK_WEIGHT,
    UNSURE,
    MappedOutput,
    Session,
    fit_calibration,
    fold_affine,
    map_generalises,
    output_layer,
    sweeping_losses,
)
from medsegkit.io import Image, write_image
from medsegkit.weights import load_checkpoint, load_model, read_checkpoint, save_checkpoint

SHAPE = (48, 24, 24)
CENTRES = {"A": (8, 12, 12), "B": (38, 12, 12)}


def _ball(centre, radius, shape=SHAPE):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


@pytest.fixture(scope="module")
def weak_case():
    """Two bright balls; a tiny U-Net trained to call every bright voxel class 1, while the truth says
    ball B is background: the model mislabels B."""
    torch.manual_seed(0)
    array = np.zeros(SHAPE, np.float32)
    for centre in CENTRES.values():
        array[_ball(centre, 5)] = 1.0
    array += np.random.default_rng(0).normal(0, 0.05, SHAPE).astype(np.float32)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=2)
    x = torch.from_numpy(array)[None, None]
    y = torch.from_numpy((array > 0.5).astype(np.int64))[None]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    image = Image(array, np.eye(4), {}, None)
    return model, image


KW = {"roi_size": (16, 16, 16), "preprocessing": "none"}


def test_run_equals_segment_and_reports_the_focus_first():
    torch.manual_seed(1)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=3)
    array = np.random.default_rng(1).normal(size=(40, 36, 30)).astype(np.float32)
    image = Image(array, np.diag([1.5, 1.5, 2.0, 1.0]), {}, None)  # resampled to 2 mm: a real inverse
    kw = {"roi_size": (16, 16, 16), "overlap": 0.25,
          "preprocessing": {"orientation": "RAS", "spacing": [2, 2, 2]}}
    reference = segment(model, image, **kw).array
    before = [p.detach().clone() for p in model.parameters()]
    session = Session(model, image, **kw)
    updates = []
    labels = session.run(focus={"axis": 2, "index": 3},
                         on_update=lambda region, lab: updates.append((region, lab[region].copy())))
    np.testing.assert_array_equal(labels, reference)
    assert labels.dtype == reference.dtype
    first_region, first_values = updates[0]
    assert first_region[2] == slice(3, 4)  # the focused slice comes first ...
    np.testing.assert_array_equal(first_values, reference[first_region])  # ... already final
    assert len(updates) >= 2
    covered = np.zeros(labels.shape, bool)
    for region, _ in updates:
        covered[region] = True
    assert covered.all()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # caller's model untouched


def test_run_with_a_box_focus_and_a_2d_model_on_a_volume():
    torch.manual_seed(2)
    model = create_model("UNet2d", channels=(4, 8), strides=(2,), out_channels=2)
    array = np.random.default_rng(2).normal(size=(20, 24, 6)).astype(np.float32)
    image = Image(array, np.eye(4), {}, None)
    kw = {"roi_size": (16, 16), "preprocessing": "none"}
    reference = segment(model, image, **kw).array
    updates = []
    session = Session(model, image, **kw)
    labels = session.run(focus=(slice(2, 5), slice(0, 8), slice(4, 6)), on_update=lambda r, lab: updates.append(r))
    np.testing.assert_array_equal(labels, reference)
    assert updates[0] == (slice(2, 5), slice(0, 8), slice(4, 6))


def test_run_cancel_keeps_done_windows_and_resumes(weak_case):
    model, image = weak_case
    session = Session(model, image, **KW)
    event = threading.Event()
    with pytest.raises(Cancelled, match="cancelled after 1 of"):
        session.run(progress=lambda done, total: event.set(), cancel=event)
    assert 0 < len(session.cache) < len(session.grid.slices)
    np.testing.assert_array_equal(session.run(), segment(model, image, **KW).array)


@pytest.mark.parametrize("broken", ["on_update", "progress"])
def test_a_callback_that_raises_at_the_end_of_run_leaves_a_session_that_finishes(weak_case, broken):
    # until 2026-12-08 a run whose last on_update or progress call raised kept its labels but never recorded
    # the original windows: every later run returned at once, refine failed with TypeError ('NoneType' object
    # is not subscriptable) and reset left the labels as they were; the region on_update failed on was lost
    model, image = weak_case
    reference = segment(model, image, **KW).array
    session = Session(model, image, **KW)
    viewer = np.full(SHAPE, 99, np.int64)  # what a viewer copies from the reported regions

    def copy_then_fail_at_the_end(*args):
        if broken == "on_update" and not session.pre_done.all():
            region, labels = args
            viewer[region] = labels[region]
        if session.pre_done.all():
            raise RuntimeError("viewer closed")

    with pytest.raises(RuntimeError, match="viewer closed"):
        session.run(**{broken: copy_then_fail_at_the_end})

    def copy(region, labels):
        viewer[region] = labels[region]

    labels = session.run(on_update=copy)
    np.testing.assert_array_equal(labels, reference)
    if broken == "on_update":
        np.testing.assert_array_equal(viewer, reference)  # the region whose callback failed came again
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[36:40, 10:14, 10:14] = 1
    session.refine(scribbles, scope="global")
    assert session.rounds == 1 and session.labels[37, 12, 12] == 0
    np.testing.assert_array_equal(session.reset(), reference)


def test_bad_focus_and_options_are_refused(weak_case):
    model, image = weak_case
    with pytest.raises(TypeError, match=r"unsupported option\(s\) \['largest_component'\]"):
        Session(model, image, largest_component=True)
    session = Session(model, image, **KW)
    with pytest.raises(ValueError, match="outside the image"):
        session.run(focus={"axis": 0, "index": 99})
    with pytest.raises(ValueError, match="focus must be None"):
        session.run(focus=[1, 2])
    # until 2026-12-08 these were taken as other foci: True as axis 1, 2.7 as slice 2, "3" as 3, and a box
    # with a step as the whole range (slice(0, 10, 2) as 0:10)
    for focus in ({"axis": True, "index": 3}, {"axis": 1, "index": 2.7}, {"axis": 1, "index": "3"},
                  {"axis": 1.0, "index": 3}, {"axis": None, "index": 3}):
        with pytest.raises(ValueError, match="focus axis and index must be integers, got"):
            session.run(focus=focus)
    for box in ((slice(0, 10, 2), slice(None), slice(None)), (slice(0.5, 3), slice(None), slice(None)),
                (slice(None), slice(True, 4), slice(None))):
        with pytest.raises(ValueError, match=r"must be slices of integers \(or None\) without a step"):
            session.run(focus=box)
    assert not session.cache and session.labels is None
    assert session._focus_region({"axis": np.int64(1), "index": np.int32(-1)})[1] == slice(23, 24)
    assert session._focus_region((slice(np.int64(2), None, 1), slice(None), slice(-3, None)))[::2] == (
        slice(2, 48), slice(21, 24))


@pytest.mark.slow
def test_refine_local_scope_fixes_the_marked_object_and_undo_reset_save(weak_case, tmp_path):
    from medsegkit.weights import load_model

    model, image = weak_case
    session = Session(model, image, **KW)
    original = session.run().copy()
    ball_b = _ball(CENTRES["B"], 4)
    assert original[ball_b].mean() > 0.9  # the weak model calls ball B class 1
    scribbles = np.zeros(SHAPE, np.int32)
    marked = _ball(CENTRES["B"], 2)
    scribbles[marked] = 1  # "background"
    params_before = {k: v.clone() for k, v in session.model.state_dict().items()}
    labels = session.refine(scribbles, seconds=60.0, scope="local").copy()  # the fit converges: load-independent
    assert (labels[marked] == 0).all()
    flipped = (original == 1) & (labels == 0) & ~marked
    assert flipped[ball_b].sum() > 20  # unmarked voxels of ball B near the marks now background
    np.testing.assert_array_equal(labels[:16], original[:16])  # ball A, far from the marks, keeps its labels
    np.testing.assert_array_equal(session.run(), labels)  # a later run keeps the refined labels

    session.undo()
    np.testing.assert_array_equal(session.labels, original)
    assert all(torch.equal(v, params_before[k]) for k, v in session.model.state_dict().items())
    with pytest.raises(ValueError, match="nothing to undo"):
        session.undo()

    session.refine(scribbles, seconds=60.0, scope="local")
    path = session.save(tmp_path / "adapted.safetensors")
    loaded = load_model(path)
    assert loaded.medsegkit_metadata["adapted_from"] == "UNet3d"
    assert loaded.medsegkit_metadata["interactive"] == {"rounds": 1, "marked_voxels": int(marked.sum())}
    for key, value in session.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)

    session.reset()
    np.testing.assert_array_equal(session.labels, original)
    assert (session.marks == 0).all()
    np.testing.assert_array_equal(segment(session.model, image, **KW).array, original)
    with pytest.raises(ValueError, match=r"scope must be one of \['auto', 'global', 'local'\], got 'near'"):
        session.refine(scribbles, scope="near")


def test_save_never_writes_over_the_starting_checkpoint_and_asks_before_replacing(tmp_path):
    """save() used to write wherever it was told: over an existing file, and over the very checkpoint the
    session was started from (the original model lost, its adapted copy "adapted_from" itself)."""
    torch.manual_seed(0)
    original = save_checkpoint(create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=2),
                               tmp_path / "original.safetensors")
    original_bytes = original.read_bytes()
    image = Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4), {}, None)
    session = Session(str(original), image, **KW)
    scribbles = np.zeros((16, 16, 16), np.int32)
    scribbles[8, 8, 8] = 2
    session.refine(scribbles)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"original.safetensors is the model this session started from .*"
                                             r"the original is never overwritten"):
            session.save(original, overwrite=overwrite)
    assert original.read_bytes() == original_bytes
    scan = write_image(image, tmp_path / "t1.nii.gz")  # a mistyped name must not replace a scan either
    scan_bytes = scan.read_bytes()
    with pytest.raises(ValueError, match=r"the adapted model's path .*t1.nii.gz is not a checkpoint name; accepted "
                                         r"endings: .safetensors, .pt, .pth, .ckpt"):
        session.save(scan, overwrite=True)
    assert scan.read_bytes() == scan_bytes
    target = session.save(tmp_path / "adapted.safetensors")
    first = target.read_bytes()
    with pytest.raises(FileExistsError, match="adapted.safetensors exists; pass overwrite=True to replace it"):
        session.save(target)
    assert target.read_bytes() == first
    plane = np.zeros((16, 16, 16), np.int32)
    plane[2] = 1  # a second round: background on a plane
    session.refine(plane)
    session.save(target, overwrite=True)
    assert load_model(target).medsegkit_metadata["interactive"]["rounds"] == 2
    assert load_model(target).medsegkit_metadata["adapted_from"] == str(original)


def _ramp_session(model):
    """An intensity ramp along the first axis (the weak model's class-1 boundary is a plane across it), its
    session run: ``(session, image, labels, the first plane the model calls class 1)`` (6 here)."""
    ramp = np.broadcast_to(np.linspace(0, 1, SHAPE[0], dtype=np.float32)[:, None, None], SHAPE).copy()
    image = Image(ramp, np.eye(4), {}, None)
    session = Session(model, image, **KW)
    labels = session.run().copy()
    _ramp_session.image = image
    return session, image, labels, int(np.argmax(labels[:, 12, 12] == 1))


def test_refine_global_scope_moves_the_boundary_everywhere_and_equals_the_adapted_model(weak_case):
    session, image, original, first = _ramp_session(weak_case[0])
    assert 4 <= first <= SHAPE[0] - 10 and (original[first:, 12, 12] == 1).all()
    # mark class 1 on 4 voxels in a corner 3 planes below the boundary: the fitted map moves it everywhere
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[first - 3:first, 2:4, 2:4] = 2
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    labels = session.refine(scribbles, seconds=60.0, scope="global").copy()
    assert session.last_scope == "global"
    for j in (14, 18, 22):  # rows more than 10 voxels from the marks
        assert int(np.argmax(labels[:, j, j] == 1)) < first  # the boundary moved toward the marks there too
    assert ((labels == 1) & (original == 0))[:, 14:, 14:].sum() > 50
    assert (labels[: first - 4] == 0).all()  # the planes darker than the marks stay background, but for the one next to them
    # only the output layer changed, and the session's labels are what the adapted model segments
    name, _ = output_layer(session.original, 2)
    changed = {k for k, v in session.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= {f"{name}.weight", f"{name}.bias"}
    adapted = segment(session.model, image, **KW).array
    unmarked = scribbles == 0
    np.testing.assert_array_equal(labels[unmarked], adapted[unmarked])
    assert session.last_steps >= 10


def test_refine_global_scope_generalises_to_identical_objects(weak_case):
    # the documented limit of the global scope: ball A looks like ball B, so marking B background
    # makes the fitted map call A background too (the local scope keeps A: test above)
    model, image = weak_case
    session = Session(model, image, **KW)
    original = session.run().copy()
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[_ball(CENTRES["B"], 2)] = 1
    labels = session.refine(scribbles, seconds=60.0, scope="global")
    ball_a = _ball(CENTRES["A"], 4)
    assert original[ball_a].mean() > 0.9 and labels[ball_a].mean() < 0.1


@pytest.mark.parametrize("layer", [torch.nn.Conv3d(5, 3, 3, padding=1), torch.nn.ConvTranspose3d(5, 3, 3, stride=2),
                                   torch.nn.Linear(5, 3), torch.nn.Conv2d(5, 3, 1, bias=False)])
def test_fold_affine_maps_the_layer_output(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 5) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 5, *(6,) * (layer.weight.ndim - 2))
    matrix = torch.eye(3) + 0.3 * torch.randn(3, 3)
    offset = None if layer.bias is None else torch.randn(3)
    with torch.no_grad():
        y = layer(x)
    fold_affine(layer, matrix, offset)
    with torch.no_grad():
        folded = layer(x)
    channels_last = isinstance(layer, torch.nn.Linear)
    expected = y @ matrix.T if channels_last else torch.einsum("kj,bj...->bk...", matrix, y)
    if offset is not None:
        expected = expected + (offset if channels_last else offset.reshape(1, 3, *([1] * (y.ndim - 2))))
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    if layer.bias is None:
        with pytest.raises(ValueError, match="the output layer has no bias"):
            fold_affine(layer, matrix, torch.ones(3))


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_fit_calibration_fits_the_marks_and_keeps_the_rest(classes):
    # 1-D "volume": the model's boundary between class 0 and the others is at x = 0.5
    x = torch.linspace(0, 1, 10_000)
    if classes == 1:
        scores = (x - 0.5)[None] * 10  # binary: sigmoid
    else:
        scores = torch.stack([torch.zeros_like(x), (x - 0.5) * 10, *[(x - 0.9) * 10] * (classes - 2)])
    boundaries = []
    for count in (2, 5):  # a few voxels near x = 0.33 marked "class 1", where the model says 0
        marks = torch.full(x.shape, -1, dtype=torch.int64)
        marks[3300:3300 + count] = 1
        matrix, offset, iterations = fit_calibration(scores, marks, seconds=60.0)
        assert matrix.shape == (classes, classes) and offset.shape == (classes,) and iterations >= 10
        calibrated = matrix @ scores + offset[:, None]
        labels = (calibrated[0] > 0).long() if classes == 1 else calibrated.argmax(0)
        assert (labels[x < 0.2] == 0).all() and (labels[(x > 0.55) & (x < 0.85)] == 1).all()  # the rest agrees
        boundaries.append(float(x[int(labels.argmax())]))
    # the boundary moves toward the marks, further with more marks (soft evidence: the session forces the
    # marked voxels' labels itself)
    assert 0.34 < boundaries[1] < boundaries[0] < 0.49, boundaries
    with pytest.raises(ValueError, match="at least one marked voxel"):
        fit_calibration(scores, torch.full(x.shape, -1, dtype=torch.int64))


def test_fit_calibration_weighs_every_class_s_agreement_the_same_however_many_voxels_it_has():
    """The agreement is balanced over the classes the model calls: repeating one class's voxels four times
    gives the same map (at the same weight per mark). Unbalanced, the probabilities moved by up to 0.21."""
    x = torch.linspace(0, 1, 3_000)
    scores = torch.stack([torch.zeros_like(x), (x - 0.5) * 10, (x - 0.97) * 400])  # class 2: the top 1.8 %
    marks = torch.full(x.shape, -1, dtype=torch.int64)
    marks[1380:1400] = 1  # class 1 where the model says 0: the map must favour class 1
    matrix, offset, _ = fit_calibration(scores, marks, seconds=60.0)
    background = torch.nonzero(scores.argmax(0) == 0)[:, 0]
    repeated = torch.cat([scores, scores[:, background].repeat(1, 3)], dim=1)
    repeated_marks = torch.cat([marks, torch.full((3 * len(background),), -1, dtype=torch.int64)])
    scale = repeated.shape[1] / scores.shape[1]  # the same weight per mark: MARK_WEIGHT / N
    matrix_r, offset_r, _ = fit_calibration(repeated, repeated_marks, seconds=60.0, mark_weight=MARK_WEIGHT * scale)
    # the same map up to a shift of every logit by the same amount (which softmax ignores) and the fit's
    # stopping tolerance (2.8e-3 seen)
    probabilities = torch.softmax(matrix @ scores + offset[:, None], dim=0)
    torch.testing.assert_close(torch.softmax(matrix_r @ scores + offset_r[:, None], dim=0), probabilities,
                               rtol=0, atol=1e-2)
    labels = probabilities.argmax(0)
    assert (labels[1380:1400] == 1).all() and (labels == 2).sum() == (scores.argmax(0) == 2).sum()


def test_refine_checks_scribbles_and_cancel_keeps_the_previous_result(weak_case):
    model, image = weak_case
    session = Session(model, image, **KW)
    marked = np.zeros(SHAPE, np.int32)
    marked[0, 0, 0] = 2
    # arguments that need no model are checked before the first run (until 2026-12-08 the whole volume was
    # segmented first), and a boolean mask (True would have meant "background") is refused
    # True and "2" were taken as 1 s and 2 s until 2026-12-08
    for bad, message in ((dict(scope="near"), "scope must be one of"), (dict(seconds=float("nan")), "seconds must be"),
                         (dict(seconds=True), r"^seconds must be a number > 0, got True$"),
                         (dict(seconds="2"), r"^seconds must be a number > 0, got '2'$"),
                         (dict(scribbles=marked > 0), "got bool .*a boolean mask does not say which class")):
        with pytest.raises(ValueError, match=message):
            session.refine(**{"scribbles": marked, **bad})
        assert session.labels is None and not session.cache
    # until 2026-12-08: AttributeError: 'bool' object has no attribute 'is_set', from inside the run or the fit
    for call in (lambda: session.run(cancel=True), lambda: session.refine(marked, cancel=object())):
        with pytest.raises(TypeError, match=r"^cancel must be None or have an is_set\(\) method \(a threading.Event\), "
                                            r"got (bool|object)$"):
            call()
        assert session.labels is None and not session.cache
    original = session.run().copy()
    with pytest.raises(ValueError, match=r"scribbles must be an integer array of the image's shape \(48, 24, 24\)"):
        session.refine(np.zeros((4, 4, 4), np.int32))
    with pytest.raises(ValueError, match=r"scribbles values must be in \[0, 2\]"):
        session.refine(np.full(SHAPE, 3, np.int32))
    with pytest.raises(ValueError, match="scribbles mark no voxel"):
        session.refine(np.zeros(SHAPE, np.int32))
    event = threading.Event()
    event.set()
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[36:40, 10:14, 10:14] = 1
    with pytest.raises(Cancelled, match="refine cancelled after 0 iterations of the output layer's fit"):
        session.refine(scribbles, cancel=event)
    np.testing.assert_array_equal(session.labels, original)
    assert (session.marks == 0).all()


def test_a_progress_that_raises_at_the_end_of_refine_leaves_the_session_as_it_was(weak_case):
    # until 2026-12-08 the last progress(100, 100) came after the round was recorded: refine raised, yet the
    # labels, marks and model were the adapted ones, rounds was 1 and undo had a round to take back
    model, image = weak_case
    session = Session(model, image, **KW)
    original = session.run().copy()
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[36:40, 10:14, 10:14] = 1

    def progress(done, total):
        if done == total:
            raise RuntimeError("progress bar closed")

    with pytest.raises(RuntimeError, match="progress bar closed"):
        session.refine(scribbles, scope="global", progress=progress)
    np.testing.assert_array_equal(session.labels, original)
    assert not session.marks.any() and session.rounds == 0 and session._fit is None
    assert session.last_scope is None and session.last_steps == 0
    with pytest.raises(ValueError, match="nothing to undo"):
        session.undo()
    np.testing.assert_array_equal(session.refine(scribbles, scope="global"), segment(session.model, image, **KW).array
                                  * (scribbles == 0))


def test_a_cancelled_refine_keeps_the_last_round_s_scope_and_steps(weak_case):
    # until 2026-12-08 a cancelled refine left last_scope None and last_steps at its own fit's iterations
    # (what the napari status line and the worker's reply show), not those of the round still in place
    model, image = weak_case
    session = Session(model, image, **KW)
    session.run()
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[36:40, 10:14, 10:14] = 1
    session.refine(scribbles, scope="global")
    done = session.last_scope, session.last_steps
    assert done[0] == "global" and done[1] > 0
    more = np.zeros(SHAPE, np.int32)
    more[4:8, 10:14, 10:14] = 2
    event = threading.Event()
    with pytest.raises(Cancelled, match="refine cancelled after 10 iterations of the output layer's fit"):
        session.refine(more, scope="local", cancel=event, progress=lambda done, total: event.set())
    assert (session.last_scope, session.last_steps) == done and session.rounds == 1


def test_a_model_whose_output_is_not_finite_is_refused_before_refine():
    # until 2026-12-08 the run made an all-background map and refine then failed with RuntimeError 'atol must
    # be greater than or equal to zero, but got -nan' (from the check of the output layer), naming neither the
    # model nor the NaN. The window runner now refuses NaN / Inf outputs, in run and in a first refine alike.
    torch.manual_seed(0)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=3)
    with torch.no_grad():
        output_layer(model, 3)[1].bias[1] = float("nan")
    image = Image(np.random.default_rng(0).normal(size=(24, 20, 16)).astype(np.float32), np.eye(4), {}, None)
    session = Session(model, image, **KW)
    scribbles = np.zeros(image.spatial_shape, np.int32)
    scribbles[5:8, 5:8, 5:8] = 2
    for call in (session.run, lambda: session.refine(scribbles)):
        with pytest.raises(ValueError, match="^the model returned NaN or Inf values for windows of shape"):
            call()
        assert not session.marks.any() and session.rounds == 0 and not session.finished


def _session_state(session):
    fit = session._fit
    return {"labels": session.labels.copy(), "marks": session.marks.copy(), "pre_labels": session.pre_labels.clone(),
            "rounds": session.rounds, "history": len(session._history), "scope": session.last_scope,
            "steps": session.last_steps, "fit": None if fit is None else [t for t in fit if t is not None],
            "model": {k: v.clone() for k, v in session.model.state_dict().items()}}


def _assert_same_state(a, b):
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["marks"], b["marks"])
    assert torch.equal(a["pre_labels"], b["pre_labels"])
    assert [a[k] for k in ("rounds", "history", "scope", "steps")] == [b[k] for k in ("rounds", "history", "scope", "steps")]
    assert (a["fit"] is None) == (b["fit"] is None)
    assert all(torch.equal(x, y) for x, y in zip(a["fit"] or [], b["fit"] or []))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


_SMALL = {"roi_size": (16, 16, 16), "preprocessing": "none"}
_OPERATIONS = st.lists(st.tuples(st.sampled_from(["refine", "undo", "reset", "cancel", "raise"]),
                                 st.sampled_from([0, 100]),  # the progress value at which cancel / raise strike
                                 st.tuples(st.integers(0, 22), st.integers(0, 18), st.integers(0, 14)),
                                 st.integers(1, 3), st.sampled_from(["auto", "global", "local"])), max_size=6)


@settings(max_examples=10)
@given(operations=_OPERATIONS)
def test_any_sequence_of_refine_undo_reset_cancel_equals_the_successful_calls_replayed(operations):
    """A refine that is cancelled or whose progress raises, at its first or last progress call, leaves the
    session exactly as before; the labels, marks, model and history always equal those of a fresh session
    that replays only the calls that succeeded (hypothesis found, before 2026-12-08, a progress raising at
    100 that left the adapted round in place)."""
    torch.manual_seed(0)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=3)
    image = Image(np.random.default_rng(0).normal(size=(24, 20, 16)).astype(np.float32), np.eye(4), {}, None)
    session, replay = Session(model, image, **_SMALL), Session(model, image, **_SMALL)
    session.run()
    replay.run()
    for kind, at, (i, j, k), cls, scope in operations:
        scribbles = np.zeros((24, 20, 16), np.int32)
        scribbles[i:i + 2, j:j + 2, k:k + 2] = cls
        if kind == "undo" and not replay._history:
            with pytest.raises(ValueError, match="nothing to undo"):
                session.undo()
        elif kind in ("undo", "reset"):
            getattr(session, kind)()
            getattr(replay, kind)()
        else:
            before = _session_state(session)
            event = threading.Event()

            def progress(done, total, kind=kind, at=at, event=event):
                if kind == "cancel" and done >= at:
                    event.set()
                if kind == "raise" and done >= at:
                    raise RuntimeError("progress failed")

            try:
                session.refine(scribbles, seconds=60, scope=scope, cancel=event, progress=progress)
            except (Cancelled, RuntimeError):
                assert kind != "refine"
                _assert_same_state(_session_state(session), before)
            else:  # a refine, or a cancel set during the last progress call (nothing checks it after)
                assert kind == "refine" or (kind == "cancel" and at == 100)
                replay.refine(scribbles, seconds=60, scope=scope)
        _assert_same_state(_session_state(session), _session_state(replay))


def test_instance_and_query_models_are_refused():

    image = Image(np.zeros((16, 16, 16), np.float32), np.eye(4), {}, None)
    rcnn = create_model("mask_rcnn_resnet_50_fpn", depth=18, fpn_channels=16, representation_size=32,
                        mask_layers=(8,), min_size=64, max_size=128)
    with pytest.raises(ValueError, match="Session runs semantic models .* is a 'instance' model"):
        Session(rcnn, image)
    torch.manual_seed(0)
    query = create_model("maskformer_resnet_18_3d", num_classes=2, num_queries=4, hidden_dim=16, num_heads=2,
                         decoder_layers=1, ffn_dim=32, fpn_dim=32, mask_dim=32)
    session = Session(query, image, roi_size=(16, 16, 16), preprocessing="none")
    with pytest.raises(ValueError, match="refine adapts semantic models only; .* is a 'universal' model"):
        session.refine(np.ones((16, 16, 16), np.int32))


@pytest.mark.parametrize("out_channels, options", [
    (1, {"tta_flips": (0, 1)}),
    (2, {"sw_batch_size": 3, "mode": "constant"}),
    (2, {"tta_flips": "auto", "preprocessing": {"orientation": "RAS"}}),  # the left-right mirror alone
])
def test_run_equals_segment_with_tta_binary_and_other_blending(out_channels, options):
    # a 1-class model with mirror TTA blends probabilities and normalises by the weight sums
    torch.manual_seed(3)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=out_channels)
    image = Image(np.random.default_rng(3).normal(size=(30, 20, 18)).astype(np.float32), np.eye(4), {}, None)
    kw = {"roi_size": (16, 16, 16), "preprocessing": "none", **options}
    reference = segment(model, image, **kw).array
    session = Session(model, image, **kw)
    labels = session.run(focus={"axis": 0, "index": 25})
    np.testing.assert_array_equal(labels, reference)
    assert 0 < labels.mean() < 1  # both classes present: the comparison is not trivial
    if options.get("tta_flips") == "auto":
        assert session.flip_sets == [(), (0,)]


def test_run_preview_reports_the_focus_slice_first_then_the_exact_labels(weak_case):
    model, image = weak_case
    reference = segment(model, image, **KW).array
    session = Session(model, image, **KW)
    calls = []
    labels = session.run(focus={"axis": 0, "index": 8}, preview=True,
                         on_update=lambda region, lab: calls.append((region, session.previewing, lab[region].copy())))
    focus = (slice(8, 9), slice(0, 24), slice(0, 24))
    assert calls[0][0] == focus and calls[0][1]  # the preview: one slab pass, before any window
    assert [c[1] for c in calls[1:]] == [False] * (len(calls) - 1)
    assert calls[1][0] == focus
    np.testing.assert_array_equal(calls[1][2], reference[focus])  # then the exact slice
    assert (calls[0][2] == reference[focus]).mean() > 0.9 and reference[focus].any()  # the preview is close
    np.testing.assert_array_equal(labels, reference)
    # without preview=True (or a model that takes no other input size) the first report is exact
    plain = Session(model, image, **KW)
    first = []
    plain.run(focus={"axis": 0, "index": 8}, on_update=lambda region, lab: first.append(lab[region].copy()))
    np.testing.assert_array_equal(first[0], reference[focus])


def test_updates_replayed_in_order_give_segments_labels_with_a_foreground_crop():
    """What a viewer that copies each reported region sees in the end is ``segment``'s result, with a
    foreground crop: the partial updates' nearest-voxel lookup gives 0 outside the crop box, as the exact
    inverse pads, and a slice's focus is that slice of the preprocessed grid, not the crop's corner too."""
    torch.manual_seed(3)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=3)
    array = np.zeros((40, 36, 30), np.float32)
    array[8:30, 6:28, 5:24] = np.random.default_rng(3).normal(size=(22, 22, 19)) + 2.0  # the foreground
    image = Image(array, np.diag([1.5, 1.5, 2.0, 1.0]), {}, None)
    kw = {"roi_size": (16, 16, 16), "overlap": 0.25,
          "preprocessing": {"orientation": "RAS", "spacing": [2, 2, 2], "crop_foreground": 1}}
    reference = segment(model, image, **kw).array
    session = Session(model, image, **kw)
    seen = np.full(array.shape, 255, np.uint8)
    regions = []

    def on_update(region, labels):
        seen[region] = labels[region]
        regions.append(region)

    labels = session.run(focus={"axis": 2, "index": 12}, on_update=on_update, preview=True)
    np.testing.assert_array_equal(labels, reference)
    np.testing.assert_array_equal(seen, reference)
    assert len(np.unique(reference)) >= 2 and (reference[:4] == 0).all()  # outside the crop: background
    np.testing.assert_array_equal(session._gather(session.pre_labels), reference)
    assert not session.inside.all() and session.inside.any()
    for index in (12, 22):
        box = session._focus_box({"axis": 2, "index": index})
        assert box[2].stop - box[2].start == 1, box  # 2 mm input slices: one preprocessed slice
    assert len(session._windows_over(box)) < len(session.grid.slices)  # a top slice needs the top windows only


@pytest.mark.parametrize("affine", [np.diag([-1.2, -0.9, 2.5, 1.0]),  # LPS-like, anisotropic: flips + resampling
                                    np.array([[0, 0, 1.7, 0], [-1.1, 0, 0, 0], [0, 1.3, 0, 0], [0, 0, 0, 1.0]])])
def test_run_labels_equal_segment_after_reorientation_resampling_and_crop(affine):
    """The session's labels come from one inverse of the index map; they equal ``segment``'s inverse of the
    labels for permuted / flipped axes, resampling and a foreground crop."""
    torch.manual_seed(4)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=3)
    array = np.zeros((34, 40, 22), np.float32)
    array[5:30, 8:33, 3:19] = np.random.default_rng(4).normal(size=(25, 25, 16)) + 2.0
    image = Image(array, affine, {}, None)
    kw = {"roi_size": (16, 16, 16), "overlap": 0.25,
          "preprocessing": {"orientation": "RAS", "spacing": [2, 2, 2], "crop_foreground": 1}}
    reference = segment(model, image, **kw).array
    session = Session(model, image, **kw)
    labels = session.run(focus={"axis": 1, "index": 20}, preview=True, on_update=lambda region, lab: None)
    np.testing.assert_array_equal(labels, reference)
    assert len(np.unique(reference)) >= 2 and not session.inside.all()


@pytest.mark.parametrize("name, out_channels, options, shape", [
    ("UNet2d", 3, {"roi_size": (16, 16)}, (20, 24, 6)),  # a 2D model sliced over a volume
    ("UNet3d", 1, {"roi_size": (16, 16, 16), "tta_flips": (0, 1)}, (30, 20, 18)),  # binary, mirrored: windows re-run
])
def test_refine_2d_on_a_volume_and_mirrored_binary_equal_the_adapted_model(name, out_channels, options, shape):
    torch.manual_seed(4)
    model = create_model(name, channels=(4, 8), strides=(2,), out_channels=out_channels)
    image = Image(np.random.default_rng(4).normal(size=shape).astype(np.float32), np.eye(4), {}, None)
    kw = {"preprocessing": "none", **options}
    session = Session(model, image, **kw)
    original = session.run().copy()
    scribbles = np.zeros(shape, np.int32)
    scribbles[2:5, 2:5, 2:4] = 2  # class 1
    scribbles[-5:-2, -5:-2, -4:-2] = 1  # background
    labels = session.refine(scribbles, seconds=60.0, scope="global")
    assert (labels[scribbles > 0] == scribbles[scribbles > 0] - 1).all()
    assert (labels != original).sum() > (scribbles > 0).sum()  # the adapted model changed unmarked voxels too
    adapted = segment(session.model, image, **kw).array
    np.testing.assert_array_equal(labels[scribbles == 0], adapted[scribbles == 0])
    session.undo()
    np.testing.assert_array_equal(session.labels, original)


@pytest.mark.parametrize("options", [{}, {"tta_flips": (0, 1)}])
def test_refine_keeps_one_window_cache_through_rounds_undo_and_reset(options):
    """The session holds the original model's window outputs once: refine maps them as it blends (logits)
    or blends the adapted model's windows without keeping them (mirrored probabilities), and the undo
    history holds labels, marks and maps, no window outputs; every state still equals ``segment``."""
    torch.manual_seed(5)
    model = create_model("UNet3d", channels=(4, 8), strides=(2,), out_channels=3)
    image = Image(np.random.default_rng(5).normal(size=(30, 20, 18)).astype(np.float32), np.eye(4), {}, None)
    kw = {"roi_size": (16, 16, 16), "preprocessing": "none", **options}
    session = Session(model, image, **kw)
    original = session.run().copy()
    windows = dict(session.cache)
    assert len(windows) == len(session.grid.slices) > 1
    rounds, pre_rounds = [], []
    for r in range(3):
        scribbles = np.zeros(image.spatial_shape, np.int32)
        scribbles[3 + 8 * r: 6 + 8 * r, 2:6, 2:6] = 1 + (r % 3)
        rounds.append(session.refine(scribbles, seconds=60.0, scope="global").copy())
        pre_rounds.append(session.pre_labels.clone())
        adapted = segment(session.model, image, **kw).array
        unmarked = session.marks == 0
        np.testing.assert_array_equal(rounds[-1][unmarked], adapted[unmarked])
    assert (rounds[-1] != original).any()
    assert session.cache.keys() == windows.keys() and all(session.cache[w] is windows[w] for w in windows)
    window_bytes = {t.data_ptr() for t in windows.values()}
    for snapshot in session._history:
        held = [v for v in snapshot.values() if isinstance(v, (torch.Tensor, dict))]
        assert all(not isinstance(v, dict) for v in held)  # no per-window outputs in the undo history
        assert not any(isinstance(v, torch.nn.Module) for v in snapshot.values())  # nor models: their maps
        assert snapshot["marked"].size == 48  # the voxels this round marked, not the whole marks array
        assert 0 < snapshot["labels_changed"].size < session.labels.size  # the voxels it changed, not all
        assert all(v.data_ptr() not in window_bytes for v in held)
    session.undo()
    np.testing.assert_array_equal(session.labels, rounds[1])
    assert torch.equal(session.pre_labels, pre_rounds[1]) and not torch.equal(pre_rounds[1], pre_rounds[2])
    unmarked = session.marks == 0  # round 3's marks are gone; the model rebuilt from round 2's map
    assert unmarked.sum() == unmarked.size - 2 * 48
    np.testing.assert_array_equal(segment(session.model, image, **kw).array[unmarked], rounds[1][unmarked])
    scribbles = np.zeros(image.spatial_shape, np.int32)
    scribbles[20:23, 10:13, 10:13] = 2
    again = session.refine(scribbles, seconds=60.0, scope="global")
    unmarked = session.marks == 0
    np.testing.assert_array_equal(again[unmarked], segment(session.model, image, **kw).array[unmarked])
    np.testing.assert_array_equal(session.reset(), original)
    assert all(session.cache[w] is windows[w] for w in windows)


def test_refine_auto_scope_is_local_until_the_next_marks_confirm_the_map(weak_case):
    session, _, original, first = _ramp_session(weak_case[0])
    # round 1 (nothing to check the map against yet): local, the far corner keeps its labels
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[first - 3:first, 2:4, 2:4] = 2
    labels = session.refine(scribbles, seconds=60.0).copy()
    assert session.last_scope == "local"
    np.testing.assert_array_equal(labels[:, 14:, 14:], original[:, 14:, 14:])
    # round 2 marks the same kind of error elsewhere (round 1's map already gets them right), and background
    # on dark voxels (right before and after the map)
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[first - 2:first, 20:22, 20:22] = 2
    scribbles[1, 20:22, 2:4] = 1
    before = labels
    labels = session.refine(scribbles, seconds=60.0).copy()
    assert session.last_scope == "unsure"
    assert ((labels == 1) & (original == 0))[:, 8:14, 8:14].sum() > 20  # away from both rounds' marks
    # ... but away from the marks only where the original model was unsure (top probability < UNSURE)
    probabilities = segment(session.original, _ramp_session.image, output="probabilities", **KW).array
    unsure = probabilities.max(0) < UNSURE
    far = ndimage.distance_transform_edt(scribbles == 0) > 8  # beyond the local reach of this round's marks
    changed = labels != before
    assert (changed & far).any() and not (changed & far & ~unsure).any()
    adapted = segment(session.model, _ramp_session.image, **KW).array
    # where unsure, a voxel takes the adapted model's class when its nearest mark (within FAR) has that class
    to_mark = np.stack([ndimage.distance_transform_edt(session.marks != c + 1) for c in (0, 1)])
    clear = to_mark[0] != to_mark[1]  # voxels equally far from marks of both classes are left out of the check
    toward = (adapted == to_mark.argmin(0)) & (to_mark.min(0) <= FAR)
    extrapolated = far & unsure & toward & clear
    np.testing.assert_array_equal(labels[extrapolated], adapted[extrapolated])
    assert (labels[extrapolated] != before[extrapolated]).any()
    kept = far & ~(unsure & toward) & clear
    np.testing.assert_array_equal(labels[kept], before[kept])
    assert ((adapted != labels) & far & ~unsure).any()  # confident voxels the map would flip keep their labels
    # undo brings back round 1's map: the same marks again give the same decision
    session.undo()
    session.refine(scribbles, seconds=60.0)
    assert session.last_scope == "unsure"
    # a mark against the map (background where the map moved the boundary) is not confirmed: local
    session.undo()
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[first - 1, 20:22, 20:22] = 1
    session.refine(scribbles, seconds=60.0)
    assert session.last_scope == "local"
    session.reset()
    session.refine(scribbles, seconds=60.0)
    assert session.last_scope == "local"  # after reset there is no earlier map


def test_refine_gives_voxels_only_the_class_of_their_nearest_mark(weak_case):
    # a background mark above the boundary moves it up everywhere; a class-1 mark far away keeps its
    # neighbourhood class 1 although the map, fitted to both marks, still moves the boundary up there
    session, image, original, first = _ramp_session(weak_case[0])
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[first + 2, 2:4, 2:4] = 1
    session.refine(scribbles, seconds=60.0, scope="local")
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[first + 1, 20:22, 20:22] = 2
    before = session.labels.copy()
    labels = session.refine(scribbles, seconds=60.0, scope="local").copy()
    reach = ndimage.distance_transform_edt(scribbles == 0) <= 8
    adapted = segment(session.model, image, **KW).array
    assert ((adapted == 0) & (before == 1) & reach).sum() > 20  # the map alone would shrink class 1 here
    assert not ((labels == 0) & (before == 1) & reach).any()  # refine does not, next to a class-1 mark
    np.testing.assert_array_equal(labels[scribbles > 0], 1)


def test_sweeping_losses_leaves_out_every_change_away_from_a_class_that_would_lose_too_much():
    labels = np.zeros((10, 10), np.uint8)
    labels[0] = 1  # class 1: 10 voxels, class 0: 90
    where = np.ones_like(labels, bool)
    predicted = labels[where].copy()
    changing = np.ones(labels.size, bool)
    predicted[:3] = 0  # 3 of class 1's 10 voxels would leave it (30 %)
    predicted[10:15] = 1  # 5 of class 0's 90 (6 %)
    left_out = sweeping_losses(labels, where, predicted, changing, share=0.25)
    np.testing.assert_array_equal(np.flatnonzero(left_out), [0, 1, 2])
    assert not sweeping_losses(labels, where, predicted, changing, share=0.3).any()
    # only the changes marked as subject to the limit count and are left out (those near the marks are not)
    changing[:2] = False
    assert not sweeping_losses(labels, where, predicted, changing, share=0.25).any()
    # the voxels considered are ``where``'s, the class sizes the whole label map's
    where = np.zeros_like(labels, bool)
    where[0, :5] = True
    assert sweeping_losses(labels, where, np.zeros(5, np.uint8), np.ones(5, bool), share=0.25).all()
    assert not sweeping_losses(labels, where, np.zeros(5, np.uint8), np.ones(5, bool), share=0.5).any()


def test_an_unsure_refine_does_not_sweep_a_class_away_beyond_the_marks(weak_case, monkeypatch):
    """With the share at 0 every change away from a class beyond this round's reach is left out; the same
    rounds with the default change voxels there (test_refine_auto_scope_is_local_until_the_next_marks_...)."""
    import medsegkit.interactive as interactive

    monkeypatch.setattr(interactive, "MAX_CLASS_LOSS", 0.0)
    session, _, original, first = _ramp_session(weak_case[0])
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[first - 3:first, 2:4, 2:4] = 2
    before = session.refine(scribbles, seconds=60.0).copy()
    scribbles = np.zeros(SHAPE, np.int32)
    scribbles[first - 2:first, 20:22, 20:22] = 2
    scribbles[1, 20:22, 2:4] = 1
    labels = session.refine(scribbles, seconds=60.0).copy()
    assert session.last_scope == "unsure"
    far = ndimage.distance_transform_edt(scribbles == 0) > 8
    assert not ((labels != before) & far).any()
    assert ((labels != before) & ~far & (scribbles == 0)).any()  # near the marks the map still applies


def test_map_generalises_needs_lower_cross_entropy_and_more_right():
    x = torch.linspace(0, 1, 101)
    scores = torch.stack([torch.zeros_like(x), (x - 0.5) * 10])
    marks = torch.full(x.shape, -1, dtype=torch.int64)
    marks[40:45] = 1  # class 1 where the original logits say 0
    shift_toward = (torch.eye(2), torch.tensor([0.0, 1.5]))  # moves the boundary from 0.5 to 0.35
    shift_away = (torch.eye(2), torch.tensor([0.0, -1.5]))
    assert map_generalises(scores, marks, *shift_toward)
    assert not map_generalises(scores, marks, *shift_away)
    # lower cross entropy but none of them right yet (the boundary moves from 0.5 to 0.45): not confirmed
    assert not map_generalises(scores, marks, torch.eye(2), torch.tensor([0.0, 0.5]))
    marks[:] = -1
    marks[60:65] = 1  # already right: a map that flips them is refused even with lower loss elsewhere
    assert not map_generalises(scores, marks, torch.eye(2), torch.tensor([0.0, -2.0]))
    binary = ((x - 0.5) * 10)[None]
    marks[:] = -1
    marks[40:45] = 1
    assert map_generalises(binary, marks, torch.eye(1), torch.tensor([1.5]))


def test_refined_resunet_saves_its_appended_map_and_load_model_rebuilds_it(tmp_path):
    """medsegkit's ResUNet ends in a residual unit (as MONAI's UNet with residual units): refine appends the
    map, save records the model plus "output_map", and load_model gives back a model that segments as
    the session did; a record with a broken map is refused."""
    torch.manual_seed(6)
    model = create_model("ResUNet3d", channels=(4, 8), strides=(2,), out_channels=3)
    image = Image(np.random.default_rng(6).normal(size=(24, 20, 16)).astype(np.float32), np.eye(4), {}, None)
    kw = {"roi_size": (16, 16, 16), "preprocessing": "none"}
    session = Session(model, image, **kw)
    original = session.run().copy()
    scribbles = np.zeros(image.spatial_shape, np.int32)
    scribbles[2:5, 2:5, 2:5] = 3
    scribbles[-5:-2, -5:-2, -5:-2] = 2
    labels = session.refine(scribbles, seconds=60.0, scope="global").copy()
    assert isinstance(session.model, MappedOutput) and (labels != original).sum() > (scribbles > 0).sum()
    path = session.save(tmp_path / "adapted.safetensors")
    _, record = read_checkpoint(path)
    assert record["model"]["name"] == "ResUNet3d" and record["model"]["output_map"] == {"classes": 3}
    loaded = load_model(path)
    assert isinstance(loaded, MappedOutput) and loaded.medsegkit_config["name"] == "ResUNet3d"
    assert loaded.medsegkit_metadata["interactive"]["rounds"] == 1
    torch.testing.assert_close(loaded.matrix, session.model.matrix, rtol=0, atol=0)
    rebuilt = segment(loaded, image, **kw).array
    unmarked = scribbles == 0
    np.testing.assert_array_equal(rebuilt[unmarked], labels[unmarked])
    broken = {**record, "model": {**record["model"], "output_map": {"classes": "3"}}}
    save_checkpoint(dict(load_model(path).state_dict()), tmp_path / "broken.safetensors", record=broken)
    with pytest.raises(CheckpointError, match="records an output map with classes='3'; expected an int >= 1"):
        load_model(tmp_path / "broken.safetensors")


@pytest.mark.parametrize("network", ["UNet", "SegResNet", "DynUNet"])
def test_refine_monai_networks_fold_or_append_the_map(network, tmp_path):
    # MONAI's UNet with residual units ends in ResidualUnit(conv) + identity: its last convolution cannot
    # absorb the map, so refine appends it (MappedOutput); SegResNet and DynUNet end in a plain convolution
    from monai.networks import nets

    torch.manual_seed(5)
    if network == "UNet":
        model = nets.UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1)
    elif network == "SegResNet":
        model = nets.SegResNet(3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 1), blocks_up=(1,))
    else:
        model = nets.DynUNet(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                             filters=[4, 8, 16])
    image = Image(np.random.default_rng(5).normal(size=(24, 20, 16)).astype(np.float32), np.eye(4), {}, None)
    kw = {"roi_size": (16, 16, 16), "preprocessing": "none"}
    session = Session(model.eval(), image, **kw)
    original = session.run().copy()
    scribbles = np.zeros(image.spatial_shape, np.int32)
    scribbles[2:5, 2:5, 2:5] = 3
    scribbles[-5:-2, -5:-2, -5:-2] = 2
    labels = session.refine(scribbles, seconds=60.0, scope="global").copy()
    assert (labels != original).sum() > (scribbles > 0).sum()
    adapted = segment(session.model, image, **kw).array
    np.testing.assert_array_equal(labels[scribbles == 0], adapted[scribbles == 0])
    if network == "UNet":
        assert isinstance(session.model, MappedOutput)
        # saved with its map; a network built by hand (no medsegkit record) loads into the same pair
        path = session.save(tmp_path / "adapted.safetensors")
        with pytest.raises(CheckpointError, match="does not record which model it belongs to"):
            load_model(path)
        rebuilt = nets.UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1)
        loaded = load_checkpoint(MappedOutput(rebuilt, torch.eye(3), None), path).eval()
        np.testing.assert_array_equal(segment(loaded, image, **kw).array, adapted)
        assert loaded.medsegkit_metadata["adapted_from"]
    else:
        assert type(session.model) is type(model)
        assert session.save(tmp_path / "adapted.safetensors").is_file()
    session.undo()
    np.testing.assert_array_equal(session.labels, original)
    assert type(session.model) is type(model)
