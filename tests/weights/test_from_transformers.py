"""transformers MaskFormer / Mask2Former → medsegkit: parity (max |Δ| ≤ 1e-4, fp32, eval), key maps, errors.

Reference models are transformers' own classes built from small configurations with random weights
(no downloads). transformers is a test-only dependency.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from medsegkit.nets import Mask2Former, MaskFormer  # noqa: E402
from medsegkit.weights import convert  # noqa: E402
from medsegkit.weights.from_transformers import convert_state_dict, key_map  # noqa: E402

TOLERANCE = 1e-4
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def resnet_config(kind: str):
    if kind == "basic":  # ResNet-18 layout: our ResNet has torchvision's fixed widths
        return transformers.ResNetConfig(
            depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic", out_features=STAGES
        )
    return transformers.ResNetConfig(
        depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck", out_features=STAGES
    )


def swin_config():
    return transformers.SwinConfig(
        embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4, out_features=STAGES
    )


def hf_maskformer(backbone_config):
    torch.manual_seed(0)  # transformers' own init draws from the global generator
    config = transformers.MaskFormerConfig(
        backbone_config=backbone_config,
        num_labels=5,
        fpn_feature_size=64,
        mask_feature_size=64,
        decoder_config={
            "model_type": "detr",
            "d_model": 64,
            "decoder_layers": 2,
            "decoder_ffn_dim": 128,
            "decoder_attention_heads": 4,
            "num_queries": 10,
        },
    )
    return _randomised(transformers.MaskFormerForInstanceSegmentation(config))


def hf_mask2former(backbone_config):
    torch.manual_seed(0)  # transformers' own init draws from the global generator
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone_config,
        num_labels=5,
        feature_size=64,
        mask_feature_size=64,
        hidden_dim=64,
        encoder_feedforward_dim=128,
        encoder_layers=2,
        decoder_layers=4,  # queries + 3 masked-attention layers: every feature level is attended once
        num_attention_heads=4,
        dim_feedforward=128,
        num_queries=10,
    )
    return _randomised(transformers.Mask2FormerForUniversalSegmentation(config))


def _randomised(model):
    """Perturb every weight and the BatchNorm statistics so that no mapping error hides behind an init value."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
    return model.eval()


