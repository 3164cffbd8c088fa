"""medsegkit.inference.predict: parity with MONAI's inferers, layouts, progress, cancel, lazy I/O, fast path."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import SliceInferer, sliding_window_inference
from monai.networks.nets import UNet
from torch import nn

from medsegkit.errors import Cancelled
from medsegkit.inference import predict, window_slices
from medsegkit.inference.fast import fold_batchnorm

TOL = 1e-5  # float32 parity with MONAI (only the order of the blending sums may differ)


class MonaiUNet(nn.Module):
    """MONAI's UNet with the attributes medsegkit models carry."""

    medsegkit_task = "semantic"

    def __init__(self, spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), norm="batch"):
        super().__init__()
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.net = UNet(spatial_dims, in_channels, out_channels, channels=channels, strides=(2,) * (len(channels) - 1),
                        norm=norm)

    def forward(self, x):
        return self.net(x)


def _model(seed=0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = MonaiUNet(**kwargs).eval()
    # trained-looking BatchNorm statistics instead of the identity ones
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def model3d():
    return _model()


@pytest.fixture(scope="module")
def model2d():
    return _model(spatial_dims=2)


def _volume(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# parity with MONAI
@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "mode", "batch"),
    [
        ((29, 35, 21), (16, 16, 16), 0.5, "gaussian", 3),
        ((37, 50, 29), (32, 32, 32), 0.25, "constant", 4),
        ((20, 21, 22), (64, 64, 64), 0.5, "gaussian", 2),  # roi larger than the image: padded
        ((25, 30, 20), (16, 24, 16), (0.5, 0.25, 0.0), "gaussian", 2),  # per-axis overlap
    ],
)
def test_logits_and_probabilities_equal_monai_sliding_window(model3d, shape, roi, overlap, mode, batch):
    x = _volume((1, 1, *shape))
    reference = sliding_window_inference(x, roi, batch, model3d, overlap=overlap, mode=mode)
    logits = predict(model3d, x, roi_size=roi, sw_batch_size=batch, overlap=overlap, mode=mode, output="logits")
    assert logits.shape == reference.shape
    assert torch.allclose(logits, reference, atol=TOL, rtol=0)
    probabilities = predict(model3d, x, roi_size=roi, sw_batch_size=batch, overlap=overlap, mode=mode,
                            output="probabilities")
    assert torch.allclose(probabilities, torch.softmax(reference, 1), atol=TOL, rtol=0)
    labels = predict(model3d, x[0, 0].numpy(), roi_size=roi, sw_batch_size=batch, overlap=overlap, mode=mode)
    assert isinstance(labels, np.ndarray) and labels.dtype == np.uint8 and labels.shape == shape
    np.testing.assert_array_equal(labels, reference.argmax(1)[0].numpy())


def test_2d_model_equals_monai_2d_sliding_window(model2d):
    x = _volume((2, 1, 45, 70))
    reference = sliding_window_inference(x, (32, 32), 4, model2d, overlap=0.5, mode="gaussian")
    logits = predict(model2d, x, roi_size=(32, 32), output="logits")
    assert torch.allclose(logits, reference, atol=TOL, rtol=0)


@pytest.mark.parametrize("axis", [0, 2])
def test_2d_model_on_volume_equals_monai_slice_inferer(model2d, axis):
    x = _volume((1, 1, 20, 30, 9))
    inferer = SliceInferer(roi_size=(16, 16), sw_batch_size=4, spatial_dim=axis, overlap=0.5, mode="gaussian")
    reference = inferer(x, model2d)
    logits = predict(model2d, x, roi_size=(16, 16), slice_axis=axis, output="logits")
    assert torch.allclose(logits, reference, atol=TOL, rtol=0)


def test_2d_model_on_plain_volume_slices_along_last_axis_by_default(model2d):
    volume = _volume((20, 30, 9)).numpy()
    labels = predict(model2d, volume, roi_size=16)
    assert labels.shape == (20, 30, 9)
    axial = predict(model2d, volume, roi_size=16, slice_axis=2)
    np.testing.assert_array_equal(labels, axial)


@pytest.mark.parametrize("slice_axis", [1.5, True, "0", np.float32(1.0)])
def test_slice_axis_that_is_no_int_is_refused(model2d, slice_axis):
    # before 2026-12-08 int() took 1.5 and True as axis 1 and "0" as axis 0: a map sliced along an axis never asked for
    with pytest.raises(ValueError, match=r"slice_axis must be an int, a spatial axis in \[0, 3\), got "
                                         + re.escape(repr(slice_axis))):
        predict(model2d, np.zeros((6, 7, 8), np.float32), roi_size=8, slice_axis=slice_axis)


def test_tta_flips_axis_that_is_a_bool_is_refused(model3d):
    # before 2026-12-08 (True,) mirrored axis 1
    with pytest.raises(ValueError, match=r"tta_flips must be a sequence of spatial axes such as \(0, 1, 2\) or 'auto', "
                                         r"got \(True,\)"):
        predict(model3d, np.zeros((16, 16, 16), np.float32), roi_size=16, tta_flips=(True,))


def test_window_slices_are_monais():
    slices, padded, before = window_slices((37, 50, 29), (16, 16, 32), 0.5)
    assert padded == (37, 50, 32) and before == [0, 0, 1]
    assert slices == dense_patch_slices((37, 50, 32), (16, 16, 32), (8, 8, 32))


