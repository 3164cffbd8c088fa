"""FCN with a dilated ResNet backbone (Long et al. 2015; torchvision's ``fcn_resnet50/101`` layout), 2D or 3D.

The backbone is :class:`medsegkit.nets.backbones.resnet.ResNet` with stages 3 and 4 dilated instead of
strided (output stride 8). The head is torchvision's ``FCNHead``: 3×3 conv (C5 → C5/4, no bias) → norm →
act → dropout → 1×1 conv to ``out_channels``; the optional auxiliary head does the same on C4. The logits
are resized (bilinear / trilinear) to the input's size.

With the defaults (``depth=50``, 21 classes, ``aux_loss=True``) the parameter count and the state dict
match torchvision's ``fcn_resnet50`` (35,322,218); :mod:`medsegkit.weights.from_torchvision` maps the keys.

Outputs (``../shared/API.md``): in eval mode a logits tensor ``(N, out_channels, *spatial)``; in training
mode with the auxiliary head ``{"out": (N, out_channels, *spatial), "aux": [(N, out_channels, *spatial)]}``
(without it, the logits tensor). The auxiliary head is not evaluated in eval mode.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

from medsegkit._specs import WeightsSpec, register_model
from medsegkit.nets.backbones.resnet import ResNet

__all__ = ["FCN", "FCNHead", "fcn_resnet_50", "fcn_resnet_50_3d", "fcn_resnet_101", "fcn_resnet_101_3d"]


class FCNHead(nn.Sequential):
    """3×3 conv (``in_channels`` → ``in_channels // 4``, no bias) → norm → act → dropout → 1×1 conv.

    Input ``(N, in_channels, *spatial)`` → logits ``(N, out_channels, *spatial)``. Keys ``conv``,
    ``norm``, ``out`` (torchvision's ``classifier.0``, ``.1``, ``.4``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        dropout: float = 0.1,
    ) -> None:
        inter = in_channels // 4
        conv = Conv[Conv.CONV, spatial_dims]
        super().__init__(
            OrderedDict(
                conv=conv(in_channels, inter, kernel_size=3, padding=1, bias=False),
                norm=get_norm_layer(norm, spatial_dims, inter),
                act=get_act_layer(act),
                dropout=nn.Dropout(dropout),  # element-wise, as torchvision
                out=conv(inter, out_channels, kernel_size=1),
            )
        )


class FCN(nn.Module):
    """Fully convolutional network on a dilated ResNet.

    Args:
        spatial_dims: 2 (``(N, C, H, W)``) or 3 (``(N, C, D, H, W)``).
        in_channels: input channels (3 for the ImageNet/COCO weights).
        out_channels: number of classes (background included), e.g. 21 for the VOC labels.
        depth: ResNet depth, 18/34/50/101/152.
        aux_loss: build the auxiliary head on stage 3 (returned in training mode as ``"aux"``).
        norm: MONAI norm factory spec for backbone and heads.
        act: MONAI activation factory spec.
        dropout: dropout rate in the heads.
        replace_stride_with_dilation: for ResNet stages 2–4; FCN's default ``(False, True, True)``
            gives output stride 8.

    Shapes:
        ``(N, in_channels, *spatial)`` → eval: ``(N, out_channels, *spatial)``; training with
        ``aux_loss``: ``{"out": ..., "aux": [...]}`` of that shape.
    """

    medsegkit_task = "semantic"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 21,
        depth: int = 50,
        aux_loss: bool = True,
        *,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        dropout: float = 0.1,
        replace_stride_with_dilation: tuple[bool, bool, bool] = (False, True, True),
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.aux_loss = bool(aux_loss)
        self.backbone = ResNet(
            depth,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            norm=norm,
            act=act,
            replace_stride_with_dilation=replace_stride_with_dilation,
            out_stages=(3, 4) if self.aux_loss else (4,),
        )
        head_args: dict[str, Any] = {"norm": norm, "act": act, "dropout": dropout}
        channels = self.backbone.stage_channels
        self.head = FCNHead(spatial_dims, channels[-1], out_channels, **head_args)
        self.aux_head = (
            FCNHead(spatial_dims, channels[0], out_channels, **head_args) if self.aux_loss else None
        )
        self._interp_mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def _resize(self, logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode=self._interp_mode, align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, Any]:
        """``(N, in_channels, *spatial)`` → logits ``(N, out_channels, *spatial)`` (see class docstring)."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FCN(spatial_dims={self.spatial_dims}, in_channels={self.in_channels}) expects a "
                f"(N, {self.in_channels}, *spatial) tensor with {self.spatial_dims + 2} dims, "
                f"got shape {tuple(x.shape)}"
            )
        size = x.shape[2:]
        features = self.backbone(x)
        out = self._resize(self.head(features[-1]), size)
        if self.training and self.aux_head is not None:
            return {"out": out, "aux": [self._resize(self.aux_head(features[0]), size)]}
        return out


_FCN_REFERENCE = "Long et al. 2015, Fully Convolutional Networks for Semantic Segmentation"
_VOC_META = {
    "categories": (
        "__background__",
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    ),  # fmt: skip
    "preprocessing": "RGB in [0, 1], normalised with ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225)",
    "training_data": "COCO train2017, the 20 Pascal VOC categories (torchvision COCO_WITH_VOC_LABELS_V1)",
}
_TORCHVISION_ARCH = {
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 21,
    "aux_loss": True,
    "norm": "batch",
}
# 3D defaults follow the U-Net family's medical defaults (one-channel volumes, background + one class)
_MEDICAL_3D = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2}


@register_model(
    family="fcn",
    task="semantic",
    spatial_dims=2,
    input_shape=(1, 3, 512, 512),
    reference=_FCN_REFERENCE,
    dotted_path="medsegkit.nets.FCN",
    default_roi_size=(512, 512),
    weights=WeightsSpec(
        url="https://download.pytorch.org/models/fcn_resnet50_coco-1167a1af.pth",
        sha256="1167a1af",
        source="torchvision",
        arch=_TORCHVISION_ARCH,
        num_params=35_322_218,
        meta=_VOC_META,
    ),
)
def fcn_resnet_50(**overrides: Any) -> FCN:
    """FCN-ResNet-50, 21 classes, auxiliary head (35,322,218 parameters, as torchvision's ``fcn_resnet50``)."""
    return FCN(**{"depth": 50, **overrides})


@register_model(
    family="fcn",
    task="semantic",
    spatial_dims=2,
    input_shape=(1, 3, 512, 512),
    reference=_FCN_REFERENCE,
    dotted_path="medsegkit.nets.FCN",
    default_roi_size=(512, 512),
    weights=WeightsSpec(
        url="https://download.pytorch.org/models/fcn_resnet101_coco-7ecb50ca.pth",
        sha256="7ecb50ca",
        source="torchvision",
        arch=_TORCHVISION_ARCH,
        num_params=54_314_346,
        meta=_VOC_META,
    ),
)
def fcn_resnet_101(**overrides: Any) -> FCN:
    """FCN-ResNet-101, 21 classes, auxiliary head (54,314,346 parameters, as torchvision's ``fcn_resnet101``)."""
    return FCN(**{"depth": 101, **overrides})


@register_model(
    family="fcn",
    task="semantic",
    spatial_dims=3,
    input_shape=(1, 1, 64, 64, 64),
    reference=_FCN_REFERENCE,
    dotted_path="medsegkit.nets.FCN",
    default_roi_size=(96, 96, 96),
)
def fcn_resnet_50_3d(**overrides: Any) -> FCN:
    """3D FCN-ResNet-50 for volumes: ``in_channels=1, out_channels=2`` by default."""
    return FCN(**{**_MEDICAL_3D, "depth": 50, **overrides})


@register_model(
    family="fcn",
    task="semantic",
    spatial_dims=3,
    input_shape=(1, 1, 64, 64, 64),
    reference=_FCN_REFERENCE,
    dotted_path="medsegkit.nets.FCN",
    default_roi_size=(96, 96, 96),
)
def fcn_resnet_101_3d(**overrides: Any) -> FCN:
    """3D FCN-ResNet-101 for volumes: ``in_channels=1, out_channels=2`` by default."""
    return FCN(**{**_MEDICAL_3D, "depth": 101, **overrides})
