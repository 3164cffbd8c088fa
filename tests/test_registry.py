from __future__ import annotations

import pytest
import torch

import medsegkit
from medsegkit import registry
from medsegkit.registry import WeightsSpec


def test_create_model_records_config(tiny_registered):
    model = medsegkit.create_model(tiny_registered, out_channels=3, width=2)
    assert model.medsegkit_config == {"name": tiny_registered, "overrides": {"out_channels": 3, "width": 2}}
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 3, 8, 8)


def test_unknown_name_lists_close_matches(tiny_registered):
    with pytest.raises(KeyError, match="test_tinynet_2d"):
        medsegkit.create_model("test_tinynet_2x")


def test_case_insensitive_name(tiny_registered):
    assert medsegkit.model_info("TEST_TINYNET_2D").name == tiny_registered


def test_unknown_override_lists_accepted(tiny_registered):
    with pytest.raises(TypeError) as err:
        medsegkit.create_model(tiny_registered, widht=3)
    message = str(err.value)
    assert "'widht'" in message and "width" in message and "out_channels" in message


def test_model_info_counts_requested_configuration(tiny_registered):
    small = medsegkit.model_info(tiny_registered, width=2)
    large = medsegkit.model_info(tiny_registered, width=8)
    built = medsegkit.create_model(tiny_registered, width=8)
    assert large.num_params == sum(p.numel() for p in built.parameters())
    assert small.num_params < large.num_params
    assert large.in_channels == 1 and large.out_channels == 2 and large.spatial_dims == 2
    assert large.to_dict()["input_shape"] == [1, 1, 32, 32]
    assert large.dotted_path == "conftest.TinySegNet"
    assert large.has_weights is False


def test_list_models_filters(tiny_registered):
    assert tiny_registered in medsegkit.list_models("test_tiny*")
    assert medsegkit.list_models("test_tiny*", spatial_dims=3) == []
    assert medsegkit.list_models("test_tiny*", task="instance") == []
    assert medsegkit.list_models("test_tiny*", pretrained=True) == []
    assert medsegkit.list_models("test_tiny*", pretrained=False) == [tiny_registered]
    with pytest.raises(ValueError, match="task must be one of"):
        medsegkit.list_models(task="detection")


def test_pretrained_without_weights_is_refused(tiny_registered):
    with pytest.raises(ValueError, match="has no registered weights"):
        medsegkit.create_model(tiny_registered, pretrained=True)


def test_weights_arch_conflict_raises(tiny_registered):
    spec = registry._REGISTRY[tiny_registered]
    registry._REGISTRY[tiny_registered] = registry.ModelSpec(
        **{**spec.__dict__, "weights": WeightsSpec(url="file:///nonexistent/tiny-00000000.pt", sha256="0" * 8,
                                                   arch={"out_channels": 5})}
    )
    with pytest.raises(ValueError, match="need out_channels=5"):
        medsegkit.create_model(tiny_registered, pretrained=True, out_channels=3)


def test_duplicate_registration_refused(tiny_registered):
    def test_tinynet_2d():  # same name, different function
        raise AssertionError

    with pytest.raises(ValueError, match="registered twice"):
        registry.register_model(test_tinynet_2d)


def test_unet_family_names():
    assert medsegkit.list_models("*UNet*") == [
        "AttentionUNet2d", "AttentionUNet3d", "ResUNet2d", "ResUNet3d", "UNet2d", "UNet3d",
    ]


def test_catalogue_names_and_tasks():
    names = set(medsegkit.list_models())
    seed = {"UNet2d", "UNet3d", "ResUNet2d", "ResUNet3d", "AttentionUNet2d", "AttentionUNet3d"}
    assert seed <= names
    for name in medsegkit.list_models(task="semantic"):
        assert medsegkit.model_info(name).task == "semantic"


def test_docs_table_lists_every_model():
    from medsegkit.docs_tables import model_table_markdown

    table = model_table_markdown()
    for name in medsegkit.list_models():
        info = medsegkit.model_info(name)
        assert f"`{name}`" in table
        assert f"{info.num_params:,}" in table


# -- rebuilding from a checkpoint record: name resolution is the registry's (weights only load tensors) --


def test_model_from_record_by_name(tiny_registered):
    model = registry.model_from_record({"name": tiny_registered, "overrides": {"out_channels": 3}})
    assert model.medsegkit_config == {"name": tiny_registered, "overrides": {"out_channels": 3}}


def test_model_from_record_by_medsegkit_class():
    from medsegkit.nets import UNet

    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}
    model = registry.model_from_record({"target": "medsegkit.nets.UNet", "args": args})
    assert type(model) is UNet
    assert registry.count_parameters(model) == registry.count_parameters(UNet(**args))


def test_model_from_record_refuses_foreign_classes_and_empty_records():
    from medsegkit.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"^checkpoint x\.pt names class 'os\.system'; only medsegkit classes"):
        registry.model_from_record({"target": "os.system", "args": {"command": "true"}}, source="checkpoint x.pt")
    with pytest.raises(CheckpointError, match=r"^checkpoint does not record which model it belongs to"):
        registry.model_from_record({})


def test_load_model_is_one_function_under_its_public_names(tiny_registered, tmp_path):
    import medsegkit.weights
    from medsegkit.weights import save_checkpoint

    assert medsegkit.load_model is registry.load_model is medsegkit.weights.load_model
    model = medsegkit.create_model(tiny_registered, out_channels=3).eval()
    path = save_checkpoint(model, tmp_path / "tiny.safetensors", metadata={"class_names": ["a", "b", "c"]})
    rebuilt = medsegkit.weights.load_model(path)
    assert not rebuilt.training and rebuilt.medsegkit_metadata == {"class_names": ["a", "b", "c"]}
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
