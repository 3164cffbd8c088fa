"""torchvision → medsegkit conversion: FCN and Mask R-CNN output parity, ResNet into detector backbones."""

from __future__ import annotations

import pytest
import torch
import torchvision

from medsegkit.nets import FCN, MaskRCNN
from medsegkit.weights import convert
from medsegkit.weights.from_torchvision import fcn_key, mask_rcnn_key


def _randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine values (default ones would hide a wrong key map)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


@pytest.fixture(scope="module")
def tv_fcn():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    )
    _randomise_norms(model)
    return model.eval()


@pytest.mark.slow
def test_fcn_parity_torchvision(tv_fcn):
    """torchvision fcn_resnet50 vs ours after conversion: max |Δ| ≤ 1e-5 (fp32), eval mode."""
    ours = convert(tv_fcn, source="torchvision").eval()
    assert isinstance(ours, FCN) and ours.aux_head is not None
    x = torch.randn(1, 3, 72, 88, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tv_fcn(x)
        got = ours(x)
        ours.train()
        for m in ours.modules():  # aux head in training mode, with frozen statistics and no dropout
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)):
                m.eval()
        got_aux = ours(x)["aux"][0]
    assert (got - expected["out"]).abs().max().item() <= 1e-5
    assert (got_aux - expected["aux"]).abs().max().item() <= 1e-5


def test_fcn_state_dict_into_registry_name_and_no_aux_target(tv_fcn):
    state = tv_fcn.state_dict()
    ours = convert(state, source="torchvision", target="fcn_resnet_50")
    assert torch.equal(ours.head.out.weight, tv_fcn.classifier[4].weight)
    assert torch.equal(ours.aux_head.conv.weight, tv_fcn.aux_classifier[0].weight)
    no_aux = convert(state, source="torchvision", target=FCN(aux_loss=False))
    assert no_aux.aux_head is None and torch.equal(
        no_aux.backbone.stages[2][5].norm3.running_var, tv_fcn.backbone.layer3[5].bn3.running_var
    )
    assert fcn_key("classifier.1.running_mean") == "head.norm.running_mean"
    with pytest.raises(KeyError, match="indices 0, 1 and 4"):
        fcn_key("classifier.2.weight")
    with pytest.raises(ValueError, match="do not fit FCN"):
        convert(state, source="torchvision", target=FCN(out_channels=5))


def _tv_mask_rcnn(**kw):
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kw)
    _randomise_norms(model)
    return model.eval()


@pytest.mark.slow
def test_mask_rcnn_parity_torchvision():
    """torchvision maskrcnn_resnet50_fpn (random init, BN in eval) vs ours: same boxes, labels, scores
    (≤ 1e-4) and masks on a fixed image, with the same transform settings on both sides."""
    settings = dict(
        min_size=160,
        max_size=200,
        box_score_thresh=0.0,
        box_detections_per_img=30,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
    )
    theirs = _tv_mask_rcnn(**settings)
    ours = convert(theirs, source="torchvision").eval()
    assert isinstance(ours, MaskRCNN) and ours.num_classes == 90 and ours.backbone.body.fc is None
    assert ours.rpn.head.cls_logits.out_channels == 3
    image = torch.rand(3, 150, 190, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs([image])[0]
        got = ours([image])[0]
    assert expected["boxes"].shape[0] == 30  # the comparison covers real detections
    assert torch.equal(got["labels"], expected["labels"])
    for key in ("boxes", "scores", "masks"):
        assert got[key].shape == expected[key].shape
        assert (got[key] - expected[key]).abs().max().item() <= 1e-4
    assert torch.equal(got["masks"] > 0.5, expected["masks"] > 0.5)


def test_mask_rcnn_state_dict_into_seed_layout_is_refused_and_coco_layout_loads():
    theirs = _tv_mask_rcnn(min_size=64, max_size=64)
    state = theirs.state_dict()
    with pytest.raises(ValueError, match="do not fit MaskRCNN"):
        convert(state, source="torchvision", target="mask_rcnn_resnet_50_fpn")  # 9 anchors, 3 classes
    coco = MaskRCNN(num_classes=90, anchor_sizes=((32,), (64,), (128,), (256,), (512,)))  # keep_fc: fc stays
    fc_before = coco.backbone.body.fc.weight.detach().clone()
    convert(state, source="torchvision", target=coco)
    assert torch.equal(coco.backbone.body.fc.weight, fc_before)
    assert torch.equal(
        coco.backbone.body.stages[3][2].conv3.weight, theirs.backbone.body.layer4[2].conv3.weight
    )
    assert mask_rcnn_key("rpn.head.conv.0.0.weight") == "rpn.head.conv.0.0.weight"


@pytest.mark.slow
def test_resnet101_into_mask_rcnn_101_backbone():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet101()
    model = convert(resnet, source="torchvision", target="mask_rcnn_resnet_101_fpn")
    assert isinstance(model, MaskRCNN) and model.num_classes == 20
    body = model.backbone.body
    assert torch.equal(body.fc.weight, resnet.fc.weight)
    assert torch.equal(body.stages[2][22].conv2.weight, resnet.layer3[22].conv2.weight)
    assert torch.equal(body.stem.norm.running_var, resnet.bn1.running_var)


def test_unsupported_inputs():
    with pytest.raises(TypeError, match="supported torchvision models"):
        convert(torchvision.models.mobilenet_v3_small(), source="torchvision")
    with pytest.raises(ValueError, match="target="):
        convert({"conv1.weight": torch.zeros(1)}, source="torchvision")
    with pytest.raises(TypeError, match="fills a ResNet, FCN or MaskRCNN"):
        convert(torchvision.models.resnet18(), source="torchvision", target=torch.nn.Linear(1, 1))
