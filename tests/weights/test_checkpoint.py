from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import medsegkit
from medsegkit.errors import CheckpointError
from medsegkit.weights import load_checkpoint, load_model, read_checkpoint, save_checkpoint
from medsegkit.weights.checkpoint import checkpoint_record


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
    """Until 2026-12-08 save_checkpoint replaced an existing file by default and wrote any name:
    ``save_checkpoint(model, "t1.nii.gz")`` wrote a torch file over the scan."""
    model = medsegkit.create_model(tiny_registered)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="m.safetensors exists; pass overwrite=True to replace it"):
        save_checkpoint(model, path)
    assert path.read_bytes() == before
    save_checkpoint(model, path, overwrite=True)
    scan = tmp_path / "t1.nii.gz"
    scan.write_bytes(b"a scan")
    with pytest.raises(ValueError, match="path .*t1.nii.gz is not a checkpoint name; accepted endings: .safetensors"):
        save_checkpoint(model, scan, overwrite=True)
    assert scan.read_bytes() == b"a scan"


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


def _write_with_record(path, text):
    """A checkpoint at ``path`` (.safetensors or .pt) holding a tiny UNet2d's weights and ``text`` as its record."""
    from safetensors.torch import save_file

    state = medsegkit.create_model("UNet2d", channels=(4, 8), strides=(2,)).state_dict()
    if path.suffix == ".pt":
        torch.save({"state_dict": state, "medsegkit": text}, path)
    else:
        save_file(state, str(path), metadata={"medsegkit": text})
    return path


GOOD_RECORD = {"format": "medsegkit-checkpoint", "version": 1, "metadata": {},
               "model": {"name": "UNet2d", "overrides": {"channels": [4, 8], "strides": [2]}}}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize(("text", "match"), [
    ("{not json", "damaged 'medsegkit' record \\(not JSON"),
    ('{"model": {"name": "UNet2d"', "damaged 'medsegkit' record \\(not JSON"),
    ("[1, 2]", "record is a JSON array, expected an object"),
    ("null", "record is a JSON null, expected an object"),
    (json.dumps({**GOOD_RECORD, "model": 5}), "has model = 5, expected a JSON object"),
    (json.dumps({**GOOD_RECORD, "metadata": ["a"]}), "has metadata = \\['a'\\], expected a JSON object"),
    (json.dumps({**GOOD_RECORD, "model": {"name": 3}}), "has model.name = 3, expected a JSON string"),
    # until 2026-12-08 a null passed the check: AttributeError 'NoneType' object has no attribute 'lower'
    (json.dumps({**GOOD_RECORD, "model": {"name": None}}), "has model.name = None, expected a JSON string"),
    (json.dumps({**GOOD_RECORD, "metadata": None}), "has metadata = None, expected a JSON object"),
    (json.dumps({**GOOD_RECORD, "model": {"name": "UNet2d", "overrides": [4, 8]}}),
     "has model.overrides = \\[4, 8\\], expected a JSON object"),
    # until 2026-12-08 accepted: the names went letter by letter into the result's meta and sidecar
    (json.dumps({**GOOD_RECORD, "metadata": {"class_names": "bg"}}),
     "has metadata.class_names = 'bg' is not a list of strings"),
    (json.dumps({**GOOD_RECORD, "metadata": {"label_colors": [[0, 0, True]]}}),
     "has metadata.label_colors = \\[\\[0, 0, True\\]\\] is not a list of RGB\\(A\\) triples"),
])
def test_a_damaged_record_is_a_checkpoint_error_naming_what_is_wrong(tmp_path, suffix, text, match):
    # before: JSONDecodeError / AttributeError ("'list' object has no attribute 'get'") from inside the loader
    path = _write_with_record(tmp_path / f"m{suffix}", text)
    with pytest.raises(CheckpointError, match=match) as raised:
        load_model(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)
    assert load_model(_write_with_record(tmp_path / f"ok{suffix}", json.dumps(GOOD_RECORD))) is not None


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@given(where=st.sampled_from(["record", "model", "metadata", "model.name", "model.overrides", "model.target",
                              "model.args", "cut"]),
       value=_json_values, cut=st.integers(0, 200))