# --------------------------------------------------------------------------------------------------
# layouts and containers
def test_layouts_numpy_and_tensor(model3d):
    volume = _volume((24, 20, 18)).numpy()
    kwargs = dict(roi_size=16, sw_batch_size=8)
    labels = predict(model3d, volume, **kwargs)
    assert isinstance(labels, np.ndarray) and labels.shape == (24, 20, 18)
    np.testing.assert_array_equal(predict(model3d, volume[None], **kwargs), labels)
    batched = predict(model3d, np.stack([volume[None], volume[None] * 0.5]), **kwargs)
    assert batched.shape == (2, 24, 20, 18)
    np.testing.assert_array_equal(batched[0], labels)
    tensor = predict(model3d, torch.from_numpy(volume), **kwargs)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
    np.testing.assert_array_equal(tensor.numpy(), labels)
    probabilities = predict(model3d, volume, output="probabilities", **kwargs)
    assert probabilities.shape == (3, 24, 20, 18) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    # integer input is converted window by window
    np.testing.assert_array_equal(predict(model3d, (volume * 100).astype(np.int16), **kwargs),
                                  predict(model3d, np.trunc(volume * 100).astype(np.float32), **kwargs))


def test_single_channel_model_thresholds_sigmoid():
    model = _model(out_channels=1)
    x = _volume((1, 1, 20, 20, 20))
    logits = sliding_window_inference(x, (16, 16, 16), 4, model, overlap=0.5, mode="gaussian")
    labels = predict(model, x, roi_size=16)
    assert labels.shape == (1, 20, 20, 20)
    torch.testing.assert_close(labels, (logits[:, 0] > 0).to(torch.uint8))
    probabilities = predict(model, x, roi_size=16, output="probabilities")
    torch.testing.assert_close(probabilities, torch.sigmoid(logits), atol=TOL, rtol=0)


def test_one_channel_repeated_for_three_channel_model(caplog):
    model = _model(in_channels=3)
    x = _volume((1, 20, 20, 20))
    with caplog.at_level(logging.INFO, logger="medsegkit.inference"):
        labels = predict(model, x, roi_size=16)
    assert "repeating the single image channel 3 times" in caplog.text
    torch.testing.assert_close(labels, predict(model, x.repeat(3, 1, 1, 1), roi_size=16))


def test_model_mode_restored(model3d):
    model3d.train()
    try:
        predict(model3d, _volume((16, 16, 16)), roi_size=16)
        assert model3d.training
    finally:
        model3d.eval()


def test_default_path_runs_3d_channels_last_without_touching_the_callers_weights(model3d):
    """The default path runs a channels-last-3d copy; the caller's tensors keep their storage and strides."""
    from medsegkit.inference.fast import prepare_model

    before = {name: (t.data_ptr(), t.stride()) for name, t in model3d.state_dict().items()}
    prepared = prepare_model(model3d, device=torch.device("cpu"), fast=False, amp=False, example_shape=(1, 1, 16, 16, 16))
    assert prepared.memory_format is torch.channels_last_3d and "channels-last-3d" in prepared.notes
    conv_weights = [t for t in prepared.module.parameters() if t.dim() == 5]
    assert conv_weights and all(w.stride() == torch.empty(w.shape, memory_format=torch.channels_last_3d,
                                                           device="meta").stride() for w in conv_weights)
    assert {name: (t.data_ptr(), t.stride()) for name, t in model3d.state_dict().items()} == before
    predict(model3d, _volume((20, 20, 20)), roi_size=16)
    assert {name: (t.data_ptr(), t.stride()) for name, t in model3d.state_dict().items()} == before


def test_weights_given_back_when_predict_fails(model3d):
    before = {name: t.data_ptr() for name, t in model3d.state_dict().items()}
    with pytest.raises(Cancelled):
        predict(model3d, _volume((20, 20, 20)), roi_size=16, progress=_raise_cancelled)
    assert {name: t.data_ptr() for name, t in model3d.state_dict().items()} == before


def _raise_cancelled(done, total):
    raise Cancelled("stop")


def test_one_channel_batch_gets_channels_last_strides_without_a_copy():
    from medsegkit.inference.fast import to_memory_format

    batch = torch.randn(2, 1, 6, 7, 8)
    restrided = to_memory_format(batch, torch.channels_last_3d)
    assert restrided.data_ptr() == batch.data_ptr()
    assert restrided.stride() == (336, 1, 56, 8, 1)  # what torch.empty(..., memory_format=channels_last_3d) has
    assert torch.equal(restrided, batch)
    three = torch.randn(2, 3, 4, 5, 6)
    assert to_memory_format(three, torch.channels_last_3d).stride() == (360, 1, 90, 18, 3)


class _ViewingNet(nn.Module):
    """A 3D model that reshapes an activation with .view(), which a channels-last layout refuses."""

    medsegkit_task, spatial_dims, in_channels, out_channels = "semantic", 3, 1, 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        flat = y.view(y.shape[0], -1)  # merges channels with space: raises on a channels-last y
        return self.head(torch.tanh(flat).view(y.shape))


