"""The inference copy that ``prepare_model`` builds by module swaps (Winograd convolutions, in-place
residual adds and ReLUs, channels-last stem and weights), and the plain networks it leaves alone:
same state dict and hooks, same outputs, the caller's model never changed, the channels-last
fallback decided on the first batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsegkit.inference import predict
from medsegkit.inference.adapters import SemanticAdapter
from medsegkit.inference.fast import prepare_model
from medsegkit.nets import MaskFormer
from medsegkit.nets.backbones.resnet import ResNet
from medsegkit.nets.layers import inference_conv
from medsegkit.nets.layers.inference_conv import ChannelsLastSequential, WinogradConv2d, winograd_shape
from medsegkit.nets.layers.residual import InPlaceResidual, Residual
from medsegkit.nets.mask2former import Mask2Former
from medsegkit.nets.maskformer import predict_masks

needs_nnpack = pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="NNPACK not available")
CPU = torch.device("cpu")


def _spy_nnpack(patch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = torch._nnpack_spatial_convolution

    def spy(*args):
        calls.append(tuple(args[0].shape))
        return real(*args)

    patch.setattr(torch, "_nnpack_spatial_convolution", spy)
    return calls


def _trained_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.0)
    return model.eval()


def _snapshot(model: nn.Module) -> dict[str, tuple]:
    return {name: (t.data_ptr(), t.stride(), t._version, t.clone()) for name, t in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snapshot: dict[str, tuple]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for name, tensor in state.items():
        pointer, stride, version, values = snapshot[name]
        assert (tensor.data_ptr(), tensor.stride(), tensor._version) == (pointer, stride, version), name
        assert torch.equal(tensor, values), name


@needs_nnpack
def test_winograd_conv_keeps_state_and_hooks_and_runs_only_where_it_applies(monkeypatch):
    torch.manual_seed(0)
    plain = nn.Conv2d(256, 256, 3, padding=1).eval()
    layer = WinogradConv2d.swap(nn.Conv2d(256, 256, 3, padding=1).eval())
    layer.load_state_dict(plain.state_dict())
    assert isinstance(layer, nn.Conv2d) and layer.state_dict().keys() == plain.state_dict().keys()
    seen = []
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(2, 256, 40, 40)
    assert not layer.takes_winograd(x)  # autograd recording
    with torch.no_grad():
        assert layer.takes_winograd(x)
        assert not layer.takes_winograd(x[..., :32, :32])  # map too small
        assert not layer.takes_winograd(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not layer.takes_winograd(x)
        calls = _spy_nnpack(monkeypatch)
        got = layer(x)
        expected = plain(x)
    assert calls == [(1, 256, 40, 40)] * 2  # one sample at a time
    assert seen == [(2, 256, 40, 40)]  # the module's hooks run on the Winograd path too
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max() * 10
    assert not torch.equal(got, expected)  # really another algorithm
    calls.clear()
    graded = layer(x)  # autograd recording: the plain convolution
    assert not calls and graded.requires_grad and torch.equal(graded.detach(), expected)


def test_winograd_swap_refuses_other_convolutions():
    assert not winograd_shape(nn.Conv2d(256, 256, 3, padding=1, stride=2))
    assert not winograd_shape(nn.Conv2d(128, 256, 3, padding=1))
    assert not winograd_shape(nn.Conv3d(256, 256, 3, padding=1))
    with pytest.raises(ValueError, match="WinogradConv2d needs a 3x3, stride-1, padding-1 nn.Conv2d of >= 256"):
        WinogradConv2d.swap(nn.Conv2d(256, 256, 1))
    with pytest.raises(ValueError, match="ChannelsLastSequential is made from an nn.Sequential, got Conv2d"):
        ChannelsLastSequential.swap(nn.Conv2d(1, 1, 1))


def test_plain_models_have_no_inference_shortcuts_and_train_in_eval_mode():
    """The plain forward records gradients in any mode: no in-place add or ReLU on saved tensors."""
    torch.manual_seed(0)
    model = ResNet(18, in_channels=1).eval()
    assert all(type(m) is Residual for m in model.modules() if isinstance(m, Residual))
    assert not any(isinstance(m, (WinogradConv2d, ChannelsLastSequential, InPlaceResidual)) for m in model.modules())
    assert not any(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    x = torch.randn(1, 1, 64, 64, requires_grad=True)
    sum(f.sum() for f in model(x)).backward()
    assert x.grad is not None and model.stem.conv.weight.grad is not None
    with pytest.raises(TypeError, match="fast_inference"):
        MaskFormer(3, backbone="resnet_18", fast_inference=True)


@pytest.mark.parametrize("depth, dims", [(18, 2), (50, 2), (18, 3)])
def test_prepared_resnet_equals_the_plain_one(depth, dims, monkeypatch):
    torch.manual_seed(0)
    model = _trained_norms(ResNet(depth, spatial_dims=dims, in_channels=2))
    x = torch.randn(1, 2, *([64] * dims))
    with torch.no_grad():
        plain = model(x)
    exact = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 2, *([64] * dims)),
                          relayout=False)
    copy = exact.module
    assert copy is not model and isinstance(copy.stem, ChannelsLastSequential)
    assert all(type(m) is InPlaceResidual for m in copy.modules() if isinstance(m, Residual))
    assert copy.state_dict().keys() == model.state_dict().keys()
    with torch.inference_mode():
        in_place = copy(x)  # in-place adds / ReLUs, channels-last stem: the same values
    assert all(torch.equal(a, b) and a.is_contiguous() for a, b in zip(in_place, plain))
    monkeypatch.setattr(inference_conv, "WINOGRAD_MIN_CHANNELS", 64)  # this small input's widths
    monkeypatch.setattr(inference_conv, "WINOGRAD_MIN_PIXELS", 16 * 16)
    winograd = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 2, *([64] * dims)),
                             relayout=False, winograd=True)
    swapped = [m for m in winograd.module.modules() if isinstance(m, WinogradConv2d)]
    assert bool(swapped) == (dims == 2)
    with torch.inference_mode():
        fast = winograd.module(x)
    for a, b in zip(fast, plain):
        assert a.shape == b.shape and a.is_contiguous()
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    if dims == 2 and torch.backends.nnpack.is_available():
        assert not all(torch.equal(a, b) for a, b in zip(fast, plain))  # Winograd really ran
    model.train()
    model(x)  # the caller's model still trains: BatchNorm updates its statistics
    assert model.stem.norm.num_batches_tracked.item() == 1


def _small_maskformer(**kwargs) -> MaskFormer:
    torch.manual_seed(0)
    sizes = {"num_queries": 6, "hidden_dim": 32, "num_heads": 4, "decoder_layers": 2, "ffn_dim": 64}
    return _trained_norms(MaskFormer(3, backbone="resnet_18", fpn_dim=32, mask_dim=64, **{**sizes, **kwargs}))


def test_prepare_never_changes_the_callers_model_and_keeps_its_hooks():
    model = _small_maskformer()
    adapter = SemanticAdapter(model)  # what predict prepares for a query model: a tensor output
    calls = []
    model.pixel_decoder.stem.conv.register_forward_hook(lambda module, inputs, output: calls.append(module))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        plain_scores = adapter(x)
    assert len(calls) == 2
    before = _snapshot(model)
    for options in ({"fast": False}, {"fast": False, "winograd": True}, {"fast": True}):
        prepared = prepare_model(adapter, device=CPU, amp=False, example_shape=(1, 3, 64, 64), **options)
        copy = prepared.module.model
        assert copy is not model
        scores = prepared(x)
        _assert_unchanged(model, before)
        assert all(type(m) is Residual for m in model.modules() if isinstance(m, Residual))
        assert type(model.backbone.stem) is nn.Sequential and not model.backbone.stem.act.inplace
        assert calls[-1] is copy.pixel_decoder.stem.conv  # the copied hook runs in the copy
        if not options["fast"]:  # (the fast path folds BatchNorm: conv biases, Identity norms)
            assert copy.state_dict().keys() == model.state_dict().keys()
            # 2D, default path: new modules sharing the caller's weight tensors, not a second copy
            assert all(a is b for a, b in zip(copy.parameters(), model.parameters()))
            torch.testing.assert_close(scores, plain_scores, rtol=0, atol=1e-4)
            with torch.inference_mode():
                out = copy(x)
            for key in ("pred_logits", "pred_masks"):
                torch.testing.assert_close(out[key], plain[key], rtol=0, atol=1e-4)
    # 2 plain calls; 2 per default-path option; fast: the BatchNorm trace (caller's model), the folded
    # copy's check and the batch
    assert len(calls) == 2 + 2 * 2 + 3


def test_prepare_folds_every_batchnorm_of_a_resnet():
    """The BatchNorm-folding trace sees every convolution through its forward hook."""
    model = _trained_norms(ResNet(18, in_channels=1))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    prepared = prepare_model(model, device=CPU, fast=True, amp=False, example_shape=(1, 1, 64, 64))
    assert f"{norms} BatchNorm layer(s) folded into convolutions" in prepared.notes
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.module.modules())


def test_prepared_copy_is_cached_until_the_weights_change():
    model = _small_maskformer()
    first = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 3, 64, 64))
    again = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 3, 32, 32))
    assert again.module is first.module
    with torch.no_grad():
        model.class_head.bias.add_(1.0)
    changed = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 3, 64, 64))
    assert changed.module is not first.module
    assert torch.equal(changed.module.class_head.bias, model.class_head.bias)


def test_default_3d_predict_leaves_the_callers_weights_alone():
    """The default path runs 3D weights channels-last in its copy; the caller's tensors, strides and
    storage are the same before and after ``predict``."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = _trained_norms(UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1))
    before = _snapshot(model)
    prepared = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 1, 16, 16, 16))
    assert prepared.memory_format is torch.channels_last_3d and "channels-last-3d" in prepared.notes
    relaid = [w for w in prepared.module.parameters() if w.dim() == 5]
    assert relaid and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in relaid)
    _assert_unchanged(model, before)
    volume = torch.randn(1, 1, 20, 20, 20)
    labels = predict(model, volume, roi_size=16)
    _assert_unchanged(model, before)
    with torch.no_grad():
        plain = model(volume[..., :16, :16, :16])
    torch.testing.assert_close(prepared(volume[..., :16, :16, :16]), plain, rtol=0, atol=1e-5)
    assert labels.shape[-3:] == (20, 20, 20)