def test_fuzzed_records_load_or_raise_one_line_error(where, value, cut):
    import copy
    import tempfile
    from pathlib import Path

    record = copy.deepcopy(GOOD_RECORD)
    if where == "record":
        record = value
    elif where == "cut":
        record = None
    elif where.startswith("model."):
        record["model"][where.split(".")[1]] = value
    else:
        record[where] = value
    text = json.dumps(GOOD_RECORD)[:cut] if record is None else json.dumps(record)
    with tempfile.TemporaryDirectory() as folder:
        path = _write_with_record(Path(folder) / "m.safetensors", text)
        try:
            model = load_model(path)
        except (CheckpointError, KeyError, TypeError, ValueError) as err:
            message = err.args[0] if isinstance(err, KeyError) else str(err)
            assert message and "\n" not in message, message
            assert not isinstance(err, json.JSONDecodeError), message
        else:
            assert isinstance(model, torch.nn.Module)


def test_a_record_naming_another_configuration_is_one_line(tmp_path):
    # the record says default UNet2d widths, the weights are (4, 8): torch's error has one line per key
    text = json.dumps({**GOOD_RECORD, "model": {"name": "UNet2d", "overrides": {}}})
    path = _write_with_record(tmp_path / "m.safetensors", text)
    with pytest.raises(CheckpointError, match="weights do not fit the recorded model: Error\\(s\\) in loading "
                                              "state_dict for UNet: (Missing key|Unexpected key|size mismatch)") as raised:
        load_model(path)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 800


@pytest.mark.parametrize("target", ["medsegkit.weights.save_checkpoint", "medsegkit.files.atomic_write",
                                    "medsegkit.nets.no_such_module.UNet", "medsegkit.nets.unet.LAYOUTS"])
def test_a_record_target_that_is_not_a_network_class_is_refused_before_it_is_called(tmp_path, target):
    # before: load_model called any medsegkit function the record named with the record's args: a checkpoint
    # naming save_checkpoint with {"path": victim, "overwrite": true} wrote a checkpoint over the victim file
    victim = tmp_path / "scan.nii.gz"
    victim.write_bytes(b"precious scan")
    record = {"format": "medsegkit-checkpoint", "version": 1, "metadata": {},
              "model": {"target": target, "args": {"model": {}, "path": str(victim), "overwrite": True}}}
    state = medsegkit.create_model("UNet2d", channels=(4, 8), strides=(2,)).state_dict()
    path = save_checkpoint(state, tmp_path / "evil.safetensors", record=record)
    with pytest.raises(CheckpointError) as raised:
        load_model(path)
    assert str(raised.value) == (f"checkpoint {path} names {target!r}, which is not a network class of medsegkit.nets; "
                                 "only its torch.nn.Module classes are rebuilt")
    assert victim.read_bytes() == b"precious scan"


_UNET = {"channels": (4, 8), "strides": (2,)}


@settings(max_examples=30)
@given(poison=st.sampled_from(["nan", "inf", "-inf", "int64", "bool"]), which=st.integers(0, 10 ** 6),
       where=st.integers(0, 10 ** 6), how=st.sampled_from(["load_model", "load_checkpoint", "init_bundle"]))
def test_weights_that_are_not_finite_or_not_floating_point_are_refused(poison, which, where, how):
    # before: all of these loaded silently (load_state_dict casts int / bool and copies NaN), and the model
    # predicted NaN logits (an all-background label map) or the integer-truncated weights
    import tempfile
    from pathlib import Path

    from medsegkit.bundle import init_bundle

    model = medsegkit.create_model("UNet3d", out_channels=4, **_UNET)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    floats = [key for key, value in state.items() if value.is_floating_point()]
    key = floats[which % len(floats)]
    if poison in ("int64", "bool"):
        state[key] = state[key].to(getattr(torch, poison))
        message = (f"{key} holds torch.{poison} values where the model has torch.float32 weights; a checkpoint's "
                   "weights are floating-point tensors")
    else:
        state[key].view(-1)[where % state[key].numel()] = float(poison)
        message = (f"{key} holds 1 NaN or infinite value(s) of {state[key].numel()}; weights must be finite "
                   "(was the training diverging when it was saved?)")
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(state, Path(folder) / "m.safetensors",
                               record=checkpoint_record(model))
        with pytest.raises(CheckpointError) as raised:
            if how == "load_model":
                load_model(path)
            elif how == "load_checkpoint":
                load_checkpoint(medsegkit.create_model("UNet3d", out_channels=4, **_UNET), path)
            else:
                init_bundle("UNet3d", Path(folder) / "bundle", checkpoint=path)
        assert str(raised.value) == f"checkpoint {path}: {message}"
        assert not (Path(folder) / "bundle").exists()
