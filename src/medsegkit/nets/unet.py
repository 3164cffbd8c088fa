"""The U-Net family: :class:`UNet`, :class:`ResUNet` and :class:`AttentionUNet`, one N-d implementation.

All three are one configurable encoder–decoder built from MONAI blocks (``Convolution``,
``ResidualUnit``, ``UpSample``, the ``Conv`` / ``Pool`` factories). Their defaults reproduce MONAI's
networks exactly — ``UNet(...)`` builds the same layers (same parameter count, same outputs after
loading the same weights) as ``monai.networks.nets.UNet(...)`` called with the same arguments, and
``AttentionUNet(...)`` the same as ``monai.networks.nets.AttentionUnet(...)`` — and keyword-only knobs
reach the classic (Ronneberger et al. 2015) layout and the seed's vocabulary: pooling or strided-conv
downsampling, transposed-conv / interpolation / pixel-shuffle upsampling, concatenation or addition of
skips, stem and head convolutions, per-stage self-attention, deep supervision, attention-gate options.

Two layouts (``layout=``):

- ``"monai"`` (``UNet`` default, MONAI's ``UNet``): every encoder stage downsamples at its start (the
  first stage already works at ``1/strides[0]`` resolution); a decoder stage concatenates the skip with
  the features from below *then* upsamples (the transposed convolution is the decoder's conv); the top
  decoder stage outputs ``out_channels`` directly (its last conv has no norm/act).
- ``"classic"`` (``AttentionUNet``, MONAI's ``AttentionUnet``, the seed): a full-resolution first stage,
  a downsampler between consecutive stages, decoder stages that upsample, merge the skip and convolve,
  and a head convolution to ``out_channels``.

Module names are readable: ``stem``, ``encoder.stages.{i}`` (``i = 0`` is the finest), ``bottleneck``,
``decoder.stages.{j}`` (in execution order, ``j = 0`` is the deepest), ``head``, ``aux_heads.{j}``.
MONAI state dicts load directly: a load pre-hook renames MONAI's recursive keys
(``model.1.submodule.0.conv.unit0...``) to ours.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from monai.networks.layers.factories import Act, Conv, Norm, Pool
from torch import nn

from medsegkit._serialize import jsonable
from medsegkit._specs import register_model
from medsegkit.nets.layers.attention import AttentionGate, NoGate, SpatialSelfAttention
from medsegkit.nets.layers.padding import pad_to_multiple

__all__ = [
    "AttentionUNet",
    "AttentionUNet2d",
    "AttentionUNet3d",
    "ResUNet",
    "ResUNet2d",
    "ResUNet3d",
    "UNet",
    "UNet2d",
    "UNet3d",
    "pad_to_multiple",
]

LAYOUTS = ("monai", "classic")
DOWNSAMPLE_MODES = ("conv", "maxpool", "avgpool")
UPSAMPLE_MODES = ("deconv", "nontrainable", "pixelshuffle")
SKIP_MERGES = ("cat", "add")
GATE_SIGNALS = ("upsampled", "coarse")
# the seed's spellings
_UPSAMPLE_ALIASES = {
    "transpose": ("deconv", None),
    "bilinear": ("nontrainable", "linear"),
    "trilinear": ("nontrainable", "linear"),
    "linear": ("nontrainable", "linear"),
    "nearest": ("nontrainable", "nearest"),
}
_MERGE_ALIASES = {"concat": "cat", "sum": "add"}
_ACT_ALIASES = {"leaky_relu": "leakyrelu"}


# --------------------------------------------------------------------------------------------------
# argument normalisation
# --------------------------------------------------------------------------------------------------


def _is_seq(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _per_dim(value: Any, spatial_dims: int, name: str) -> tuple[int, ...]:
    """An int or a per-axis sequence → a tuple with one int per spatial axis."""
    if _is_seq(value):
        if len(value) != spatial_dims or not all(isinstance(v, int) for v in value):
            raise ValueError(
                f"{name} must be an int or {spatial_dims} ints (one per spatial axis), got {value!r}"
            )
        return tuple(int(v) for v in value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int or {spatial_dims} ints, got {value!r}")
    return (int(value),) * spatial_dims


def _per_stage_geometry(value: Any, n_stages: int, spatial_dims: int, name: str) -> list[tuple[int, ...]]:
    """Kernel size / dilation: an int, one per-axis sequence (MONAI), or one entry per stage."""
    if _is_seq(value) and any(_is_seq(v) for v in value):
        if len(value) != n_stages:
            raise ValueError(
                f"{name} given per stage must have {n_stages} entries (encoder stages + bottleneck), "
                f"got {len(value)}: {value!r}"
            )
        return [_per_dim(v, spatial_dims, f"{name}[{i}]") for i, v in enumerate(value)]
    if _is_seq(value) and len(value) != spatial_dims:
        raise ValueError(
            f"the length of `{name}` should equal to `spatial_dims` ({spatial_dims}), got {value!r}"
        )
    return [_per_dim(value, spatial_dims, name)] * n_stages


def _per_stage(value: Any, n_stages: int, name: str, kind: type) -> list:
    """A scalar for every stage, or a sequence with one value per stage."""
    if _is_seq(value):
        if len(value) != n_stages:
            raise ValueError(
                f"{name} given per stage must have {n_stages} entries, got {len(value)}: {value!r}"
            )
        return [kind(v) for v in value]
    return [kind(value)] * n_stages


def _spec(value: Any) -> Any:
    """JSON round trip turns ``("group", {...})`` into a list; MONAI factories want a tuple."""
    if isinstance(value, list):
        return tuple(value)
    return value


def _act_spec(act: Any) -> Any:
    act = _spec(act)
    if isinstance(act, str):
        return _ACT_ALIASES.get(act.lower(), act)
    if isinstance(act, tuple) and act and isinstance(act[0], str):
        return (_ACT_ALIASES.get(act[0].lower(), act[0]), *act[1:])
    return act


def _norm_spec(norm: Any) -> Any:
    norm = _spec(norm)
    if isinstance(norm, str) and norm.lower() == "none":
        return None
    return norm


def _dropout_spec(dropout: Any) -> Any:
    """MONAI's dropout forms: a probability in [0, 1], ``None`` (no dropout layer), a name or ``(name, {args})``."""
    dropout = _spec(dropout)
    if dropout is None or isinstance(dropout, str):
        return dropout
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool):
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        return float(dropout)
    if (
        isinstance(dropout, tuple)
        and len(dropout) == 2
        and isinstance(dropout[0], str)
        and isinstance(dropout[1], dict)
    ):
        return dropout
    raise ValueError(
        "dropout must be a probability in [0, 1], None, a MONAI dropout name or (name, {arguments}) "
        f"such as ('dropout', {{'p': 0.1}}), got {dropout!r}"
    )


