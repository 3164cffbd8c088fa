"""The U-Net family: shapes, MONAI parameter counts, every knob, the seed's layout, errors, registry."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import AttentionUnet as MonaiAttentionUnet
from monai.networks.nets import UNet as MonaiUNet
from torch import nn

import medsegkit
from medsegkit.nets import AttentionUNet, ResUNet, UNet
from medsegkit.nets.layers.attention import AttentionGate, NoGate, SpatialSelfAttention
from medsegkit.nets.unet import pad_to_multiple


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def spatial(dims: int, size: int = 16) -> tuple[int, ...]:
    return (size,) * dims


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("cls", [UNet, ResUNet, AttentionUNet])
@pytest.mark.parametrize("dims", [2, 3])
def test_forward_shape_odd_channels(cls, dims):
    model = cls(dims, 3, 5, (3, 5, 7), (2, 2)).eval()
    x = torch.randn(2, 3, *spatial(dims))
    assert model(x).shape == (2, 5, *spatial(dims))
    assert (model.spatial_dims, model.in_channels, model.out_channels) == (dims, 3, 5)
    assert model.medsegkit_task == "semantic"


def test_anisotropic_strides_and_kernels():
    model = UNet(
        3, 1, 2, (4, 8, 16), ((1, 2, 2), (2, 2, 2)), kernel_size=((1, 3, 3), (3, 3, 3), (3, 3, 3))
    ).eval()
    assert model.size_multiple == (2, 4, 4)
    assert model(torch.randn(1, 1, 6, 12, 20)).shape == (1, 2, 6, 12, 20)
    # the first stage's kernel is (1, 3, 3)
    assert model.encoder.stages[0].units[0].conv.kernel_size == (1, 3, 3)


# ------------------------------------------------------------------ parameter counts = MONAI's


def test_full_size_counts_equal_monai():
    with torch.device("meta"):
        monai_res = MonaiUNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
        ours_res = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
        monai_att = MonaiAttentionUnet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2))
        ours_att = AttentionUNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2))
    assert count(ours_res) == count(monai_res) == 4_808_917
    assert count(ours_att) == count(monai_att) == 5_909_130


def test_resunet_is_unet_with_two_residual_units():
    args = (3, 1, 2, (4, 8, 16), (2, 2))
    assert (
        count(ResUNet(*args))
        == count(UNet(*args, num_res_units=2))
        == count(MonaiUNet(*args, num_res_units=2))
    )
    assert count(UNet(*args, block="res")) == count(ResUNet(*args))


# Parity of counts, weights and outputs with MONAI over the whole knob space: test_unet_monai_properties.py


def test_attention_merge_conv_keeps_monais_kernel_3():
    """MONAI's AttentionUnet builds its merge convs with kernel 3 whatever kernel_size says (issue 13)."""
    args = (2, 1, 2, (3, 4, 5), (1, 2))
    monai_model = MonaiAttentionUnet(*args, up_kernel_size=5, kernel_size=5)
    ours = AttentionUNet(*args, up_kernel_size=5, kernel_size=5)
    assert count(ours) == count(monai_model) == 3_534
    assert [stage.units[0].conv.kernel_size for stage in ours.decoder.stages] == [(3, 3), (3, 3)]
    assert ours.encoder.stages[0].units[0].conv.kernel_size == (5, 5)
    ours.load_state_dict(monai_model.state_dict(), strict=True)

    same = AttentionUNet(*args, up_kernel_size=5, kernel_size=5, merge_kernel_size=5)
    assert count(same) == 4_334
    assert [stage.units[0].conv.kernel_size for stage in same.decoder.stages] == [(5, 5), (5, 5)]
    per_axis = AttentionUNet(*args, merge_kernel_size=(1, 3))
    assert per_axis.decoder.stages[0].units[0].conv.kernel_size == (1, 3)
    assert per_axis.decoder.stages[0].units[0].conv.padding == (0, 1)
    assert per_axis.eval()(torch.randn(1, 1, 8, 8)).shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="merge_kernel_size values should be positive odd ints"):
        AttentionUNet(*args, merge_kernel_size=4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        same.load_state_dict(monai_model.state_dict())


def test_unet_takes_monai_dropout_specs():
    args = (2, 1, 2, (4, 8, 16), (2, 2))

    def types(model: nn.Module) -> set[str]:
        return {type(m).__name__ for m in model.modules()}

    assert "AlphaDropout" in types(UNet(*args, dropout=("alphadropout", {"p": 0.1})))
    assert not {"Dropout", "AlphaDropout"} & types(UNet(*args, dropout=None))
    drops = [m for m in UNet(*args, dropout=("dropout", {"p": 0.3})).modules() if isinstance(m, nn.Dropout)]
    assert drops and {m.p for m in drops} == {0.3}
    assert UNet(*args, dropout=["dropout", {"p": 0.3}]).init_args["dropout"] == ["dropout", {"p": 0.3}]
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\], got -0.1"):
        UNet(*args, dropout=-0.1)
    with pytest.raises(ValueError, match="dropout must be a probability in .* got \\{'p': 0.1\\}"):
        UNet(*args, dropout={"p": 0.1})
    assert UNet(*args, adn_ordering="nda").eval()(torch.randn(1, 1, 8, 8)).shape == (1, 2, 8, 8)


