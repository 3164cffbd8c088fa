"""Mask2Former: counts, outputs (ResNet 2D/3D, Swin), masked attention, deformable attention (2D/3D), training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsegkit import create_model, list_models, model_info
from medsegkit.nets import Mask2Former
from medsegkit.nets.layers.deformable_attention import (
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
)
from medsegkit.nets.layers.position_encoding import sine_position_encoding

COUNTS = {
    "mask2former_resnet_18": 30_972_567,
    "mask2former_resnet_34": 41_080_727,
    "mask2former_resnet_50": 44_041_367,
    "mask2former_resnet_101": 63_033_495,
    "mask2former_swin_tiny": 47_439_633,
    "mask2former_swin_small": 68_757_537,
    "mask2former_swin_base": 106_922_191,
    "mask2former_swin_large": 215_488_779,
}
TINY = {
    "num_queries": 6,
    "hidden_dim": 32,
    "num_heads": 4,
    "decoder_layers": 4,
    "ffn_dim": 64,
    "encoder_layers": 1,
    "encoder_ffn_dim": 64,
    "feature_dim": 32,
    "mask_dim": 32,
}
SMALL_SWIN = {"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "window_size": 4}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_seed_counts_and_metadata(name):
    info = model_info(name)
    assert info.num_params == COUNTS[name]
    assert (info.task, info.family, info.num_classes, info.in_channels, info.spatial_dims) == (
        "universal",
        "mask2former",
        150,
        3,
        2,
    )
    assert info.dotted_path == "medsegkit.nets.Mask2Former"
    expected_size = 384 if name.endswith(("base", "large")) else 224 if "swin" in name else 512
    assert info.input_shape == (1, 3, expected_size, expected_size)


def test_registered_names_and_3d_variants():
    resnets = [n for n in COUNTS if "resnet" in n]
    assert list_models("mask2former_*", spatial_dims=3) == sorted(n + "_3d" for n in resnets)
    assert not any(n.startswith("mask2former_swin") and n.endswith("_3d") for n in list_models())
    info = model_info("mask2former_resnet_50_3d")
    assert (info.spatial_dims, info.in_channels) == (3, 1)
    # 3D has the same parameters but the 3D convolutions and 3-coordinate sampling offsets
    assert info.num_params > COUNTS["mask2former_resnet_50"]


def test_outputs_resnet_2d():
    model = Mask2Former(3, backbone="resnet_18", **TINY).eval()
    assert model.medsegkit_task == "universal"
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert set(out) == {"pred_logits", "pred_masks"}
    assert out["pred_logits"].shape == (2, 6, 4) and out["pred_masks"].shape == (2, 6, 16, 24)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    # one prediction from the learned queries + one per masked-attention layer; the last is the output
    assert len(out["aux_outputs"]) == TINY["decoder_layers"] - 1
    (out["pred_masks"].mean() + out["aux_outputs"][0]["pred_logits"].mean()).backward()
    assert model.pixel_decoder.encoder_layers[0].self_attn.sampling_offsets.weight.grad is not None


def test_outputs_swin_and_errors():
    model = Mask2Former(3, backbone="swin", backbone_kwargs=SMALL_SWIN, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["pred_masks"].shape == (1, 6, 16, 16)
    with pytest.raises(ValueError, match="2D only"):
        Mask2Former(3, backbone="swin_tiny", spatial_dims=3)
    with pytest.raises(ValueError, match="unknown Swin size 'huge'"):
        Mask2Former(3, backbone="swin_huge")
    with pytest.raises(ValueError, match=r"expects a \(N, C, D, H, W\) tensor"):
        Mask2Former(3, backbone="resnet_18", spatial_dims=3, in_channels=1, **TINY)(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="decoder_layers"):
        Mask2Former(3, decoder_layers=0)


def test_outputs_resnet_3d():
    model = Mask2Former(2, backbone="resnet_18", spatial_dims=3, in_channels=1, **TINY).eval()
    assert model.pixel_decoder.encoder_layers[0].self_attn.sampling_offsets.out_features == 4 * 3 * 4 * 3
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 64, 32))
    assert out["pred_logits"].shape == (1, 6, 3) and out["pred_masks"].shape == (1, 6, 8, 16, 8)
    assert torch.isfinite(out["pred_masks"]).all()


def test_masked_attention_uses_previous_layer_masks():
    torch.manual_seed(0)
    model = Mask2Former(3, backbone="resnet_18", **TINY).train()  # training: every layer's masks come back
    seen = []
    for layer in model.decoder_layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append((args[2].shape[1], args[4])))
    out = model(torch.randn(1, 3, 96, 64))
    predictions = [a["pred_masks"] for a in out["aux_outputs"]]
    sizes = [(3, 2), (6, 4), (12, 8)]  # strides 32, 16, 8: round robin from the coarsest level
    assert len(seen) == TINY["decoder_layers"] - 1
    for index, (tokens, attn_mask) in enumerate(seen):
        size = sizes[index % 3]
        assert tokens == size[0] * size[1]
        resized = F.interpolate(predictions[index], size=size, mode="bilinear", align_corners=False)
        expected = resized.flatten(2).sigmoid() >= 0.5
        expected |= ~expected.any(-1, keepdim=True)  # a query with an empty mask attends everywhere
        assert attn_mask.dtype == torch.bool and attn_mask.shape == (1, 1, 6, tokens)
        assert torch.equal(attn_mask[:, 0], expected)


@pytest.mark.parametrize(("spatial_dims", "shape"), [(2, (1, 3, 96, 64)), (3, (1, 1, 32, 64, 32))])
def test_inference_attention_masks_from_resized_embeddings_equal_the_full_path(spatial_dims, shape):
    """In eval, attention masks come from resized pixel embeddings (resize(E·F) = E·resize(F)); the
    result must equal the training path, which predicts full-resolution masks and resizes them."""
    torch.manual_seed(0)
    model = Mask2Former(3, backbone="resnet_18", spatial_dims=spatial_dims, in_channels=shape[1], **TINY)
    x = torch.randn(shape)
    masks_seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for layer in model.decoder_layers:
        layer.register_forward_pre_hook(lambda module, args: masks_seen[model.training].append(args[4]))
    with torch.no_grad():
        fast = model.eval()(x)
        # the training branch with every layer behaving as in eval (BatchNorm statistics, no dropout)
        model.train()
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
                module.eval()
        full = model(x)
    assert len(masks_seen[False]) == len(masks_seen[True]) == TINY["decoder_layers"] - 1
    for got, expected in zip(masks_seen[False], masks_seen[True]):
        assert torch.equal(got, expected)
    torch.testing.assert_close(fast["pred_logits"], full["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast["pred_masks"], full["pred_masks"], rtol=0, atol=1e-5)
    assert "aux_outputs" not in fast and len(full["aux_outputs"]) == TINY["decoder_layers"] - 1


def test_deformable_attention_matches_transformers_2d():
    pytest.importorskip("transformers")
    from transformers.models.mask2former.modeling_mask2former import (
        multi_scale_deformable_attention as reference,
    )

    torch.manual_seed(0)
    batch, heads, head_dim, levels, points = 2, 4, 8, 3, 4
    shapes = [(6, 5), (3, 3), (2, 1)]
    length = sum(h * w for h, w in shapes)
    queries = 7
    value = torch.randn(batch, length, heads, head_dim)
    locations = torch.rand(batch, queries, heads, levels, points, 2) * 1.4 - 0.2  # some outside the map
    weights = torch.rand(batch, queries, heads, levels, points)
    expected = reference(value, shapes, locations, weights)  # (N, Q, C)
    sizes = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float32)  # (levels, x/y)
    pixels = (locations * sizes[:, None, :] - 0.5).permute(3, 5, 0, 1, 2, 4)  # (levels, 2, N, Q, heads, P)
    ours = multi_scale_deformable_attention(value, shapes, pixels, weights.permute(3, 0, 1, 2, 4))
    assert ours.shape == expected.shape == (batch, queries, heads * head_dim)
    assert (ours - expected).abs().max() < 1e-5


def test_deformable_attention_3d_samples_voxels_and_interpolates():
    torch.manual_seed(0)
    heads, head_dim, points = 2, 3, 2
    shapes = [(4, 3, 2), (2, 2, 1)]
    length = sum(d * h * w for d, h, w in shapes)
    value = torch.randn(1, length, heads, head_dim)
    # point 0 samples voxel (d=1, h=2, w=0) of level 0 / (1, 0, 0) of level 1 exactly at its centre
    # (pixel coordinates (x, y, z)); point 1 lies halfway between two voxels along z
    pixels = torch.zeros(2, 3, 1, 1, heads, points)
    pixels[0, :, 0, 0, :, 0] = torch.tensor([0.0, 2.0, 1.0])[:, None]
    pixels[1, :, 0, 0, :, 0] = torch.tensor([0.0, 0.0, 1.0])[:, None]
    pixels[0, :, 0, 0, :, 1] = torch.tensor([1.0, 0.0, 2.5])[:, None]
    pixels[1, :, 0, 0, :, 1] = torch.tensor([0.0, 1.0, 1.5])[:, None]  # z = 1.5: half outside (zeros)
    weights = torch.tensor([[0.25, 0.15], [0.35, 0.25]]).view(2, 1, 1, 1, points).expand(2, 1, 1, heads, points)
    out = multi_scale_deformable_attention(value, shapes, pixels, weights)
    level0 = value[0, :24].view(4, 3, 2, heads, head_dim)
    level1 = value[0, 24:].view(2, 2, 1, heads, head_dim)
    expected = (
        0.25 * level0[1, 2, 0]
        + 0.15 * 0.5 * (level0[2, 0, 1] + level0[3, 0, 1])
        + 0.35 * level1[1, 0, 0]
        + 0.25 * 0.5 * level1[1, 1, 0]
    )
    assert out.shape == (1, 1, heads * head_dim)
    torch.testing.assert_close(out[0, 0], expected.flatten(), rtol=0, atol=1e-6)


def test_deformable_attention_gradients_match_grid_sample():
    """Autograd through the gather: values, attention weights and sampling positions (via the
    interpolation weights) get grid_sample's gradients."""
    torch.manual_seed(0)
    heads, head_dim, points, queries = 2, 4, 3, 5
    shapes = [(5, 6), (3, 2)]
    length = sum(h * w for h, w in shapes)
    value = torch.randn(1, length, heads, head_dim, requires_grad=True)
    grid = (torch.rand(2, heads, points, queries, 2) * 2.4 - 1.2).requires_grad_(True)  # (levels, h, P, Q, xy)
    attn = torch.rand(2, heads, points, queries, requires_grad=True)
    out_ref = 0
    start = 0
    for level, (h, w) in enumerate(shapes):
        level_value = value[0, start : start + h * w].reshape(h, w, heads, head_dim).permute(2, 3, 0, 1)
        start += h * w
        sampled = torch.nn.functional.grid_sample(level_value, grid[level], align_corners=False)  # (h, D, P, Q)
        out_ref = out_ref + (sampled * attn[level][:, None]).sum(2)  # (heads, D, Q)
    out_ref = out_ref.permute(2, 0, 1).reshape(1, queries, heads * head_dim)
    sizes = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float32)
    pixels = ((grid + 1) * sizes[:, None, None, None, :] - 1) / 2  # (levels, heads, P, Q, xy)
    ours = multi_scale_deformable_attention(
        value, shapes, pixels.permute(0, 4, 3, 1, 2).unsqueeze(2), attn.permute(0, 3, 1, 2).unsqueeze(1)
    )
    torch.testing.assert_close(ours, out_ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(ours)
    got = torch.autograd.grad((ours * upstream).sum(), [value, grid, attn])
    expected = torch.autograd.grad((out_ref * upstream).sum(), [value, grid, attn])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_deformable_module_errors_and_init():
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(30, 4)
    module = MultiScaleDeformableAttention(16, 4, 2, 2, spatial_dims=3)
    offsets = module.sampling_offsets.bias.view(4, 2, 2, 3)
    assert torch.allclose(offsets[:, :, 1], 2 * offsets[:, :, 0])  # rings of points at growing distance
    with pytest.raises(ValueError, match="expected 2 feature levels"):
        module(torch.zeros(1, 3, 16), torch.zeros(1, 3, 3), torch.zeros(1, 8, 16), [(2, 2, 2)])


def test_position_encoding_matches_transformers_and_is_nd():
    pytest.importorskip("transformers")
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding

    reference = Mask2FormerSinePositionEmbedding(num_position_features=32, normalize=True)(
        (2, 64, 5, 7), "cpu", torch.float32
    )
    ours = sine_position_encoding((5, 7), 64)
    assert ours.shape == (1, 64, 5, 7) and torch.allclose(ours[0], reference[0], atol=1e-6)
    volume = sine_position_encoding((3, 4, 5), 64)
    assert volume.shape == (1, 64, 3, 4, 5)
    with torch.inference_mode():  # cached under inference mode, then used where autograd records
        sine_position_encoding((2, 3), 8)
    weight = torch.randn(8, 8, requires_grad=True)
    torch.nn.functional.linear(sine_position_encoding((2, 3), 8).flatten(2).mT, weight).sum().backward()
    assert weight.grad is not None
    flat = volume.flatten(2)[0].T  # every voxel gets a distinct code
    assert torch.cdist(flat, flat).add(torch.eye(60) * 10).min() > 1e-3


@pytest.mark.slow
def test_3d_training_with_set_criterion_lowers_the_loss():
    from medsegkit.train.set_criterion import SetCriterion

    torch.manual_seed(0)
    model = Mask2Former(2, backbone="resnet_18", spatial_dims=3, in_channels=1, **TINY).train()
    model.backbone.requires_grad_(False)  # keeps the run short; pixel decoder, decoder and heads learn
    criterion = SetCriterion(2, num_points=None, mask_loss="bce")
    x = torch.randn(2, 1, 32, 32, 32)  # batch 2: BatchNorm needs 2 values at the 1×1×1 stride-32 level
    masks = torch.zeros(2, 8, 8, 8)
    masks[0, :4] = 1
    masks[1, 4:] = 1
    targets = [{"labels": torch.tensor([0, 1]), "masks": masks} for _ in range(2)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(10):
        loss = criterion(model(x), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_create_model_records_overrides():
    with torch.device("meta"):
        model = create_model("mask2former_swin_tiny", num_classes=4)
    assert model.num_classes == 4 and model.class_head.out_features == 5
    assert model.medsegkit_config == {"name": "mask2former_swin_tiny", "overrides": {"num_classes": 4}}


def test_short_axis_softmax_equals_torch_softmax():
    from medsegkit.nets.layers.deformable_attention import _softmax_short_last

    x = torch.randn(2, 50, 8, 12) * 20  # large logits: the max shift must keep exp finite
    with torch.no_grad():
        torch.testing.assert_close(_softmax_short_last(x), x.softmax(-1), rtol=0, atol=1e-6)
    x.requires_grad_(True)
    _softmax_short_last(x).pow(2).sum().backward()  # training keeps torch's softmax (autograd)
    assert x.grad is not None and torch.isfinite(x.grad).all()
