"""MONAI bundles written by medsegkit run with MONAI's own tools, unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from medsegkit.bundle import check_metadata, init_bundle, run_bundle, verify_bundle
from medsegkit.cli import main

TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}
SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "mni152_t1_2mm.nii.gz"


def monai_bundle(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return init_bundle("UNet3d", tmp_path_factory.mktemp("b") / "unet_bundle", overrides=TINY, roi_size=(32, 32, 32))


def test_layout_and_metadata(bundle):
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
                "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "LICENSE"):
        assert (bundle / rel).is_file(), rel
    assert (bundle / "models").is_dir()
    metadata = json.loads((bundle / "configs/metadata.json").read_text())
    assert check_metadata(metadata) == []
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    network_def = json.loads((bundle / "configs/inference.json").read_text())["network_def"]
    assert network_def["_target_"] == "medsegkit.nets.UNet"
    assert network_def["spatial_dims"] == 3 and network_def["out_channels"] == 4
    assert network_def["channels"] == [4, 8, 16] and network_def["norm"] == "batch"


def test_check_metadata_names_missing_fields():
    problems = check_metadata({"version": "1", "changelog": {}})
    assert "missing field 'monai_version'" in problems
    assert "changelog has no entry for version '1'" in problems
    assert "network_data_format.inputs.image is missing" in problems


def test_verify_bundle_and_cli(bundle, capsys):
    report = verify_bundle(bundle)
    assert report["verify_net_in_out"] == "ok"
    assert report["configs"] == ["inference.json", "train.json", "evaluate.json"]
    assert main(["bundle", "verify", str(bundle)]) == 0
    assert "verify_net_in_out ok" in capsys.readouterr().out


def test_verify_reports_broken_bundle(bundle, tmp_path, capsys):
    import shutil

    broken = Path(shutil.copytree(bundle, tmp_path / "broken"))
    metadata = json.loads((broken / "configs/metadata.json").read_text())
    del metadata["authors"]
    metadata["network_data_format"]["outputs"]["pred"]["num_channels"] = 7
    (broken / "configs/metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError) as err:
        verify_bundle(broken)
    assert "missing field 'authors'" in str(err.value) and "verify_net_in_out failed" in str(err.value)
    assert main(["bundle", "verify", str(broken)]) == 2
    assert "problem(s)" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "match"), [("{", "is not valid JSON"), ("[]", "holds a JSON array")])
def test_a_bundle_whose_metadata_is_not_a_json_object_is_named(bundle, tmp_path, text, match):
    import shutil

    broken = Path(shutil.copytree(bundle, tmp_path / "broken"))
    (broken / "configs/metadata.json").write_text(text)
    with pytest.raises(ValueError, match=f"bundle metadata {broken / 'configs/metadata.json'} {match}"):
        verify_bundle(broken)


def test_init_refuses_bad_task_and_existing_dirs(bundle, tmp_path):
    with pytest.raises(ValueError, match="task must be 'instance'"):
        init_bundle("mask_rcnn_resnet_50_fpn", tmp_path / "x", task="semantic")
    with pytest.raises(FileExistsError, match="--overwrite"):
        init_bundle("UNet3d", bundle, overrides=TINY)


def test_monai_verify_net_in_out_cli(bundle):
    monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                 "--config_file", "configs/inference.json", "--device", "cpu", cwd=bundle)


@pytest.mark.slow
def test_monai_train_evaluate_inference_export(bundle):
    """MONAI's `run` trains on the sample (1 epoch), evaluates, infers, then `ckpt_export` scripts it."""
    monai_bundle("run", "--config_file", "configs/train.json", "--max_epochs", "1", cwd=bundle)
    assert (bundle / "models/model.pt").is_file()
    monai_bundle("run", "--config_file", "['configs/train.json','configs/evaluate.json']", cwd=bundle)
    monai_bundle("run", "--config_file", "configs/inference.json", cwd=bundle)
    (seg,) = (bundle / "eval").glob("*_seg.nii.gz")
    import nibabel as nib

    out, image = nib.load(seg), nib.load(SAMPLE)
    assert out.shape[:3] == image.shape
    np.testing.assert_allclose(out.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 3}
    monai_bundle("ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
                 "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", cwd=bundle)
    scripted = torch.jit.load(str(bundle / "models/model.ts"))
    from medsegkit.bundle import bundle_network

    net = bundle_network(bundle).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_medsegkit_bundle_run(bundle, tmp_path, capsys):
    weights = bundle / "models" / "model.pt"
    if not weights.exists():
        from medsegkit.bundle import bundle_network

        torch.save(bundle_network(bundle, load_weights=False).state_dict(), weights)
    out_dir = tmp_path / "out"
    (written,) = run_bundle(bundle, [SAMPLE], out_dir)
    assert written.name == "mni152_t1_2mm_seg.nii.gz" and written.is_file()
    with pytest.raises(FileExistsError):
        run_bundle(bundle, [SAMPLE], out_dir)
    assert main(["bundle", "run", str(bundle), str(SAMPLE), "-o", str(out_dir)]) == 2
    assert "exists" in capsys.readouterr().err