def test_model_refusing_channels_last_runs_contiguous(caplog):
    torch.manual_seed(0)
    model = _ViewingNet().eval()
    x = _volume((1, 1, 24, 20, 20))
    with caplog.at_level(logging.INFO, logger="medsegkit.inference"):
        logits = predict(model, x, roi_size=16, output="logits")
    assert "cannot run channels-last" in caplog.text
    reference = sliding_window_inference(x, (16, 16, 16), 4, model, overlap=0.5, mode="gaussian")
    assert torch.allclose(logits, reference, atol=TOL, rtol=0)
    assert all(t.is_contiguous() for t in model.parameters())


@pytest.mark.parametrize("classes", [1, 3])
def test_labels_without_weight_normalisation_equal_labels_of_blended_logits(classes):
    """Label maps skip the division by the weight sums; they equal the labels of the blended outputs."""
    model = _model(out_channels=classes)
    x = _volume((1, 1, 30, 26, 22))
    for tta in ((), (0, 2)):
        labels = predict(model, x, roi_size=16, tta_flips=tta)
        blended = predict(model, x, roi_size=16, tta_flips=tta, output="probabilities" if tta else "logits")
        if classes == 1:
            expected = (blended[:, 0] > (0.5 if tta else 0.0)).to(torch.uint8)
        else:
            expected = blended.argmax(1).to(torch.uint8)
        torch.testing.assert_close(labels, expected, rtol=0, atol=0)


def test_tta_averages_probabilities_over_every_flip(model3d):
    x = _volume((1, 1, 16, 16, 16))  # one window: per-window TTA equals whole-image TTA
    expected = torch.zeros(1, 3, 16, 16, 16)
    flips = [(), (2,), (3,), (2, 3)]
    with torch.no_grad():
        for dims in flips:
            y = model3d(x.flip(dims) if dims else x)
            expected += torch.softmax(y.flip(dims) if dims else y, 1) / len(flips)
    got = predict(model3d, x, roi_size=16, tta_flips=(0, 1), output="probabilities")
    assert torch.allclose(got, expected, atol=TOL)
    torch.testing.assert_close(predict(model3d, x, roi_size=16, tta_flips=(0, 1)), expected.argmax(1).to(torch.uint8))


# --------------------------------------------------------------------------------------------------
# progress and cancel
def test_progress_called_once_per_window_batch(model3d):
    shape, roi, batch = (40, 30, 20), (16, 16, 16), 3
    calls = []
    predict(model3d, np.zeros((2, 1, *shape), np.float32), roi_size=roi, sw_batch_size=batch,
            progress=lambda done, total: calls.append((done, total)))
    windows = len(dense_patch_slices(shape, roi, (8, 8, 8)))
    expected = 2 * math.ceil(windows / batch)
    assert [c[0] for c in calls] == list(range(1, expected + 1))
    assert {c[1] for c in calls} == {expected}


class _Gate:
    """Forward-call counter and events shared by a model and its inference copies (``deepcopy`` keeps it)."""

    def __init__(self):
        self.calls = 0
        self.first_done = threading.Event()
        self.go_on = threading.Event()

    def __deepcopy__(self, memo):
        return self


class _GatedModel(MonaiUNet):
    """Counts forward calls and blocks after the first until the test lets it go on."""

    def __init__(self):
        super().__init__()
        self.gate = _Gate()

    def forward(self, x):
        self.gate.calls += 1
        if self.gate.calls == 2:
            self.gate.first_done.set()
            self.gate.go_on.wait(10)
        return super().forward(x)


@pytest.mark.parametrize("target", ["path", "zarr"])
def test_cancel_from_another_thread_stops_within_one_batch_and_writes_nothing(tmp_path, target):
    import zarr

    model = _GatedModel().eval()
    volume = np.zeros((64, 32, 32), np.float32)
    out = tmp_path / "labels.zarr"
    if target == "zarr":
        out = zarr.create_array(store=str(out), shape=volume.shape, chunks=(16, 32, 32), dtype="uint8")
        out[:] = 9  # the caller's earlier contents
    cancel = threading.Event()
    errors = []

    def run():
        try:
            predict(model, volume, roi_size=16, sw_batch_size=1, out=out, cancel=cancel)
        except Cancelled as err:
            errors.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    assert model.gate.first_done.wait(20)
    cancel.set()  # set while the second batch runs
    model.gate.go_on.set()
    worker.join(30)
    assert not worker.is_alive() and len(errors) == 1
    assert model.gate.calls == 2  # the batch in flight finished, no further batch started
    assert "after 2 of" in str(errors[0])
    if target == "path":
        assert list(tmp_path.iterdir()) == []  # no output and no partial store left
    else:  # the caller's array is theirs: kept, with no slab finished yet, so as it was
        assert [p.name for p in tmp_path.iterdir()] == ["labels.zarr"]
        assert (zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")[:] == 9).all()


def test_a_callers_out_array_of_the_wrong_shape_is_refused_and_kept(tmp_path, model3d):
    """Until 2026-12-07 the refusal removed the caller's zarr array (its folder) with everything in it."""
    import zarr

    kept = zarr.create_array(store=str(tmp_path / "mine.zarr"), shape=(5, 5, 5), dtype="uint8")
    kept[:] = 7
    with pytest.raises(ValueError, match=r"out has shape \(5, 5, 5\), but this prediction has shape \(20, 20, 20\)"):
        predict(model3d, _volume((20, 20, 20)), roi_size=16, out=kept)
    assert (zarr.open_array(str(tmp_path / "mine.zarr"), mode="r")[:] == 7).all()


def test_error_midway_removes_partial_output(tmp_path, model3d):
    import zarr

    source = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=(64, 16, 16), chunks=(16, 16, 16), dtype="float32")
    source[:] = 0.0
    source[60, 5, 5] = np.nan  # found only when the last windows are read
    out = tmp_path / "out.zarr"
    with pytest.raises(ValueError, match="NaN or Inf values .*window at"):
        predict(model3d, source, roi_size=16, out=str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


# --------------------------------------------------------------------------------------------------
# lazy input and slab-wise output
def test_lazy_zarr_and_dask_input_and_zarr_output(tmp_path, model3d):
    import dask.array as da
    import zarr

    volume = _volume((50, 24, 20)).numpy()
    expected = predict(model3d, volume, roi_size=16)
    source = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=volume.shape, chunks=(16, 16, 16), dtype="float32")
    source[:] = volume
    np.testing.assert_array_equal(predict(model3d, source, roi_size=16), expected)
    np.testing.assert_array_equal(predict(model3d, da.from_array(volume, chunks=(10, 24, 20)), roi_size=16), expected)
    written = predict(model3d, source, roi_size=16, out=str(tmp_path / "out.zarr"))
    np.testing.assert_array_equal(written[:], expected)
    assert not list(tmp_path.glob(".*partial"))
    with pytest.raises(FileExistsError, match="already exists"):
        predict(model3d, source, roi_size=16, out=str(tmp_path / "out.zarr"))
    target = np.full(volume.shape, 255, np.uint8)
    assert predict(model3d, volume, roi_size=16, out=target) is target
    np.testing.assert_array_equal(target, expected)
    probabilities = np.zeros((3, *volume.shape), np.float32)
    predict(model3d, volume, roi_size=16, output="probabilities", out=probabilities)
    np.testing.assert_array_equal(probabilities.argmax(0), expected)
    with pytest.raises(ValueError, match=r"out has shape \(50, 24\)"):
        predict(model3d, volume, roi_size=16, out=np.zeros((50, 24), np.uint8))


