"""backend="auto" (measure, keep the faithful, pick the fastest, cache per machine and model), the per-model
cache of the ONNX conversion, int8 (NNCF) and bioimage.io packages, and the demo model's round trip
through the CLI for every format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medsegkit
from medsegkit import create_model
from medsegkit.cli import main
from medsegkit.inference import backends
from medsegkit.inference.autobackend import choose_backend, cpu_name

ROI3 = (16, 16, 16)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private MEDSEGKIT_HOME: the auto cache and the int8 index are written there."""
    monkeypatch.setenv("MEDSEGKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def unet3d():
    torch.manual_seed(0)
    model = create_model("UNet3d", out_channels=3, channels=(4, 8), strides=(2,)).eval()
    model.medsegkit_metadata = {"class_names": ["background", "a", "b"], "preprocessing": "none"}
    return model


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(0).random((27, 20, 29), dtype=np.float32)


def test_auto_measures_every_backend_caches_the_choice_and_reads_the_cache(unet3d, volume, home, capsys, monkeypatch):
    reference = medsegkit.predict(unet3d, volume, roi_size=ROI3, sw_batch_size=2)
    labels = medsegkit.predict(unet3d, volume, roi_size=ROI3, sw_batch_size=2, backend="auto")
    assert float((labels == reference).mean()) >= 0.995
    printed = capsys.readouterr().err
    assert "backend auto: " in printed and "measured now" in printed and "ETA" in printed

    cache = json.loads((home / "backend_choices.json").read_text())
    (key, entry), = cache.items()
    assert f"|{cpu_name()}|threads={torch.get_num_threads()}|batch=[2, 1, 16, 16, 16]" in key
    assert set(entry["measured"]) >= {"torch float32", "onnxruntime float32", "openvino float32"}
    assert entry["measured"]["torch float32"]["agreement"] == 1.0
    chosen = f"{entry['backend']} {entry['precision']}"
    assert entry["ms_per_batch"] == min(m["ms"] for name, m in entry["measured"].items()
                                        if m["agreement"] >= 0.995) == entry["measured"][chosen]["ms"]
    assert entry["skipped"]["openvino int8"].startswith("no int8 export of this model")

    # the second call reads the cache: a choice edited in the cache is what runs, without measuring
    entry["backend"], entry["precision"] = "onnxruntime", "float32"
    (home / "backend_choices.json").write_text(json.dumps({key: entry}))
    calls = []
    original = backends.BackendRunner.__call__

    def counting(self, batch):
        calls.append(self.network.backend)
        return original(self, batch)

    monkeypatch.setattr(backends.BackendRunner, "__call__", counting)
    again = medsegkit.predict(unet3d, volume, roi_size=ROI3, sw_batch_size=2, backend="auto")
    monkeypatch.setattr(backends.BackendRunner, "__call__", original)
    assert "cached choice" in capsys.readouterr().err
    assert set(calls) == {"onnxruntime"}  # only the cached backend ran: no measurement of the others
    np.testing.assert_array_equal(again, reference)
    # another batch shape is another key: measured again
    medsegkit.predict(unet3d, volume, roi_size=ROI3, sw_batch_size=3, backend="auto")
    assert len(json.loads((home / "backend_choices.json").read_text())) == 2


def test_cli_auto_names_the_choice_in_the_progress_bar(unet3d, volume, home, tmp_path, capsys):
    from medsegkit.io import Image, write_image
    from medsegkit.weights import save_checkpoint

    checkpoint = save_checkpoint(unet3d, tmp_path / "tiny.safetensors", metadata=unet3d.medsegkit_metadata)
    write_image(Image(volume, np.eye(4)), tmp_path / "image.nii.gz")
    argv = ["predict", str(checkpoint), str(tmp_path / "image.nii.gz"), "--roi", "16", "--sw-batch-size", "2"]
    assert main([*argv, "-o", str(tmp_path / "auto.nii.gz"), "--backend", "auto"]) == 0
    err = capsys.readouterr().err
    (entry,) = json.loads((home / "backend_choices.json").read_text()).values()
    chosen = f"{entry['backend']} {entry['precision']}"
    assert f"backend auto: {chosen}, " in err and "ETA" in err  # printed before the run
    assert f"windows [{chosen}]" in err  # and named in the progress bar
    assert main([*argv, "-o", str(tmp_path / "torch.nii.gz")]) == 0
    assert "windows [" not in capsys.readouterr().err  # no auto, no choice in the bar


def test_auto_leaves_out_a_backend_whose_labels_disagree(unet3d, volume, home, monkeypatch):
    real = backends.backend_network

    def wrong_onnxruntime(model, backend, shape, dims):
        network = real(model, backend, shape, dims)
        if backend == "onnxruntime":
            call = network.call
            network.call = lambda batch: -call(batch)  # the worst class everywhere, and instant
        return network

    monkeypatch.setattr(backends, "backend_network", wrong_onnxruntime)
    batch = torch.from_numpy(volume[None, None, :16, :16, :16].copy())
    choice = choose_backend(unet3d, batch, spatial_dims=3, use_cache=False, rounds=1)
    assert choice.measured["onnxruntime float32"]["agreement"] < 0.5
    assert choice.skipped["onnxruntime float32"].startswith("labels agree ")
    assert choice.skipped["onnxruntime float32"].endswith("< 99.5 % with torch float32")
    assert choice.name != "onnxruntime float32"
    assert not home.exists()  # use_cache=False writes nothing


def test_auto_refuses_fast_and_amp_and_keeps_exports_on_their_backend(unet3d, volume, home, tmp_path):
    with pytest.raises(ValueError, match=r"backend='auto' chooses the precision itself .* drop fast / amp"):
        medsegkit.predict(unet3d, volume, roi_size=ROI3, backend="auto", fast=True)
    out = medsegkit.export(unet3d, tmp_path / "ts", format="torchscript", roi_size=ROI3, log=None)
    reference = medsegkit.predict(unet3d, volume, roi_size=ROI3)
    np.testing.assert_array_equal(medsegkit.predict(out, volume, backend="auto"), reference)
    assert not home.exists()  # an export runs as exported: nothing measured, nothing cached
    with pytest.raises(ValueError, match=r"backend must be None or one of torch, onnxruntime, openvino, auto, got 'tvm'"):
        medsegkit.predict(unet3d, volume, backend="tvm")


def test_the_onnx_conversion_is_made_once_per_model_shape_and_weights(volume, monkeypatch):
    torch.manual_seed(1)
    model = create_model("UNet3d", out_channels=2, channels=(4, 8), strides=(2,)).eval()
    conversions = []
    real = backends._convert

    def counting(*args):
        conversions.append(args[1])
        return real(*args)

    monkeypatch.setattr(backends, "_convert", counting)
    for _ in range(2):
        labels = medsegkit.predict(model, volume, roi_size=ROI3, backend="onnxruntime")
    assert conversions == ["onnxruntime"]
    np.testing.assert_array_equal(labels, medsegkit.predict(model, volume, roi_size=ROI3))
    medsegkit.predict(model, volume, roi_size=ROI3, backend="onnxruntime", sw_batch_size=3)
    assert conversions == ["onnxruntime"] * 2  # another batch shape
    head_bias = [p for name, p in model.named_parameters() if name.endswith("bias")][-1]  # (2,): the classes
    with torch.no_grad():
        head_bias.add_(torch.tensor([0.3, -0.3]))
    changed = medsegkit.predict(model, volume, roi_size=ROI3, backend="onnxruntime")
    assert conversions == ["onnxruntime"] * 3  # weights changed in place: converted again
    assert (changed != labels).any()  # a stale conversion would have given the old labels
    np.testing.assert_array_equal(changed, medsegkit.predict(model, volume, roi_size=ROI3))


# --------------------------------------------------------------------------------------------------
# int8
def test_int8_errors(unet3d, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"quantize='int8' is OpenVINO's post-training quantization \(NNCF\); "
                                         r"use format='openvino', not 'onnx'"):
        medsegkit.export(unet3d, tmp_path / "x", format="onnx", quantize="int8")
    with pytest.raises(ValueError, match=r"quantize must be None or 'int8', got 'int4'"):
        medsegkit.export(unet3d, tmp_path / "x", format="openvino", quantize="int4")
    with pytest.raises(ValueError, match=r"needs calibration volumes: this checkpoint records no sample or validation "
                                         r"volumes; pass calibration=\[image paths\] \(--calibration FILE ...\)"):
        medsegkit.export(unet3d, tmp_path / "x", format="openvino", quantize="int8", roi_size=ROI3)
    assert not list(tmp_path.iterdir())
    assert main(["export", "UNet3d", "--format", "onnx", "--calibration", "a.nii.gz", "-o", str(tmp_path / "y")]) == 2
    assert "--calibration is for --quantize int8" in capsys.readouterr().err


def test_int8_export_on_given_volumes_is_measured_by_auto_and_opened_once(unet3d, volume, tmp_path, home):
    from medsegkit.inference.autobackend import open_int8
    from medsegkit.io import Image

    image = Image(volume, np.eye(4))
    printed: list[str] = []
    out = medsegkit.export(unet3d, tmp_path / "int8", format="openvino", quantize="int8", calibration=[image],
                           roi_size=ROI3, batch_size=2, log=printed.append)
    sidecar = json.loads((out / "medsegkit.json").read_text())
    assert sidecar["quantize"]["calibration"] == ["image"] and sidecar["quantize"]["calibration_batches"] >= 1
    assert sidecar["verification"]["precision"] == "int8" and sidecar["verification"]["label_agreement"] >= 0.995
    assert any("labels agree with PyTorch float32 on" in line for line in printed)
    index = json.loads((home / "int8_exports.json").read_text())
    assert list(index.values()) == [str((out / "model.xml").resolve())]

    batch = torch.from_numpy(np.stack([volume[None, :16, :16, :16], volume[None, 8:24, 4:20, 10:26]]))
    choice = choose_backend(unet3d, batch, spatial_dims=3, use_cache=False, rounds=1)
    assert choice.measured["openvino int8"]["agreement"] >= 0.995 and "openvino int8" not in choice.skipped
    assert open_int8(out / "model.xml") is open_int8(out / "model.xml")  # compiled once per process
    # a batch shape the int8 export was not made for: left out with the reason
    other = choose_backend(unet3d, batch[:1], spatial_dims=3, use_cache=False, rounds=1)
    assert other.skipped["openvino int8"].startswith("no int8 export of this model")


@pytest.mark.slow
def test_int8_demo_export_round_trip_dice_and_auto_registration(tmp_path, home):
    """`medsegkit export DEMO --format openvino --quantize int8` calibrates on the shipped MNI152 sample; the
    CLI round trip keeps the held-out Dice within 0.005 of float32 with the same windows."""
    import nibabel as nib

    from medsegkit.cli.demo import held_out_scores
    from medsegkit.data import MNI_CLASS_NAMES, demo_checkpoint_path, sample_path

    checkpoint, sample = str(demo_checkpoint_path()), str(sample_path("mni152_t1"))
    assert main(["export", checkpoint, "--format", "openvino", "--quantize", "int8", "-o", str(tmp_path / "int8")]) == 0
    sidecar = json.loads((tmp_path / "int8" / "medsegkit.json").read_text())
    assert sidecar["quantize"]["precision"] == "int8"
    assert sidecar["quantize"]["calibration"] == ["mni152_t1_2mm.nii.gz"]
    assert sidecar["verification"]["label_agreement"] >= 0.995
    index = json.loads((home / "int8_exports.json").read_text())
    assert list(index.values()) == [str((tmp_path / "int8" / "model.xml").resolve())]

    reference = np.asarray(nib.load(sample_path("mni152_tissue")).dataobj)
    dice = {}
    for name, model in [("float32", checkpoint), ("int8", str(tmp_path / "int8"))]:
        assert main(["predict", model, sample, "-o", str(tmp_path / f"{name}.nii.gz"), "--quiet"]) == 0
        labels = np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj)
        dice[name] = held_out_scores(labels, reference, list(MNI_CLASS_NAMES))["mean_foreground_dice"]
    assert abs(dice["int8"] - dice["float32"]) <= 0.005, dice