def test_model_zoo_bundle_runs_with_our_unet_by_changing_target(tmp_path):
    """A bundle written for MONAI's UNet keeps its checkpoint when only `_target_` changes."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import UNet as MonaiUNet

    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [8, 16, 32], "strides": [2, 2],
            "num_res_units": 2, "norm": "batch"}
    torch.manual_seed(0)
    monai_net = MonaiUNet(**args).eval()
    ckpt = tmp_path / "model.pt"
    torch.save(monai_net.state_dict(), ckpt)
    config = {"network_def": {"_target_": "UNet", **args},
              "handler": {"_target_": "CheckpointLoader", "load_path": str(ckpt), "load_dict": {"model": "@net"},
                          "strict": True},
              "net": "$@network_def"}
    x = torch.randn(1, 1, 32, 32, 32)
    outputs = []
    for target in ("UNet", "medsegkit.nets.UNet"):
        config["network_def"]["_target_"] = target
        parser = ConfigParser(config)
        net = parser.get_parsed_content("net")
        net.load_state_dict(torch.load(ckpt, weights_only=True), strict=True)
        with torch.no_grad():
            outputs.append(net.eval()(x))
    assert type(net).__module__ == "medsegkit.nets.unet"
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_multi_gpu_train_config_under_torchrun_on_cpu(tmp_path):
    """MONAI's multi-GPU convention, 2 CPU ranks (gloo): both finish, rank 0 writes the checkpoint."""
    bundle_dir = init_bundle("UNet3d", tmp_path / "ddp_bundle", overrides=TINY, roi_size=(32, 32, 32))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
           "--max_epochs", "1"]
    result = subprocess.run(cmd, cwd=bundle_dir, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (bundle_dir / "models" / "model.pt").is_file()
    assert result.stderr.count("Epoch[1] Complete") + result.stdout.count("Epoch[1] Complete") >= 2


def test_strong_augmentation_bundle_options_parse(tmp_path):
    """The generalisation recipe's options (strong augmentation, crop, label clean-up) give valid configs."""
    bundle_dir = init_bundle("UNet3d", tmp_path / "strong", overrides=TINY, roi_size=(32, 32, 32), out_channels=2,
                             preprocessing="mr_robust", augmentation="strong", crop_foreground=True,
                             postprocessing=("largest_component", "fill_holes"))
    train = json.loads((bundle_dir / "configs/train.json").read_text())
    names = [t["_target_"] for t in train["train"]["random_transforms"]]
    assert "RandAffined" in names and "RandBiasFieldd" in names
    assert verify_bundle(bundle_dir)["configs"] == ["inference.json", "train.json", "evaluate.json"]
    with pytest.raises(ValueError, match="augmentation must be one of"):
        init_bundle("UNet3d", tmp_path / "bad", augmentation="heavy")
    with pytest.raises(ValueError, match="postprocessing steps must be among"):
        init_bundle("UNet3d", tmp_path / "bad2", postprocessing=("erode",))


@pytest.mark.slow
def test_instance_model_gets_label_map_bundle(tmp_path):
    """Mask R-CNN: inference-only bundle; MONAI's verify passes and a run writes an instance label map."""
    import nibabel as nib

    bundle_dir = init_bundle("mask_rcnn_resnet_50_fpn", tmp_path / "maskrcnn",
                             overrides={"min_size": 64, "max_size": 64})
    assert not (bundle_dir / "configs/train.json").exists()
    network_def = json.loads((bundle_dir / "configs/inference.json").read_text())["network_def"]
    assert network_def["_target_"] == "medsegkit.bundle.components.LabelMapNetwork"
    assert network_def["task"] == "instance"
    report = verify_bundle(bundle_dir)
    assert report["verify_net_in_out"] == "ok" and report["configs"] == ["inference.json"]
    volume = np.zeros((48, 48, 2), np.float32)
    volume[10:20, 10:20] = 100.0
    image = tmp_path / "cells.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.5, 0.5, 2.0, 1.0])), image)
    (written,) = run_bundle(bundle_dir, [image], tmp_path / "out")
    result = nib.load(written)
    assert result.shape[:3] == volume.shape
    np.testing.assert_allclose(result.affine, np.diag([0.5, 0.5, 2.0, 1.0]), atol=1e-5)
    labels = np.asarray(result.dataobj)
    assert labels.dtype == np.int32 and labels.min() >= 0


def test_universal_model_task_choice(tmp_path):
    with pytest.raises(ValueError, match="universal models accept"):
        init_bundle("UNet3d", tmp_path / "u", task="panoptic")
    # a 2D query model's panoptic / instance output exists for 2D images only, not slice by slice on volumes
    with pytest.raises(ValueError, match=r"maskformer_resnet_18 is a 2D query model: .* bundle it with "
                                         r"task='semantic', or use maskformer_resnet_18_3d"):
        init_bundle("maskformer_resnet_18", tmp_path / "mf2d", task="panoptic", overrides={"num_queries": 5})
    assert not (tmp_path / "mf2d").exists()
    bundle_dir = init_bundle("maskformer_resnet_18_3d", tmp_path / "mf", task="panoptic",
                             overrides={"num_queries": 5})
    network_def = json.loads((bundle_dir / "configs/inference.json").read_text())["network_def"]
    # the plain model inside LabelMapNetwork (a SemanticAdapter there was refused when the bundle was built)
    assert network_def["task"] == "panoptic" and network_def["model"]["_target_"].startswith("medsegkit.")
    assert "SemanticAdapter" not in json.dumps(network_def)
    from medsegkit.bundle import bundle_network

    assert type(bundle_network(bundle_dir).model).__name__ == "MaskFormer"


def test_label_map_network_runs_in_eval_mode_and_leaves_the_modes_as_they_were():
    """predict runs the wrapped model in eval mode and gives every module its mode back; the network used to
    call ``model.eval()`` for good, so a wrapper in training mode came back with an eval-mode model."""
    from medsegkit import create_model
    from medsegkit.bundle.components import LabelMapNetwork

    torch.manual_seed(0)
    model = create_model("maskformer_resnet_18_3d", num_classes=2, num_queries=4, hidden_dim=16, num_heads=2,
                         decoder_layers=1, ffn_dim=32, fpn_dim=32, mask_dim=32)
    network = LabelMapNetwork(model, task="panoptic", roi_size=(64, 32, 32))
    x = torch.rand(1, 1, 64, 32, 32)  # the stride-32 map needs two voxels for the FPN's GroupNorm
    network.train()
    model.backbone.eval()  # a frozen part inside a training model keeps its own mode too
    modes = {name: m.training for name, m in network.named_modules()}
    trained = network(x)
    assert {name: m.training for name, m in network.named_modules()} == modes
    network.eval()
    evaluated = network(x)
    assert trained.shape == (1, 1, 64, 32, 32) and torch.equal(trained, evaluated)
    assert not any(m.training for m in network.modules())


def test_label_map_bundle_loads_its_checkpoint_and_runs(tmp_path):
    """The checkpoint of an instance model goes into models/model.pt under LabelMapNetwork's ``model.`` keys,
    so the bundle's strict CheckpointLoader loads it (before, the run failed on the missing ``model.`` keys)."""
    import nibabel as nib

    from medsegkit import create_model
    from medsegkit.weights import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(create_model("mask_rcnn_resnet_50_fpn", num_classes=2), tmp_path / "rcnn.safetensors")
    bundle_dir = init_bundle("mask_rcnn_resnet_50_fpn", tmp_path / "rcnn", checkpoint=tmp_path / "rcnn.safetensors",
                             out_channels=2)
    state = torch.load(bundle_dir / "models/model.pt", weights_only=True)
    assert all(key.startswith("model.") for key in state)
    volume = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32) * 100
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "vol.nii.gz")
    (written,) = run_bundle(bundle_dir, [tmp_path / "vol.nii.gz"], tmp_path / "out")
    assert nib.load(written).shape == (64, 64, 3)
    with pytest.raises(ValueError, match=r"do not fit the bundle's network \(medsegkit.bundle.components.LabelMapNetwork\)"):
        init_bundle("mask_rcnn_resnet_50_fpn", tmp_path / "bad", checkpoint=tmp_path / "rcnn.safetensors",
                    out_channels=3)


