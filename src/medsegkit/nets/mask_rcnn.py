"""Mask R-CNN (He et al. 2017) on our ResNet + torchvision's FPN, RPN, RoIAlign box and mask heads.

The detection machinery is torchvision's (``GeneralizedRCNNTransform``, ``AnchorGenerator``, ``RPNHead``,
``RegionProposalNetwork``, ``RoIHeads``, ``MultiScaleRoIAlign``, ``FeaturePyramidNetwork``): this class is
a :class:`torchvision.models.detection.MaskRCNN` whose backbone body is
:class:`medsegkit.nets.backbones.resnet.ResNet`. Everything but ``backbone.body.*`` keeps torchvision's
state-dict keys; :mod:`medsegkit.weights.from_torchvision` maps the body's keys.

Class-count convention (``../shared/API.md``): ``num_classes`` counts the **foreground** classes; the
background class is added inside (the box/mask predictors have ``num_classes + 1`` outputs) and the
predicted ``labels`` are ``1..num_classes``. torchvision's ``num_classes=91`` (COCO) is our
``num_classes=90``. The seed catalogue counts classes *with* background (``C``), so its
``mask_rcnn_resnet_50_fpn`` (``C = 3``) is our ``num_classes=2`` and ``mask_rcnn_resnet_101_fpn``
(``C = 21``, VOC) our ``num_classes=20``.

Seed layout (the registry builders' defaults): 9 anchors per location (sizes 128/256/512 × ratios
0.5/1/2 at every FPN level), trainable BatchNorm, and the ImageNet classifier ``fc`` kept in the body
though ``forward`` never uses it (``keep_fc=False`` drops it: −2,049,000 parameters). torchvision's COCO
weights need ``anchor_sizes=((32,), (64,), (128,), (256,), (512,))`` (3 anchors per location),
``num_classes=90`` and ``keep_fc=False``; ``pretrained=True`` sets those.

Input/outputs: torchvision's convention. ``forward(images, targets=None)`` takes a list of ``(3, H, W)``
float tensors in [0, 1] (or a batched ``(N, 3, H, W)`` tensor); resize and normalisation happen inside.
Training: ``targets`` is a list of ``{"boxes": (K, 4) xyxy float, "labels": (K,) int64 in
1..num_classes, "masks": (K, H, W) uint8}`` and the result is a dict of losses. Eval: a list (one per
image) of ``{"boxes": (K, 4), "labels": (K,), "scores": (K,), "masks": (K, 1, H, W) probabilities}``
in the input image's coordinates.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN as _TorchvisionMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from medsegkit._specs import WeightsSpec, register_model
from medsegkit.nets.backbones.resnet import ResNet

__all__ = ["MaskRCNN", "ResNetFPN", "mask_rcnn_resnet_50_fpn", "mask_rcnn_resnet_101_fpn"]

SEED_ANCHOR_SIZES = ((128, 256, 512),) * 5
TORCHVISION_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
_NUM_LEVELS = 5  # P2..P5 from the FPN plus P6 (max pool)


class ResNetFPN(nn.Module):
    """ResNet body + feature pyramid (P2–P5, 1×1 lateral and 3×3 output convs) + max-pooled P6.

    Input ``(N, C, H, W)`` → ``OrderedDict`` ``{"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}``,
    each ``(N, out_channels, H / s, W / s)`` with s = 4, 8, 16, 32, 64.
    """

    def __init__(self, body: ResNet, out_channels: int = 256) -> None:
        super().__init__()
        if body.out_stages != (1, 2, 3, 4):
            raise ValueError(f"ResNetFPN needs the body's four stages, got out_stages={body.out_stages}")
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(body.stage_channels), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def _per_level(value: Sequence[Any], name: str, kind: type) -> tuple[tuple[Any, ...], ...]:
    """A flat sequence means 'the same at every level'; a nested one gives one tuple per level."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty sequence, got {value!r}")
    if all(isinstance(v, (int, float)) for v in value):
        return (tuple(kind(v) for v in value),) * _NUM_LEVELS
    if len(value) != _NUM_LEVELS or not all(isinstance(v, Sequence) and len(v) > 0 for v in value):
        raise ValueError(
            f"{name} must be one flat sequence (used at every FPN level) or {_NUM_LEVELS} non-empty "
            f"sequences (one per level P2..P6), got {value!r}"
        )
    return tuple(tuple(kind(x) for x in v) for v in value)