# --------------------------------------------------------------------------------------------------
# bioimage.io
def _bioimageio_or_skip():
    from medsegkit.inference.bioimage_package import check_bioimageio

    try:
        check_bioimageio()
    except ImportError as err:  # the environment, not the code: the message names the versions and the fix
        pytest.skip(str(err))


def test_bioimageio_refuses_the_known_broken_pydantic_pair(monkeypatch):
    import importlib.metadata

    versions = {"bioimageio.spec": "0.5.12.0", "bioimageio.core": "0.11.0", "pydantic": "2.14.4"}
    pytest.importorskip("bioimageio.core")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    from medsegkit.inference.bioimage_package import check_bioimageio

    with pytest.raises(ImportError, match=r"bioimageio.spec 0.5.12.0 \(pinned by bioimageio.core 0.11.0\) cannot "
                                          r"validate under pydantic 2.14.4 .* install pydantic<2.14"):
        check_bioimageio()
    versions["pydantic"] = "2.13.5"
    check_bioimageio()


def test_bioimageio_package_folder_and_zip_validate_and_predict_like_torch(unet3d, volume, tmp_path, home, capsys):
    _bioimageio_or_skip()
    import yaml

    printed: list[str] = []
    folder = medsegkit.export(unet3d, tmp_path / "pkg", format="bioimageio", roi_size=ROI3, log=printed.append)
    zipped = medsegkit.export(unet3d, tmp_path / "pkg.zip", format="bioimageio", roi_size=ROI3, log=None)
    assert any(line.startswith("bioimageio: rdf.yaml validated offline by bioimageio.core") for line in printed)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    assert rdf["type"] == "model" and rdf["weights"] == {"onnx": {"source": "model.onnx", "opset_version": 18}}
    assert rdf["attachments"] == [{"source": "medsegkit.json"}]
    assert [a["type"] for a in rdf["inputs"][0]["axes"]] == ["batch", "channel", "space", "space", "space"]
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["background", "a", "b"]
    assert json.loads((folder / "medsegkit.json").read_text())["format"] == "bioimageio"

    reference = medsegkit.predict(unet3d, volume, roi_size=ROI3)
    np.testing.assert_array_equal(medsegkit.predict(folder, volume), reference)
    np.testing.assert_array_equal(medsegkit.predict(zipped, volume), reference)
    assert [p.name for p in (home / "bioimageio").iterdir()][0] and len(list((home / "bioimageio").iterdir())) == 1

    # bioimage.io's own prediction gives our labels on a window of the volume
    from bioimageio.core import load_description, predict
    from bioimageio.core.digest_spec import create_sample_for_model

    window = volume[None, None, :16, :16, :16].copy()
    description = load_description(str(zipped))
    sample = create_sample_for_model(description, inputs={"input": window})
    logits = predict(model=description, inputs=sample).members["logits"].data.to_numpy()
    with torch.no_grad():
        ours = unet3d(torch.from_numpy(window)).argmax(1).numpy()
    np.testing.assert_array_equal(logits.argmax(1), ours)


