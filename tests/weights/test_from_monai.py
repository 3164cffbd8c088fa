"""MONAI → medsegkit conversion: ``convert``, ``config_from_monai``, ``to_monai``, readable keys, errors.

Parity of parameter counts, weights and outputs with MONAI's ``UNet`` / ``AttentionUnet`` over the whole
knob space (strict loading, max |Δ| ≤ 1e-5, ``to_monai`` round trip) is property-tested in
``tests/nets/test_unet_monai_properties.py``.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import randomise
from monai.networks.nets import AttentionUnet as MonaiAttentionUnet
from monai.networks.nets import UNet as MonaiUNet

from medsegkit.nets import AttentionUNet, UNet
from medsegkit.weights import convert
from medsegkit.weights.from_monai import config_from_monai, to_monai

TOLERANCE = 1e-5



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


def test_to_monai_keeps_dtype_and_refuses_what_monai_lacks():
    ours = UNet(2, 1, 2, (4, 8), (2,), num_res_units=1).double().train()
    back = to_monai(ours)
    assert back.training and {p.dtype for p in back.parameters()} == {torch.float64}
    assert {p.dtype for p in convert(back, source="monai").parameters()} == {torch.float64}
    merge5 = AttentionUNet(2, 1, 2, (4, 8, 16), (2, 2), kernel_size=5, merge_kernel_size=5)
    with pytest.raises(ValueError, match="merge convs' kernel 3"):
        to_monai(merge5)
    assert isinstance(
        to_monai(AttentionUNet(2, 1, 2, (4, 8), (2,), merge_kernel_size=(3, 3))), MonaiAttentionUnet
    )
    per_stage = UNet(2, 1, 2, (4, 8), (2,), kernel_size=((1, 3), (3, 3)))
    with pytest.raises(ValueError, match="MONAI takes one kernel_size for every stage"):
        to_monai(per_stage)


@pytest.mark.parametrize("source", ["monai 3D UNet", "monai wider UNet", "torchvision resnet18"])
def test_a_state_dict_of_another_architecture_is_one_line(source):
    # before: load_state_dict's RuntimeError with one line per mismatching key (5 lines for the 3D UNet)
    import torchvision

    state = {
        "monai 3D UNet": lambda: MonaiUNet(3, 1, 2, (4, 8, 16), (2, 2)).state_dict(),
        "monai wider UNet": lambda: MonaiUNet(2, 1, 2, (4, 8, 32), (2, 2)).state_dict(),
        "torchvision resnet18": lambda: torchvision.models.resnet18().state_dict(),
    }[source]()
    target = UNet(2, 1, 2, (4, 8, 16), (2, 2))
    with pytest.raises(ValueError) as raised:
        convert(state, source="monai", target=target)
    message = str(raised.value)
    assert message.startswith("MONAI weights do not fit UNet: Error(s) in loading state_dict for UNet: "), message
    assert "\n" not in message and len(message) < 700
    with pytest.raises(ValueError, match="^MONAI weights do not fit UNet: "):  # a MONAI model into a wrong target
        convert(MonaiUNet(2, 1, 2, (4, 8, 32), (2, 2)), source="monai", target=target)