class _Flattens(nn.Module):
    """A 3D model that reshapes its activations with ``.view()``: it cannot run channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.conv(x)
        return y.view(y.shape[0], -1).view(y.shape)  # channels and voxels in one axis


class _FailsLater(_Flattens):
    """Runs channels-last, then raises a RuntimeError on its second batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("second batch failed")
        return self.conv(x)


def test_channels_last_fallback_is_decided_once_on_the_first_batch():
    torch.manual_seed(0)
    model = _Flattens().eval()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = model(x)
    prepared = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 1, 8, 8, 8))
    assert prepared.memory_format is torch.channels_last_3d and prepared.module is not model
    copy = prepared.module
    copy.calls = 0
    torch.testing.assert_close(prepared(x), expected)  # first batch: fails channels-last, runs contiguous
    assert copy.calls == 2 and prepared.memory_format is torch.contiguous_format
    assert not any(note.startswith("channels-last") for note in prepared.notes)
    assert copy.conv.weight.is_contiguous()
    torch.testing.assert_close(prepared(x), expected)
    assert copy.calls == 3  # decided: no channels-last try
    again = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 1, 8, 8, 8))
    assert again.module is copy and again.memory_format is torch.contiguous_format  # the decision is kept

    later = _FailsLater().eval()
    prepared = prepare_model(later, device=CPU, fast=False, amp=False, example_shape=(1, 1, 8, 8, 8))
    prepared(x)
    with pytest.raises(RuntimeError, match="second batch failed"):
        prepared(x)  # an error after the first batch is the model's own: raised, not retried
    assert prepared.memory_format is torch.channels_last_3d and prepared.module.calls == 2


