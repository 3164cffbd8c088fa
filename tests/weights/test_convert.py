"""``convert``'s two layers: the registry resolves a name, :mod:`medsegkit.weights` fills built models.

``medsegkit.convert`` / ``medsegkit.weights.convert`` are :func:`medsegkit.registry.convert`; the
weights-level :func:`medsegkit.weights.convert_weights` (and each ``from_*`` module) refuses a name.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet as MonaiUNet

import medsegkit
import medsegkit.registry
import medsegkit.weights
from medsegkit.nets import UNet
from medsegkit.weights import convert, convert_weights, target_arguments
from medsegkit.weights.from_monai import config_from_monai

TOLERANCE = 1e-5


def _randomised_monai_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = MonaiUNet(3, 1, 3, (4, 8, 16), (2, 2), num_res_units=1, norm="batch", bias=False)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape) + 0.5 if key.endswith("running_var") else torch.randn(value.shape))
    return model.eval()


def test_public_convert_is_the_registry_one():
    assert medsegkit.convert is medsegkit.registry.convert
    assert medsegkit.weights.convert is medsegkit.registry.convert
    assert convert is medsegkit.registry.convert
    assert "convert" in dir(medsegkit.weights) and "convert_weights" in medsegkit.weights.__all__


def test_a_registry_name_is_built_with_the_source_architecture():
    """The name's builder gets the MONAI model's arguments (not its own defaults: 16..256 channels)."""
    reference = _randomised_monai_unet()
    ours = convert(reference, source="monai", target="UNet3d")
    assert ours.medsegkit_config["name"] == "UNet3d"
    overrides = ours.medsegkit_config["overrides"]
    assert overrides["channels"] == [4, 8, 16] and overrides["num_res_units"] == 1 and overrides["bias"] is False
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert float((ours.eval()(x) - reference(x)).abs().max()) <= TOLERANCE


def test_target_arguments_read_the_source_model_only():
    reference = _randomised_monai_unet()
    assert target_arguments(reference, source="monai") == config_from_monai(reference)[1]
    assert target_arguments(reference.state_dict(), source="monai") == {}
    with pytest.raises(ValueError, match="unknown source 'keras'; accepted: monai, torchvision, transformers"):
        target_arguments(reference, source="keras")


def test_weights_level_conversion_refuses_a_name_and_fills_a_built_model():
    reference = _randomised_monai_unet()
    with pytest.raises(TypeError, match=r"target='UNet3d' is a registry name: call medsegkit.convert\("):
        convert_weights(reference.state_dict(), source="monai", target="UNet3d")
    from medsegkit.weights import from_monai, from_torchvision, from_transformers

    for module in (from_monai, from_torchvision, from_transformers):
        with pytest.raises(TypeError, match="a registry name is resolved by medsegkit.convert"):
            module.convert({"x": torch.zeros(1)}, target="UNet3d")
    built = UNet(**config_from_monai(reference)[1])
    assert convert_weights(reference.state_dict(), source="monai", target=built) is built
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert float((built.eval()(x) - reference(x)).abs().max()) <= TOLERANCE


def test_bad_names_and_sources_are_reported_before_anything_is_built():
    reference = _randomised_monai_unet()
    with pytest.raises(KeyError, match="unknown model name 'UNet4d'; closest names: .*UNet3d"):
        convert(reference, source="monai", target="UNet4d")
    with pytest.raises(ValueError, match="unknown source 'keras'"):
        convert(reference, source="keras", target="UNet3d")
    with pytest.raises(ValueError, match="unknown source 'keras'"):
        convert(reference, source="keras")
    with pytest.raises(TypeError, match="monai.networks.nets.UNet"):
        convert(torch.nn.Linear(2, 2), source="monai", target="UNet3d")
