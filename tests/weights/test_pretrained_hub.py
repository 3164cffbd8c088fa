"""pretrained=True for torchvision-published weights, served from a loopback HTTP server (no internet).

The registered URL is redirected to 127.0.0.1; the served file is a torchvision-format checkpoint made
here, named like torchvision's (``<name>-<first 8 hex of its sha256>.pth``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import torchvision

import medsegkit.weights
from medsegkit import create_model, registry
from medsegkit.errors import CheckpointError


def _redirect(monkeypatch, name: str, url: str) -> None:
    """Point the registered weights of ``name`` at ``url``; the hash prefix comes from its file name,
    as for torchvision's published files."""
    spec = registry.get_model_spec(name)
    prefix = Path(url).stem.rsplit("-", 1)[-1]
    weights = dataclasses.replace(spec.weights, url=url, sha256=prefix)
    monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(spec, weights=weights))


def _publish(root: Path, stem: str, state: dict) -> str:
    """Save ``state`` like torchvision publishes it; returns the file name with the sha256 prefix."""
    tmp = root / f"{stem}.tmp"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"{stem}-{digest[:8]}.pth"
    tmp.rename(root / name)
    return name


@pytest.mark.slow
def test_fcn_resnet_50_pretrained_from_torchvision_file(served, monkeypatch):
    root, base, log = served
    torch.manual_seed(0)
    theirs = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True)
    for m in theirs.modules():  # non-default statistics, so that a load that did nothing would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    theirs.eval()
    name = _publish(root, "fcn_resnet50_coco", theirs.state_dict())
    _redirect(monkeypatch, "fcn_resnet_50", f"{base}/{name}")

    ours = create_model("fcn_resnet_50", pretrained=True).eval()
    assert log == [f"/{name}"]
    x = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)["out"]).abs().max().item() <= 1e-5
    assert len(ours.medsegkit_metadata["categories"]) == 21
    assert (medsegkit.weights.hub.cache_dir() / name).exists()
    create_model("fcn_resnet_50", pretrained=True)  # second time: from the cache
    assert log == [f"/{name}"]


def test_hash_mismatch_raises_and_caches_nothing(served, monkeypatch):
    root, base, log = served
    resnet = torchvision.models.resnet18()
    name = _publish(root, "fcn_resnet50_coco", resnet.state_dict())
    wrong = name.replace(name[-12:-4], "00000000" if name[-12:-4] != "00000000" else "11111111")
    (root / name).rename(root / wrong)
    _redirect(monkeypatch, "fcn_resnet_50", f"{base}/{wrong}")
    with pytest.raises(CheckpointError, match="sha256"):
        create_model("fcn_resnet_50", pretrained=True)
    assert log == [f"/{wrong}"]
    cache = medsegkit.weights.hub.cache_dir()
    assert not cache.exists() or not any(cache.iterdir())


def test_conflicting_overrides_raise_before_download(served, monkeypatch):
    root, base, log = served
    _redirect(monkeypatch, "fcn_resnet_50", f"{base}/fcn_resnet50_coco-1167a1af.pth")
    with pytest.raises(ValueError, match=r"need out_channels=21.*out_channels=3 was given"):
        create_model("fcn_resnet_50", pretrained=True, out_channels=3)
    with pytest.raises(ValueError, match="aux_loss"):
        create_model("fcn_resnet_50", pretrained=True, aux_loss=False)
    with pytest.raises(ValueError, match="anchor_sizes"):
        create_model("mask_rcnn_resnet_50_fpn", pretrained=True, anchor_sizes=((128, 256, 512),) * 5)
    assert log == []


def test_mask_rcnn_pretrained_sets_coco_architecture(monkeypatch):
    """pretrained=True builds the architecture torchvision's COCO weights need before loading them."""
    built = []
    monkeypatch.setattr(
        medsegkit.weights, "load_registered_weights", lambda model, spec: built.append((model, spec))
    )
    model = create_model("mask_rcnn_resnet_50_fpn", pretrained=True, box_score_thresh=0.3)
    ((loaded, spec),) = built
    assert loaded is model and spec.weights.source == "torchvision"
    assert model.num_classes == 90 and model.roi_heads.box_predictor.cls_score.out_features == 91
    assert model.rpn.head.cls_logits.out_channels == 3 and model.backbone.body.fc is None
    assert model.roi_heads.score_thresh == 0.3
    assert sum(p.numel() for p in model.parameters()) == spec.weights.num_params