def test_maskformer_prepared_copy_matches_the_plain_model():
    model = _small_maskformer()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        features = model.backbone(x)
    prepared = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 3, 64, 64), winograd=True)
    with torch.inference_mode():
        fast = prepared.module(x)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(fast[key], plain[key], rtol=1e-4, atol=1e-5)
    # the eval path folds the projection; projecting first gives the same masks
    with torch.no_grad():
        projected = model.pixel_decoder(features)
        unprojected = model.pixel_decoder(features, project=False)
    assert projected.shape[1] == 64 and unprojected.shape[1] == 32


def test_mask2former_copy_never_gets_winograd():
    """Its attention masks threshold ``sigmoid < 0.5``, so 1e-5 changes would flip them."""
    torch.manual_seed(0)
    model = Mask2Former(3, backbone="resnet_50", num_queries=4, hidden_dim=32, num_heads=4, decoder_layers=2,
                        ffn_dim=32, encoder_layers=1, encoder_ffn_dim=32, feature_dim=256, mask_dim=32).eval()
    assert any(winograd_shape(m) for m in model.modules())  # the FPN's 256-channel 3x3 convs
    prepared = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 3, 64, 64), winograd=True)
    assert not any(isinstance(m, WinogradConv2d) for m in prepared.module.modules())
    assert any(isinstance(m, InPlaceResidual) for m in prepared.module.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
    with torch.inference_mode():
        out = prepared.module(x)
    assert torch.equal(out["pred_logits"], plain["pred_logits"]) and torch.equal(out["pred_masks"], plain["pred_masks"])


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


def test_prepared_swin_equals_the_plain_one():
    """In-place residuals in the Swin blocks: bit-equal features, padding (60 is no multiple of 7 · 4)
    and shifted windows included."""
    from medsegkit.nets.backbones.swin import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4).eval()
    x = torch.randn(2, 3, 60, 60)
    with torch.no_grad():
        plain = model(x)
    prepared = prepare_model(model, device=CPU, fast=False, amp=False, example_shape=(1, 3, 60, 60))
    assert sum(type(m) is InPlaceResidual for m in prepared.module.modules()) == 8
    with torch.inference_mode():
        got = prepared.module(x)
    assert all(torch.equal(a, b) for a, b in zip(got, plain))