NET_SOURCE = textwrap.dedent(
    """
    class Net(nn.Module):
        spatial_dims, in_channels, out_channels, medsegkit_task = 3, 1, 2, "semantic"

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            # one 1x1x1 convolution: cheap, no im2col buffer, so the window loop's own memory is measured
            self.body = nn.Conv3d(1, 2, 1)

        def forward(self, x):
            return self.body(x)
    """
)

MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, torch, zarr
    from torch import nn
    from medsegkit.inference import predict
    torch.set_num_threads(1)
    # start zarr's decoder threads before the limit, and decode one chunk at a time: with zarr's default of 10
    # concurrent chunk reads the address space one slab read needed was 10.6-15.7 MB of the 16 MB margin on a
    # busy machine (the test failed in CI, 2026-12-08), against 6.3-7.3 MB with one at a time
    zarr.config.set({"threading.max_workers": 2, "async.concurrency": 1})
    """
) + NET_SOURCE + textwrap.dedent(
    """
    def vm_size():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    source_path, out_path, margin = sys.argv[1], sys.argv[2], int(sys.argv[3])
    source = zarr.open_array(source_path, mode="r")
    model = Net().eval()
    predict(model, source[:64, :, :], roi_size=32)  # warm-up: lazy imports, thread pools, zarr's loop
    limit = vm_size() + margin
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        np.ones(source.shape, source.dtype)
    except MemoryError:
        print("control: an array the size of the volume does not fit")
    else:
        print("control: an array the size of the volume fits")
    predict(model, source, roi_size=(16, 80, 80), overlap=0.0, sw_batch_size=2, out=out_path)
    print("done")
    """
)


@pytest.mark.slow
def test_zarr_volume_larger_than_memory_limit_segments(tmp_path):
    """A zarr volume larger than the address space left to the process segments window by window."""
    import zarr

    # 32.8 MB of float32 against a 16 MB address-space margin: even with the ~10 MB of free heap glibc may
    # keep from the warm-up, an array of the volume cannot be allocated (the control below checks that)
    shape = (320, 160, 160)
    source = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=shape, chunks=(40, 80, 80), dtype="float32")
    rng = np.random.default_rng(0)
    for start in range(0, shape[0], 80):
        source[start:start + 80] = rng.standard_normal((80, *shape[1:]), dtype=np.float32)
    script = tmp_path / "limited.py"
    script.write_text(MEMORY_SCRIPT)
    out = tmp_path / "out.zarr"
    # one malloc arena: glibc otherwise reserves 64 MB of address space per thread
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "in.zarr"), str(out), str(16 * 2**20)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "control: an array the size of the volume does not fit" in run.stdout
    assert run.stdout.strip().endswith("done")
    written = zarr.open_array(str(out), mode="r")
    assert written.shape == shape and written.dtype == np.uint8
    namespace: dict = {"nn": nn, "torch": torch}
    exec(NET_SOURCE, namespace)
    reference = predict(namespace["Net"]().eval(), source[:], roi_size=(16, 80, 80), overlap=0.0, sw_batch_size=2)
    np.testing.assert_array_equal(written[:], reference)


# --------------------------------------------------------------------------------------------------
# bad input
@pytest.mark.parametrize(
    ("image", "kwargs", "message"),
    [
        (np.zeros((16, 16)), {}, r"image has 2 dimension\(s\) .* 3D model takes"),
        (np.zeros((1, 1, 1, 16, 16, 16)), {}, r"image has 6 dimension\(s\)"),
        (np.zeros((2, 16, 16, 16)), {}, r"image has 2 channel\(s\) .* model takes 1"),
        (np.full((16, 16, 16), np.nan), {}, "NaN or Inf"),
        (np.full((16, 16, 16), np.inf), {}, "NaN or Inf"),
        (np.zeros((0, 16, 16)), {}, "image is empty"),
        (np.zeros((16, 16, 16), np.complex64), {}, "complex"),
        (np.zeros((16, 16, 16), bool), {}, "booleans"),
        (np.zeros((16, 16, 16), object), {}, "dtype object is not accepted"),
        ("not an array", {}, "image must be a numpy array"),
        (np.zeros((16, 16, 16)), {"roi_size": (16, 16)}, "roi_size must be an int or 3 ints"),
        (np.zeros((16, 16, 16)), {"overlap": 1.0}, r"overlap must be in \[0, 1\)"),
        (np.zeros((16, 16, 16)), {"overlap": -0.1}, r"overlap must be in \[0, 1\)"),
        (np.zeros((16, 16, 16)), {"overlap": float("nan")}, r"overlap must be in \[0, 1\)"),
        (np.zeros((16, 16, 16)), {"overlap": ()}, r"overlap must be in \[0, 1\)"),
        (np.zeros((16, 16, 16)), {"output": "masks"}, "output must be one of"),
        (np.zeros((16, 16, 16)), {"mode": "linear"}, "mode must be 'gaussian' or 'constant'"),
        (np.zeros((16, 16, 16)), {"sw_batch_size": 0}, "sw_batch_size must be a positive int"),
        (np.zeros((16, 16, 16)), {"sw_batch_size": True}, "sw_batch_size must be a positive int"),
        # before 2026-12-07 a NaN sigma_scale blended NaN weights into an all-background map, silently
        (np.zeros((16, 16, 16)), {"sigma_scale": float("nan")}, "sigma_scale must be a positive number or one per axis"),
        (np.zeros((16, 16, 16)), {"sigma_scale": -0.125}, "sigma_scale must be a positive number or one per axis"),
        (np.zeros((16, 16, 16)), {"sigma_scale": (0.1, 0.0, 0.1)}, "sigma_scale must be a positive number"),
        (np.zeros((16, 16, 16)), {"cval": float("nan")}, "cval must be a finite number"),
        (np.zeros((16, 16, 16)), {"cval": "0"}, "cval must be a finite number"),
        (np.zeros((16, 16, 16)), {"slice_axis": 0}, "slice_axis is only for a 2D model"),
        (np.zeros((16, 16, 16)), {"tta_flips": (3,)}, r"tta_flips axes must be spatial axes in \[0, 3\)"),
        (np.zeros((16, 16, 16)), {"tta_flips": True}, "tta_flips must be a sequence"),
        (np.zeros((16, 16, 16)), {"task": "panoptic"}, "needs a universal model"),
        (np.zeros((16, 16, 16)), {"amp": "int8"}, "amp must be True, False, 'bf16' or 'fp16'"),
    ],
)
def test_bad_input_clear_error(model3d, image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predict(model3d, image, **{"roi_size": 16, **kwargs})


def test_overlap_accepts_numpy_numbers_as_sigma_scale_does(model3d):
    """Until 2026-12-08 overlap=np.float32(0.5) was refused ('overlap must be in [0, 1)') while sigma_scale took
    numpy numbers; numpy's float32 is not a Python float."""
    image = np.random.default_rng(0).standard_normal((20, 20, 20)).astype(np.float32)
    expected = predict(model3d, image, roi_size=16, overlap=0.5)
    np.testing.assert_array_equal(predict(model3d, image, roi_size=16, overlap=np.float32(0.5)), expected)


