"""medsegkit.export: every format writes the network + sidecar + test tensors, verifies itself against
PyTorch (logits max |Δ| ≤ 1e-4, labels identical), and round-trips through segment / predict / the CLI
with labels identical to the PyTorch model's."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import medsegkit
from medsegkit import Cancelled, create_model
from medsegkit.cli import main
from medsegkit.exporter import ExportMismatchError, export
from medsegkit.inference.backends import ExportedNetwork, load_exported
from medsegkit.io import Image

FORMATS = ["onnx", "openvino", "exported-program", "torchscript"]
NETWORK_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "exported-program": "model.pt2", "torchscript": "model.ts"}
ROI3 = (16, 16, 16)


@pytest.fixture(scope="module")
def unet3d():
    torch.manual_seed(0)
    model = create_model("UNet3d", out_channels=3, channels=(4, 8), strides=(2,)).eval()
    model.medsegkit_metadata = {"class_names": ["background", "a", "b"], "label_colors": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
                                "preprocessing": "none"}
    return model


@pytest.fixture(scope="module")
def exports(unet3d, tmp_path_factory):
    """The tiny UNet3d exported in every format (batch of 2 windows of 16³)."""
    folder = tmp_path_factory.mktemp("exports")
    printed = {}
    for fmt in FORMATS:
        lines: list[str] = []
        export(unet3d, folder / fmt, format=fmt, roi_size=ROI3, batch_size=2, overlap=0.25, log=lines.append)
        printed[fmt] = lines
    return folder, printed


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(0).random((1, 23, 20, 29), dtype=np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_writes_network_sidecar_and_verified_test_tensors(exports, unet3d, fmt):
    folder, printed = exports
    out = folder / fmt
    assert (out / NETWORK_FILES[fmt]).is_file()
    sidecar = json.loads((out / "medsegkit.json").read_text())
    assert sidecar["format"] == fmt and sidecar["network"] == NETWORK_FILES[fmt]
    assert (sidecar["spatial_dims"], sidecar["in_channels"], sidecar["out_channels"]) == (3, 1, 3)
    assert sidecar["roi_size"] == list(ROI3) and sidecar["batch_size"] == 2
    assert (sidecar["overlap"], sidecar["mode"]) == (0.25, "gaussian")
    assert sidecar["class_names"] == ["background", "a", "b"] and sidecar["label_colors"][1] == [255, 0, 0]
    assert sidecar["preprocessing"] == "none" and sidecar["model"]["name"] == "UNet3d"
    verification = sidecar["verification"]
    assert verification["max_abs_logit_diff"] <= 1e-4 and verification["labels_differing"] == 0
    # the printed figures are the recorded ones
    assert len(printed[fmt]) == 1 and f"{verification['max_abs_logit_diff']:.2e}" in printed[fmt][0]
    assert medsegkit.export is export  # the public name
    # the test tensors are the PyTorch model's input and output
    test_input = np.load(out / "test_input.npy")
    assert test_input.shape == (2, 1, *ROI3)
    with torch.no_grad():
        expected = unet3d(torch.from_numpy(test_input)).numpy()
    np.testing.assert_allclose(np.load(out / "test_output.npy"), expected, rtol=0, atol=1e-6)
    # and the exported network reproduces them (a batch of 3 runs as 2 + 1 zero-padded)
    network = load_exported(out)
    batch = torch.from_numpy(np.concatenate([test_input, test_input[:1]]))
    np.testing.assert_allclose(network(batch).numpy(), np.concatenate([expected, expected[:1]]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_segment_exported_equals_segment_model(exports, unet3d, volume, fmt):
    folder, _ = exports
    image = Image(volume[0], np.diag([1.5, 1.5, 2.0, 1.0]))
    reference = medsegkit.segment(unet3d, image, roi_size=ROI3, overlap=0.25)
    exported = medsegkit.segment(folder / fmt / NETWORK_FILES[fmt], image)  # the sidecar's roi and overlap
    np.testing.assert_array_equal(exported.array, reference.array)
    assert exported.meta["class_names"] == ["background", "a", "b"]
    np.testing.assert_array_equal(exported.affine, image.affine)


def test_interactive_session_runs_an_export_and_refuses_to_adapt_it(exports, unet3d, volume):
    from medsegkit.interactive import Session

    folder, _ = exports
    image = Image(volume[0], np.diag([1.5, 1.5, 2.0, 1.0]))
    session = Session(folder / "onnx", image, overlap=0.25)
    labels = session.run()
    np.testing.assert_array_equal(labels, medsegkit.segment(folder / "onnx", image, overlap=0.25).array)
    marks = np.zeros(labels.shape, np.int32)
    marks[4:6, 4:6, 4:6] = 2
    with pytest.raises(ValueError, match="cannot be adapted: refine with the PyTorch checkpoint"):
        session.refine(marks, seconds=1)
    np.testing.assert_array_equal(session.labels, labels)  # the result is kept


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_predict_backend_equals_torch(exports, unet3d, volume, backend):
    folder, _ = exports
    reference = medsegkit.predict(unet3d, volume, roi_size=ROI3, overlap=0.25)
    on_the_fly = medsegkit.predict(unet3d, volume, roi_size=ROI3, overlap=0.25, backend=backend, sw_batch_size=3)
    from_export = medsegkit.predict(folder / "onnx", volume, overlap=0.25, backend=backend)
    np.testing.assert_array_equal(on_the_fly, reference)
    np.testing.assert_array_equal(from_export, reference)
    logits = medsegkit.predict(folder / "onnx", volume, overlap=0.25, backend=backend, output="logits")
    torch_logits = medsegkit.predict(unet3d, volume, roi_size=ROI3, overlap=0.25, output="logits")
    assert float(np.abs(logits - torch_logits).max()) <= 1e-4


def test_backend_progress_cancel_and_zarr_output(exports, unet3d, volume, tmp_path):
    folder, _ = exports
    calls: list[tuple[int, int]] = []
    stored = medsegkit.predict(folder / "onnx", volume, overlap=0.25, out=tmp_path / "labels.zarr",
                               progress=lambda done, total: calls.append((done, total)))
    reference = medsegkit.predict(unet3d, volume, roi_size=ROI3, overlap=0.25)
    np.testing.assert_array_equal(stored[...], reference)
    total = calls[-1][1]
    assert calls == [(i, total) for i in range(1, total + 1)] and total > 1

    cancel = threading.Event()

    def stop_after_first(done: int, total: int) -> None:
        cancel.set()

    with pytest.raises(Cancelled, match="after 1 of"):
        medsegkit.predict(folder / "openvino", volume, overlap=0.25, out=tmp_path / "cancelled.zarr",
                          progress=stop_after_first, cancel=cancel)
    assert not (tmp_path / "cancelled.zarr").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["labels.zarr"]  # no partial store left


def test_unet2d_and_fcn_export_and_round_trip(tmp_path):
    torch.manual_seed(0)
    unet2d = create_model("UNet2d", out_channels=2, channels=(4, 8), strides=(2,)).eval()
    fcn = create_model("fcn_resnet_50", depth=18, out_channels=3).eval()
    rng = np.random.default_rng(1)
    for name, model, fmt, image in [("unet2d", unet2d, "openvino", rng.random((1, 40, 36), dtype=np.float32)),
                                    ("fcn", fcn, "onnx", rng.random((3, 40, 36), dtype=np.float32))]:
        out = export(model, tmp_path / name, format=fmt, roi_size=(32, 32), log=None)
        reference = medsegkit.predict(model, image, roi_size=(32, 32))
        np.testing.assert_array_equal(medsegkit.predict(out, image), reference)


@pytest.mark.slow  # 10-40 s each: the query models' torch.export (CI runs the slow tests too)
@pytest.mark.parametrize("name, fmt", [("maskformer_resnet_18", "onnx"),
                                       ("maskformer_resnet_18", "exported-program"), ("mask2former_resnet_18", "openvino")])
def test_maskformer_and_mask2former_semantic_export(tmp_path, name, fmt):
    """Query models export their semantic scores (SemanticAdapter); ONNX goes through torch.export's program
    (torch.onnx's own export of the module failed in its decomposition step with an IndexError); Mask2Former's
    OpenVINO IR comes from the program too (OpenVINO's ONNX frontend refuses its boolean ReduceSum / Slice)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, num_queries=8).eval()
    out = export(model, tmp_path / "mf", format=fmt, roi_size=(64, 64), log=None)
    image = np.random.default_rng(2).random((3, 70, 64), dtype=np.float32)
    reference = medsegkit.predict(model, image, roi_size=(64, 64), task="semantic")
    np.testing.assert_array_equal(medsegkit.predict(out, image), reference)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda text, side: "{oops", "is not valid JSON"),
    (lambda text, side: "[1]", "holds a JSON array, expected an object; export the model again"),
    (lambda text, side: json.dumps({k: v for k, v in side.items() if k != "roi_size"}), "roi_size is missing \\(3 positive"),
    (lambda text, side: json.dumps({**side, "roi_size": [16, 16]}), "roi_size = \\[16, 16\\] is not 3 positive integers"),
    (lambda text, side: json.dumps({**side, "in_channels": "x"}), "in_channels = 'x' is not a positive integer"),
    (lambda text, side: json.dumps({**side, "batch_size": 0}), "batch_size = 0 is not a positive integer"),
    (lambda text, side: json.dumps({**side, "spatial_dims": True}), "spatial_dims = True is not 2 or 3"),
    (lambda text, side: json.dumps({**side, "metadata": [1]}), "metadata = \\[1\\] is not an object"),
    # until 2026-12-08 accepted, and segment() put a number or a string of letters into the result's class names
    (lambda text, side: json.dumps({**side, "metadata": {**side["metadata"], "class_names": 5}}),
     "metadata.class_names = 5 is not a list of strings"),
    (lambda text, side: json.dumps({**side, "metadata": {**side["metadata"], "label_colors": "x"}}),
     "metadata.label_colors = 'x' is not a list of RGB\\(A\\) triples"),
])
def test_a_damaged_sidecar_is_one_error_naming_the_file_and_the_entry(exports, tmp_path, edit, match):
    # before: JSONDecodeError, KeyError 'roi_size', "invalid literal for int()" or a list-index TypeError
    import shutil

    copy = tmp_path / "onnx"
    shutil.copytree(exports[0] / "onnx", copy)
    text = (copy / "medsegkit.json").read_text()
    (copy / "medsegkit.json").write_text(edit(text, json.loads(text)))
    with pytest.raises(ValueError, match=match) as raised:
        load_exported(copy)
    assert str(copy / "medsegkit.json") in str(raised.value) and "export the model again" in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("fmt", ["onnx", "exported-program", "torchscript"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "a checkpoint"])
