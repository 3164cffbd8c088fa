"""Inference shortcuts: Winograd 3×3 convs and in-place adds / ReLUs, and the ResNet and MaskFormer
paths that use them (equal to the plain path within float rounding, bit-equal without Winograd, plain
under autograd)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsegkit.nets import MaskFormer
from medsegkit.nets.backbones.resnet import ResNet
from medsegkit.nets.layers import inference_conv
from medsegkit.nets.layers.inference_conv import conv, winograd_applies
from medsegkit.nets.maskformer import predict_masks

needs_nnpack = pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="NNPACK not available")


@needs_nnpack
def test_winograd_conditions_and_accuracy():
    torch.manual_seed(0)
    layer = nn.Conv2d(256, 256, 3, padding=1).eval()
    x = torch.randn(2, 256, 40, 40)
    assert winograd_applies(layer, x)
    assert not winograd_applies(layer, x[..., :32, :32])  # map too small
    assert not winograd_applies(layer, x.double())
    assert not winograd_applies(nn.Conv2d(256, 256, 3, padding=1, stride=2), x)
    assert not winograd_applies(nn.Conv2d(128, 256, 3, padding=1), x[:, :128])
    assert not winograd_applies(nn.Conv3d(256, 256, 3, padding=1), x[..., None])
    calls = []
    real = torch._nnpack_spatial_convolution

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "_nnpack_spatial_convolution", spy)
        with torch.no_grad():
            got = conv(layer, x)
            plain = conv(layer, x, fast=False)
        assert calls == [(1, 256, 40, 40)] * 2  # one sample at a time
        calls.clear()
        got_with_grad = conv(layer, x)  # autograd recording: plain convolution
        assert not calls and got_with_grad.requires_grad
    expected = layer._conv_forward(x, layer.weight, layer.bias).detach()
    assert torch.equal(plain, expected)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max() * 10
    assert not torch.equal(got, expected)  # really another algorithm


@pytest.mark.parametrize("depth, dims", [(18, 2), (50, 2), (18, 3)])
def test_resnet_inference_paths_match_the_autograd_path(depth, dims, monkeypatch):
    torch.manual_seed(0)
    model = ResNet(depth, spatial_dims=dims, in_channels=2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.0)
    model.eval()
    x = torch.randn(1, 2, *([64] * dims))
    graded = [f.detach() for f in model(x)]  # autograd recording: the plain layers
    with torch.no_grad():
        in_place = model(x)  # in-place adds / ReLUs, channels-last stem: the same values
        assert all(torch.equal(a, b) and a.is_contiguous() for a, b in zip(in_place, graded))
        model.fast_inference = True
        assert all(m.fast_inference for m in model.stages.modules() if hasattr(m, "conv1"))
        monkeypatch.setattr(inference_conv, "WINOGRAD_MIN_CHANNELS", 64)  # this small input's widths
        monkeypatch.setattr(inference_conv, "WINOGRAD_MIN_PIXELS", 16 * 16)
        fast = model(x)
    for a, b in zip(fast, graded):
        assert a.shape == b.shape and a.is_contiguous()
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    if dims == 2 and torch.backends.nnpack.is_available():
        assert not all(torch.equal(a, b) for a, b in zip(fast, graded))  # Winograd really ran
    model.train()
    model(x)  # training mode: BatchNorm updates its statistics
    assert model.stem.norm.num_batches_tracked.item() == 1


def test_resnet_fast_inference_is_off_by_default():
    assert not ResNet(18).fast_inference  # FCN / Mask R-CNN keep torchvision's exact arithmetic
    model = MaskFormer(3, backbone="resnet_18", num_queries=4, hidden_dim=32, fpn_dim=32, mask_dim=32)
    assert model.backbone.fast_inference and model.pixel_decoder.fast_inference
    plain = MaskFormer(3, backbone="resnet_18", fast_inference=False)
    assert not plain.backbone.fast_inference and not plain.pixel_decoder.fast_inference


@pytest.mark.parametrize("dims, queries", [(2, 5), (2, 40), (3, 5)])
def test_project_masks_equals_projection_then_product(dims, queries):
    torch.manual_seed(0)
    model = MaskFormer(3, backbone="resnet_18", spatial_dims=dims, fpn_dim=32, mask_dim=64, num_queries=queries)
    decoder = model.pixel_decoder
    assert decoder.folds_projection(queries) == (queries <= 32)
    x = torch.randn(2, 32, *([6] * dims))
    embed = torch.randn(2, queries, 64)
    got = decoder.project_masks(embed, x)
    expected = predict_masks(embed, decoder.mask_projection(x))
    assert got.shape == expected.shape == (2, queries, *([6] * dims)) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_maskformer_fast_inference_matches_plain_path():
    torch.manual_seed(0)
    kwargs = {"num_queries": 6, "hidden_dim": 32, "num_heads": 4, "decoder_layers": 2, "ffn_dim": 64}
    model = MaskFormer(3, backbone="resnet_18", fpn_dim=32, mask_dim=64, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
        model.backbone.fast_inference = model.pixel_decoder.fast_inference = False
        plain = model(x)
        features = model.backbone(x)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(fast[key], plain[key], rtol=1e-4, atol=1e-5)
    # the eval path folds the projection; projecting first gives the same masks
    with torch.no_grad():
        projected = model.pixel_decoder(features)
        unprojected = model.pixel_decoder(features, project=False)
    assert projected.shape[1] == 64 and unprojected.shape[1] == 32
