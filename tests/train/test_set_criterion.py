"""HungarianMatcher / SetCriterion against transformers' MaskFormerLoss and Mask2FormerLoss, plus overfitting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsegkit.train.set_criterion import HungarianMatcher, SetCriterion, sample_points

transformers = pytest.importorskip("transformers")
from transformers.models.mask2former import modeling_mask2former as hf_m2f  # noqa: E402
from transformers.models.maskformer import modeling_maskformer as hf_mf  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny-model training loops run faster on one thread, and far faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(n=2, q=8, k=4, pred_size=(12, 12), target_size=(24, 24), objects=(3, 2), seed=0, aux=0):
    g = torch.Generator().manual_seed(seed)

    def pred():
        return {
            "pred_logits": torch.randn(n, q, k + 1, generator=g) * 2,
            "pred_masks": torch.randn(n, q, *pred_size, generator=g) * 3,
        }

    outputs = pred()
    if aux:
        outputs["aux_outputs"] = [pred() for _ in range(aux)]
    targets = [
        {
            "labels": torch.randint(0, k, (m,), generator=g),
            "masks": (torch.rand(m, *target_size, generator=g) > 0.6).float(),
        }
        for m in objects
    ]
    return outputs, targets


def _hf_args(outputs, targets):
    return dict(
        masks_queries_logits=outputs["pred_masks"],
        class_queries_logits=outputs["pred_logits"],
        mask_labels=[t["masks"] for t in targets],
        class_labels=[t["labels"] for t in targets],
    )


def _hf_aux(outputs):
    return [{"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]} for a in outputs["aux_outputs"]]


def _same_indices(ours, theirs):
    assert len(ours) == len(theirs)
    for (qi, ti), (hq, ht) in zip(ours, theirs):
        assert torch.equal(qi, hq) and torch.equal(ti, ht)


def test_matcher_equals_maskformer_matcher():
    outputs, targets = _batch(objects=(3, 5))
    ours = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5)(outputs, targets)
    theirs = hf_mf.MaskFormerHungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5)(**_hf_args(outputs, targets))
    _same_indices(ours, theirs)
    assert [len(q) for q, _ in ours] == [3, 5]


def test_matcher_equals_mask2former_matcher_under_same_seed():
    outputs, targets = _batch(objects=(4, 1), pred_size=(16, 16), target_size=(16, 16))
    torch.manual_seed(11)
    ours = HungarianMatcher(num_points=200)(outputs, targets)
    torch.manual_seed(11)
    theirs = hf_m2f.Mask2FormerHungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=200)(
        **_hf_args(outputs, targets)
    )
    _same_indices(ours, theirs)


def test_matcher_finds_the_obvious_assignment():
    # query 2 predicts object 0 exactly, query 5 object 1
    masks = torch.zeros(2, 8, 8)
    masks[0, :4], masks[1, 4:] = 1, 1
    pred_masks = torch.full((1, 6, 8, 8), -8.0)
    pred_masks[0, 2] = masks[0] * 16 - 8
    pred_masks[0, 5] = masks[1] * 16 - 8
    logits = torch.zeros(1, 6, 4)
    logits[0, 2, 1] = logits[0, 5, 0] = 8.0
    targets = [{"labels": torch.tensor([1, 0]), "masks": masks}]
    for num_points in (None, 64):
        (queries, objects), = HungarianMatcher(num_points=num_points)({"pred_logits": logits, "pred_masks": pred_masks}, targets)
        assert dict(zip(objects.tolist(), queries.tolist())) == {0: 2, 1: 5}


@pytest.mark.parametrize("aux", [0, 2])
def test_criterion_equals_maskformer_loss(aux):
    # different target sizes in the batch: both zero-pad to the largest
    outputs, targets = _batch(aux=aux, seed=1)
    targets[1]["masks"] = targets[1]["masks"][:, :20, :18]
    weights = {"loss_cross_entropy": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}
    ours = SetCriterion(4, eos_coef=0.1, weight_dict=weights)(outputs, targets)
    matcher = hf_mf.MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
    hf_loss = hf_mf.MaskFormerLoss(num_labels=4, matcher=matcher, weight_dict=weights, eos_coef=0.1)
    theirs = hf_loss(**_hf_args(outputs, targets), auxiliary_predictions=_hf_aux(outputs) if aux else None)
    assert set(ours) == set(theirs) | {"loss"}
    assert len(theirs) == 3 * (1 + aux)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=0, msg=key)
    expected = sum(v * weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] for k, v in theirs.items())
    torch.testing.assert_close(ours["loss"], expected, rtol=1e-6, atol=0)


def test_criterion_equals_mask2former_loss_under_same_seed():
    outputs, targets = _batch(aux=1, seed=2, pred_size=(16, 16), target_size=(32, 32))
    config = transformers.Mask2FormerConfig(
        num_labels=4, train_num_points=300, oversample_ratio=3.0, importance_sample_ratio=0.75
    )
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    torch.manual_seed(5)
    ours = SetCriterion(4, num_points=300)(outputs, targets)
    torch.manual_seed(5)
    theirs = hf_m2f.Mask2FormerLoss(config, weights)(**_hf_args(outputs, targets), auxiliary_predictions=_hf_aux(outputs))
    assert set(ours) == set(theirs) | {"loss"}
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=0, msg=key)


def test_sample_points_3d_matches_trilinear_lookup():
    volume = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4)
    # voxel centres in normalised [0, 1] coordinates, (x, y, z) = (w, h, d) order
    centres = torch.tensor([[[(0 + 0.5) / 4, (1 + 0.5) / 3, (1 + 0.5) / 2], [(3 + 0.5) / 4, (2 + 0.5) / 3, (0 + 0.5) / 2]]])
    assert sample_points(volume, centres).tolist() == [[[volume[0, 0, 1, 1, 0].item(), volume[0, 0, 0, 2, 3].item()]]]
    with pytest.raises(ValueError, match="3 coordinates"):
        sample_points(volume, centres[..., :2])


@pytest.mark.parametrize("num_points", [None, 100])
def test_criterion_3d_and_empty_targets(num_points):
    outputs, targets = _batch(q=5, k=3, pred_size=(4, 6, 6), target_size=(8, 12, 12), objects=(2, 0), aux=1, seed=3)
    outputs["pred_masks"].requires_grad_(True)
    losses = SetCriterion(3, num_points=num_points)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert outputs["pred_masks"].grad.abs().sum() > 0
    # a batch without any object: only "no object" class loss, zero mask losses
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 12, 12)}] * 2
    losses = SetCriterion(3, num_points=num_points)(outputs, empty)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_cross_entropy"] > 0


def test_bad_arguments():
    outputs, targets = _batch()
    with pytest.raises(ValueError, match="num_classes=3"):
        SetCriterion(3)(outputs, [{"labels": t["labels"] % 3, "masks": t["masks"]} for t in targets])
    with pytest.raises(ValueError, match=r"integer class ids in \[0, 4\)"):
        SetCriterion(4)(outputs, [{"labels": torch.tensor([7]), "masks": torch.zeros(1, 24, 24)}] * 2)
    with pytest.raises(ValueError, match="list of 2 dicts"):
        SetCriterion(4)(outputs, targets[:1])
    with pytest.raises(ValueError, match="3 spatial dims|2 spatial dims"):
        SetCriterion(4)(outputs, [{"labels": torch.tensor([1]), "masks": torch.zeros(1, 2, 24, 24)}] * 2)
    with pytest.raises(TypeError, match="pred_logits"):
        SetCriterion(4)({"logits": 1}, targets)
    with pytest.raises(ValueError, match="subset of"):
        SetCriterion(4, losses=("boxes",))
    with pytest.raises(ValueError, match="unknown"):
        SetCriterion(4, weight_dict={"loss_ce": 1.0})
    with pytest.raises(ValueError, match="mask_loss"):
        HungarianMatcher(mask_loss="l1")
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(0, 0, 0)


class TinyQueryNet(nn.Module):
    """A small learnable query model: conv features, learned queries, dot-product masks."""

    medsegkit_task = "universal"

    def __init__(self, spatial_dims=2, in_channels=1, num_classes=2, num_queries=6, hidden=16):
        super().__init__()
        from monai.networks.blocks import Convolution

        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self.features = nn.Sequential(
            Convolution(spatial_dims, in_channels, hidden, strides=2, norm="instance", act="relu"),
            Convolution(spatial_dims, hidden, hidden, norm="instance", act="relu"),
            Convolution(spatial_dims, hidden, hidden, conv_only=True),
        )
        self.queries = nn.Parameter(torch.randn(num_queries, hidden))
        self.attend = nn.MultiheadAttention(hidden, 2, batch_first=True)
        self.classify = nn.Linear(hidden, num_classes + 1)

    def forward(self, x):
        features = self.features(x)  # (N, C, *spatial/2)
        tokens = features.flatten(2).transpose(1, 2)
        queries = self.queries.expand(x.shape[0], -1, -1)
        queries = queries + self.attend(queries, tokens, tokens)[0]
        masks = torch.einsum("nqc, nc... -> nq...", queries, features)
        return {"pred_logits": self.classify(queries), "pred_masks": masks}


def _synthetic_batch(spatial_dims=2, size=32):
    """Two images, each with a bright square (class 0) and a dark-on-grey disc (class 1)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * spatial_dims, indexing="ij")).float()
    images, targets = [], []
    for centre_a, centre_b in [(8, 22), (22, 9)]:
        square = ((grid - centre_a).abs() <= 5).all(0)
        disc = ((grid - centre_b) ** 2).sum(0) <= 25
        disc &= ~square
        image = 0.5 * disc.float() + 1.0 * square.float()
        images.append(image[None])
        targets.append({"labels": torch.tensor([0, 1]), "masks": torch.stack([square, disc]).float()})
    return torch.stack(images), targets