def test_a_damaged_or_foreign_network_file_is_one_error_naming_it(exports, unet3d, tmp_path, fmt, damage):
    # before: torch's RuntimeError "PytorchStreamReader failed reading zip archive ..." (.ts) or zipfile's
    # "BadZipFile: File is not a zip file" (.pt2), naming no file, and ONNX Runtime's own InvalidProtobuf
    import shutil

    copy = Path(shutil.copytree(exports[0] / fmt, tmp_path / fmt))
    network = copy / NETWORK_FILES[fmt]
    if damage == "garbage":
        network.write_bytes(b"garbage" * 10)
    elif damage == "truncated":
        network.write_bytes(network.read_bytes()[: network.stat().st_size // 2])
    else:
        network.unlink()
        medsegkit.save_checkpoint(unet3d, tmp_path / "m.safetensors").rename(network)
    with pytest.raises(ValueError) as raised:
        load_exported(copy)
    message = str(raised.value)
    assert message.startswith(f"{network} is not a readable {fmt} network (") and "\n" not in message, message
    assert message.endswith(f"); an export holds the {NETWORK_FILES[fmt]} that `medsegkit export --format {fmt}` "
                            "writes: export the model again"), message


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 40) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@given(key=st.sampled_from(["spatial_dims", "in_channels", "batch_size", "roi_size", "metadata", "model"]),
       value=_json_values)
def test_fuzzed_sidecars_describe_a_network_or_raise_one_line(key, value):
    import tempfile

    from medsegkit.inference.backends import read_sidecar

    side = {"spatial_dims": 3, "in_channels": 1, "batch_size": 2, "roi_size": [16, 16, 16], "metadata": {},
            "model": {"name": "UNet3d"}, key: value}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "medsegkit.json").write_text(json.dumps(side))
        try:
            read = read_sidecar(Path(folder))
        except ValueError as err:
            assert "\n" not in str(err) and "medsegkit.json" in str(err)
        else:  # everything the network wrapper reads is usable
            network = ExportedNetwork(lambda a: a, read, backend="onnxruntime")
            assert len(network.default_roi_size) == network.spatial_dims and network.batch_size >= 1