@pytest.mark.parametrize(
    ("roi_size", "message"),
    [
        # before 2026-12-08: RuntimeError "DefaultCPUAllocator: can't allocate memory: you tried to allocate
        # 4000000000000 bytes" from MONAI's importance map
        (10**6, r"roi_size \(1000000, 1000000, 1000000\) pads the image \(16, 16, 16\) to 1,000,000,000,000,000,000 "
                r"voxels; a window larger than the image may pad it to at most 2,147,483,647 voxels \(2\*\*31 - 1\): "
                r"give a smaller roi_size"),
        ((16, 16, 2**31), "pads the image"),
        # before: True taken as a window of 1 voxel, silently
        (True, r"roi_size must be an int or 3 ints for a 3D model, got True"),
        ((True, 16, 16), r"roi_size must be an int or 3 ints for a 3D model, got \(True, 16, 16\)"),
        # before: TypeError "'float' object is not iterable"
        (2.5, r"roi_size must be an int or 3 ints for a 3D model, got 2.5"),
        ("16", r"roi_size must be an int or 3 ints for a 3D model, got '16'"),
    ],
)
def test_roi_size_that_is_no_size_or_pads_without_bound_is_refused(model3d, roi_size, message):
    with pytest.raises(ValueError, match=message):
        predict(model3d, np.zeros((16, 16, 16), np.float32), roi_size=roi_size)


def test_roi_larger_than_the_image_still_pads(model3d):
    image = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    assert predict(model3d, image, roi_size=(8, 8, 1024)).shape == (4, 5, 6)