# ------------------------------------------------------------------ knob matrix


def _signature(model: nn.Module) -> tuple[int, str]:
    return count(model), repr(model)


UNET_BASE = (3, 1, 2, (4, 8, 16), (2, 2))
UNET_KNOBS = [
    {"convs_per_stage": 2},
    {"convs_per_stage": (1, 2, 3)},
    {"decoder_convs_per_stage": 2},
    {"dilation": 2},
    {"stage_attention": True},
    {"stage_attention": (False, False, True)},
    {"downsample": "maxpool"},
    {"downsample": "avgpool"},
    {"upsample": "nontrainable"},
    {"upsample": "nontrainable", "interp_mode": "nearest"},
    {"upsample": "trilinear"},
    {"upsample": "pixelshuffle"},
    {"up_kernel_size": 5},
    {"stem_channels": 4},
    {"head_kernel_size": 1},
    {"head_kernel_size": 3},
    {"deep_supervision": True},
    {"layout": "classic"},
    {"num_res_units": 2},
    {"block": "res"},
    {"norm": "batch"},
    {"norm": ("group", {"num_groups": 2})},
    {"norm": "group"},
    {"norm": None},
    {"act": ("leakyrelu", {"negative_slope": 0.01})},
    {"act": "leaky_relu"},
    {"dropout": 0.1},
    {"bias": False},
    {"adn_ordering": "ADN"},
    {"kernel_size": (1, 3, 3)},
]


