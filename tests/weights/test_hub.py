"""Download cache: loopback HTTP server (no internet), hash checks, cache reuse."""

from __future__ import annotations

import hashlib

import pytest
import torch

import medsegkit
from medsegkit import registry
from medsegkit.errors import CheckpointError
from medsegkit.registry import WeightsSpec
from medsegkit.weights import hub, save_checkpoint


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEGKIT_HOME", str(tmp_path / "home"))


def test_download_checks_full_hash_and_caches(served):
    root, base, log = served
    (root / "w.bin").write_bytes(b"weights" * 100)
    digest = hashlib.sha256(b"weights" * 100).hexdigest()
    path = hub.download(f"{base}/w.bin", sha256=digest, progress=False)
    assert path.read_bytes() == b"weights" * 100
    assert path.parent == hub.cache_dir()
    hub.download(f"{base}/w.bin", sha256=digest, progress=False)
    assert log.count("/w.bin") == 1  # second call served from the cache


def test_hash_mismatch_discards_file(served):
    root, base, _ = served
    (root / "w.bin").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="expected"):
        hub.download(f"{base}/w.bin", sha256="0" * 64, progress=False)
    assert not list(hub.cache_dir().glob("*"))


def test_torchvision_style_prefix_in_file_name(served):
    root, base, _ = served
    data = b"tv weights"
    prefix = hashlib.sha256(data).hexdigest()[:8]
    (root / f"net-{prefix}.pth").write_bytes(data)
    assert hub.hash_prefix_from_filename(f"{base}/net-{prefix}.pth") == prefix
    assert hub.download(f"{base}/net-{prefix}.pth", progress=False).read_bytes() == data
    (root / "net-deadbeef.pth").write_bytes(data)
    with pytest.raises(CheckpointError):
        hub.download(f"{base}/net-deadbeef.pth", progress=False)


def test_unsupported_scheme():
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        hub.download("ftp://example.invalid/x.pt")


def test_pretrained_true_loads_registered_weights(served, tiny_registered, tmp_path):
    root, base, _ = served
    source = medsegkit.create_model(tiny_registered, out_channels=4)
    path = save_checkpoint(source, root / "tiny.safetensors", metadata={"class_names": ["a", "b", "c", "d"]})
    digest = hub.sha256_of(path)
    spec = registry._REGISTRY[tiny_registered]
    registry._REGISTRY[tiny_registered] = registry.ModelSpec(
        **{**spec.__dict__, "weights": WeightsSpec(url=f"{base}/tiny.safetensors", sha256=digest,
                                                   arch={"out_channels": 4})}
    )
    model = medsegkit.create_model(tiny_registered, pretrained=True)
    assert model.out_channels == 4
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    assert model.medsegkit_metadata["class_names"] == ["a", "b", "c", "d"]
    assert tiny_registered in medsegkit.list_models(pretrained=True)
    # a path string loads that file
    again = medsegkit.create_model(tiny_registered, pretrained=str(path), out_channels=4)
    torch.testing.assert_close(again(x), source(x), rtol=0, atol=0)


def test_two_urls_ending_in_the_same_name_are_two_files(served):
    # before: the cache was keyed by the file name alone, so the second URL silently got the first URL's file
    root, base, log = served
    for folder, data in (("a", b"weights of a"), ("b", b"weights of b")):
        (root / folder).mkdir()
        (root / folder / "model.safetensors").write_bytes(data)
    assert hub.download(f"{base}/a/model.safetensors", progress=False).read_bytes() == b"weights of a"
    assert hub.download(f"{base}/b/model.safetensors", progress=False).read_bytes() == b"weights of b"
    assert hub.download(f"{base}/a/model.safetensors", progress=False).read_bytes() == b"weights of a"
    assert log == ["/a/model.safetensors", "/b/model.safetensors"]  # each URL fetched once


def test_pretrained_file_url_without_hash_loads_that_file(tmp_path, tiny_registered):
    # before: pretrained='file:///.../b/model.safetensors' loaded the copy of a/model.safetensors cached earlier
    models = {}
    for folder in ("a", "b"):
        models[folder] = medsegkit.create_model(tiny_registered)
        save_checkpoint(models[folder], tmp_path / folder / "model.safetensors")
    x = torch.randn(1, 1, 8, 8)
    for folder in ("a", "b", "a"):
        loaded = medsegkit.create_model(tiny_registered, pretrained=(tmp_path / folder / "model.safetensors").as_uri())
        torch.testing.assert_close(loaded(x), models[folder](x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^'http://127.0.0.1:1/weights/' names no file \(its path ends with '/'\)"):
        hub.download("http://127.0.0.1:1/weights/")


def test_registered_weights_of_another_library_with_a_nan_are_refused(tmp_path, monkeypatch):
    # before: a MONAI state dict with a NaN, converted for pretrained=True, loaded silently (NaN logits)
    import dataclasses

    from monai.networks.nets import UNet as MonaiUNet

    from medsegkit.errors import CheckpointError

    source = MonaiUNet(2, 1, 2, (4, 8), (2,), num_res_units=2)
    accepted = set(registry.accepted_arguments("UNet2d"))
    arch = {k: v for k, v in medsegkit.weights.target_arguments(source, source="monai").items() if k in accepted}
    state = source.state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = float("nan")
    path = tmp_path / "monai_unet.pt"
    torch.save(state, path)
    spec = registry.get_model_spec("UNet2d")
    weights = WeightsSpec(url=path.as_uri(), sha256=hub.sha256_of(path), source="monai", arch=arch)
    monkeypatch.setitem(registry._REGISTRY, "UNet2d", dataclasses.replace(spec, weights=weights))
    with pytest.raises(CheckpointError) as raised:
        medsegkit.create_model("UNet2d", pretrained=True)
    cached = hub.cache_dir() / "monai_unet.pt"
    assert str(raised.value) == (f"registered weights {cached}: {key} holds 1 NaN or infinite value(s) of "
                                 f"{state[key].numel()}; weights must be finite (was the training diverging when "
                                 "it was saved?)")