class _Counts(nn.Module):
    """A 3D conv that counts its calls."""

    medsegkit_task = "semantic"

    def __init__(self):
        super().__init__()
        self.spatial_dims, self.in_channels, self.calls = 3, 1, 0
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # before 2026-12-08: TypeError "'int' object is not callable" after the first window batch had run
        ({"progress": 5}, r"^progress must be a callable progress\(done, total\) or None, got int$"),
        # before: AttributeError "'object' object has no attribute 'is_set'" / TypeError "'bool' object is not callable"
        ({"cancel": object()}, r"^cancel must have an is_set\(\) method \(a threading.Event\) or be None, got object$"),
        ({"cancel": True}, "^cancel must have an is_set"),
        ({"cancel": type("Flag", (), {"is_set": False})()}, "^cancel must have an is_set"),
    ],
)
def test_progress_and_cancel_of_the_wrong_kind_are_refused_before_any_window(kwargs, message):
    model = _Counts().eval()
    with pytest.raises(ValueError, match=message):
        predict(model, np.zeros((16, 8, 8), np.float32), roi_size=8, sw_batch_size=1, **kwargs)
    assert model.calls == 0


@pytest.mark.parametrize("model", [None, lambda x: x, "not a module".split()])
def test_model_that_is_no_module_is_refused(model):
    # before 2026-12-08: AttributeError "'NoneType' object has no attribute 'modules'" (and 'function', 'list')
    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module or the path of an export, got "):
        predict(model, np.zeros((8, 8, 8), np.float32), roi_size=8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # before 2026-12-08: RuntimeError "Expected one of cpu, cuda, ipu, xpu, ... device type at start of device string: gpu"
        ({"device": "gpu"}, r"^device must be a device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'$"),
        ({"sw_device": ""}, r"^sw_device must be a device such as 'cpu', 'cuda' or 'cuda:1', got ''$"),
        ({"device": True}, "^device must be a device such as"),
        # before: "Tensor.item() cannot be called on meta tensors" / "Cannot copy out of meta tensor; no data!"
        ({"device": "meta"}, r"^device='meta': a meta device holds no data; use 'cpu' or 'cuda'$"),
        ({"sw_device": torch.device("meta")}, r"^sw_device=device\(type='meta'\): a meta device holds no data"),
        # before (no CUDA): RuntimeError "Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU..."
        ({"device": "cuda"}, r"^device='cuda': CUDA is not available here \(torch.cuda.is_available\(\) is False\); use 'cpu'$"),
        ({"sw_device": 5}, r"^sw_device=5: CUDA is not available here"),
    ],
)
def test_devices_that_cannot_be_used_are_one_clear_error(monkeypatch, kwargs, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same message with or without a GPU here
    model = _Counts().eval()
    with pytest.raises(ValueError, match=message):
        predict(model, np.zeros((8, 8, 8), np.float32), roi_size=8, **kwargs)
    assert model.calls == 0


def test_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^device='cuda:7': this machine has 1 CUDA device\(s\), cuda:0 to cuda:0$"):
        predict(_Counts().eval(), np.zeros((8, 8, 8), np.float32), roi_size=8, device="cuda:7")


def test_image_tensor_on_the_meta_device_is_refused():
    # before 2026-12-08: NotImplementedError / RuntimeError "Tensor.item() cannot be called on meta tensors" from torch
    with pytest.raises(ValueError, match=r"^image is a tensor on the meta device, which holds no values; give a tensor with data$"):
        predict(_Counts().eval(), torch.zeros(8, 8, 8, device="meta"), roi_size=8)


def _read_only(shape, dtype):
    array = np.zeros(shape, dtype)
    array.flags.writeable = False
    return array


@pytest.mark.parametrize(
    ("classes", "out", "output", "message"),
    [
        # before 2026-12-08: probabilities truncated to 0 in an int8 array, 300 labels wrapped modulo 256 in uint8,
        # labels 1 and 2 both True in a bool array, nothing written to a meta tensor: all without a word
        (2, np.zeros((2, 8, 8, 8), np.int8), "probabilities",
         r"^out has dtype int8, but probabilities / logits are float32; give a floating array$"),
        (300, np.zeros((8, 8, 8), np.uint8), "labels", r"^out has dtype uint8, which cannot hold labels 0 to 299; give an "
                                                       r"integer array \(uint8 up to 256 classes, else int32\)$"),
        (3, np.zeros((8, 8, 8), bool), "labels", "^out has dtype bool, which cannot hold labels 0 to 2"),
        (2, torch.zeros(2, 8, 8, 8, dtype=torch.int32), "logits", "^out has dtype torch.int32, but probabilities / logits"),
        (2, torch.zeros(8, 8, 8, device="meta"), "labels",
         r"^out is a tensor on the meta device, which holds no values; give one on 'cpu' or 'cuda'$"),
        # before: numpy's "assignment destination is read-only" after the first slab had been computed
        (2, _read_only((8, 8, 8), np.uint8), "labels", r"^out is a read-only array; give a writeable one \(or a path\)$"),
        # before: AttributeError "'list' object has no attribute 'shape'"
        (2, [0] * 8, "labels", r"^out must be an array of the result's shape \(numpy, memmap, zarr, tensor\) or a path, got list$"),
    ],
)
def test_out_that_cannot_hold_the_result_is_refused(classes, out, output, message):
    model = _Spoils(lambda y: y).eval()
    model.conv = nn.Conv3d(1, classes, 1)
    with pytest.raises(ValueError, match=message):
        predict(model, np.zeros((8, 8, 8), np.float32), roi_size=8, out=out, output=output)


@pytest.mark.parametrize(("classes", "dtype"), [(2, bool), (2, np.int8), (256, np.uint8), (300, np.int16), (3, np.float32)])
def test_out_that_holds_the_labels_is_written(classes, dtype):
    model = _Spoils(lambda y: y).eval()
    model.conv = nn.Conv3d(1, classes, 1)
    image = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    out = predict(model, image, roi_size=8, out=np.zeros((8, 8, 8), dtype))
    np.testing.assert_array_equal(out, predict(model, image, roi_size=8).astype(dtype))


def test_per_axis_sigma_scale_is_accepted(model3d):
    image = np.random.default_rng(0).random((20, 16, 16)).astype(np.float32)
    per_axis = predict(model3d, image, roi_size=16, sigma_scale=(0.125, 0.125, 0.125), output="logits")
    np.testing.assert_allclose(per_axis, predict(model3d, image, roi_size=16, output="logits"), rtol=0, atol=1e-6)


def test_a_session_refuses_the_same_window_options(model3d):
    from medsegkit.interactive import Session
    from medsegkit.io import Image

    image = Image(np.zeros((16, 16, 16), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="cval must be a finite number"):
        Session(model3d, image, preprocessing="none", roi_size=16, cval=float("nan"))
    with pytest.raises(ValueError, match="sigma_scale must be a positive number"):
        Session(model3d, image, preprocessing="none", roi_size=16, sigma_scale=0)


def test_bad_input_writes_no_output(tmp_path, model3d):
    with pytest.raises(ValueError, match="NaN"):
        predict(model3d, np.full((16, 16, 16), np.nan, np.float32), roi_size=16, out=str(tmp_path / "o.zarr"))
    assert list(tmp_path.iterdir()) == []


def test_model_with_wrong_output_size_is_reported():
    class Shrinks(MonaiUNet):
        def forward(self, x):
            return super().forward(x)[..., :-1]

    with pytest.raises(ValueError, match="must return .* of its input's spatial size"):
        predict(Shrinks().eval(), np.zeros((16, 16, 16), np.float32), roi_size=16)


class _Spoils(nn.Module):
    """A 3D conv whose output ``spoil`` changes (one NaN voxel, complex values, no class channel)."""

    medsegkit_task = "semantic"

    def __init__(self, spoil):
        super().__init__()
        self.spatial_dims, self.in_channels, self.spoil = 3, 1, spoil
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        return self.spoil(self.conv(x))


def _one_nan(y):
    y = y.clone()
    y[-1, 1, -1, -1, -1] = float("nan")
    return y


def _one_inf(y):
    y = y.clone()
    y[0, 0, 0, 0, 0] = float("inf")
    return y


def test_batch_size_beyond_the_number_of_windows_allocates_only_those(model3d):
    # before 2026-12-08 the window buffer had sw_batch_size rows whatever the number of windows:
    # RuntimeError "Storage size calculation overflowed with sizes=[1000000000000000, 1, 16, 16, 16]" (10**9: an
    # attempt to allocate 256 GB for a 8³ image)
    image = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    expected = predict(model3d, image, roi_size=16, output="logits")
    huge = predict(model3d, image, roi_size=16, sw_batch_size=10**15, output="logits")
    np.testing.assert_array_equal(huge, expected)


@pytest.mark.parametrize(
    ("spoil", "kwargs", "message"),
    [
        # before 2026-12-08: a labels map (the NaN voxel background), NaN probabilities, no error
        (_one_nan, {}, r"the model returned NaN or Inf values for windows of shape \(2, 1, 8, 8, 8\); the labels would "
                       r"be meaningless \(a diverged checkpoint, or fp16 overflow: try amp=False\)"),
        (_one_inf, {"output": "probabilities"}, "the model returned NaN or Inf values"),
        (_one_nan, {"tta_flips": (0,)}, "the model returned NaN or Inf values"),
        # before: the imaginary part dropped with a ComplexWarning, labels returned
        (lambda y: y.to(torch.complex64), {}, r"the model returned torch.complex64 values; a semantic model must "
                                               r"return real logits \(N, K, \*spatial\)"),
        # before: IndexError 'index 0 is out of bounds for dimension 0 with size 0' from the argmax
        (lambda y: y[:, :0], {}, r"the model returned shape \(2, 0, 8, 8, 8\): no class channel \(K = 0\)"),
    ],
)
def test_model_returning_nan_complex_or_no_classes_is_refused(spoil, kwargs, message):
    image = np.random.default_rng(0).random((12, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        predict(_Spoils(spoil).eval(), image, roi_size=8, sw_batch_size=2, overlap=0.5, **kwargs)


# --------------------------------------------------------------------------------------------------
# task dispatch
def test_instance_and_universal_models_are_routed(monkeypatch):
    import importlib

    predict_module = importlib.import_module("medsegkit.inference.predict")  # the module, not the function
    seen = {}
    monkeypatch.setattr(predict_module, "predict_instances",
                        lambda model, image, **kw: seen.setdefault("instance", kw) and "instances")

    class SemanticAdapter(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.spatial_dims, self.in_channels = model, 3, 1

        def forward(self, x):
            return self.model(x)

    monkeypatch.setattr(predict_module, "SemanticAdapter", SemanticAdapter)
    monkeypatch.setattr(predict_module, "predict_query", lambda model, image, task, **kw: ("query", task, kw["roi_size"]))

    class InstanceNet(MonaiUNet):
        medsegkit_task = "instance"

    class UniversalNet(MonaiUNet):
        medsegkit_task = "universal"

    assert predict(InstanceNet(), np.zeros((16, 16, 16)), roi_size=16) == "instances"
    assert seen["instance"]["roi_size"] == 16 and seen["instance"]["output"] == "labels"
    universal = UniversalNet().eval()
    assert predict(universal, np.zeros((16, 16, 16)), task="panoptic", roi_size=8) == ("query", "panoptic", 8)
    labels = predict(universal, _volume((16, 16, 16)).numpy(), roi_size=16)
    np.testing.assert_array_equal(labels, predict(_wrap(universal), _volume((16, 16, 16)).numpy(), roi_size=16))
    with pytest.raises(ValueError, match="task must be 'semantic', 'instance' or 'panoptic'"):
        predict(universal, np.zeros((16, 16, 16)), task="depth")


def _wrap(universal):
    class Plain(nn.Module):
        medsegkit_task, spatial_dims, in_channels = "semantic", 3, 1

        def forward(self, x):
            return universal(x)

    return Plain()


# --------------------------------------------------------------------------------------------------
# fast path
def _trained_model() -> tuple[nn.Module, torch.Tensor]:
    """A small U-Net trained for a few steps to find bright blobs (trained BatchNorm statistics)."""
    torch.manual_seed(0)
    model = MonaiUNet(out_channels=2, channels=(8, 16, 32))
    generator = torch.Generator().manual_seed(0)

    def sample(n):
        grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
        centres = torch.rand(n, 3, 1, 1, 1, generator=generator) * 20 + 6
        radius = torch.rand(n, 1, 1, 1, generator=generator) * 5 + 4
        masks = ((grid[None] - centres) ** 2).sum(1) < radius**2
        images = masks[:, None].float() + 0.4 * torch.randn(n, 1, 32, 32, 32, generator=generator)
        return images, masks.long()

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(25):
        images, masks = sample(4)
        loss = nn.functional.cross_entropy(model(images), masks)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    images, masks = sample(1)
    return model, images


@pytest.mark.slow
def test_fast_path_agrees_with_default_on_trained_model():
    model, image = _trained_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    default = predict(model, image, roi_size=32)
    fast = predict(model, image, roi_size=32, fast=True)
    agreement = (default == fast).float().mean().item()
    assert agreement >= 0.995, agreement
    assert 0.02 < default.float().mean().item() < 0.5  # the model really segments something
    # the caller's model is unchanged (folding works on a copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.modules())


def test_batchnorm_folding_is_exact_in_float32(model3d):
    x = _volume((2, 1, 16, 16, 16))
    folded, count = fold_batchnorm(model3d, x[:1])
    batch_norms = sum(isinstance(m, nn.BatchNorm3d) for m in model3d.modules())
    assert count == batch_norms == 4
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model3d(x), atol=1e-5, rtol=1e-5)


def _frozen_norm_model() -> nn.Module:
    """A model being fine-tuned: training mode, its BatchNorm layers frozen (eval)."""
    model = _model(seed=3).train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def _modes(model: nn.Module) -> list[tuple[str, bool]]:
    return [(name, module.training) for name, module in model.named_modules()]


def test_folding_and_predict_give_every_module_back_its_own_mode():
    # model.train(was_training) after the trace set the frozen BatchNorm layers back to training: the
    # next fine-tuning step would then have updated their running statistics
    model = _frozen_norm_model()
    before = _modes(model)
    assert any(training for _, training in before) and not all(training for _, training in before)
    folded, count = fold_batchnorm(model, _volume((1, 1, 16, 16, 16)))
    assert count == 4 and _modes(model) == before
    predict(model, _volume((1, 1, 24, 24, 24)), roi_size=16, fast=True, output="logits")
    assert _modes(model) == before


def test_instance_norm_is_not_folded():
    model = _model(norm="instance")
    folded, count = fold_batchnorm(model, _volume((1, 1, 16, 16, 16)))
    assert count == 0 and folded is model


def test_fast_without_bf16_falls_back_to_float32_and_says_so(monkeypatch, caplog, model3d):
    import medsegkit.amp as amp_module

    monkeypatch.setattr(amp_module, "bf16_supported", lambda device: False)
    x = _volume((1, 1, 24, 24, 24))
    with caplog.at_level(logging.INFO, logger="medsegkit.inference"):
        logits = predict(model3d, x, roi_size=16, fast=True, output="logits")
    assert "no native bfloat16 support; running in float32" in caplog.text
    assert "BatchNorm layer(s) folded" in caplog.text and "channels-last-3d" in caplog.text
    reference = sliding_window_inference(x, (16, 16, 16), 4, model3d, overlap=0.5, mode="gaussian")
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() and not __import__("medsegkit.inference.fast", fromlist=["x"]).bf16_supported("cpu"),
                    reason="no native bf16 on this machine")
def test_amp_bf16_close_to_float32(model3d):
    x = _volume((1, 1, 24, 24, 24))
    reference = predict(model3d, x, roi_size=16, output="probabilities")
    mixed = predict(model3d, x, roi_size=16, output="probabilities", amp="bf16")
    assert (mixed - reference).abs().max() < 0.05