@pytest.mark.parametrize("spatial_dims,num_points,steps", [(2, None, 60), (2, 256, 60), (3, 512, 40)])
def test_overfits_one_batch(spatial_dims, num_points, steps, one_thread):
    torch.manual_seed(0)
    size = 32 if spatial_dims == 2 else 16
    images, targets = _synthetic_batch(spatial_dims, size)
    model = TinyQueryNet(spatial_dims=spatial_dims)
    criterion = SetCriterion(2, num_points=num_points)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        loss = criterion(model(images), targets)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert min(history[-5:]) <= 0.5 * history[0], history


TINY_QUERY_MODELS = {
    "maskformer": ("medsegkit.nets.maskformer", "MaskFormer", {"decoder_layers": 2, "fpn_dim": 32, "dropout": 0.0}, None),
    "mask2former": (
        "medsegkit.nets.mask2former", "Mask2Former",
        {"decoder_layers": 3, "encoder_layers": 1, "encoder_ffn_dim": 64, "feature_dim": 32}, 256,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY_QUERY_MODELS))
def test_real_query_model_overfits_one_batch(family, one_thread):
    """The real MaskFormer / Mask2Former (tiny heads, ResNet-18) with aux losses: loss halves in 20 steps."""
    import importlib

    module, name, extra, num_points = TINY_QUERY_MODELS[family]
    torch.manual_seed(0)
    model = getattr(importlib.import_module(module), name)(
        num_classes=2, backbone="resnet_18", in_channels=1, num_queries=6, hidden_dim=32, num_heads=2,
        ffn_dim=64, mask_dim=32, **extra,
    )
    images, targets = _synthetic_batch(2, 64)
    criterion = SetCriterion(2, num_points=num_points)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        losses = criterion(model(images), targets)
        optimiser.zero_grad()
        losses["loss"].backward()
        optimiser.step()
        history.append(losses["loss"].item())
    assert "loss_dice_0" in losses  # the decoder's auxiliary predictions are supervised too
    assert min(history[-3:]) <= 0.5 * history[0], history
