"""MaskFormer (Cheng et al. 2021): per-pixel classification is not all you need.

A backbone (ResNet, 2D or 3D) feeds an FPN pixel decoder (per-pixel embeddings at stride 4) and a
DETR transformer decoder (learned queries cross-attending to the stride-32 features). Each query
predicts a class (``num_classes + 1``, the last being "no object") and a mask embedding whose dot
product with the per-pixel embeddings gives its mask logits.

The architecture is transformers' ``MaskFormerForInstanceSegmentation`` with a ResNet backbone
(same parameter counts; :func:`medsegkit.weights.convert` with ``source="transformers"`` maps its
weights, outputs equal within 1e-4), written N-d so that ``spatial_dims=3`` segments volumes.

Outputs (``forward``)::

    {"pred_logits": (N, Q, K + 1), "pred_masks": (N, Q, *spatial / 4)}
    # + "aux_outputs": [{"pred_logits", "pred_masks"} for every decoder layer but the last] in training

Registered names: ``maskformer_resnet_18/34/50/101`` and their ``_3d`` variants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn

from medsegkit._specs import register_model
from medsegkit.nets.layers.position_encoding import sine_position_encoding
from medsegkit.nets.layers.residual import Residual
from medsegkit.nets.layers.transformer import MLP, FeedForward, MultiheadAttention

__all__ = ["MaskFormer", "build_backbone"]

RESNET_DEPTHS = (18, 34, 50, 101)
_REFERENCE = "Cheng et al. 2021, Per-Pixel Classification is Not All You Need for Semantic Segmentation"


def build_backbone(
    backbone: str,
    *,
    spatial_dims: int,
    in_channels: int,
    backbone_kwargs: Mapping[str, Any] | None = None,
    allow_swin: bool = False,
) -> nn.Module:
    """Build a feature backbone from its name.

    Args:
        backbone: ``"resnet_18"``, ``"resnet_34"``, ``"resnet_50"``, ``"resnet_101"`` or, where
            ``allow_swin``, ``"swin_tiny"``, ``"swin_small"``, ``"swin_base"``, ``"swin_large"``
            (``"swin"`` with ``backbone_kwargs`` gives a custom Swin).
        spatial_dims: 2 or 3 (Swin: 2 only).
        in_channels: input channels.
        backbone_kwargs: extra constructor arguments of :class:`~medsegkit.nets.backbones.resnet.ResNet`
            (``norm``, ``act``...) or :class:`~medsegkit.nets.backbones.swin.SwinTransformer`
            (``embed_dim``, ``depths``, ``num_heads``, ``window_size``...).

    Returns:
        A module with ``stage_channels``, ``stage_strides`` whose ``forward`` returns the stride 4, 8,
        16 and 32 feature maps.
    """
    kwargs = dict(backbone_kwargs or {})
    family, _, variant = backbone.partition("_")
    if family == "resnet" and variant.isdigit() and int(variant) in RESNET_DEPTHS:
        from medsegkit.nets.backbones.resnet import ResNet

        return ResNet(int(variant), spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)
    if allow_swin and family == "swin":
        from medsegkit.nets.backbones.swin import SWIN_CONFIGS, SwinTransformer

        if variant and variant not in SWIN_CONFIGS:
            raise ValueError(f"unknown Swin size {variant!r}; accepted: {', '.join(SWIN_CONFIGS)}")
        if spatial_dims != 2:
            raise ValueError(
                f"the Swin backbone is 2D only (spatial_dims=2), got spatial_dims={spatial_dims}; "
                "use a ResNet backbone (backbone='resnet_50') for volumes"
            )
        return SwinTransformer(**{**SWIN_CONFIGS.get(variant, {}), "in_channels": in_channels, **kwargs})
    accepted = [f"resnet_{d}" for d in RESNET_DEPTHS]
    if allow_swin:
        accepted += ["swin_tiny", "swin_small", "swin_base", "swin_large"]
    raise ValueError(f"unknown backbone {backbone!r}; accepted: {', '.join(accepted)}")


def conv_norm(
    spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, *, act: bool, groups: int = 32
) -> nn.Sequential:
    """Bias-free conv → GroupNorm(``groups``) (→ ReLU): the pixel decoders' unit. Keys ``conv``, ``norm``."""
    layers = nn.Sequential()
    layers.add_module(
        "conv",
        Conv[Conv.CONV, spatial_dims](
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        ),
    )
    layers.add_module("norm", nn.GroupNorm(groups, out_channels))
    if act:
        layers.add_module("act", nn.ReLU(inplace=True))
    return layers


