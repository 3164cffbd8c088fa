"""MONAI → medsegkit parity: same outputs (max |Δ| ≤ 1e-5, fp32, eval mode) after converting MONAI's
``UNet`` / ``AttentionUnet``, both through ``medsegkit.weights.convert`` and through a direct
``load_state_dict(monai_model.state_dict())``; and back with ``to_monai``.

Print the figures: ``python tests/weights/test_from_monai.py`` (or ``pytest -s`` on this file).
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AttentionUnet as MonaiAttentionUnet
from monai.networks.nets import UNet as MonaiUNet

from medsegkit.nets import AttentionUNet, UNet
from medsegkit.weights import convert
from medsegkit.weights.from_monai import config_from_monai, to_monai

TOLERANCE = 1e-5

# name -> (MONAI class, args, kwargs, input shape, our class)
CONFIGS = {
    "UNet-2d-instance-prelu": (MonaiUNet, (2, 1, 3, (4, 8, 16), (2, 2)), {}, (2, 1, 32, 32), UNet),
    "UNet-3d-res2-batch": (
        MonaiUNet,
        (3, 2, 3, (4, 8, 16, 32), (2, 2, 2)),
        {"num_res_units": 2, "norm": "batch"},
        (1, 2, 16, 16, 16),
        UNet,
    ),
    "UNet-3d-aniso-res1-group-leaky-ADN": (
        MonaiUNet,
        (3, 1, 2, (4, 8, 16), ((1, 2, 2), (2, 2, 2))),
        {
            "kernel_size": (1, 3, 3),
            "up_kernel_size": (1, 3, 3),
            "num_res_units": 1,
            "norm": ("group", {"num_groups": 2}),
            "act": ("leakyrelu", {"negative_slope": 0.01}),
            "adn_ordering": "ADN",
            "dropout": 0.1,
        },
        (2, 1, 8, 16, 16),
        UNet,
    ),
    "UNet-2d-res3-batch-nobias": (
        MonaiUNet,
        (2, 1, 2, (4, 8, 16, 32), (2, 2, 2)),
        {"num_res_units": 3, "norm": "batch", "bias": False},
        (2, 1, 32, 32),
        UNet,
    ),
    "UNet-3d-plain-batch-relu": (
        MonaiUNet,
        (3, 1, 4, (4, 8, 16), (2, 2)),
        {"norm": "batch", "act": "relu"},
        (1, 1, 16, 16, 16),
        UNet,
    ),
    "AttentionUnet-2d": (
        MonaiAttentionUnet,
        (2, 1, 3, (4, 8, 16), (2, 2)),
        {},
        (2, 1, 32, 32),
        AttentionUNet,
    ),
    "AttentionUnet-3d": (
        MonaiAttentionUnet,
        (3, 2, 2, (4, 8, 16, 32), (2, 2, 2)),
        {"dropout": 0.1},
        (1, 2, 16, 16, 16),
        AttentionUNet,
    ),
    "AttentionUnet-3d-aniso": (
        MonaiAttentionUnet,
        (3, 1, 2, (4, 8, 16), ((1, 2, 2), (2, 2, 2))),
        {},
        (1, 1, 4, 16, 16),
        AttentionUNet,
    ),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BatchNorm statistics, so that parity checks every tensor, not the default init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
            else:
                value.copy_(torch.randn(value.shape, generator=generator) * 0.3)
    return model


def parity(name: str) -> tuple[float, float, float]:
    """max |Δ| of (convert, load_state_dict, to_monai) against MONAI for configuration ``name``."""
    monai_cls, args, kwargs, shape, ours_cls = CONFIGS[name]
    torch.manual_seed(0)
    reference = randomise(monai_cls(*args, **kwargs)).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        expected = reference(x)
        converted = convert(reference, source="monai").eval()
        direct = ours_cls(*args, **kwargs)
        direct.load_state_dict(reference.state_dict())
        direct.eval()
        back = to_monai(direct).eval()
        deltas = tuple(float((m(x) - expected).abs().max()) for m in (converted, direct, back))
    assert type(converted) is ours_cls
    return deltas


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_monai(name):
    via_convert, via_load, via_to_monai = parity(name)
    print(
        f"\n[monai parity] {name}: max|Δ| convert={via_convert:.3g} load_state_dict={via_load:.3g} "
        f"to_monai={via_to_monai:.3g} (tolerance {TOLERANCE:g}, fp32, eval)"
    )
    assert via_convert <= TOLERANCE
    assert via_load <= TOLERANCE
    assert via_to_monai <= TOLERANCE


def test_parameter_counts_match_after_convert():
    for name, (monai_cls, args, kwargs, _, _) in CONFIGS.items():
        reference = monai_cls(*args, **kwargs)
        ours = convert(reference, source="monai")
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()), (
            name
        )
        assert set(ours.state_dict()) != set(reference.state_dict())  # readable keys, not MONAI's


def test_readable_keys():
    ours = convert(MonaiUNet(2, 1, 2, (4, 8, 16), (2, 2), num_res_units=2), source="monai")
    keys = set(ours.state_dict())
    assert "encoder.stages.0.units.0.conv.unit0.conv.weight" in keys
    assert "bottleneck.units.0.conv.unit1.conv.weight" in keys
    assert (
        "decoder.stages.1.up.conv.weight" in keys
        and "decoder.stages.1.units.0.conv.unit0.conv.weight" in keys
    )
    attention = convert(MonaiAttentionUnet(2, 1, 2, (4, 8, 16), (2, 2)), source="monai")
    keys = set(attention.state_dict())
    assert {
        "head.conv.weight",
        "decoder.stages.0.gate.phi.weight",
        "decoder.stages.0.gate.psi_norm.running_var",
    } <= keys


def test_config_is_read_from_monai_model():
    monai_model = MonaiUNet(
        3, 1, 2, (4, 8, 16), (2, 2), kernel_size=5, num_res_units=1, norm="batch", bias=False
    )
    cls_name, kwargs = config_from_monai(monai_model)
    assert cls_name == "UNet"
    assert kwargs["kernel_size"] == 5 and kwargs["num_res_units"] == 1 and kwargs["norm"] == "batch"
    assert kwargs["bias"] is False and kwargs["spatial_dims"] == 3


def test_bare_state_dict_into_registry_name():
    reference = randomise(MonaiUNet(2, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), norm="batch")).eval()
    ours = convert(reference.state_dict(), source="monai", target="UNet2d")
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert float((ours(x) - reference(x)).abs().max()) <= TOLERANCE
    assert ours.medsegkit_config["name"] == "UNet2d"


def test_bare_state_dict_into_model_and_errors():
    reference = MonaiAttentionUnet(2, 1, 2, (4, 8, 16), (2, 2))
    target = AttentionUNet(2, 1, 2, (4, 8, 16), (2, 2))
    assert convert(reference.state_dict(), source="monai", target=target) is target
    with pytest.raises(ValueError, match="target="):
        convert(reference.state_dict(), source="monai")
    with pytest.raises(TypeError, match="monai.networks.nets.UNet"):
        convert(torch.nn.Linear(2, 2), source="monai")
    wrong = UNet(2, 1, 2, (4, 8, 16), (2, 2), downsample="maxpool")
    with pytest.raises(RuntimeError, match="no MONAI counterpart"):
        wrong.load_state_dict(MonaiUNet(2, 1, 2, (4, 8, 16), (2, 2)).state_dict())
    with pytest.raises(ValueError, match="no MONAI counterpart"):
        to_monai(wrong)
    with pytest.raises(RuntimeError, match="size mismatch"):
        UNet(2, 1, 2, (4, 8, 32), (2, 2)).load_state_dict(MonaiUNet(2, 1, 2, (4, 8, 16), (2, 2)).state_dict())


def test_checkpoint_unet_refused():
    from monai.networks.nets.unet import CheckpointUNet

    with pytest.raises(TypeError, match="CheckpointUNet"):
        convert(CheckpointUNet(2, 1, 2, (4, 8), (2,)), source="monai")


def test_nested_model_loads_monai_keys_under_prefix():
    """The pre-hook works when our network is a submodule (keys carry a prefix)."""
    reference = randomise(MonaiUNet(2, 1, 2, (4, 8), (2,))).eval()
    wrapper = torch.nn.Module()
    wrapper.net = UNet(2, 1, 2, (4, 8), (2,))
    wrapper.load_state_dict({f"net.{k}": v for k, v in reference.state_dict().items()})
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert float((wrapper.net.eval()(x) - reference(x)).abs().max()) <= TOLERANCE


if __name__ == "__main__":
    print(
        f"{'configuration':40s} {'convert':>10s} {'load_sd':>10s} {'to_monai':>10s}   (max |Δ| vs MONAI, fp32, eval)"
    )
    for config in CONFIGS:
        a, b, c = parity(config)
        print(f"{config:40s} {a:10.3g} {b:10.3g} {c:10.3g}")