class MaskRCNN(_TorchvisionMaskRCNN):
    """Mask R-CNN with a ResNet-FPN backbone (see the module docstring for conventions).

    Args:
        num_classes: foreground classes (background is added inside).
        depth: ResNet depth (18, 34, 50, 101, 152).
        in_channels: image channels (``image_mean``/``image_std`` need as many entries).
        norm: MONAI norm spec of the ResNet body (trainable ``"batch"`` by default).
        keep_fc: keep the unused ImageNet classifier ``fc`` (2048 → 1000) in the body, as the seed does.
        fpn_channels: FPN width (also the RPN head's and the RoI features' channels).
        representation_size: width of the box head's two FC layers (RoIAlign 7×7 input).
        mask_layers: channels of the mask head's 3×3 convs (RoIAlign 14×14 input); the mask predictor's
            transposed conv keeps the last of them.
        anchor_sizes: anchor sizes (pixels, in the resized image); flat = the same at every level,
            nested = one tuple per level P2..P6. Every level must have the same number of anchors.
        aspect_ratios: height/width ratios; flat or nested as ``anchor_sizes``.
        min_size, max_size, image_mean, image_std: ``GeneralizedRCNNTransform`` settings (ImageNet
            mean/std by default).
        rpn_*, box_*: torchvision's ``MaskRCNN`` arguments of the same names.

    Attributes:
        num_classes, in_channels, spatial_dims (= 2).
    """

    medsegkit_task = "instance"

    def __init__(
        self,
        num_classes: int = 2,
        *,
        depth: int = 50,
        in_channels: int = 3,
        norm: str | tuple = "batch",
        keep_fc: bool = True,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        mask_layers: Sequence[int] = (256, 256, 256, 256),
        anchor_sizes: Sequence[Any] = SEED_ANCHOR_SIZES,
        aspect_ratios: Sequence[Any] = (0.5, 1.0, 2.0),
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
    ) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes counts foreground classes and must be ≥ 1, got {num_classes!r}")
        sizes = _per_level(anchor_sizes, "anchor_sizes", int)
        ratios = _per_level(aspect_ratios, "aspect_ratios", float)
        anchors_per_location = {len(s) * len(r) for s, r in zip(sizes, ratios)}
        if len(anchors_per_location) != 1:
            raise ValueError(
                "every FPN level needs the same number of anchors (sizes × ratios) because the RPN head is "
                f"shared across levels; got anchor_sizes={sizes}, aspect_ratios={ratios}"
            )
        image_mean = tuple(image_mean) if image_mean is not None else (0.485, 0.456, 0.406)
        image_std = tuple(image_std) if image_std is not None else (0.229, 0.224, 0.225)
        if len(image_mean) != in_channels or len(image_std) != in_channels:
            raise ValueError(
                f"image_mean and image_std need {in_channels} values (one per input channel), got "
                f"{image_mean} and {image_std}"
            )
        body = ResNet(depth, in_channels=in_channels, norm=norm, num_fc_classes=1000 if keep_fc else None)
        backbone = ResNetFPN(body, fpn_channels)
        mask_layers = tuple(int(c) for c in mask_layers)
        if not mask_layers:
            raise ValueError("mask_layers needs at least one conv width, e.g. (256, 256, 256, 256)")
        with_background = int(num_classes) + 1
        super().__init__(
            backbone,
            num_classes=None,  # the predictors below carry num_classes + 1 outputs
            box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, with_background),
            mask_head=MaskRCNNHeads(fpn_channels, mask_layers, 1),
            mask_predictor=MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], with_background),
            min_size=min_size,
            max_size=max_size,
            image_mean=list(image_mean),
            image_std=list(image_std),
            rpn_anchor_generator=AnchorGenerator(sizes, ratios),
            rpn_head=RPNHead(fpn_channels, anchors_per_location.pop()),
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            rpn_nms_thresh=rpn_nms_thresh,
            rpn_fg_iou_thresh=rpn_fg_iou_thresh,
            rpn_bg_iou_thresh=rpn_bg_iou_thresh,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            rpn_positive_fraction=rpn_positive_fraction,
            rpn_score_thresh=rpn_score_thresh,
            box_score_thresh=box_score_thresh,
            box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img,
            box_fg_iou_thresh=box_fg_iou_thresh,
            box_bg_iou_thresh=box_bg_iou_thresh,
            box_batch_size_per_image=box_batch_size_per_image,
            box_positive_fraction=box_positive_fraction,
        )
        self.num_classes = int(num_classes)
        self.in_channels = in_channels
        self.spatial_dims = 2
        self.depth = depth

    def forward(self, images: Any, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        """List of ``(C, H, W)`` tensors in [0, 1] or an ``(N, C, H, W)`` tensor → losses (training) or
        one ``{"boxes", "labels", "scores", "masks"}`` dict per image (eval)."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(
                    f"MaskRCNN takes a list of (C, H, W) images or an (N, C, H, W) tensor, got a tensor of "
                    f"shape {tuple(images.shape)}"
                )
            images = list(images.unbind(0))
        elif not isinstance(images, (list, tuple)) or not all(isinstance(i, torch.Tensor) for i in images):
            raise TypeError(
                f"MaskRCNN takes a list of (C, H, W) tensors or an (N, C, H, W) tensor, got {type(images)}"
            )
        for image in images:
            if image.ndim != 3 or image.shape[0] != self.in_channels:
                raise ValueError(
                    f"each image must be ({self.in_channels}, H, W) with values in [0, 1], got shape "
                    f"{tuple(image.shape)}"
                )
        if self.training and targets is None:
            raise ValueError("in training mode MaskRCNN needs targets (boxes, labels, masks per image)")
        return super().forward(list(images), targets)


_REFERENCE = "He et al. 2017, Mask R-CNN"
_COCO_ARCH = {"num_classes": 90, "anchor_sizes": TORCHVISION_ANCHOR_SIZES, "keep_fc": False, "in_channels": 3}


def _coco_categories() -> tuple[str, ...]:
    # the 91 torchvision COCO entries (index 0 = background, "N/A" for unused ids)
    return (
        "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
        "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat",
        "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella",
        "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
        "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
        "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
        "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
        "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
        "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
        "scissors", "teddy bear", "hair drier", "toothbrush",
    )  # fmt: skip


@register_model(
    family="mask_rcnn",
    task="instance",
    spatial_dims=2,
    input_shape=(1, 3, 512, 512),
    reference=_REFERENCE,
    dotted_path="medsegkit.nets.MaskRCNN",
    weights=WeightsSpec(
        url="https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
        sha256="bf2d0c1e",
        source="torchvision",
        arch=_COCO_ARCH,
        num_params=44_401_393 + 53_120,  # torchvision counts frozen BN (no affine params); ours is trainable
        meta={
            "categories": _coco_categories(),
            "preprocessing": "RGB in [0, 1]; resize (min 800, max 1333) and ImageNet normalisation inside",
            "training_data": "COCO train2017 (torchvision MaskRCNN_ResNet50_FPN_Weights.COCO_V1)",
            "metrics": {"COCO-val2017": {"box_map": 37.9, "mask_map": 34.6}},
        },
    ),
)
def mask_rcnn_resnet_50_fpn(**overrides: Any) -> MaskRCNN:
    """Mask R-CNN ResNet-50-FPN, seed layout: 2 foreground classes (seed C = 3), 46,037,607 parameters."""
    return MaskRCNN(**{"num_classes": 2, "depth": 50, **overrides})


@register_model(
    family="mask_rcnn",
    task="instance",
    spatial_dims=2,
    input_shape=(1, 3, 512, 512),
    reference=_REFERENCE,
    dotted_path="medsegkit.nets.MaskRCNN",
)
def mask_rcnn_resnet_101_fpn(**overrides: Any) -> MaskRCNN:
    """Mask R-CNN ResNet-101-FPN, seed layout: 20 foreground classes (VOC; seed C = 21), 65,126,611 parameters.

    No detection weights are published for it; convert a torchvision ``resnet101`` into its backbone with
    ``medsegkit.weights.convert(resnet101, source="torchvision", target=model)``.
    """
    return MaskRCNN(**{"num_classes": 20, "depth": 101, **overrides})