def predict_masks(mask_embed: torch.Tensor, pixel_embed: torch.Tensor) -> torch.Tensor:
    """``(N, Q, C)`` · ``(N, C, *spatial)`` → mask logits ``(N, Q, *spatial)`` (one batched matmul)."""
    batch, channels = pixel_embed.shape[:2]
    masks = torch.bmm(mask_embed, pixel_embed.reshape(batch, channels, -1))
    return masks.view(batch, mask_embed.shape[1], *pixel_embed.shape[2:])


def check_input(model: nn.Module, x: torch.Tensor) -> None:
    """Clear errors for input tensors of the wrong rank or channel count."""
    dims = model.spatial_dims
    if x.ndim != dims + 2:
        layout = "(N, C, H, W)" if dims == 2 else "(N, C, D, H, W)"
        raise ValueError(
            f"{type(model).__name__}(spatial_dims={dims}) expects a {layout} tensor, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != model.in_channels:
        raise ValueError(
            f"{type(model).__name__} was built for in_channels={model.in_channels}, got an input with "
            f"{x.shape[1]} channels (shape {tuple(x.shape)})"
        )


class FPNPixelDecoder(nn.Module):
    """MaskFormer's pixel decoder: a top-down FPN ending at stride 4, then a 3×3 mask projection.

    Shapes:
        features (stride 4, 8, 16, 32; ``in_channels`` each) → ``(N, mask_dim, *spatial / 4)``, or with
        ``project=False`` the FPN output ``(N, feature_dim, *spatial / 4)`` before the projection.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        spatial_dims: int = 2,
        feature_dim: int = 256,
        mask_dim: int = 256,
    ) -> None:
        super().__init__()
        self.stem = conv_norm(spatial_dims, in_channels[-1], feature_dim, 3, act=True)
        self.layers = nn.ModuleList()
        for lateral_channels in reversed(in_channels[:-1]):
            layer = nn.Module()
            layer.lateral = conv_norm(spatial_dims, lateral_channels, feature_dim, 1, act=False)
            layer.output = conv_norm(spatial_dims, feature_dim, feature_dim, 3, act=True)
            self.layers.append(layer)
        self.mask_projection = Conv[Conv.CONV, spatial_dims](feature_dim, mask_dim, 3, padding=1)
        self.residual = Residual()

    def forward(self, features: Sequence[torch.Tensor], *, project: bool = True) -> torch.Tensor:
        x = self.stem(features[-1])
        for layer, lateral in zip(self.layers, reversed(features[:-1])):
            lateral = layer.lateral(lateral)
            upsampled = F.interpolate(x, size=lateral.shape[2:], mode="nearest")
            x = layer.output(self.residual(upsampled, lateral))
        return self.mask_projection(x) if project else x

    @staticmethod
    def _padded_queries(queries: int) -> int:
        # oneDNN's CPU kernels block output channels by 32: 100 outputs took 53 ms at 256 x 128², 128 took 44
        return -(-queries // 32) * 32

    def folds_projection(self, queries: int) -> bool:
        """Whether :meth:`project_masks` is cheaper than projecting first, for ``queries`` queries."""
        return self._padded_queries(queries) < self.mask_projection.out_channels

    def project_masks(self, mask_embed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mask logits straight from the unprojected FPN output: ``predict_masks(mask_embed, projection(x))``.

        The projection is linear, so the mask embeddings are multiplied into its weights first and one
        convolution with ``Q`` output channels (padded to a multiple of 32) replaces a
        ``mask_dim``-channel one plus the product (batches as groups). Cheaper whenever ``Q < mask_dim``
        (100 < 256 by default).

        Shapes: ``mask_embed (N, Q, mask_dim)``, ``x (N, feature_dim, *spatial)`` → ``(N, Q, *spatial)``.
        """
        projection = self.mask_projection
        batch, queries = mask_embed.shape[:2]
        padded = self._padded_queries(queries)
        mask_embed = F.pad(mask_embed, (0, 0, 0, padded - queries))
        weight = torch.einsum("nqc,ci...->nqi...", mask_embed, projection.weight)
        weight = weight.reshape(batch * padded, *projection.weight.shape[1:])
        bias = (mask_embed @ projection.bias).reshape(-1)
        convolve = F.conv2d if x.dim() == 4 else F.conv3d
        masks = convolve(x.reshape(1, -1, *x.shape[2:]), weight, bias, padding=projection.padding, groups=batch)
        return masks.view(batch, padded, *masks.shape[2:])[:, :queries].contiguous()


class DetrDecoderLayer(nn.Module):
    """DETR decoder layer (post-norm): self-attention, cross-attention, feed-forward.

    ``queries (N, Q, C)``, ``query_pos (1 or N, Q, C)``, ``memory (N, S, C)``, ``memory_pos (1 or N, S, C)``
    → ``(N, Q, C)``.
    """

    def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(hidden_dim, num_heads)
        self.self_attn_norm = nn.LayerNorm(hidden_dim)
        self.cross_attn = MultiheadAttention(hidden_dim, num_heads)
        self.cross_attn_norm = nn.LayerNorm(hidden_dim)
        self.ffn = FeedForward(hidden_dim, ffn_dim)
        self.ffn_norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.residual = Residual()

    def forward(
        self, x: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_key: torch.Tensor
    ) -> torch.Tensor:
        q = x + query_pos
        x = self.self_attn_norm(self.residual(x, self.dropout(self.self_attn(q, q, x))))
        attended = self.dropout(self.cross_attn(x + query_pos, memory_key, memory))
        x = self.cross_attn_norm(self.residual(x, attended))
        return self.ffn_norm(self.residual(x, self.dropout(self.ffn(x))))


class MaskFormer(nn.Module):
    """MaskFormer with a ResNet backbone, N-d.

    Args:
        num_classes: foreground classes ``K``; the class head has ``K + 1`` outputs (last: no object).
        backbone: ``"resnet_18"``, ``"resnet_34"``, ``"resnet_50"`` or ``"resnet_101"``.
        in_channels: input channels.
        spatial_dims: 2 (``(N, C, H, W)``) or 3 (``(N, C, D, H, W)``).
        num_queries: object queries ``Q``.
        hidden_dim: transformer width.
        num_heads: attention heads.
        decoder_layers: transformer decoder layers.
        ffn_dim: feed-forward width in the decoder.
        dropout: dropout in the decoder (DETR's 0.1).
        fpn_dim: channels of the FPN.
        mask_dim: channels of the per-pixel and mask embeddings.
        backbone_kwargs: extra arguments of the backbone (e.g. ``{"norm": "instance"}``).

    The forward is plain PyTorch; :func:`medsegkit.inference.fast.prepare_model` builds the inference
    copy (in-place adds and ReLUs, channels-last stem, and with ``winograd=True`` Winograd 3×3
    convolutions in the backbone and FPN).

    In eval mode the mask projection is folded into the mask embeddings
    (:meth:`FPNPixelDecoder.project_masks`) when ``num_queries < mask_dim``.

    Shapes:
        input ``(N, in_channels, *spatial)`` (sides multiples of 32 give exact stride-4 masks) →
        ``{"pred_logits": (N, Q, K + 1), "pred_masks": (N, Q, *spatial / 4)}``; in training also
        ``"aux_outputs"``, a list of such dicts from the earlier decoder layers.
    """

    medsegkit_task = "universal"

    def __init__(
        self,
        num_classes: int = 150,
        *,
        backbone: str = "resnet_50",
        in_channels: int = 3,
        spatial_dims: int = 2,
        num_queries: int = 100,
        hidden_dim: int = 256,
        num_heads: int = 8,
        decoder_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        fpn_dim: int = 256,
        mask_dim: int = 256,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.backbone = build_backbone(
            backbone,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            backbone_kwargs=backbone_kwargs,
        )
        channels = self.backbone.stage_channels
        self.pixel_decoder = FPNPixelDecoder(
            channels,
            spatial_dims=spatial_dims,
            feature_dim=fpn_dim,
            mask_dim=mask_dim,
        )
        self.input_projection = (
            Conv[Conv.CONV, spatial_dims](channels[-1], hidden_dim, 1) if channels[-1] != hidden_dim else None
        )
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.decoder_layers = nn.ModuleList(
            DetrDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout) for _ in range(decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        check_input(self, x)
        features = self.backbone(x)
        fold_projection = not self.training and self.pixel_decoder.folds_projection(self.num_queries)
        pixel_embed = self.pixel_decoder(features, project=not fold_projection)
        memory = features[-1] if self.input_projection is None else self.input_projection(features[-1])
        memory_pos = sine_position_encoding(
            memory.shape[2:], self.hidden_dim, device=memory.device, dtype=memory.dtype
        )
        memory = memory.flatten(2).transpose(1, 2)  # (N, S, C)
        memory_key = memory + memory_pos.flatten(2).transpose(1, 2)
        query_pos = self.query_embed.weight.unsqueeze(0)
        hidden = torch.zeros(
            x.shape[0], self.num_queries, self.hidden_dim, device=x.device, dtype=memory.dtype
        )
        outputs = []
        for index, layer in enumerate(self.decoder_layers):
            hidden = layer(hidden, query_pos, memory, memory_key)
            if self.training or index == len(self.decoder_layers) - 1:
                normed = self.decoder_norm(hidden)
                mask_embed = self.mask_embed(normed)
                if fold_projection:
                    masks = self.pixel_decoder.project_masks(mask_embed, pixel_embed)
                else:
                    masks = predict_masks(mask_embed, pixel_embed)
                outputs.append({"pred_logits": self.class_head(normed), "pred_masks": masks})
        result = dict(outputs[-1])
        if self.training:
            result["aux_outputs"] = outputs[:-1]
        return result


def _maskformer(depth: int, spatial_dims: int, overrides: dict[str, Any]) -> MaskFormer:
    defaults: dict[str, Any] = {"backbone": f"resnet_{depth}", "spatial_dims": spatial_dims}
    if spatial_dims == 3:
        defaults["in_channels"] = 1
    return MaskFormer(**{**defaults, **overrides})


def _register(depth: int, spatial_dims: int):
    shape = (1, 3, 512, 512) if spatial_dims == 2 else (1, 1, 64, 128, 128)
    return register_model(
        family="maskformer",
        task="universal",
        spatial_dims=spatial_dims,
        input_shape=shape,
        reference=_REFERENCE,
        dotted_path="medsegkit.nets.MaskFormer",
    )


@_register(18, 2)
def maskformer_resnet_18(**overrides: Any) -> MaskFormer:
    """MaskFormer, ResNet-18, 150 classes, 100 queries (24,700,119 parameters)."""
    return _maskformer(18, 2, overrides)


@_register(34, 2)
def maskformer_resnet_34(**overrides: Any) -> MaskFormer:
    """MaskFormer, ResNet-34, 150 classes, 100 queries (34,808,279 parameters)."""
    return _maskformer(34, 2, overrides)


@_register(50, 2)
def maskformer_resnet_50(**overrides: Any) -> MaskFormer:
    """MaskFormer, ResNet-50, 150 classes, 100 queries (41,307,863 parameters)."""
    return _maskformer(50, 2, overrides)


@_register(101, 2)
def maskformer_resnet_101(**overrides: Any) -> MaskFormer:
    """MaskFormer, ResNet-101, 150 classes, 100 queries (60,299,991 parameters)."""
    return _maskformer(101, 2, overrides)


@_register(18, 3)
def maskformer_resnet_18_3d(**overrides: Any) -> MaskFormer:
    """3D MaskFormer, ResNet-18 (N-d backbone and pixel decoder), 1 input channel, 150 classes."""
    return _maskformer(18, 3, overrides)


@_register(34, 3)
def maskformer_resnet_34_3d(**overrides: Any) -> MaskFormer:
    """3D MaskFormer, ResNet-34, 1 input channel, 150 classes."""
    return _maskformer(34, 3, overrides)


@_register(50, 3)
def maskformer_resnet_50_3d(**overrides: Any) -> MaskFormer:
    """3D MaskFormer, ResNet-50, 1 input channel, 150 classes."""
    return _maskformer(50, 3, overrides)


@_register(101, 3)
def maskformer_resnet_101_3d(**overrides: Any) -> MaskFormer:
    """3D MaskFormer, ResNet-101, 1 input channel, 150 classes."""
    return _maskformer(101, 3, overrides)