def test_bundle_from_a_checkpoint_runs_its_recipe_and_equals_segment(tmp_path):
    """A bundle written for the shipped demo checkpoint takes its architecture, recorded preprocessing
    (RAS, 2 mm, head crop, percentile intensity), window and class names from the checkpoint: its MONAI
    inference gives exactly ``segment``'s labels of that checkpoint."""
    from medsegkit import segment
    from medsegkit.data import demo_checkpoint_path, sample_path
    from medsegkit.io import read_image
    from medsegkit.weights import load_model

    checkpoint = demo_checkpoint_path()
    recorded = load_model(checkpoint).medsegkit_metadata
    bundle_dir = init_bundle("UNet3d", tmp_path / "demo_bundle", checkpoint=checkpoint)
    inference = json.loads((bundle_dir / "configs" / "inference.json").read_text())
    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    assert inference["network_def"]["channels"] == [16, 32, 64, 128] and inference["network_def"]["layout"] == "classic"
    assert inference["inferer"]["roi_size"] == recorded["roi_size"] == [64, 64, 48]
    assert [t["_target_"] for t in inference["preprocessing"]["transforms"]][2:6] == [
        "Orientationd", "Spacingd", "CropForegroundd", "ScaleIntensityRangePercentilesd"]
    assert metadata["medsegkit"]["preprocessing"] == recorded["preprocessing"]
    assert list(metadata["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == recorded["class_names"]
    written = run_bundle(bundle_dir, [sample_path("mni152_t1")], tmp_path / "out")
    bundle_labels = np.asarray(read_image(written[0]).array)
    np.testing.assert_array_equal(bundle_labels, np.asarray(segment(checkpoint, sample_path("mni152_t1")).array))


def test_bundle_refuses_a_checkpoint_of_another_model_or_architecture(tmp_path):
    from medsegkit.data import demo_checkpoint_path

    checkpoint = demo_checkpoint_path()
    with pytest.raises(ValueError, match=r"holds a UNet3d model, not UNet2d; write the bundle for UNet3d"):
        init_bundle("UNet2d", tmp_path / "a", checkpoint=checkpoint)
    with pytest.raises(ValueError, match=r"do not fit the bundle's network \(medsegkit.nets.UNet\): .*size mismatch"
                                         r".*pass the constructor arguments the checkpoint was trained with"):
        init_bundle("UNet3d", tmp_path / "b", checkpoint=checkpoint, overrides={"channels": [8, 16, 32, 64]})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_train_config_runs_the_engines_iteration_and_keeps_the_train_metric(bundle):
    """train.json's trainer iterates with medsegkit.train's TrainStep (the objective and step of `medsegkit
    train`), and its logits still feed the bundle's train Dice."""
    from monai.bundle import ConfigParser

    from medsegkit.train.objectives import SemanticObjective
    from medsegkit.train.step import TrainStep

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/train.json"))
    parser["bundle_root"] = str(bundle)
    parser["max_epochs"] = 1
    parser["validate#handlers"] = []  # no checkpoint written into the shared fixture bundle
    step, trainer = parser.get_parsed_content("train#step"), parser.get_parsed_content("train#trainer")
    assert isinstance(step, TrainStep) and isinstance(step.objective, SemanticObjective) and step.outputs
    assert trainer._process_function is step
    trainer.run()
    assert trainer.state.iteration == 1
    assert 0.0 <= trainer.state.metrics["train_dice"] <= 1.0
    # decollated per patch and post-processed as MONAI's own iteration would be: one-hot argmax of the logits
    first = trainer.state.output[0]
    assert len(trainer.state.output) == 2 and np.isfinite(first["loss"])  # 2 patches per volume visit
    assert first["pred"].shape[0] == 4 and torch.all(first["pred"].sum(0) == 1)
    assert first["label"].shape == first["pred"].shape


def test_run_refuses_two_images_with_one_result_name_and_a_result_over_an_input(tmp_path, capsys):
    """Refused before the bundle runs: two images named alike in different folders (the second result
    replaced the first, and the same path was returned twice), and a result that is one of the inputs
    (``--overwrite`` replaced the input ``case_seg.nii.gz`` with the result of ``case.nii.gz``, then
    segmented that result)."""
    import nibabel as nib

    bundle_dir = init_bundle("UNet3d", tmp_path / "b", overrides={"channels": [4, 8], "strides": [2]})
    for folder, seed in (("x", 0), ("y", 1)):
        (tmp_path / folder).mkdir()
        volume = np.random.default_rng(seed).random((16, 16, 16)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / folder / "case.nii.gz")
    with pytest.raises(ValueError, match=r"x/case.nii.gz and .*y/case.nii.gz would both be written to .*case_seg.nii.gz"):
        run_bundle(bundle_dir, [tmp_path / "x/case.nii.gz", tmp_path / "y/case.nii.gz"], tmp_path / "out")
    assert not (tmp_path / "out").exists()

    scan = tmp_path / "x" / "case_seg.nii.gz"  # a scan that happens to be named like a result
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), scan)
    before = scan.read_bytes()
    with pytest.raises(ValueError, match=r"the result of .*x/case.nii.gz would replace the input .*case_seg.nii.gz"):
        run_bundle(bundle_dir, [tmp_path / "x/case.nii.gz", scan], tmp_path / "x", overwrite=True)
    code = main(["bundle", "run", str(bundle_dir), str(tmp_path / "x/case.nii.gz"), str(scan), "-o",
                 str(tmp_path / "x"), "--overwrite"])
    assert code == 2 and "would replace the input" in capsys.readouterr().err
    assert scan.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["case.nii.gz", "case_seg.nii.gz"]


