from __future__ import annotations

import json
import os

import pytest
import torch

import medsegkit
from medsegkit.errors import CheckpointError
from medsegkit.weights import load_checkpoint, load_model, read_checkpoint, save_checkpoint


class Payload:  # a class whose pickle would run code on load
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_rebuilds_from_file_alone(tmp_path, tiny_registered, suffix):
    model = medsegkit.create_model(tiny_registered, out_channels=3)
    meta = {"class_names": ["bg", "a", "b"], "preprocessing": {"orientation": "RAS", "spacing": [2, 2, 2]}}
    path = save_checkpoint(model, tmp_path / f"tiny{suffix}", metadata=meta)
    assert path.exists() and not list(tmp_path.glob("*.part"))
    rebuilt = load_model(path)
    assert not rebuilt.training
    assert rebuilt.medsegkit_metadata == meta
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
    state, record = read_checkpoint(path)
    assert record["model"] == {"name": tiny_registered, "overrides": {"out_channels": 3}}


def test_refuses_existing_output_unless_overwrite(tmp_path, tiny_registered):
    model = medsegkit.create_model(tiny_registered)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(model, path, overwrite=False)
    assert path.read_bytes() == before


def test_pickled_code_is_refused(tmp_path, tiny_registered):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    model = medsegkit.create_model(tiny_registered)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(model, path)


def test_other_architecture_is_named(tmp_path, tiny_registered):
    small = medsegkit.create_model(tiny_registered, width=2)
    path = save_checkpoint(small, tmp_path / "small.pt")
    big = medsegkit.create_model(tiny_registered, width=8)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(big, path)


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"not a checkpoint at all", "not a readable")])
def test_corrupt_files(tmp_path, tiny_registered, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(medsegkit.create_model(tiny_registered), path)


def test_missing_file_and_directory(tmp_path, tiny_registered):
    model = medsegkit.create_model(tiny_registered)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(model, tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(model, tmp_path)


def test_foreign_plain_state_dict_loads(tmp_path, tiny_registered):
    model = medsegkit.create_model(tiny_registered)
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    other = medsegkit.create_model(tiny_registered)
    load_checkpoint(other, path)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="does not record which model"):
        load_model(path)


def test_metadata_must_be_json(tmp_path, tiny_registered):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(medsegkit.create_model(tiny_registered), tmp_path / "m.pt", metadata={"x": object()})
    assert not list(tmp_path.iterdir())


def test_safetensors_header_holds_record(tmp_path, tiny_registered):
    from safetensors import safe_open

    path = save_checkpoint(medsegkit.create_model(tiny_registered), tmp_path / "m.safetensors", metadata={"a": 1})
    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()["medsegkit"])
    assert record["format"] == "medsegkit-checkpoint" and record["metadata"] == {"a": 1}


@pytest.mark.parametrize("record_kind", ["name", "target"])
def test_attention_unet_saved_before_merge_kernel_size_still_loads(tmp_path, record_kind):
    """Checkpoints written before ``merge_kernel_size`` existed merged skips with ``kernel_size`` (5 here):
    their records lack the argument, and load_model rebuilds that layout from the weights' shapes."""
    from medsegkit.weights.checkpoint import checkpoint_record

    arguments = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=(3, 4, 5), strides=(1, 2),
                     kernel_size=5, up_kernel_size=5)
    if record_kind == "name":
        old_layout = medsegkit.create_model("AttentionUNet2d", **arguments, merge_kernel_size=5)
        record = {"format": "medsegkit-checkpoint", "version": 1, "metadata": {},
                  "model": {"name": "AttentionUNet2d", "overrides": arguments}}
    else:
        old_layout = medsegkit.nets.AttentionUNet(**arguments, merge_kernel_size=5)
        record = checkpoint_record(old_layout)
        del record["model"]["args"]["merge_kernel_size"]
    path = save_checkpoint(old_layout.state_dict(), tmp_path / "old.safetensors", record=record)
    loaded = load_model(path)
    assert loaded.init_args["merge_kernel_size"] == 5
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(loaded(x), old_layout.eval()(x), rtol=0, atol=0)
    # a checkpoint of the current layout (merge kernel 3, MONAI's) loads as it is
    current = medsegkit.nets.AttentionUNet(**arguments)
    path = save_checkpoint(current, tmp_path / "new.safetensors")
    assert load_model(path).init_args["merge_kernel_size"] is None