def assert_parity(hf_model, ours, shape=(2, 3, 96, 64)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_model(pixel_values=x)
        output = ours(x)
    logits, masks = reference.class_queries_logits, reference.masks_queries_logits
    assert output["pred_logits"].shape == logits.shape
    assert output["pred_masks"].shape == masks.shape == (shape[0], 10, shape[2] // 4, shape[3] // 4)
    assert masks.std() > 1e-3 and logits.std() > 1e-3  # not a degenerate comparison
    assert (output["pred_logits"] - logits).abs().max().item() <= TOLERANCE
    assert (output["pred_masks"] - masks).abs().max().item() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_maskformer_resnet_parity(kind):
    hf_model = hf_maskformer(resnet_config(kind))
    ours = convert(hf_model, source="transformers")
    assert isinstance(ours, MaskFormer) and not ours.training
    assert ours.backbone.depth == (18 if kind == "basic" else 50)
    assert ours.num_classes == 5 and ours.num_queries == 10
    assert_parity(hf_model, ours)


@pytest.mark.slow
def test_maskformer_parity_on_the_winograd_inference_copy(monkeypatch):
    """Full-width FPN (256) on a 48² stride-4 map: in ``prepare_model(winograd=True)``'s copy the
    Winograd conv and the folded mask projection run.

    Winograd moves results by float rounding, ~5e-6 of the output's scale here (masks reach ~15-20 on
    this randomised model), so masks are compared relative to their scale; the plain model meets the
    absolute 1e-4."""
    from medsegkit.inference.fast import prepare_model

    torch.manual_seed(0)
    config = transformers.MaskFormerConfig(
        backbone_config=resnet_config("bottleneck"),
        num_labels=5,
        decoder_config={"model_type": "detr", "decoder_layers": 2, "num_queries": 10},
    )
    hf_model = _randomised(transformers.MaskFormerForInstanceSegmentation(config))
    ours = convert(hf_model, source="transformers")
    assert ours.pixel_decoder.folds_projection(10)
    prepared = prepare_model(ours, device=torch.device("cpu"), fast=False, amp=False, example_shape=(1, 3, 192, 192),
                             winograd=True)
    winograd_calls = []
    real = torch._nnpack_spatial_convolution

    def spy(*args):
        winograd_calls.append(tuple(args[0].shape))
        return real(*args)

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", spy)
    x = torch.randn(1, 3, 192, 192, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_model(pixel_values=x)
        plain = ours(x)
    assert not winograd_calls  # the plain model has no inference shortcuts
    with torch.inference_mode():
        fast = prepared.module(x)
    masks = reference.masks_queries_logits
    if torch.backends.nnpack.is_available():
        assert (1, 256, 48, 48) in winograd_calls
    assert (plain["pred_masks"] - masks).abs().max().item() <= TOLERANCE
    assert (plain["pred_logits"] - reference.class_queries_logits).abs().max().item() <= TOLERANCE
    assert (fast["pred_masks"] - masks).abs().max().item() <= 1e-5 * masks.abs().max().item()
    assert (fast["pred_logits"] - reference.class_queries_logits).abs().max().item() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["basic", "bottleneck", "swin"])
def test_mask2former_parity(kind):
    hf_model = hf_mask2former(swin_config() if kind == "swin" else resnet_config(kind))
    ours = convert(hf_model, source="transformers")
    assert isinstance(ours, Mask2Former)
    hf_count = sum(p.numel() for p in hf_model.parameters())
    ours_count = sum(p.numel() for p in ours.parameters())
    # transformers' Swin keeps a final LayerNorm (2 × 8 × embed_dim) that the backbone never uses
    assert hf_count - ours_count == (2 * 8 * 32 if kind == "swin" else 0)
    # 96×64 with Swin window 4 exercises padding (stage 1 is 24×16) and shifted windows
    assert_parity(hf_model, ours)


@pytest.mark.slow
def test_state_dict_with_target_and_old_swin_names():
    hf_model = hf_mask2former(swin_config())
    state = hf_model.state_dict()
    # transformers 4.x layout of Swin attention / MLP (hub checkpoints use it)
    old = {}
    for key, value in state.items():
        key = key.replace("attention.q_proj", "attention.self.query").replace(
            "attention.k_proj", "attention.self.key"
        )
        key = key.replace("attention.v_proj", "attention.self.value").replace(
            "attention.o_proj", "attention.output.dense"
        )
        key = key.replace(
            "attention.relative_position_bias.relative_position_bias_table",
            "attention.self.relative_position_bias_table",
        )
        key = key.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        old[key] = value
    assert old.keys() != state.keys()
    reference = convert(hf_model, source="transformers")
    target = Mask2Former(**reference.init_args).eval()
    ours = convert(old, source="transformers", target=target)
    assert ours is target
    for key, value in reference.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key


def test_bare_state_dict_needs_target():
    with pytest.raises(ValueError, match="target"):
        convert({"class_predictor.weight": torch.zeros(1)}, source="transformers")


def test_state_dict_mismatch_is_reported():
    ours = MaskFormer(
        3,
        backbone="resnet_18",
        num_queries=4,
        hidden_dim=32,
        fpn_dim=32,
        mask_dim=32,
        decoder_layers=1,
        num_heads=2,
        ffn_dim=32,
    )
    with pytest.raises(KeyError, match="no transformers source"):
        convert_state_dict({"unrelated.weight": torch.zeros(1)}, ours)
    with pytest.raises(ValueError, match="MaskFormer or Mask2Former"):
        key_map(torch.nn.Linear(2, 2))


def test_key_map_is_explicit_and_complete():
    ours = Mask2Former(
        3,
        backbone="swin",
        backbone_kwargs={
            "embed_dim": 32,
            "depths": [1, 1, 2, 1],
            "num_heads": [1, 2, 4, 8],
            "window_size": 4,
        },
        num_queries=4,
        hidden_dim=64,
        feature_dim=64,
        mask_dim=64,
        decoder_layers=2,
        encoder_layers=1,
    )
    mapping = key_map(ours)
    assert set(mapping) == set(ours.state_dict())
    assert (
        mapping["backbone.out_norms.3.weight"]
        == "model.pixel_level_module.encoder.hidden_states_norms.stage4.weight"
    )
    assert mapping["decoder_layers.0.cross_attn.k_proj.weight"] == (
        "split:k:model.transformer_module.decoder.layers.0.cross_attn.in_proj_weight"
    )
    assert (
        mapping["pixel_decoder.lateral_convs.0.conv.weight"]
        == "model.pixel_level_module.decoder.adapter_1.0.weight"
    )
    assert not any("swin.layernorm" in v for v in mapping.values())


def test_unsupported_configuration_errors():
    config = transformers.ResNetConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], layer_type="basic", out_features=STAGES
    )
    with torch.device("meta"):
        hf_model = transformers.MaskFormerForInstanceSegmentation(
            transformers.MaskFormerConfig(backbone_config=config, num_labels=3)
        )
    with pytest.raises(ValueError, match="unsupported ResNet backbone configuration.*hidden_sizes"):
        convert(hf_model, source="transformers")
    with pytest.raises(ValueError, match="unsupported transformers class"):
        convert(hf_model.model, source="transformers")


