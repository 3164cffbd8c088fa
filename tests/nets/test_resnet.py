"""ResNet backbone: parameter counts and weights vs torchvision, strides, dilation, 3D."""

from __future__ import annotations

import pytest
import torch
import torchvision

from medsegkit.nets.backbones.resnet import ResNet
from medsegkit.weights.from_torchvision import convert, resnet_key


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_parameter_count_equals_torchvision(depth):
    with torch.device("meta"):
        ours = ResNet(depth, num_fc_classes=1000)
        theirs = getattr(torchvision.models, f"resnet{depth}")()
        without_fc = ResNet(depth)
    assert _count(ours) == _count(theirs)
    assert _count(ours) - _count(without_fc) == ours.fc.in_features * 1000 + 1000


def _tv_features(model: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        out.append(x)
    return out


def _randomise_norm_stats(model: torch.nn.Module) -> None:
    # non-trivial BatchNorm statistics, so that a wrong key map cannot go unnoticed
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)


@pytest.mark.parametrize("depth,dilation", [(18, (False, False, False)), (50, (False, True, True))])
def test_torchvision_weights_give_same_features(depth, dilation):
    torch.manual_seed(0)
    theirs = (
        getattr(torchvision.models, f"resnet{depth}")(replace_stride_with_dilation=list(dilation))
        if depth >= 50
        else torchvision.models.resnet18()
    )
    _randomise_norm_stats(theirs)
    theirs.eval()
    ours = convert(theirs).eval()
    assert isinstance(ours, ResNet) and ours.fc is not None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = _tv_features(theirs, x)
        got = ours(x)
    assert len(got) == 4
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5
    assert torch.equal(ours.fc.weight, theirs.fc.weight)


def test_strides_channels_and_out_stages():
    model = ResNet(50, out_stages=(2, 4)).eval()
    assert model.stage_channels == (512, 2048)
    assert model.stage_strides == (8, 32)
    with torch.no_grad():
        c3, c5 = model(torch.zeros(1, 3, 64, 96))
    assert c3.shape == (1, 512, 8, 12) and c5.shape == (1, 2048, 2, 3)
    dilated = ResNet(18, replace_stride_with_dilation=(False, True, True))
    assert dilated.stage_strides == (4, 8, 8, 8)


def test_readable_keys():
    keys = set(ResNet(50, num_fc_classes=10).state_dict())
    for key in (
        "stem.conv.weight",
        "stem.norm.running_var",
        "stages.0.0.conv1.weight",
        "stages.0.0.norm3.bias",
        "stages.3.2.conv3.weight",
        "stages.1.0.downsample.0.weight",
        "stages.1.0.downsample.1.weight",
        "fc.weight",
    ):
        assert key in keys
    assert resnet_key("layer2.0.downsample.1.running_mean") == "stages.1.0.downsample.1.running_mean"
    assert resnet_key("bn1.weight") == "stem.norm.weight"
    with pytest.raises(KeyError, match="not a torchvision ResNet key"):
        resnet_key("layer5.0.conv1.weight")


def test_3d_forward_and_no_2d_layers():
    model = ResNet(18, spatial_dims=3, in_channels=1, norm=("group", {"num_groups": 8})).eval()
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    with torch.no_grad():
        features = model(torch.randn(1, 1, 32, 32, 32))
    assert [tuple(f.shape) for f in features] == [
        (1, 64, 8, 8, 8),
        (1, 128, 4, 4, 4),
        (1, 256, 2, 2, 2),
        (1, 512, 1, 1, 1),
    ]


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(42)
    with pytest.raises(ValueError, match="out_stages"):
        ResNet(18, out_stages=(4, 1))
    with pytest.raises(ValueError, match="4 dims"):
        ResNet(18)(torch.zeros(3, 32, 32))