def test_errors_mask_rcnn_unsupported_format_existing_out(unet3d, exports, tmp_path):
    with pytest.raises(ValueError, match=r"MaskRCNN is a detection model .*number depends on the image"):
        export(create_model("mask_rcnn_resnet_50_fpn", num_classes=2), tmp_path / "rcnn", format="onnx")
    with pytest.raises(ValueError, match=r"format must be one of onnx, openvino, exported-program, torchscript, "
                                         r"bioimageio, got 'tflite'"):
        export(unet3d, tmp_path / "x", format="tflite")
    folder, _ = exports
    before = (folder / "onnx" / "model.onnx").read_bytes()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export(unet3d, folder / "onnx", format="onnx", roi_size=ROI3)
    assert (folder / "onnx" / "model.onnx").read_bytes() == before
    with pytest.raises(ValueError, match=r"a onnx export runs on onnxruntime or openvino, not backend='torch'"):
        load_exported(folder / "onnx", backend="torch")
    with pytest.raises(ValueError, match=r"takes windows \(N, 1, 16, 16, 16\); got \(1, 1, 8, 8, 8\)"):
        medsegkit.predict(folder / "onnx", np.zeros((8, 8, 8), np.float32), roi_size=(8, 8, 8))
    with pytest.raises(ValueError, match="runs as it was exported: fast=True"):
        medsegkit.predict(folder / "onnx", np.zeros((8, 8, 8), np.float32), fast=True)
    assert not list(tmp_path.iterdir())