TINY_UNET = {"channels": [4, 8], "strides": [2]}


def test_overwrite_replaces_only_an_earlier_bundle_and_never_the_checkpoint_it_bundles(tmp_path):
    """Before: ``overwrite=True`` wrote LICENSE, docs/README.md and configs/ into any folder (a folder of the
    user's own files included), and re-saved a checkpoint given as the bundle's own models/model.pt as a plain
    state dict, dropping its record and metadata."""
    import medsegkit
    from medsegkit.weights import read_checkpoint, save_checkpoint

    data = tmp_path / "data"
    (data / "docs").mkdir(parents=True)
    (data / "LICENSE").write_text("my license")
    (data / "docs" / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError) as raised:
        init_bundle("UNet3d", data, overrides=TINY_UNET, overwrite=True)
    assert str(raised.value) == (f"{data} is not empty and is not a MONAI bundle (no configs/metadata.json); "
                                 "--overwrite replaces only an earlier bundle's files: choose another folder")
    assert (data / "LICENSE").read_text() == "my license" and (data / "docs" / "README.md").read_text() == "my notes"

    bundle_dir = init_bundle("UNet3d", tmp_path / "b", overrides=TINY_UNET, roi_size=(16, 16, 16))
    model = medsegkit.create_model("UNet3d", out_channels=4, **TINY_UNET)
    checkpoint = save_checkpoint(model, bundle_dir / "models" / "model.pt", metadata={"class_names": list("abcd")})
    before = checkpoint.read_bytes()
    with pytest.raises(ValueError) as raised:
        init_bundle("UNet3d", bundle_dir, checkpoint=checkpoint, overwrite=True)
    assert str(raised.value) == (f"bundle {bundle_dir} holds the checkpoint it bundles ({checkpoint}) as "
                                 "models/model.pt; choose another folder (overwrite never applies to inputs)")
    assert checkpoint.read_bytes() == before and read_checkpoint(checkpoint)[1]["metadata"]["class_names"] == list("abcd")