@pytest.mark.parametrize("knob", UNET_KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_unet_knob_changes_module_and_runs(knob):
    base = UNet(*UNET_BASE)
    model = UNet(*UNET_BASE, **knob)
    assert _signature(model) != _signature(base)
    x = torch.randn(1, 1, 8, 8, 8)
    assert model.eval()(x).shape == (1, 2, 8, 8, 8)


@pytest.mark.parametrize("layout", ["monai", "classic"])
def test_skip_merge_add(layout):
    channels = (4, 8, 8) if layout == "monai" else (4, 8, 16)
    cat = UNet(2, 1, 2, channels, (2, 2), layout=layout)
    add = UNet(2, 1, 2, channels, (2, 2), layout=layout, skip_merge="add")
    concat = UNet(2, 1, 2, channels, (2, 2), layout=layout, skip_merge="concat")
    assert count(add) < count(cat) == count(concat)
    assert add.eval()(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)


ATTENTION_KNOBS = [
    {"gate_levels": (1,)},
    {"gate_signal": "coarse"},
    {"gate_norm": None},
    {"gate_norm": "instance"},
    {"inter_channels": 3},
    {"act": "relu"},
    {"norm": "instance"},
    {"downsample": "maxpool"},
    {"upsample": "bilinear"},
    {"deep_supervision": True},
    {"convs_per_stage": 1},
    {"decoder_convs_per_stage": 2},
    {"num_res_units": 1},
    {"stage_attention": (False, True, True)},
    {"stem_channels": 2},
    {"head_kernel_size": 3},
    {"skip_merge": "add"},
]


@pytest.mark.parametrize("knob", ATTENTION_KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_attention_unet_knob_changes_module_and_runs(knob):
    base = AttentionUNet(2, 1, 2, (4, 8, 16), (2, 2))
    model = AttentionUNet(2, 1, 2, (4, 8, 16), (2, 2), **knob)
    assert _signature(model) != _signature(base)
    assert model.eval()(torch.randn(1, 1, 8, 8)).shape == (1, 2, 8, 8)


def test_gate_bias_init_opens_gates():
    model = AttentionUNet(2, 1, 2, (4, 8, 16), (2, 2), gate_bias_init=2.0, gate_norm=None)
    gates = [m for m in model.modules() if isinstance(m, AttentionGate)]
    assert len(gates) == 2
    for gate in gates:
        assert torch.equal(gate.psi.weight, torch.zeros_like(gate.psi.weight))
        assert gate.psi.bias.item() == 2.0


def test_activation_and_norm_are_configurable_in_attention_unet():
    model = AttentionUNet(
        2, 1, 2, (4, 8, 16), (2, 2), act=("leakyrelu", {"negative_slope": 0.2}), norm="instance"
    )
    types = {type(m).__name__ for m in model.modules()}
    assert "LeakyReLU" in types and "PReLU" not in types and "ReLU" not in types
    assert "InstanceNorm2d" in types
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.encoder.modules())


# ------------------------------------------------------------------ the seed's layout from the knobs


def test_seed_unet_layout_from_knobs():
    """The seed's U-Net: stem, full-resolution first stage, maxpool down, bilinear + 1×1 up, concat,
    2 conv-BN-ReLU blocks per stage, bias only without norm, 1×1 head, deep supervision."""
    model = UNet(
        2,
        1,
        2,
        (4, 8),
        (2,),
        act="relu",
        norm="batch",
        bias=False,
        layout="classic",
        convs_per_stage=2,
        downsample="maxpool",
        upsample="bilinear",
        skip_merge="concat",
        stem_channels=4,
        head_kernel_size=1,
        deep_supervision=True,
    )
    # Hand count: stem 3×3 1→4 (36) + BN (8) = 44; stage 0: 2 × (3×3 4→4 (144) + BN 8) = 304;
    # bottleneck: 3×3 4→8 (288) + BN 16 + 3×3 8→8 (576) + BN 16 = 896; decoder: 1×1 8→4 (32, no bias) +
    # 3×3 8→4 (288) + BN 8 + 3×3 4→4 (144) + BN 8 = 480; head 1×1 4→2 with bias = 10. No aux head for 1 level.
    assert count(model) == 44 + 304 + 896 + 480 + 10
    assert isinstance(model.bottleneck.down, nn.MaxPool2d)
    assert model.encoder.stages[0].units[0].conv.stride == (1, 1)  # the first stage is at full resolution
    upsample = [m for m in model.decoder.modules() if isinstance(m, nn.Upsample)]
    assert upsample and upsample[0].mode == "bilinear" and upsample[0].align_corners is False
    assert model.head.conv.kernel_size == (1, 1)
    seen = []
    model.encoder.stages[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.eval()(torch.randn(1, 1, 16, 16))
    assert seen == [(1, 4, 16, 16)]


def test_seed_resunet_layout_with_attention_stages():
    model = UNet(
        3,
        1,
        2,
        (4, 8, 16),
        (2, 2),
        block="res",
        act="relu",
        norm="group",
        layout="classic",
        convs_per_stage=2,
        downsample="conv",
        upsample="transpose",
        up_kernel_size=2,
        stem_channels=4,
        stage_attention=(False, False, True),
        deep_supervision=True,
    )
    assert sum(isinstance(m, SpatialSelfAttention) for m in model.modules()) == 1  # bottleneck only
    assert model.decoder.stages[0].up.conv.kernel_size == (2, 2, 2)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == m.num_channels for m in norms if m.num_channels <= 32)
    model.train()
    out = model(torch.randn(2, 1, 16, 16, 16))
    assert out["out"].shape == (2, 2, 16, 16, 16)
    assert [a.shape for a in out["aux"]] == [(2, 2, 8, 8, 8)]


def test_seed_attention_unet_layout_from_knobs():
    """The seed's Attention U-Net: maxpool down, trilinear up, deep supervision, gates without norm on every
    level but the finest, gated by the coarse decoder input, inter channels min//2, gates start at 0.88."""
    channels = (4, 8, 16, 32)
    model = AttentionUNet(
        3,
        1,
        2,
        channels,
        (2, 2, 2),
        act="relu",
        norm="batch",
        bias=False,
        convs_per_stage=2,
        decoder_convs_per_stage=2,
        downsample="maxpool",
        upsample="trilinear",
        stem_channels=4,
        deep_supervision=True,
        gate_levels=range(1, len(channels) - 1),
        gate_signal="coarse",
        gate_norm=None,
        gate_bias_init=2.0,
    )
    # decoder.stages runs deepest first: levels 2, 1, 0
    gates = [stage.gate for stage in model.decoder.stages]
    assert isinstance(gates[2], NoGate) and all(isinstance(g, AttentionGate) for g in gates[:2])
    deepest = gates[0]
    assert deepest.phi.in_channels == 32 and deepest.theta.in_channels == 16  # gating = coarse decoder input
    assert deepest.theta.out_channels == min(16, 32) // 2
    assert all(
        isinstance(getattr(g, n), nn.Identity)
        for g in gates[:2]
        for n in ("theta_norm", "phi_norm", "psi_norm")
    )
    # every attention coefficient starts at sigmoid(2)
    skip, gating = torch.randn(1, 16, 4, 4, 4), torch.randn(1, 32, 2, 2, 2)
    assert torch.allclose(deepest(skip, gating), skip * torch.sigmoid(torch.tensor(2.0)))
    model.train()
    out = model(torch.randn(1, 1, 16, 16, 16))
    assert out["out"].shape == (1, 2, 16, 16, 16)
    assert [tuple(a.shape) for a in out["aux"]] == [(1, 2, 8, 8, 8), (1, 2, 4, 4, 4)]  # finest first
    assert model.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


# ------------------------------------------------------------------ deep supervision


@pytest.mark.parametrize("layout", ["monai", "classic"])
def test_deep_supervision_output(layout):
    model = UNet(2, 1, 3, (4, 8, 16, 32), (2, 2, 2), layout=layout, deep_supervision=True)
    x = torch.randn(2, 1, 32, 32)
    model.train()
    out = model(x)
    (out["out"].mean() + sum(a.mean() for a in out["aux"])).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == (2, 3, 32, 32)
    sizes = [a.shape[-1] for a in out["aux"]]
    assert sizes == sorted(sizes, reverse=True) and len(sizes) == 2  # finest first, all but the last stage
    assert all(a.shape[:2] == (2, 3) for a in out["aux"])
    model.eval()
    assert isinstance(model(x), torch.Tensor)


# ------------------------------------------------------------------ errors


def test_bad_spatial_size_names_the_multiple():
    model = UNet(3, 1, 2, (4, 8, 16), ((1, 2, 2), (2, 2, 2)))
    with pytest.raises(ValueError, match=r"multiple of \[2, 4, 4\]") as err:
        model(torch.randn(1, 1, 8, 16, 18))
    assert "pad_to_multiple" in str(err.value) and "[8, 16, 18]" in str(err.value)


def test_pad_to_multiple_round_trip():
    model = UNet(3, 1, 2, (4, 8, 16), ((1, 2, 2), (2, 2, 2))).eval()
    x = torch.randn(1, 1, 7, 13, 18)
    padded, crop = pad_to_multiple(x, model.size_multiple)
    assert padded.shape == (1, 1, 8, 16, 20)
    assert torch.equal(padded[crop], x)
    assert model(padded)[crop].shape == (1, 2, 7, 13, 18)
    same, _ = pad_to_multiple(padded, model.size_multiple)
    assert same is padded
    with pytest.raises(ValueError, match="spatial axes"):
        pad_to_multiple(x, (2, 2))


@pytest.mark.parametrize("cls", [UNet, ResUNet, AttentionUNet])
def test_bad_channels_and_dims(cls):
    model = cls(2, 3, 2, (4, 8), (2,))
    with pytest.raises(ValueError, match=r"expected 3 input channel\(s\).*got 1"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="2 spatial axes"):
        model(torch.randn(1, 3, 8, 8, 8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels": (4,), "strides": ()}, "length of `channels`"),
        ({"strides": (2,)}, "length of `strides`"),
        ({"kernel_size": 4}, "odd"),
        ({"kernel_size": (3, 3)}, "length of `kernel_size`"),
        ({"up_kernel_size": (3, 3)}, "length of `up_kernel_size`"),
        ({"downsample": "stride"}, "downsample must be one of"),
        ({"upsample": "cubic"}, "upsample must be one of"),
        ({"skip_merge": "mul"}, "skip_merge must be one of"),
        ({"skip_merge": "add"}, "deepest two channel entries"),
        ({"layout": "nnunet"}, "layout must be one of"),
        ({"convs_per_stage": (1, 2)}, "3 entries"),
        ({"convs_per_stage": 0}, ">= 1"),
        ({"block": "res", "num_res_units": 0, "norm": "batch"}, None),
        ({"block": "basic", "num_res_units": 2}, "conflicts"),
        ({"strides": ((1, 2, 2), (2, 2, 2)), "upsample": "pixelshuffle"}, "isotropic"),
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"dropout": 1.5}, "dropout"),
        ({"adn_ordering": "NAX"}, "adn_ordering"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": (4, 8, 16),
        "strides": (2, 2),
        **kwargs,
    }
    if message is None:  # a valid spelling, for contrast
        assert UNet(**args).init_args["block"] == "res"
        return
    with pytest.raises(ValueError, match=message):
        UNet(**args)


def test_bad_attention_arguments():
    with pytest.raises(ValueError, match="gate_signal"):
        AttentionUNet(2, 1, 2, (4, 8, 16), (2, 2), gate_signal="lower")
    with pytest.raises(ValueError, match="gate_levels"):
        AttentionUNet(2, 1, 2, (4, 8, 16), (2, 2), gate_levels=(2,))
    with pytest.raises(ValueError, match="num_res_units >= 1"):
        ResUNet(2, 1, 2, (4, 8), (2,), num_res_units=0)


def test_extra_strides_warn_like_monai():
    with pytest.warns(UserWarning, match="will not be used"):
        model = UNet(2, 1, 2, (4, 8), (2, 2))
    assert model.size_multiple == (2, 2)


# ------------------------------------------------------------------ registry, init_args, checkpoints


def test_registry_builders():
    names = medsegkit.list_models("*UNet*")
    assert names == sorted(
        ["AttentionUNet2d", "AttentionUNet3d", "ResUNet2d", "ResUNet3d", "UNet2d", "UNet3d"]
    )
    model = medsegkit.create_model(
        "UNet3d", in_channels=1, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2)
    )
    assert model.eval()(torch.randn(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)
    assert medsegkit.model_info("ResUNet3d").num_params == 4_808_917
    assert medsegkit.model_info("AttentionUNet3d").num_params == 5_909_130
    info = medsegkit.model_info("UNet2d")
    assert (info.dotted_path, info.default_roi_size, info.default_preprocessing) == (
        "medsegkit.nets.UNet",
        (256, 256),
        "mr",
    )
    assert (
        info.task == "semantic"
        and info.spatial_dims == 2
        and info.in_channels == 1
        and info.out_channels == 2
    )
    with torch.device("meta"):
        expected = count(MonaiUNet(2, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), norm="batch"))
    assert info.num_params == expected
    assert (
        medsegkit.model_info("ResUNet2d", num_res_units=3).num_params
        > medsegkit.model_info("ResUNet2d").num_params
    )
    with pytest.raises(TypeError, match="downsample"):
        medsegkit.create_model("AttentionUNet2d", downsampel="maxpool")


def test_init_args_rebuild_through_checkpoint(tmp_path):
    from medsegkit.weights import load_model, save_checkpoint

    model = AttentionUNet(
        2, 1, 3, (4, 8, 16), (2, 2), gate_signal="coarse", norm=("group", {"num_groups": 2}), gate_levels=(1,)
    ).eval()
    path = save_checkpoint(model, tmp_path / "att.safetensors")
    rebuilt = load_model(path).eval()
    assert type(rebuilt) is AttentionUNet
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(rebuilt(x), model(x))


def test_size_multiple_is_product_of_strides():
    model = UNet(3, 1, 2, (4, 8, 16, 32), ((1, 2, 2), (1, 2, 2), (2, 2, 2)))
    assert model.size_multiple == (2, 8, 8)
    assert model.size_multiple == tuple(math.prod(s[d] for s in model.strides) for d in range(3))
