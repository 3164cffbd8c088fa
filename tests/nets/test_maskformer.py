"""MaskFormer: registry entries and exact counts, outputs in 2D and 3D, input errors, a 3D training run."""

from __future__ import annotations

import pytest
import torch

from medsegkit import create_model, list_models, model_info
from medsegkit.nets import MaskFormer
from medsegkit.nets.maskformer import build_backbone

COUNTS = {
    "maskformer_resnet_18": 24_700_119,
    "maskformer_resnet_34": 34_808_279,
    "maskformer_resnet_50": 41_307_863,
    "maskformer_resnet_101": 60_299_991,
}
TINY = {
    "num_queries": 6,
    "hidden_dim": 32,
    "num_heads": 4,
    "decoder_layers": 3,
    "ffn_dim": 64,
    "fpn_dim": 32,
    "mask_dim": 32,
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_seed_counts_and_metadata(name):
    info = model_info(name)
    assert info.num_params == COUNTS[name]
    assert (info.task, info.family, info.spatial_dims, info.num_classes, info.in_channels) == (
        "universal",
        "maskformer",
        2,
        150,
        3,
    )
    assert info.dotted_path == "medsegkit.nets.MaskFormer"
    info_3d = model_info(name + "_3d")
    assert (info_3d.spatial_dims, info_3d.in_channels, info_3d.num_classes) == (3, 1, 150)
    assert len(info_3d.input_shape) == 5


def test_registered_names():
    assert list_models("maskformer_*") == sorted(list(COUNTS) + [n + "_3d" for n in COUNTS])
    assert set(list_models("maskformer_*", task="universal", spatial_dims=3)) == {n + "_3d" for n in COUNTS}


def test_outputs_2d_eval_and_training():
    model = MaskFormer(4, backbone="resnet_18", **TINY)
    assert model.medsegkit_task == "universal"
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert set(out) == {"pred_logits", "pred_masks"}
    assert out["pred_logits"].shape == (2, 6, 5)
    assert out["pred_masks"].shape == (2, 6, 16, 24)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert len(out["aux_outputs"]) == TINY["decoder_layers"] - 1
    assert all(a["pred_masks"].shape == (2, 6, 16, 16) for a in out["aux_outputs"])
    out["pred_masks"].mean().backward()
    assert model.query_embed.weight.grad is not None and model.backbone.stem.conv.weight.grad is not None


def test_outputs_3d():
    model = MaskFormer(2, backbone="resnet_18", spatial_dims=3, in_channels=1, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 64, 32))
    assert out["pred_logits"].shape == (1, 6, 3)
    assert out["pred_masks"].shape == (1, 6, 8, 16, 8)


def test_input_and_argument_errors():
    model = MaskFormer(2, backbone="resnet_18", **TINY)
    with pytest.raises(ValueError, match=r"expects a \(N, C, H, W\) tensor"):
        model(torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="in_channels=3.*1 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown backbone 'swin_tiny'; accepted: resnet_18"):
        MaskFormer(2, backbone="swin_tiny")
    with pytest.raises(ValueError, match="num_classes"):
        MaskFormer(0)
    with pytest.raises(ValueError, match="2D only"):
        build_backbone("swin_tiny", spatial_dims=3, in_channels=1, allow_swin=True)
    with pytest.raises(TypeError, match="accepted arguments"):
        create_model("maskformer_resnet_18", not_an_argument=1)


def test_create_model_overrides():
    with torch.device("meta"):
        model = create_model("maskformer_resnet_50_3d", num_classes=3, num_queries=20)
    assert (model.spatial_dims, model.in_channels, model.num_classes, model.num_queries) == (3, 1, 3, 20)
    assert model.medsegkit_config == {
        "name": "maskformer_resnet_50_3d",
        "overrides": {"num_classes": 3, "num_queries": 20},
    }


def _query_loss(out, target_labels, target_masks):
    """Fixed assignment (query i ↔ object i, the rest "no object"): class CE + mask BCE, aux layers included."""
    total = 0.0
    for item in [out] + out.get("aux_outputs", []):
        logits, masks = item["pred_logits"], item["pred_masks"]
        labels = torch.full(logits.shape[:2], logits.shape[-1] - 1, dtype=torch.long)
        labels[:, : len(target_labels)] = target_labels
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        picked = masks[:, : len(target_labels)]
        total = total + torch.nn.functional.binary_cross_entropy_with_logits(
            picked, target_masks.expand_as(picked)
        )
    return total


@pytest.mark.slow
def test_3d_training_lowers_the_loss():
    torch.manual_seed(0)
    model = MaskFormer(2, backbone="resnet_18", spatial_dims=3, in_channels=1, dropout=0.0, **TINY).train()
    model.backbone.requires_grad_(False)  # keeps the run short; pixel decoder, decoder and heads learn
    # the stride-32 map must hold several voxels: DETR queries only tell themselves apart through
    # cross-attention over more than one memory token. Batch 2: BatchNorm needs 2 values per channel.
    x = torch.randn(2, 1, 16, 32, 64)
    masks = torch.zeros(2, 2, 4, 8, 16)
    masks[:, 0, :, :, :8] = 1
    masks[:, 1, :, :, 8:] = 1
    labels = torch.tensor([0, 1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(15):
        loss = _query_loss(model(x), labels, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # DETR-style decoders start slowly (queries begin identical); 15 steps take the loss down by > 15 %
    assert losses[-1] < 0.85 * losses[0], losses
