"""N-d ResNet backbone (He et al. 2016), the body shared by FCN, Mask R-CNN, MaskFormer and Mask2Former.

One code path for 2D and 3D: every layer comes from MONAI's factories (``Conv[Conv.CONV, dims]``,
``Norm``, ``Act``, ``Pool``) picked by ``spatial_dims``. The layout follows torchvision's ``resnet``:
basic blocks for depth 18/34, bottleneck v1.5 blocks (stride on the 3×3 conv) for 50/101/152, bias-free
convs, a 7×7 stride-2 stem conv and a 3×3 stride-2 max pool. With ``spatial_dims=2`` and
``num_fc_classes=1000`` the parameter count equals torchvision's ``resnetXX()`` and a torchvision state
dict loads through :func:`medsegkit.weights.from_torchvision.convert` (explicit key map).

State-dict keys read as the network does::

    stem.conv.weight, stem.norm.weight, ...
    stages.0.0.conv1.weight, stages.0.0.norm1.weight, stages.0.0.downsample.0.weight (conv),
    stages.0.0.downsample.1.weight (norm), ..., fc.weight (only with ``num_fc_classes``)

Example::

    body = ResNet(50, spatial_dims=3, in_channels=1)
    c2, c3, c4, c5 = body(torch.zeros(1, 1, 64, 64, 64))   # strides 4, 8, 16, 32
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

from medsegkit.nets.layers.residual import Residual

__all__ = ["BasicBlock", "Bottleneck", "RESNET_LAYOUTS", "ResNet"]

# depth -> (block type, blocks per stage)
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

_STAGE_WIDTHS = (64, 128, 256, 512)


def _conv(
    spatial_dims: int, in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1
) -> nn.Module:
    """Bias-free conv with 'same' padding for odd kernels (``(kernel // 2) * dilation``)."""
    return Conv[Conv.CONV, spatial_dims](
        in_ch,
        out_ch,
        kernel_size=kernel,
        stride=stride,
        padding=(kernel // 2) * dilation,
        dilation=dilation,
        bias=False,
    )


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection (ResNet-18/34).

    Input ``(N, in_channels, *spatial)`` → output ``(N, channels, *spatial / stride)``.
    """

    expansion = 1

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv(spatial_dims, in_channels, channels, 3, stride, first_dilation or dilation)
        self.norm1 = get_norm_layer(norm, spatial_dims, channels)
        self.conv2 = _conv(spatial_dims, channels, channels, 3, 1, dilation)
        self.norm2 = get_norm_layer(norm, spatial_dims, channels)
        self.act = get_act_layer(act)
        self.downsample = downsample
        self.residual = Residual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(self.residual(identity, out))


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride, dilation) → 1×1 (×4 channels) with a residual connection (ResNet v1.5).

    Input ``(N, in_channels, *spatial)`` → output ``(N, 4 * channels, *spatial / stride)``.
    """

    expansion = 4

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = _conv(spatial_dims, in_channels, channels, 1)
        self.norm1 = get_norm_layer(norm, spatial_dims, channels)
        self.conv2 = _conv(spatial_dims, channels, channels, 3, stride, first_dilation or dilation)
        self.norm2 = get_norm_layer(norm, spatial_dims, channels)
        self.conv3 = _conv(spatial_dims, channels, out_channels, 1)
        self.norm3 = get_norm_layer(norm, spatial_dims, out_channels)
        self.act = get_act_layer(act)
        self.downsample = downsample
        self.residual = Residual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.act(self.residual(identity, out))


class ResNet(nn.Module):
    """N-d ResNet body returning the feature maps of the requested stages.

    Args:
        depth: 18, 34 (basic blocks), 50, 101 or 152 (bottleneck v1.5 blocks).
        spatial_dims: 2 or 3.
        in_channels: input channels (3 for ImageNet weights).
        norm: MONAI norm factory spec (``"batch"``, ``("group", {"num_groups": 32})``, ...).
        act: MONAI activation factory spec.
        replace_stride_with_dilation: for stages 2, 3, 4: keep the resolution and dilate instead of
            striding (FCN uses ``(False, True, True)``: output stride 8).
        num_fc_classes: keep an ImageNet-style classifier ``fc`` (C5 channels → ``num_fc_classes``).
            ``forward`` never uses it; it exists so that counts and state dicts match torchvision's
            classification ResNet (``1000`` for ImageNet).
        out_stages: which stages (1..4) ``forward`` returns, in increasing order.

    The forward is plain PyTorch. For inference, :func:`medsegkit.inference.fast.prepare_model` makes a
    copy whose residual adds and ReLUs run in place and whose stem runs channels-last on the CPU (the
    same values, fewer passes over memory), and optionally Winograd 3×3 convolutions.

    Attributes:
        stage_channels: channels of the returned feature maps, in ``out_stages`` order
            (``(256, 512, 1024, 2048)`` for depth ≥ 50 and all stages).
        stage_strides: their strides with respect to the input (4, 8, 16, 32 without dilation).

    Shapes:
        input ``(N, in_channels, *spatial)`` (``(N, C, H, W)`` or ``(N, C, D, H, W)``) →
        list of ``(N, stage_channels[i], *spatial / stage_strides[i])``.
    """

    def __init__(
        self,
        depth: int = 50,
        *,
        spatial_dims: int = 2,
        in_channels: int = 3,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
        num_fc_classes: int | None = None,
        out_stages: Sequence[int] = (1, 2, 3, 4),
    ) -> None:
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation needs one flag for each of stages 2, 3 and 4, got "
                f"{tuple(replace_stride_with_dilation)!r}"
            )
        out_stages = tuple(int(s) for s in out_stages)
        if (
            not out_stages
            or list(out_stages) != sorted(set(out_stages))
            or not set(out_stages) <= {1, 2, 3, 4}
        ):
            raise ValueError(f"out_stages must be increasing stage numbers from 1..4, got {out_stages!r}")

        block_name, blocks_per_stage = RESNET_LAYOUTS[depth]
        block = BasicBlock if block_name == "basic" else Bottleneck
        self.depth = depth
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_stages = out_stages

        self.stem = nn.Sequential(
            OrderedDict(
                conv=_conv(spatial_dims, in_channels, 64, 7, stride=2),
                norm=get_norm_layer(norm, spatial_dims, 64),
                act=get_act_layer(act),
                pool=Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1),
            )
        )

        channels_in, dilation, stride_total = 64, 1, 4
        all_channels, all_strides = [], []
        stages = []
        for index, (width, num_blocks) in enumerate(zip(_STAGE_WIDTHS, blocks_per_stage)):
            stride = 1 if index == 0 else 2
            previous_dilation = dilation
            if index > 0 and replace_stride_with_dilation[index - 1]:
                dilation *= stride
                stride = 1
            stride_total *= stride
            channels_out = width * block.expansion
            downsample = None
            if stride != 1 or channels_in != channels_out:
                downsample = nn.Sequential(
                    _conv(spatial_dims, channels_in, channels_out, 1, stride),
                    get_norm_layer(norm, spatial_dims, channels_out),
                )
            common = {"norm": norm, "act": act}
            blocks = [
                block(
                    spatial_dims,
                    channels_in,
                    width,
                    stride=stride,
                    dilation=dilation,
                    first_dilation=previous_dilation,
                    downsample=downsample,
                    **common,
                )
            ]
            blocks += [
                block(spatial_dims, channels_out, width, dilation=dilation, **common)
                for _ in range(1, num_blocks)
            ]
            stages.append(nn.Sequential(*blocks))
            channels_in = channels_out
            all_channels.append(channels_out)
            all_strides.append(stride_total)
        self.stages = nn.ModuleList(stages)
        self.stage_channels = tuple(all_channels[s - 1] for s in out_stages)
        self.stage_strides = tuple(all_strides[s - 1] for s in out_stages)
        self.num_features = all_channels[-1]
        self.fc = nn.Linear(all_channels[-1], num_fc_classes) if num_fc_classes else None
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so that random-init training behaves the same
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif (
                isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm))
                and module.weight is not None
            ):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(N, in_channels, *spatial)`` → feature maps of ``out_stages`` (see class docstring)."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"ResNet(spatial_dims={self.spatial_dims}) expects a (N, C, *spatial) tensor with "
                f"{self.spatial_dims + 2} dims, got shape {tuple(x.shape)}"
            )
        x = self.stem(x)
        features = []
        for number, stage in enumerate(self.stages[: self.out_stages[-1]], start=1):
            x = stage(x)
            if number in self.out_stages:
                features.append(x)
        return features