def test_a_failure_while_writing_leaves_no_half_bundle(tmp_path, monkeypatch):
    """Before: the configs were written one by one into the bundle folder, so a failure while saving
    models/model.pt left a bundle of configs without its weights (and an earlier bundle half replaced)."""
    import medsegkit
    from medsegkit.weights import save_checkpoint

    model = medsegkit.create_model("UNet3d", out_channels=4, **TINY_UNET)
    checkpoint = save_checkpoint(model, tmp_path / "m.safetensors")
    earlier = init_bundle("UNet3d", tmp_path / "earlier", overrides=TINY_UNET, roi_size=(16, 16, 16))
    earlier_files = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    for target, overwrite in ((tmp_path / "new", False), (earlier, True)):
        with pytest.raises(OSError, match="No space left on device"):
            init_bundle("UNet3d", target, checkpoint=checkpoint, overwrite=overwrite, roi_size=(24, 24, 24))
    assert not (tmp_path / "new").exists()
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == earlier_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "m.safetensors"]  # no temporary folder left


class _Payload:  # a class whose pickle would run code on load
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bundle_network_names_unreadable_unsafe_or_misfitting_weights_and_broken_configs(tmp_path):
    """Before: torch's own errors: a 6-line UnpicklingError for a garbage or pickled-code model.pt, an 8-line
    RuntimeError key list for weights of another architecture, and a bare JSONDecodeError (no file named) for
    a damaged inference.json."""
    import medsegkit
    from medsegkit.bundle import bundle_network
    from medsegkit.errors import CheckpointError

    bundle_dir = init_bundle("UNet3d", tmp_path / "b", overrides=TINY_UNET, roi_size=(16, 16, 16))
    weights = bundle_dir / "models" / "model.pt"
    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"^checkpoint {weights} is not a readable PyTorch or safetensors file"):
        bundle_network(bundle_dir)
    torch.save({"model": _Payload()}, weights)
    with pytest.raises(CheckpointError, match=f"^checkpoint {weights} contains pickled Python objects, which "
                                              "medsegkit refuses to load"):
        bundle_network(bundle_dir)
    other = medsegkit.create_model("UNet3d", out_channels=4, channels=(4, 16), strides=(2,))
    torch.save({"model": other.state_dict()}, weights)
    with pytest.raises(CheckpointError) as raised:
        bundle_network(bundle_dir)
    assert str(raised.value).startswith(f"bundle weights {weights} do not fit the bundle's network_def: Error(s) in "
                                        "loading state_dict for UNet: size mismatch for bottleneck.units.0.conv.weight")
    assert "\n" not in str(raised.value)
    config = bundle_dir / "configs" / "inference.json"
    config.write_text("{not json")
    with pytest.raises(ValueError, match=f"^bundle config {config} is not valid JSON \\(Expecting property name "
                                         "enclosed in double quotes: line 1 column 2 \\(char 1\\)\\); fix it or write "
                                         "the bundle again$"):
        bundle_network(bundle_dir, load_weights=False)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@given(where=st.sampled_from(["network_data_format", "network_data_format.inputs", "network_data_format.inputs.image",
                              "network_data_format.outputs", "changelog", "version", "medsegkit"]),
       value=_json_values)