def test_bioimageio_errors(unet3d, tmp_path, home):
    with pytest.raises(ValueError, match=r"format 'bioimageio' takes batch_size=1 .* got 2"):
        medsegkit.export(unet3d, tmp_path / "pkg", format="bioimageio", roi_size=ROI3, batch_size=2)
    (tmp_path / "other.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip
    with pytest.raises(ValueError, match=r"other.zip is not an exported network; accepted: .onnx, .xml, .pt2, .ts, an "
                                         r"export folder or a bioimage.io package \(folder or .zip\)"):
        medsegkit.predict(tmp_path / "other.zip", np.zeros((8, 8, 8), np.float32))
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"broken.zip is not an exported network"):
        medsegkit.predict(tmp_path / "broken.zip", np.zeros((8, 8, 8), np.float32))
    import zipfile

    with zipfile.ZipFile(tmp_path / "foreign.zip", "w") as archive:
        archive.writestr("rdf.yaml", "type: model\n")
    with pytest.raises(ValueError, match=r"foreign.zip is a bioimage.io package without medsegkit.json; medsegkit opens "
                                         r"the packages `medsegkit export --format bioimageio` writes"):
        medsegkit.predict(tmp_path / "foreign.zip", np.zeros((8, 8, 8), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.zip", "foreign.zip", "home", "other.zip"]
    assert list((home / "bioimageio").iterdir()) == []  # the refused zip left no half-unpacked copy


# --------------------------------------------------------------------------------------------------
# the demo model through the CLI, every float32 format
@pytest.fixture(scope="module")
def demo_reference(tmp_path_factory):
    import nibabel as nib

    from medsegkit.data import demo_checkpoint_path, sample_path

    folder = tmp_path_factory.mktemp("demo")
    assert main(["predict", str(demo_checkpoint_path()), str(sample_path("mni152_t1")), "-o",
                 str(folder / "checkpoint.nii.gz"), "--quiet"]) == 0
    return folder, np.asarray(nib.load(folder / "checkpoint.nii.gz").dataobj)


@pytest.mark.slow
@pytest.mark.parametrize("fmt, target", [("openvino", "model.xml"), ("exported-program", "model.pt2"),
                                         ("torchscript", "model.ts"), ("bioimageio", "")])
def test_demo_round_trip_through_the_cli(demo_reference, fmt, target, tmp_path, home):
    """`medsegkit export DEMO --format F` → `medsegkit predict EXPORTED` = `medsegkit predict DEMO` (the onnx
    format's round trip is tests/test_export.py::test_demo_model_onnx_round_trip_through_the_cli)."""
    import nibabel as nib

    from medsegkit.data import demo_checkpoint_path, sample_path

    if fmt == "bioimageio":
        _bioimageio_or_skip()
    _, from_checkpoint = demo_reference
    assert main(["export", str(demo_checkpoint_path()), "--format", fmt, "-o", str(tmp_path / fmt)]) == 0
    exported = tmp_path / fmt / target if target else tmp_path / fmt
    assert main(["predict", str(exported), str(sample_path("mni152_t1")), "-o", str(tmp_path / "labels.nii.gz"),
                 "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "labels.nii.gz").dataobj), from_checkpoint)


@pytest.mark.parametrize("edit", [{"backend": "tvm"}, {"precision": "fp8"}, {"ms_per_batch": "fast"}, {"measured": []}])
def test_a_cached_choice_auto_does_not_make_is_measured_again(unet3d, volume, home, caplog, edit):
    """A hand-edited or foreign cache entry: before 2026-12-07 ``backend: "tvm"`` was passed on to predict."""
    from medsegkit.inference import autobackend

    batch = torch.from_numpy(volume[None, None, :16, :16, :16].copy())
    key = autobackend.choice_key(autobackend.model_hash(unet3d), list(batch.shape))
    entry = {"backend": "torch", "precision": "float32", "ms_per_batch": 1.0, "batch_shape": list(batch.shape),
             "measured": {"torch float32": {"ms": 1.0, "agreement": 1.0}}, **edit}
    home.mkdir()
    autobackend.cache_path().write_text(json.dumps({key: entry}))
    (home / autobackend.INT8_INDEX_FILE).write_text(json.dumps({f"{autobackend.model_hash(unet3d)}|{list(batch.shape)}": 5}))
    with caplog.at_level("WARNING", logger=autobackend.logger.name):
        choice = choose_backend(unet3d, batch, spatial_dims=3, rounds=1)
    assert not choice.cached and (choice.backend, choice.precision) in autobackend.CONFIGURATIONS
    assert "ignoring a cached backend choice" in caplog.text