def test_a_refused_export_leaves_the_models_modes_as_they_were(tmp_path):
    model = create_model("UNet3d", in_channels=1, out_channels=2, channels=(4, 8), strides=(2,)).train()
    frozen = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)][:1]
    for module in frozen:
        module.eval()
    before = [module.training for module in model.modules()]
    with pytest.raises(ValueError, match=r"roi_size must be 3 positive ints for this 3D model, got \(16, 16\)"):
        export(model, tmp_path / "x", format="onnx", roi_size=(16, 16))
    assert [module.training for module in model.modules()] == before and frozen
    assert not list(tmp_path.iterdir())


def test_mismatch_leaves_nothing_and_overwrite_replaces(unet3d, tmp_path, monkeypatch):
    import medsegkit.exporter as exporter

    original = ExportedNetwork.forward

    def off_by_a_bit(self, batch):
        return original(self, batch) + 1e-3  # beyond the 1e-4 tolerance

    monkeypatch.setattr(ExportedNetwork, "forward", off_by_a_bit)
    with pytest.raises(ExportMismatchError, match=r"logits max \|Δ\| 1.00e-03 .* nothing written"):
        exporter.export(unet3d, tmp_path / "out", format="torchscript", roi_size=ROI3, log=None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ExportedNetwork, "forward", original)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"out exists and is not a medsegkit export \(no medsegkit.json\); "
                                              r"overwrite replaces only an earlier export or an empty folder"):
        exporter.export(unet3d, tmp_path / "out", format="torchscript", roi_size=ROI3, log=None, overwrite=True)
    assert (tmp_path / "out" / "stale.txt").read_text() == "old"
    (tmp_path / "out" / "medsegkit.json").write_text("{}")  # an earlier export (its leftovers go with it)
    exporter.export(unet3d, tmp_path / "out", format="torchscript", roi_size=ROI3, log=None, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "medsegkit.json", "model.ts", "test_input.npy", "test_output.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_never_deletes_the_checkpoint_being_exported(unet3d, tmp_path, capsys):
    """``medsegkit export models/m.safetensors -o models --overwrite`` replaced the folder, deleting the
    checkpoint it exported (and every other file there)."""
    from medsegkit.weights import save_checkpoint

    folder = tmp_path / "models"
    folder.mkdir()
    checkpoint = save_checkpoint(unet3d, folder / "m.safetensors", metadata=unet3d.medsegkit_metadata)
    (folder / "notes.txt").write_text("mine")
    saved = checkpoint.read_bytes()
    assert main(["export", str(checkpoint), "--format", "torchscript", "--roi", "16", "-o", str(folder),
                 "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "models exists and is not a medsegkit export" in err
    (folder / "medsegkit.json").write_text("{}")  # even where the folder looks like an export
    with pytest.raises(ValueError, match=r"models holds the model it exports .*\(overwrite never applies to inputs\)"):
        export(str(checkpoint), folder, format="torchscript", roi_size=ROI3, log=None, overwrite=True)
    assert checkpoint.read_bytes() == saved and (folder / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder made beforehand is fine to fill
    assert export(str(checkpoint), empty, format="torchscript", roi_size=ROI3, log=None, overwrite=True) == empty


def test_cli_export_and_errors(unet3d, tmp_path, capsys):
    from medsegkit.cli.export import FORMATS as CLI_FORMATS
    from medsegkit.exporter import FORMATS as EXPORT_FORMATS
    from medsegkit.weights import save_checkpoint

    assert CLI_FORMATS == EXPORT_FORMATS
    checkpoint = save_checkpoint(unet3d, tmp_path / "tiny.safetensors", metadata=unet3d.medsegkit_metadata)
    assert main(["export", str(checkpoint), "--format", "torchscript", "--roi", "16", "-o", str(tmp_path / "ts")]) == 0
    captured = capsys.readouterr()
    assert "logits max |Δ|" in captured.out and captured.out.strip().endswith(str(tmp_path / "ts"))
    assert main(["export", str(checkpoint), "--format", "torchscript", "-o", str(tmp_path / "ts")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass overwrite=True (--overwrite)" in err
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "onnx", "-o", str(tmp_path / "m")]) == 2
    assert "checkpoint" in capsys.readouterr().err and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_demo_model_onnx_round_trip_through_the_cli(tmp_path):
    """`medsegkit export DEMO --format onnx` → `medsegkit predict EXPORTED` = `medsegkit predict DEMO`."""
    import nibabel as nib

    from medsegkit.data import demo_checkpoint_path, sample_path

    sample = str(sample_path("mni152_t1"))
    assert main(["export", str(demo_checkpoint_path()), "--format", "onnx", "-o", str(tmp_path / "demo")]) == 0
    assert main(["predict", str(demo_checkpoint_path()), sample, "-o", str(tmp_path / "ck.nii.gz"), "--quiet"]) == 0
    assert main(["predict", str(tmp_path / "demo" / "model.onnx"), sample, "-o", str(tmp_path / "ox.nii.gz"),
                 "--quiet"]) == 0
    from_checkpoint = np.asarray(nib.load(tmp_path / "ck.nii.gz").dataobj)
    from_export = np.asarray(nib.load(tmp_path / "ox.nii.gz").dataobj)
    assert set(np.unique(from_checkpoint)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(from_export, from_checkpoint)


def test_openvino_falls_back_to_the_program_and_names_both_causes(unet3d, volume, tmp_path, monkeypatch):
    """Where the ONNX route fails (Mask2Former: OpenVINO's ONNX frontend), the OpenVINO IR is converted from the
    torch.export program; where that fails too, the error names the model and both causes and nothing is left."""
    import openvino as ov

    import medsegkit.exporter as exporter

    def no_onnx(network, target, example, name):
        raise ValueError("ONNX refused (test)")

    monkeypatch.setattr(exporter, "_onnx", no_onnx)
    out = export(unet3d, tmp_path / "ov", format="openvino", roi_size=ROI3, log=None)
    assert json.loads((out / "medsegkit.json").read_text())["verification"]["max_abs_logit_diff"] <= 1e-4
    np.testing.assert_array_equal(medsegkit.predict(out, volume), medsegkit.predict(unet3d, volume, roi_size=ROI3))

    def refuse(*args, **kwargs):
        raise RuntimeError("frontend refused (test)")

    monkeypatch.setattr(ov, "convert_model", refuse)
    with pytest.raises(ValueError, match=r"UNet cannot be written as OpenVINO IR: from ONNX: ONNX refused \(test\); "
                                         r"from its torch.export program: RuntimeError: frontend refused \(test\)"):
        export(unet3d, tmp_path / "ov2", format="openvino", roi_size=ROI3, log=None)
    assert [p.name for p in tmp_path.iterdir()] == ["ov"]
