"""Mask R-CNN: exact seed counts, num_classes convention, anchors, training step, eval outputs."""

from __future__ import annotations

import pytest
import torch

from medsegkit import create_model, list_models, model_info
from medsegkit.nets import MaskRCNN
from medsegkit.registry import get_model_spec

# a small configuration: ResNet-18 body, narrow FPN and heads, anchors for ~10-30 px objects
SMALL = dict(
    depth=18, keep_fc=False, fpn_channels=32, representation_size=64, mask_layers=(32, 32),
    anchor_sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=(1.0,),
    min_size=64, max_size=64, rpn_batch_size_per_image=64, box_batch_size_per_image=32,
    rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50,
)  # fmt: skip


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,count,num_classes",
    [("mask_rcnn_resnet_50_fpn", 46_037_607, 2), ("mask_rcnn_resnet_101_fpn", 65_126_611, 20)],
)
def test_seed_parameter_counts(name, count, num_classes):
    info = model_info(name)
    assert info.num_params == count
    assert (info.task, info.num_classes, info.in_channels, info.spatial_dims) == (
        "instance",
        num_classes,
        3,
        2,
    )
    assert list_models("mask_rcnn_*", task="instance") == [
        "mask_rcnn_resnet_101_fpn",
        "mask_rcnn_resnet_50_fpn",
    ]


def test_recipe_parts():
    with torch.device("meta"):
        model = MaskRCNN(num_classes=2)
        no_fc = MaskRCNN(num_classes=2, keep_fc=False)
        coco = MaskRCNN(num_classes=90, keep_fc=False, anchor_sizes=((32,), (64,), (128,), (256,), (512,)))
    # seed table: total = ResNet-50 with fc + 20,464,429 + 5,382 * C, C counting background
    assert _count(model) == 25_557_032 + 20_464_429 + 5_382 * 3
    assert _count(model) - _count(no_fc) == 2_049_000
    assert model.rpn.head.cls_logits.out_channels == 9 and coco.rpn.head.cls_logits.out_channels == 3
    assert model.roi_heads.box_predictor.cls_score.out_features == 3  # background + 2
    assert _count(model.backbone.fpn) == 3_344_384 and _count(model.rpn.head) == 601_645
    assert _count(coco) == 44_454_513  # torchvision maskrcnn_resnet50_fpn(weights=None), trainable BN
    spec = get_model_spec("mask_rcnn_resnet_50_fpn").weights
    assert spec.url.endswith("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth") and spec.num_params == 44_454_513
    assert len(spec.meta["categories"]) == 91


def test_pretrained_conflicting_override():
    with pytest.raises(ValueError, match="num_classes=90"):
        create_model("mask_rcnn_resnet_50_fpn", pretrained=True, num_classes=2)
    with pytest.raises(ValueError, match="keep_fc"):
        create_model("mask_rcnn_resnet_50_fpn", pretrained=True, keep_fc=True)


def _synthetic_batch(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, size, size, generator=g) * 0.1
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 8:24, 10:30] = 1
        masks[1, 36:56, 34:50] = 1
        image[:, masks.bool().any(0)] += 0.8
        boxes = torch.tensor([[10.0, 8.0, 30.0, 24.0], [34.0, 36.0, 50.0, 56.0]])
        images.append(image)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


def test_training_step_and_eval_outputs():
    torch.manual_seed(0)
    model = MaskRCNN(num_classes=2, **SMALL)
    images, targets = _synthetic_batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    assert all(torch.isfinite(v) for v in losses.values())
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    changed = [k for k, v in model.named_parameters() if not torch.equal(before[k], v)]
    for part in (
        "backbone.body.stem.conv.weight",
        "backbone.fpn.inner_blocks.0.0.weight",
        "rpn.head.cls_logits.weight",
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.weight",
    ):
        assert part in changed

    model.eval()
    with torch.no_grad():
        batched = model(torch.stack(images))
        listed = model(images)
    assert len(batched) == 2
    for a, b in zip(batched, listed):
        assert set(a) == {"boxes", "labels", "scores", "masks"}
        assert torch.equal(a["boxes"], b["boxes"])
        k = a["boxes"].shape[0]
        assert a["masks"].shape == (k, 1, 64, 64) and a["labels"].shape == (k,)
        assert ((a["labels"] >= 1) & (a["labels"] <= 2)).all()


def test_bad_inputs():
    model = MaskRCNN(num_classes=1, **SMALL).eval()
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model([torch.zeros(1, 32, 32)])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        model(torch.zeros(3, 32, 32))
    model.train()
    with pytest.raises(ValueError, match="needs targets"):
        model([torch.zeros(3, 32, 32)])
    with pytest.raises(ValueError, match="foreground"):
        MaskRCNN(num_classes=0)
    with pytest.raises(ValueError, match="same number of anchors"):
        MaskRCNN(num_classes=1, anchor_sizes=((8,), (16, 32), (32,), (64,), (128,)))
    with pytest.raises(ValueError, match="image_mean"):
        MaskRCNN(num_classes=1, in_channels=1)