def _norm_for(norm: Any, channels: int) -> Any:
    """``"group"`` without ``num_groups`` → the largest divisor of ``channels`` that is ≤ 32 (the seed's rule)."""
    name, kwargs = (norm, {}) if isinstance(norm, str) else (norm if norm is not None else (None, {}))
    if isinstance(name, str) and name.lower() == "group" and "num_groups" not in (kwargs or {}):
        groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
        return ("group", {**(kwargs or {}), "num_groups": groups})
    return norm


def _transposed_padding(
    kernel: tuple[int, ...], stride: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Padding/output padding making a transposed conv exactly ``stride`` times larger.

    ``None`` for odd kernels: MONAI's own choice then applies (keeps parity with MONAI's networks).
    """
    if all(k % 2 == 1 for k in kernel):
        return None
    padding = tuple(max(0, math.ceil((k - s) / 2)) for k, s in zip(kernel, stride))
    output_padding = tuple(s - k + 2 * p for k, s, p in zip(kernel, stride, padding))
    if any(op < 0 or op >= s for op, s in zip(output_padding, stride)):
        raise ValueError(
            f"up_kernel_size {kernel} cannot upsample exactly by {stride}; use an odd kernel or >= stride"
        )
    return padding, output_padding


class _Roles:
    """The act / norm / dropout of one kind of block (encoder, upsampler, decoder)."""

    def __init__(self, act: Any, norm: Any, dropout: Any) -> None:
        self.act, self.norm, self.dropout = act, norm, dropout


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------


class EncoderStage(nn.Module):
    """``down`` (pooling, or identity when the first unit is a strided conv) → ``units`` → ``attention``.

    Shapes: ``(N, C_in, *S)`` → ``(N, C_out, *S / stride)``.
    """

    def __init__(self, down: nn.Module, units: nn.Sequential, attention: nn.Module) -> None:
        super().__init__()
        self.down = down
        self.units = units
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.units(self.down(x)))


class DecoderStage(nn.Module):
    """One decoder level: upsampler ``up``, skip merge, optional attention ``gate``, ``units``, ``attention``.

    ``merge_first=True`` (MONAI's ``UNet``): ``up(merge(skip, x))`` then ``units``, so the skip is at
    the resolution of ``x``. ``merge_first=False`` (classic): ``merge(gate(skip), up(x))`` then
    ``units``; the skip is at the upsampled resolution. The skip comes first in a concatenation.

    Shapes: ``x (N, C_low, *S_low)``, ``skip (N, C_skip, *S_skip)`` → ``(N, C_out, *S_out)``.
    """

    def __init__(
        self,
        up: nn.Module,
        units: nn.Sequential,
        attention: nn.Module,
        gate: nn.Module,
        merge_first: bool,
        add: bool,
        coarse_gating: bool,
    ) -> None:
        super().__init__()
        self.up = up
        self.gate = gate
        self.units = units
        self.attention = attention
        self.merge_first = merge_first
        self.add = add
        self.coarse_gating = coarse_gating

    def _merge(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.add:
            return skip + x
        return torch.cat((skip, x), dim=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.merge_first:
            x = self.up(self._merge(skip, x))
        else:
            lower = x
            x = self.up(x)
            gating = lower if self.coarse_gating else x
            x = self._merge(self.gate(skip, gating), x)
        return self.attention(self.units(x))


class _StageList(nn.Module):
    """Holds ``stages`` so that state-dict keys read ``encoder.stages.0...`` / ``decoder.stages.0...``."""

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)


# --------------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------------


class _EncoderDecoder(nn.Module):
    """Shared implementation of :class:`UNet`, :class:`ResUNet` and :class:`AttentionUNet`."""

    medsegkit_task = "semantic"
    __jit_ignored_attributes__ = ["init_args", "channels", "strides", "size_multiple", "layout", "_monai_map"]

    def _build(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[Any],
        kernel_size: Any,
        up_kernel_size: Any,
        num_res_units: int,
        roles: dict[str, _Roles],
        bias: bool,
        adn_ordering: str,
        convs_per_stage: Any,
        decoder_convs_per_stage: Any,
        dilation: Any,
        stage_attention: Any,
        downsample: str,
        upsample: str,
        interp_mode: str | None,
        skip_merge: str,
        stem_channels: int | None,
        head_kernel_size: int | None,
        deep_supervision: bool,
        layout: str,
        gates: dict[str, Any] | None = None,
        merge_kernel_size: Any = None,
    ) -> None:
        # ---- validation (MONAI's messages where MONAI checks the same thing) ----
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not _is_seq(channels) or len(channels) < 2:
            raise ValueError(f"the length of `channels` should be no less than 2, got {channels!r}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise ValueError(f"`channels` must be positive ints, got {channels!r}")
        if not _is_seq(strides):
            raise ValueError(f"`strides` must be a sequence (one stride per downsampling), got {strides!r}")
        delta = len(strides) - (len(channels) - 1)
        if delta < 0:
            raise ValueError(
                f"the length of `strides` should equal to `len(channels) - 1` ({len(channels) - 1}), got {len(strides)}"
            )
        if delta > 0:
            warnings.warn(
                f"`len(strides) > len(channels) - 1`, the last {delta} values of strides will not be used.",
                stacklevel=3,
            )
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {downsample!r}")
        upsample_name = upsample.lower() if isinstance(upsample, str) else upsample
        if upsample_name in _UPSAMPLE_ALIASES:
            upsample_name, alias_mode = _UPSAMPLE_ALIASES[upsample_name]
            if alias_mode is not None and interp_mode is None:
                interp_mode = alias_mode
        if upsample_name not in UPSAMPLE_MODES:
            raise ValueError(
                f"upsample must be one of {UPSAMPLE_MODES} (or the aliases {tuple(_UPSAMPLE_ALIASES)}), got {upsample!r}"
            )
        interp_mode = interp_mode or "linear"
        if interp_mode not in ("linear", "bilinear", "trilinear", "nearest"):
            raise ValueError(f"interp_mode must be 'linear' or 'nearest', got {interp_mode!r}")
        interp_mode = "nearest" if interp_mode == "nearest" else "linear"
        merge = _MERGE_ALIASES.get(skip_merge, skip_merge)
        if merge not in SKIP_MERGES:
            raise ValueError(f"skip_merge must be one of {SKIP_MERGES} (or 'concat'), got {skip_merge!r}")
        if not isinstance(num_res_units, int) or num_res_units < 0:
            raise ValueError(f"num_res_units must be an int >= 0, got {num_res_units!r}")
        if not isinstance(adn_ordering, str) or set(adn_ordering.upper()) - set("ADN"):
            raise ValueError(f"adn_ordering must be a string of the letters A, D, N, got {adn_ordering!r}")

        n = len(channels) - 1  # number of downsamplings
        n_stages = n + 1  # encoder stages + bottleneck
        stage_strides = [_per_dim(s, spatial_dims, f"strides[{i}]") for i, s in enumerate(strides[:n])]
        if any(v < 1 for s in stage_strides for v in s):
            raise ValueError(f"strides must be >= 1, got {strides!r}")
        kernels = _per_stage_geometry(kernel_size, n_stages, spatial_dims, "kernel_size")
        up_kernels = _per_stage_geometry(up_kernel_size, n_stages, spatial_dims, "up_kernel_size")
        dilations = _per_stage_geometry(dilation, n_stages, spatial_dims, "dilation")
        if any(k % 2 == 0 for ks in kernels for k in ks):
            raise ValueError(f"kernel_size values should be odd, got {kernel_size!r}")
        # the first decoder conv of each level (the one merging the skip); None: the level's kernel_size
        merge_kernels = (
            kernels
            if merge_kernel_size is None
            else _per_stage_geometry(merge_kernel_size, n_stages, spatial_dims, "merge_kernel_size")
        )
        if any(k < 1 or k % 2 == 0 for ks in merge_kernels for k in ks):
            raise ValueError(
                f"merge_kernel_size values should be positive odd ints, got {merge_kernel_size!r}"
            )
        enc_convs = _per_stage(convs_per_stage, n_stages, "convs_per_stage", int)
        dec_convs = (
            enc_convs[:n]
            if decoder_convs_per_stage is None
            else _per_stage(decoder_convs_per_stage, n, "decoder_convs_per_stage", int)
        )
        if any(c < 1 for c in enc_convs + dec_convs):
            raise ValueError(
                f"convs_per_stage must be >= 1, got {convs_per_stage!r} / {decoder_convs_per_stage!r}"
            )
        attention_flags = _per_stage(stage_attention, n_stages, "stage_attention", bool)
        if upsample_name == "pixelshuffle" and any(len(set(s)) != 1 for s in stage_strides):
            raise ValueError("upsample='pixelshuffle' needs isotropic strides (MONAI's SubpixelUpsample)")
        if stem_channels is not None and (not isinstance(stem_channels, int) or stem_channels < 1):
            raise ValueError(f"stem_channels must be a positive int or None, got {stem_channels!r}")
        if layout == "classic" and head_kernel_size is None:
            head_kernel_size = 1
        if head_kernel_size is not None and (head_kernel_size < 1 or head_kernel_size % 2 == 0):
            raise ValueError(f"head_kernel_size must be a positive odd int or None, got {head_kernel_size!r}")
        if gates is not None and layout != "classic":
            raise ValueError("attention gates need layout='classic'")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = tuple(channels)
        self.strides = tuple(stage_strides)
        self.layout = layout
        self.deep_supervision = bool(deep_supervision)
        self.size_multiple = tuple(math.prod(s[d] for s in stage_strides) for d in range(spatial_dims))
        self._size_multiple: list[int] = list(self.size_multiple)
        self._spatial_dims: int = spatial_dims
        self._in_channels: int = in_channels

        def unit(
            role: str, cin: int, cout: int, stage: int, *, stride=1, subunits=None, last=False, kernel=None
        ) -> nn.Module:
            r = roles[role]
            kernel = kernels[stage] if kernel is None else kernel
            if num_res_units > 0:
                return ResidualUnit(
                    spatial_dims,
                    cin,
                    cout,
                    strides=stride,
                    kernel_size=kernel,
                    subunits=subunits or num_res_units,
                    act=r.act,
                    norm=_norm_for(r.norm, cout),
                    dropout=r.dropout,
                    dilation=dilations[stage],
                    bias=bias,
                    last_conv_only=last,
                    adn_ordering=adn_ordering,
                )
            return Convolution(
                spatial_dims,
                cin,
                cout,
                strides=stride,
                kernel_size=kernel,
                act=r.act,
                norm=_norm_for(r.norm, cout),
                dropout=r.dropout,
                dilation=dilations[stage],
                bias=bias,
                conv_only=last,
                adn_ordering=adn_ordering,
            )

        def attention(stage: int, c: int) -> nn.Module:
            if not attention_flags[stage]:
                return nn.Identity()
            return SpatialSelfAttention(spatial_dims, c, norm=_norm_for(roles["enc"].norm, c))

        def down_stage(cin: int, cout: int, stage: int, stride: tuple[int, ...]) -> EncoderStage:
            pooled = downsample != "conv" and any(s > 1 for s in stride)
            down: nn.Module = nn.Identity()
            if pooled:
                pool = Pool.MAX if downsample == "maxpool" else Pool.AVG
                down = Pool[pool, spatial_dims](kernel_size=stride, stride=stride)
            first_stride = 1 if pooled else stride
            units = [unit("enc", cin, cout, stage, stride=first_stride)]
            units += [unit("enc", cout, cout, stage) for _ in range(enc_convs[stage] - 1)]
            return EncoderStage(down, nn.Sequential(*units), attention(stage, cout))

        def upsampler(cin: int, cout: int, level: int, last: bool) -> nn.Module:
            stride = stage_strides[level]
            if upsample_name == "deconv":
                r = roles["up"]
                pads = _transposed_padding(up_kernels[level], stride)
                return Convolution(
                    spatial_dims,
                    cin,
                    cout,
                    strides=stride,
                    kernel_size=up_kernels[level],
                    act=r.act,
                    norm=_norm_for(r.norm, cout),
                    dropout=r.dropout,
                    bias=bias,
                    conv_only=last,
                    is_transposed=True,
                    adn_ordering=adn_ordering,
                    padding=None if pads is None else pads[0],
                    output_padding=None if pads is None else pads[1],
                )
            if all(s == 1 for s in stride):
                return (
                    Conv[Conv.CONV, spatial_dims](cin, cout, kernel_size=1, bias=bias)
                    if cin != cout
                    else nn.Identity()
                )
            if upsample_name == "nontrainable":
                return UpSample(
                    spatial_dims,
                    cin,
                    cout,
                    scale_factor=stride,
                    mode="nontrainable",
                    interp_mode=interp_mode,
                    align_corners=None if interp_mode == "nearest" else False,
                    bias=bias,
                )
            return UpSample(spatial_dims, cin, cout, scale_factor=stride[0], mode="pixelshuffle", bias=bias)

        # ---- stem ----
        self.stem: nn.Module = nn.Identity()
        first_in = in_channels
        if stem_channels is not None:
            r = roles["enc"]
            self.stem = Convolution(
                spatial_dims,
                in_channels,
                stem_channels,
                kernel_size=kernels[0],
                act=r.act,
                norm=_norm_for(r.norm, stem_channels),
                dropout=r.dropout,
                bias=bias,
                adn_ordering=adn_ordering,
            )
            first_in = stem_channels

        # ---- encoder and bottleneck ----
        ones = (1,) * spatial_dims
        encoder = []
        for i in range(n):
            cin = first_in if i == 0 else channels[i - 1]
            stride = stage_strides[i] if layout == "monai" else (ones if i == 0 else stage_strides[i - 1])
            encoder.append(down_stage(cin, channels[i], i, stride))
        self.encoder = _StageList(encoder)
        bottom_stride = ones if layout == "monai" else stage_strides[n - 1]
        self.bottleneck = down_stage(channels[n - 1], channels[n], n, bottom_stride)

        # ---- decoder (execution order: deepest level first) ----
        has_head = head_kernel_size is not None
        gate_levels = set(range(n)) if gates is None or gates["levels"] is None else set(gates["levels"])
        if gates is not None and not gate_levels <= set(range(n)):
            raise ValueError(
                f"gate_levels must be decoder levels in 0..{n - 1} (0 = finest), got {sorted(gate_levels)}"
            )
        decoder = []
        decoder_out: list[int] = []
        lower = channels[n]
        for level in reversed(range(n)):
            skip_c = channels[level]
            if layout == "monai":
                if merge == "add" and lower != skip_c:
                    raise ValueError(
                        f"skip_merge='add' at level {level} adds the skip ({skip_c} channels) to the features from "
                        f"below ({lower} channels); with layout='monai' the deepest two channel entries must match"
                    )
                merged = skip_c + lower if merge == "cat" else skip_c
                top = level == 0
                out_c = (channels[0] if has_head else out_channels) if top else channels[level - 1]
                final = top and not has_head
                # MONAI: the transposed conv is the decoder's conv, followed by one ResidualUnit when residual
                deconv_counts = upsample_name == "deconv" and num_res_units == 0
                n_post = dec_convs[level] - 1 if deconv_counts else dec_convs[level]
                post = [
                    unit("dec", out_c, out_c, level, subunits=1, last=final and k == n_post - 1)
                    for k in range(n_post)
                ]
                up = upsampler(merged, out_c, level, last=final and n_post == 0)
                stage = DecoderStage(
                    up,
                    nn.Sequential(*post),
                    nn.Identity() if final else attention(level, out_c),  # never on the output logits
                    NoGate(),
                    True,
                    merge == "add",
                    False,
                )
            else:
                out_c = skip_c
                up = upsampler(lower, skip_c, level, last=False)
                gate: nn.Module = NoGate()
                coarse = gates is not None and gates["signal"] == "coarse"
                if gates is not None and level in gate_levels:
                    gate = AttentionGate(
                        spatial_dims,
                        skip_c,
                        lower if coarse else skip_c,
                        inter_channels=gates["inter_channels"],
                        norm=gates["norm"],
                        interp_mode=interp_mode,
                        bias_init=gates["bias_init"],
                    )
                merged = 2 * skip_c if merge == "cat" else skip_c
                units = [unit("dec", merged, out_c, level, kernel=merge_kernels[level])]
                units += [unit("dec", out_c, out_c, level) for _ in range(dec_convs[level] - 1)]
                stage = DecoderStage(
                    up, nn.Sequential(*units), attention(level, out_c), gate, False, merge == "add", coarse
                )
            decoder.append(stage)
            decoder_out.append(out_c)
            lower = out_c
        self.decoder = _StageList(decoder)

        # ---- head and deep-supervision heads ----
        self.head: nn.Module = nn.Identity()
        if has_head:
            self.head = Convolution(
                spatial_dims,
                decoder_out[-1],
                out_channels,
                kernel_size=head_kernel_size,
                bias=True,
                conv_only=True,
                padding=None if head_kernel_size > 1 else 0,
            )
        conv = Conv[Conv.CONV, spatial_dims]
        self.aux_heads = nn.ModuleList(
            [conv(c, out_channels, kernel_size=1) for c in decoder_out[:-1]] if self.deep_supervision else []
        )
        self._monai_map = self._compute_monai_map(
            layout=layout,
            num_res_units=num_res_units,
            enc_convs=enc_convs,
            dec_convs=dec_convs,
            attention_flags=attention_flags,
            downsample=downsample,
            upsample=upsample_name,
            merge=merge,
            stem=stem_channels,
            head_kernel_size=head_kernel_size,
            gates=gates,
            gate_levels=gate_levels,
        )
        self._register_load_state_dict_pre_hook(self._load_monai_keys)

    # ---- MONAI state-dict compatibility ----

    def _compute_monai_map(self, **cfg: Any) -> list[tuple[str, str]] | None:
        n = len(self.channels) - 1
        plain = (
            cfg["downsample"] == "conv"
            and cfg["upsample"] == "deconv"
            and cfg["merge"] == "cat"
            and cfg["stem"] is None
            and not any(cfg["attention_flags"])
            and not self.deep_supervision
        )
        if not plain:
            return None
        pairs: list[tuple[str, str]] = []
        if cfg["layout"] == "monai":  # monai.networks.nets.UNet
            if (
                cfg["head_kernel_size"] is not None
                or set(cfg["enc_convs"]) != {1}
                or set(cfg["dec_convs"]) != {1}
            ):
                return None
            for level in range(n):
                m = "model." + "1.submodule." * level
                d = f"decoder.stages.{n - 1 - level}."
                pairs.append((m + "0.", f"encoder.stages.{level}.units.0."))
                if cfg["num_res_units"] > 0:
                    pairs += [(m + "2.0.", d + "up."), (m + "2.1.", d + "units.0.")]
                else:
                    pairs.append((m + "2.", d + "up."))
            pairs.append(("model." + "1.submodule." * n, "bottleneck.units.0."))
            return pairs
        # monai.networks.nets.AttentionUnet
        gates = cfg["gates"]
        if (
            gates is None
            or cfg["num_res_units"] > 0
            or cfg["head_kernel_size"] != 1
            or set(cfg["enc_convs"]) != {2}
            or set(cfg["dec_convs"]) != {1}
            or gates["signal"] != "upsampled"
            or cfg["gate_levels"] != set(range(n))
            or gates["norm"] is None
        ):
            return None
        pairs += [
            ("model.0.conv.0.", "encoder.stages.0.units.0."),
            ("model.0.conv.1.", "encoder.stages.0.units.1."),
        ]
        for level in range(n):
            layer = "model.1." + "submodule.1." * level
            d = f"decoder.stages.{n - 1 - level}."
            pairs += [
                (layer + "attention.W_g.0.conv.", d + "gate.phi."),
                (layer + "attention.W_g.1.", d + "gate.phi_norm."),
                (layer + "attention.W_x.0.conv.", d + "gate.theta."),
                (layer + "attention.W_x.1.", d + "gate.theta_norm."),
                (layer + "attention.psi.0.conv.", d + "gate.psi."),
                (layer + "attention.psi.1.", d + "gate.psi_norm."),
                (layer + "upconv.up.", d + "up."),
                (layer + "merge.", d + "units.0."),
            ]
            if level < n - 1:
                enc = f"encoder.stages.{level + 1}.units."
                pairs += [
                    (layer + "submodule.0.conv.0.", enc + "0."),
                    (layer + "submodule.0.conv.1.", enc + "1."),
                ]
            else:
                pairs += [
                    (layer + "submodule.conv.0.", "bottleneck.units.0."),
                    (layer + "submodule.conv.1.", "bottleneck.units.1."),
                ]
        pairs.append(("model.2.conv.", "head.conv."))
        return pairs

    def monai_key_map(self) -> list[tuple[str, str]]:
        """``(monai_prefix, our_prefix)`` pairs renaming MONAI's state-dict keys to ours.

        Raises:
            ValueError: this configuration has no MONAI counterpart (e.g. pooling, a stem, deep supervision).
        """
        if self._monai_map is None:
            raise ValueError(
                f"this {type(self).__name__} configuration has no MONAI counterpart (MONAI's UNet / AttentionUnet "
                "use strided-conv down, transposed-conv up, concatenation, no stem, no self-attention, no deep "
                "supervision, and the default layout and convs_per_stage)"
            )
        return list(self._monai_map)

    @staticmethod
    def _rename(key: str, pairs: Sequence[tuple[str, str]]) -> str | None:
        best = None
        for source, target in pairs:
            if key.startswith(source) and (best is None or len(source) > len(best[0])):
                best = (source, target)
        return None if best is None else best[1] + key[len(best[0]) :]

    def _load_monai_keys(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        monai_keys = [k for k in state_dict if k.startswith(prefix + "model.")]
        if not monai_keys:
            return
        if self._monai_map is None:
            error_msgs.append(
                f"the state dict has MONAI keys ({monai_keys[0]!r}, ...) but this {type(self).__name__} configuration "
                "has no MONAI counterpart; build it with MONAI's layout (default knobs) to load MONAI weights"
            )
            return
        for key in monai_keys:
            renamed = self._rename(key[len(prefix) :], self._monai_map)
            if renamed is not None:
                state_dict[prefix + renamed] = state_dict.pop(key)

    # ---- forward ----

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self._spatial_dims + 2:
            raise ValueError(
                f"expected input (N, C, *spatial) with {self._spatial_dims} spatial axes, got shape {list(x.shape)}"
            )
        if x.shape[1] != self._in_channels:
            raise ValueError(
                f"expected {self._in_channels} input channel(s) (in_channels), got {x.shape[1]} (input shape {list(x.shape)})"
            )
        for axis in range(self._spatial_dims):
            if x.shape[2 + axis] % self._size_multiple[axis] != 0:
                raise ValueError(
                    f"input spatial size {list(x.shape[2:])} must be a multiple of {self._size_multiple} per axis (the product of strides); pad it "
                    "with medsegkit.nets.unet.pad_to_multiple(x, model.size_multiple) or crop it"
                )

    def forward(self, x: torch.Tensor):
        """``(N, in_channels, *spatial)`` → logits ``(N, out_channels, *spatial)``.

        Every spatial size must be a multiple of ``size_multiple`` (the product of the strides per axis).
        In training mode with ``deep_supervision=True`` the result is
        ``{"out": logits, "aux": [logits of each deeper decoder stage at its own resolution, finest first]}``.
        """
        self._check_input(x)
        x = self.stem(x)
        skips: list[torch.Tensor] = []
        for stage in self.encoder.stages:
            x = stage(x)
            skips.append(x)
        x = self.bottleneck(x)
        n = len(skips)
        features: list[torch.Tensor] = []
        for j, stage in enumerate(self.decoder.stages):
            x = stage(x, skips[n - 1 - j])
            features.append(x)
        out = self.head(x)
        if torch.jit.is_scripting():
            return out
        if self.deep_supervision and self.training:
            aux = [head(feature) for head, feature in zip(self.aux_heads, features)]
            return {"out": out, "aux": aux[::-1]}
        return out


class UNet(_EncoderDecoder):
    """Configurable U-Net (Ronneberger et al. 2015) whose defaults are MONAI's ``UNet``.

    ``UNet(spatial_dims, in_channels, out_channels, channels, strides, ...)`` with MONAI's positional
    arguments and defaults builds exactly MONAI's network (same layers, parameter count and outputs
    for the same weights; MONAI state dicts load directly). Keyword-only knobs change the layout.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels ``C``.
        out_channels: output channels (classes) ``K``.
        channels: channels per level, finest first; the last entry is the bottleneck's. ``len >= 2``.
        strides: one downsampling factor per level (``len(channels) - 1``); each an int or one int per
            axis (anisotropic: ``((1, 2, 2), (2, 2, 2), ...)``).
        kernel_size: odd conv kernel: an int, one per axis, or one entry per stage (encoder stages +
            bottleneck; the decoder level reuses its encoder stage's).
        up_kernel_size: kernel of the transposed convolutions (same forms).
        num_res_units: ``0``: plain ``Convolution`` units; ``> 0``: MONAI ``ResidualUnit`` with that many
            convolutions.
        act: MONAI activation spec (``"PRELU"``, ``"relu"``, ``("leakyrelu", {"negative_slope": 0.01})``, ...).
        norm: MONAI norm spec (``"INSTANCE"``, ``"batch"``, ``("group", {"num_groups": 8})``, ``"group"``
            (largest divisor of the channels ≤ 32), ``None`` / ``"none"``).
        dropout: MONAI dropout spec: a probability in [0, 1], ``None`` (no dropout layer), or
            ``("dropout" | "alphadropout", {"p": ...})``.
        bias: conv bias.
        adn_ordering: order of activation (A), dropout (D) and norm (N) after each conv (any subset, either
            case, as MONAI's ``ADN``).
        convs_per_stage: conv units per encoder stage (int, or one per stage incl. the bottleneck);
            a unit is one ``Convolution`` or one ``ResidualUnit``. MONAI: 1.
        decoder_convs_per_stage: conv units per decoder level (default: the encoder stage's); in
            ``layout="monai"`` the transposed convolution counts as the first one.
        dilation: conv dilation (same forms as ``kernel_size``).
        stage_attention: add a residual spatial self-attention block after a stage's convs
            (bool, or one per stage; the decoder level follows its encoder stage).
        downsample: ``"conv"`` (strided first conv of the stage), ``"maxpool"`` or ``"avgpool"``.
        upsample: ``"deconv"`` (transposed conv with norm/act), ``"nontrainable"`` (1×1 conv +
            interpolation), ``"pixelshuffle"``; seed spellings ``"transpose"``, ``"bilinear"``,
            ``"trilinear"``, ``"nearest"`` are accepted.
        interp_mode: ``"linear"`` (bi/trilinear) or ``"nearest"`` for ``upsample="nontrainable"``.
        skip_merge: ``"cat"`` (``"concat"``) or ``"add"``.
        stem_channels: add a stem conv (kernel of stage 0, norm, act) to this many channels.
        head_kernel_size: add a head conv (no norm/act) to ``out_channels``; ``layout="classic"``
            always has one (default 1).
        deep_supervision: 1×1 auxiliary heads after every decoder stage but the last.
        layout: ``"monai"`` (MONAI's ``UNet``: stages downsample at their start, decoder merges then
            upsamples) or ``"classic"`` (full-resolution first stage, decoder upsamples then merges).
        block: the seed's spelling: ``"basic"`` (plain convs) or ``"res"`` (``num_res_units=2``).

    Shapes: ``(N, in_channels, *spatial)`` → ``(N, out_channels, *spatial)``, e.g. ``(N, C, D, H, W)``;
    each spatial size must be a multiple of ``size_multiple`` (see :func:`pad_to_multiple`).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[int | Sequence[int]],
        kernel_size: int | Sequence[int] | Sequence[Any] = 3,
        up_kernel_size: int | Sequence[int] | Sequence[Any] = 3,
        num_res_units: int = 0,
        act: tuple | str | None = Act.PRELU,
        norm: tuple | str | None = Norm.INSTANCE,
        dropout: float | tuple | str | None = 0.0,
        bias: bool = True,
        adn_ordering: str = "NDA",
        *,
        convs_per_stage: int | Sequence[int] = 1,
        decoder_convs_per_stage: int | Sequence[int] | None = None,
        dilation: int | Sequence[Any] = 1,
        stage_attention: bool | Sequence[bool] = False,
        downsample: str = "conv",
        upsample: str = "deconv",
        interp_mode: str | None = None,
        skip_merge: str = "cat",
        stem_channels: int | None = None,
        head_kernel_size: int | None = None,
        deep_supervision: bool = False,
        layout: str = "monai",
        block: str | None = None,
    ) -> None:
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_args = jsonable(init_args, strict=False)
        if block is not None:
            if block not in ("basic", "res"):
                raise ValueError(f"block must be 'basic' or 'res', got {block!r}")
            if block == "basic" and num_res_units > 0:
                raise ValueError(f"block='basic' conflicts with num_res_units={num_res_units}")
            if block == "res" and num_res_units == 0:
                num_res_units = 2
        role = _Roles(_act_spec(act), _norm_spec(norm), _dropout_spec(dropout))
        self._build(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            kernel_size=kernel_size,
            up_kernel_size=up_kernel_size,
            num_res_units=num_res_units,
            roles={"enc": role, "up": role, "dec": role},
            bias=bias,
            adn_ordering=adn_ordering,
            convs_per_stage=convs_per_stage,
            decoder_convs_per_stage=decoder_convs_per_stage,
            dilation=dilation,
            stage_attention=stage_attention,
            downsample=downsample,
            upsample=upsample,
            interp_mode=interp_mode,
            skip_merge=skip_merge,
            stem_channels=stem_channels,
            head_kernel_size=head_kernel_size,
            deep_supervision=deep_supervision,
            layout=layout,
        )


class ResUNet(UNet):
    """:class:`UNet` with MONAI residual units (Zhang et al. 2018): ``num_res_units`` defaults to 2.

    Same arguments and shapes as :class:`UNet`; ``ResUNet(...)`` equals ``UNet(..., num_res_units=2)``
    and MONAI's ``UNet(..., num_res_units=2)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[int | Sequence[int]],
        kernel_size: int | Sequence[int] | Sequence[Any] = 3,
        up_kernel_size: int | Sequence[int] | Sequence[Any] = 3,
        num_res_units: int = 2,
        act: tuple | str | None = Act.PRELU,
        norm: tuple | str | None = Norm.INSTANCE,
        dropout: float | tuple | str | None = 0.0,
        bias: bool = True,
        adn_ordering: str = "NDA",
        *,
        convs_per_stage: int | Sequence[int] = 1,
        decoder_convs_per_stage: int | Sequence[int] | None = None,
        dilation: int | Sequence[Any] = 1,
        stage_attention: bool | Sequence[bool] = False,
        downsample: str = "conv",
        upsample: str = "deconv",
        interp_mode: str | None = None,
        skip_merge: str = "cat",
        stem_channels: int | None = None,
        head_kernel_size: int | None = None,
        deep_supervision: bool = False,
        layout: str = "monai",
    ) -> None:
        if num_res_units < 1:
            raise ValueError(
                f"ResUNet needs num_res_units >= 1, got {num_res_units}; use UNet for plain convs"
            )
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            channels,
            strides,
            kernel_size,
            up_kernel_size,
            num_res_units,
            act,
            norm,
            dropout,
            bias,
            adn_ordering,
            convs_per_stage=convs_per_stage,
            decoder_convs_per_stage=decoder_convs_per_stage,
            dilation=dilation,
            stage_attention=stage_attention,
            downsample=downsample,
            upsample=upsample,
            interp_mode=interp_mode,
            skip_merge=skip_merge,
            stem_channels=stem_channels,
            head_kernel_size=head_kernel_size,
            deep_supervision=deep_supervision,
            layout=layout,
        )
        self.init_args = jsonable(init_args, strict=False)


class AttentionUNet(_EncoderDecoder):
    """Attention U-Net (Oktay et al. 2018) whose defaults are MONAI's ``AttentionUnet``.

    ``AttentionUNet(spatial_dims, in_channels, out_channels, channels, strides, kernel_size,
    up_kernel_size, dropout)`` builds exactly MONAI's network: ``layout="classic"``, two convs per
    encoder stage (BatchNorm + ReLU), strided-conv down, transposed conv (``up_kernel_size``, BatchNorm +
    ReLU) up, gates with BatchNorm on the upsampled features at every level, one merge conv per decoder
    level (instance norm + PReLU, MONAI ``Convolution``'s defaults) and a 1×1 head. Like MONAI, the merge
    conv has kernel 3 whatever ``kernel_size`` says; ``merge_kernel_size`` (not a MONAI argument) changes it.

    The other keyword knobs are :class:`UNet`'s (``convs_per_stage`` defaults to 2,
    ``decoder_convs_per_stage`` to 1, ``head_kernel_size`` to 1; the layout is always ``"classic"``).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels ``C``.
        out_channels: output channels (classes) ``K``.
        channels: channels per level, finest first; the last entry is the bottleneck's.
        strides: one downsampling factor per level (int or one per axis).
        kernel_size: odd conv kernel (int, per axis, or per stage).
        up_kernel_size: transposed-conv kernel.
        dropout: dropout in the conv blocks (MONAI: not in the upsamplers); :class:`UNet`'s forms.
        num_res_units: ``> 0`` uses MONAI ``ResidualUnit``s instead of plain convs.
        act: ``None`` keeps MONAI's per-block choice (ReLU in the encoder and the upsamplers, PReLU in the
            decoder convs); a MONAI activation spec applies to every block.
        norm: ``None`` keeps MONAI's per-block choice (BatchNorm in the encoder and the upsamplers,
            InstanceNorm in the decoder convs); a MONAI norm spec applies to every block.
        bias: conv bias.
        adn_ordering: order of activation, dropout and norm after each conv.
        convs_per_stage: conv units per encoder stage (int or per stage incl. the bottleneck).
        decoder_convs_per_stage: conv units per decoder level.
        dilation: conv dilation.
        stage_attention: residual spatial self-attention after a stage's convs (bool or per stage).
        downsample: ``"conv"``, ``"maxpool"`` or ``"avgpool"``.
        upsample: ``"deconv"``, ``"nontrainable"`` or ``"pixelshuffle"`` (and the seed's aliases).
        interp_mode: ``"linear"`` or ``"nearest"`` (interpolation of upsampling and coarse gating).
        skip_merge: ``"cat"`` or ``"add"``.
        stem_channels: add a stem conv to this many channels.
        head_kernel_size: kernel of the head conv to ``out_channels``.
        merge_kernel_size: kernel of the first conv of each decoder level, the one that merges the skip
            (odd; int, per axis or per stage like ``kernel_size``). ``None``: MONAI's 3, whatever
            ``kernel_size`` says (MONAI's ``AttentionUnet`` builds that conv with ``Convolution``'s default
            kernel); pass ``merge_kernel_size=kernel_size`` for the same kernel as the other convs (then a
            MONAI checkpoint no longer fits unless ``kernel_size`` is 3).
        deep_supervision: 1×1 auxiliary heads after every decoder level but the last.
        gate_levels: decoder levels that get a gate (0 = finest); ``None``: all (MONAI). The seed gates
            every level but the finest: ``range(1, len(channels) - 1)``.
        gate_signal: ``"upsampled"`` (MONAI: gate with the upsampled decoder features) or ``"coarse"``
            (the paper / seed: the decoder input before upsampling; θ(x) is resampled to its grid and the
            attention map back).
        gate_norm: norm spec inside the gates (MONAI: ``"batch"``; the seed: ``None``).
        inter_channels: θ/φ channels (default ``max(1, min(skip, gating) // 2)``).
        gate_bias_init: when given, ψ starts with weight 0 and this bias (seed: 2.0 → gates start at 0.88).

    Shapes: ``(N, in_channels, *spatial)`` → ``(N, out_channels, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[int | Sequence[int]],
        kernel_size: int | Sequence[int] | Sequence[Any] = 3,
        up_kernel_size: int | Sequence[int] | Sequence[Any] = 3,
        dropout: float | tuple | str | None = 0.0,
        *,
        num_res_units: int = 0,
        act: tuple | str | None = None,
        norm: tuple | str | None = None,
        bias: bool = True,
        adn_ordering: str = "NDA",
        convs_per_stage: int | Sequence[int] = 2,
        decoder_convs_per_stage: int | Sequence[int] | None = 1,
        dilation: int | Sequence[Any] = 1,
        stage_attention: bool | Sequence[bool] = False,
        downsample: str = "conv",
        upsample: str = "deconv",
        interp_mode: str | None = None,
        skip_merge: str = "cat",
        stem_channels: int | None = None,
        head_kernel_size: int | None = 1,
        merge_kernel_size: int | Sequence[int] | Sequence[Any] | None = None,
        deep_supervision: bool = False,
        gate_levels: Sequence[int] | None = None,
        gate_signal: str = "upsampled",
        gate_norm: tuple | str | None = "batch",
        inter_channels: int | None = None,
        gate_bias_init: float | None = None,
    ) -> None:
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_args = jsonable(init_args, strict=False)
        if gate_signal not in GATE_SIGNALS:
            raise ValueError(f"gate_signal must be one of {GATE_SIGNALS}, got {gate_signal!r}")
        if head_kernel_size is None:
            raise ValueError("AttentionUNet always has a head conv: head_kernel_size must be an odd int")
        enc_act = Act.RELU if act is None else _act_spec(act)
        dec_act = Act.PRELU if act is None else _act_spec(act)
        enc_norm = Norm.BATCH if norm is None else _norm_spec(norm)
        dec_norm = Norm.INSTANCE if norm is None else _norm_spec(norm)
        roles = {
            "enc": _Roles(enc_act, enc_norm, _dropout_spec(dropout)),
            "up": _Roles(enc_act, enc_norm, 0.0),  # MONAI's UpConv gets no dropout
            "dec": _Roles(dec_act, dec_norm, _dropout_spec(dropout)),
        }
        self._build(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            kernel_size=kernel_size,
            up_kernel_size=up_kernel_size,
            num_res_units=num_res_units,
            roles=roles,
            bias=bias,
            adn_ordering=adn_ordering,
            convs_per_stage=convs_per_stage,
            decoder_convs_per_stage=decoder_convs_per_stage,
            dilation=dilation,
            stage_attention=stage_attention,
            downsample=downsample,
            upsample=upsample,
            interp_mode=interp_mode,
            skip_merge=skip_merge,
            stem_channels=stem_channels,
            head_kernel_size=head_kernel_size,
            deep_supervision=deep_supervision,
            layout="classic",
            merge_kernel_size=3 if merge_kernel_size is None else merge_kernel_size,
            gates={
                "levels": None if gate_levels is None else [int(g) for g in gate_levels],
                "signal": gate_signal,
                "norm": _norm_spec(gate_norm),
                "inter_channels": inter_channels,
                "bias_init": gate_bias_init,
            },
        )


# --------------------------------------------------------------------------------------------------
# registry builders (documented medical defaults)
# --------------------------------------------------------------------------------------------------

MEDICAL_DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 2,
    "channels": (16, 32, 64, 128, 256),
    "strides": (2, 2, 2, 2),
    "norm": "batch",
}
# AttentionUNet keeps MONAI's per-block norms (BatchNorm in the conv blocks, upsamplers and gates;
# InstanceNorm in the merge convs) so that AttentionUNet3d equals MONAI's AttentionUnet.
_ATTENTION_DEFAULTS = {k: v for k, v in MEDICAL_DEFAULTS.items() if k != "norm"}
_ROI = {2: (256, 256), 3: (96, 96, 96)}


def _register(cls_name: str, dims: int, reference: str):
    return register_model(
        family="unet",
        task="semantic",
        spatial_dims=dims,
        input_shape=(1, 1, *_ROI[dims]),
        reference=reference,
        dotted_path=f"medsegkit.nets.{cls_name}",
        default_roi_size=_ROI[dims],
        default_preprocessing="mr",
    )


@_register("UNet", 2, "Ronneberger et al. 2015")
def UNet2d(**overrides: Any) -> UNet:
    """2D :class:`UNet`, MONAI layout: ``channels=(16, 32, 64, 128, 256)``, ``strides=(2, 2, 2, 2)``, batch norm."""
    return UNet(**{**MEDICAL_DEFAULTS, "spatial_dims": 2, **overrides})


@_register("UNet", 3, "Ronneberger et al. 2015")
def UNet3d(**overrides: Any) -> UNet:
    """3D :class:`UNet`, MONAI layout: ``channels=(16, 32, 64, 128, 256)``, ``strides=(2, 2, 2, 2)``, batch norm."""
    return UNet(**{**MEDICAL_DEFAULTS, "spatial_dims": 3, **overrides})


@_register("ResUNet", 2, "Zhang et al. 2018")
def ResUNet2d(**overrides: Any) -> ResUNet:
    """2D :class:`ResUNet`: :func:`UNet2d` with 2 residual units per stage."""
    return ResUNet(**{**MEDICAL_DEFAULTS, "num_res_units": 2, "spatial_dims": 2, **overrides})


@_register("ResUNet", 3, "Zhang et al. 2018")
def ResUNet3d(**overrides: Any) -> ResUNet:
    """3D :class:`ResUNet`: :func:`UNet3d` with 2 residual units per stage."""
    return ResUNet(**{**MEDICAL_DEFAULTS, "num_res_units": 2, "spatial_dims": 3, **overrides})


@_register("AttentionUNet", 2, "Oktay et al. 2018")
def AttentionUNet2d(**overrides: Any) -> AttentionUNet:
    """2D :class:`AttentionUNet` (MONAI ``AttentionUnet`` layout and norms), ``channels=(16, ..., 256)``."""
    return AttentionUNet(**{**_ATTENTION_DEFAULTS, "spatial_dims": 2, **overrides})


@_register("AttentionUNet", 3, "Oktay et al. 2018")
def AttentionUNet3d(**overrides: Any) -> AttentionUNet:
    """3D :class:`AttentionUNet` (MONAI ``AttentionUnet`` layout and norms), ``channels=(16, ..., 256)``."""
    return AttentionUNet(**{**_ATTENTION_DEFAULTS, "spatial_dims": 3, **overrides})