# transformers configurations of the seed's catalogue (num_labels=150, default sizes otherwise)
SEED = {
    "maskformer_resnet_18": ("maskformer", ("basic", [2, 2, 2, 2])),
    "maskformer_resnet_34": ("maskformer", ("basic", [3, 4, 6, 3])),
    "maskformer_resnet_50": ("maskformer", ("bottleneck", [3, 4, 6, 3])),
    "maskformer_resnet_101": ("maskformer", ("bottleneck", [3, 4, 23, 3])),
    "mask2former_resnet_18": ("mask2former", ("basic", [2, 2, 2, 2])),
    "mask2former_resnet_34": ("mask2former", ("basic", [3, 4, 6, 3])),
    "mask2former_resnet_50": ("mask2former", ("bottleneck", [3, 4, 6, 3])),
    "mask2former_resnet_101": ("mask2former", ("bottleneck", [3, 4, 23, 3])),
    "mask2former_swin_tiny": ("mask2former", (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224)),
    "mask2former_swin_small": ("mask2former", (96, [2, 2, 18, 2], [3, 6, 12, 24], 7, 224)),
    "mask2former_swin_base": ("mask2former", (128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384)),
    "mask2former_swin_large": ("mask2former", (192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384)),
}


@pytest.mark.parametrize("name", sorted(SEED))
def test_counts_equal_transformers(name):
    """Our seed counts are transformers' (minus the Swin's unused final LayerNorm), built on the meta device."""
    from medsegkit import model_info

    family, spec = SEED[name]
    if isinstance(spec[0], str):
        widths = [64, 128, 256, 512] if spec[0] == "basic" else [256, 512, 1024, 2048]
        backbone = transformers.ResNetConfig(
            depths=spec[1], hidden_sizes=widths, layer_type=spec[0], out_features=STAGES
        )
        unused = 0
    else:
        embed, depths, heads, window, size = spec
        backbone = transformers.SwinConfig(
            embed_dim=embed,
            depths=depths,
            num_heads=heads,
            window_size=window,
            image_size=size,
            out_features=STAGES,
        )
        unused = 16 * embed
    with torch.device("meta"):
        if family == "maskformer":
            hf_model = transformers.MaskFormerForInstanceSegmentation(
                transformers.MaskFormerConfig(backbone_config=backbone, num_labels=150)
            )
        else:
            hf_model = transformers.Mask2FormerForUniversalSegmentation(
                transformers.Mask2FormerConfig(backbone_config=backbone, num_labels=150)
            )
    assert model_info(name).num_params == sum(p.numel() for p in hf_model.parameters()) - unused