def test_check_metadata_reports_fuzzed_entries_instead_of_raising(where, value):
    """Before: AttributeError ("'int' object has no attribute 'get'") for a network_data_format, inputs,
    changelog or medsegkit entry that is not an object."""
    from medsegkit.bundle.writer import _metadata
    from medsegkit.registry import model_info

    metadata = _metadata("UNet3d", model_info("UNet3d", **TINY_UNET), 1, 4, [16, 16, 16], list("abcd"), {"preset": "mr"})
    assert check_metadata(metadata) == []
    *parents, last = where.split(".")
    holder = metadata
    for key in parents:
        holder = holder[key]
    holder[last] = value
    problems = check_metadata(metadata)
    assert all(isinstance(p, str) and "\n" not in p for p in problems)
    if where != "version" and not isinstance(value, dict):
        assert problems, (where, value)


@pytest.mark.parametrize(("config", "text", "problem"), [
    ("inference.json", "{not json", "is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                                    "column 2 (char 1))"),
    ("inference.json", "[1, 2]", "holds a JSON array, expected an object"),
    ("metadata.json", '"text"', "holds a JSON string, expected an object"),
])
def test_run_names_a_damaged_config_before_anything_runs(tmp_path, config, text, problem):
    """Before: MONAI's bare JSONDecodeError / AttributeError ("'list' object has no attribute 'items'"),
    naming no file, from inside monai.bundle.run."""
    bundle_dir = init_bundle("UNet3d", tmp_path / "b", overrides=TINY_UNET, roi_size=(16, 16, 16))
    path = bundle_dir / "configs" / config
    path.write_text(text)
    with pytest.raises(ValueError) as raised:
        run_bundle(bundle_dir, [SAMPLE], tmp_path / "out")
    assert str(raised.value) == f"bundle config {path.resolve()} {problem}; fix it or write the bundle again"
    assert not (tmp_path / "out").exists()
