"""Swin Transformer backbone (Liu et al. 2021) for Mask2Former, 2D.

Layout and numerics follow transformers' ``SwinBackbone`` with ``out_features=stage1..4`` (as
Mask2Former uses it): 4×4 patch embedding + LayerNorm, stages of (shifted) window attention with a
relative position bias, patch merging between stages, windows always partitioned (feature maps are
zero-padded to a multiple of the window, after the block's first LayerNorm), and one LayerNorm on
each returned feature map. It carries **no final LayerNorm** (transformers' backbone keeps an unused
one; conversion drops it).

State-dict keys::

    patch_embed.proj, patch_embed.norm,
    stages.{i}.blocks.{j}.norm1 / attn.qkv / attn.proj / attn.relative_position_bias_table / norm2 /
    mlp.fc1 / mlp.fc2, stages.{i}.downsample.norm / .reduction, out_norms.{i}

Example::

    body = SwinTransformer(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
    c2, c3, c4, c5 = body(torch.zeros(1, 3, 224, 224))   # strides 4, 8, 16, 32; channels 96..768
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medsegkit.nets.layers.residual import Residual

__all__ = ["SWIN_CONFIGS", "SwinTransformer"]

# name -> (embed_dim, depths, num_heads, window_size)
SWIN_CONFIGS: dict[str, dict] = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
    "small": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "window_size": 12},
    "large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "window_size": 12},
}


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``p`` in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def _relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return (relative[..., 0] * (2 * window - 1) + relative[..., 1]).flatten()


@functools.lru_cache(maxsize=64)
def _window_order(height: int, width: int, window: int, shift: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order of the (cyclically shifted) window partition of an ``height × width`` grid, and its inverse.

    ``tokens.index_select(1, order)`` on ``(N, H·W, C)`` gives the windows ``(N, windows·T, C)`` of
    ``torch.roll(x, (-shift, -shift))`` in one gather (instead of a roll and a reshape copy);
    ``windows.index_select(1, inverse)`` puts them back, rolled by ``+shift``.
    """
    with torch.inference_mode(False):  # plain tensors, usable where autograd records
        rows = (torch.arange(height, device=device) + shift) % height
        cols = (torch.arange(width, device=device) + shift) % width
        grid = rows[:, None] * width + cols[None, :]  # source token of every rolled position
        order = grid.view(height // window, window, width // window, window).transpose(1, 2).reshape(-1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=device)
    return order, inverse


def _shift_mask(height: int, width: int, window: int, shift: int, device, dtype) -> torch.Tensor:
    """Additive mask ``(windows, T, T)`` (0 or -100) keeping shifted windows from mixing regions."""
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_region = (rows >= height - window).long() + (rows >= height - shift).long()
    col_region = (cols >= width - window).long() + (cols >= width - shift).long()
    region = (row_region[:, None] * 3 + col_region[None, :]).to(dtype)
    region = (
        region.view(height // window, window, width // window, window)
        .transpose(1, 2)
        .reshape(-1, window * window)
    )
    diff = region[:, None, :] - region[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Window self-attention with a learned relative position bias.

    ``(windows, T, C)`` → ``(windows, T, C)`` with ``T = window_size ** 2``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer(
            "relative_position_index", _relative_position_index(window_size), persistent=False
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """``(num_heads, T, T)``."""
        tokens = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def attention_bias(self, grid: tuple[int, int], shift: int, dtype: torch.dtype) -> torch.Tensor:
        """Relative position bias plus, for shifted windows, the region mask: ``(1 or windows, heads, T, T)``
        for one image of ``grid`` (padded) tokens. Cached while no gradient is recorded, until the bias
        table changes or another grid / dtype comes."""
        table = self.relative_position_bias_table
        # (an inference tensor has no version counter to tell a changed table: no cache for it)
        cache = not torch.is_grad_enabled() and not table.is_inference()
        key = (grid, shift, dtype, table.device, table._version, table.data_ptr()) if cache else None
        cached = self.__dict__.get("_attention_bias")
        if cache and cached is not None and cached[0] == key:
            return cached[1]
        bias = self.relative_position_bias().unsqueeze(0)
        if shift:
            bias = bias + _shift_mask(*grid, self.window_size, shift, table.device, table.dtype)[:, None]
        bias = bias.to(dtype)
        if cache:
            self.__dict__["_attention_bias"] = (key, bias)
        return bias

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, batch: int = 1) -> torch.Tensor:
        """``x (batch · windows, T, C)``, ``bias`` from :meth:`attention_bias` (``None``: no shift) →
        ``(batch · windows, T, C)``."""
        windows, tokens, channels = x.shape
        head_dim = channels // self.num_heads
        qkv = self.qkv(x).view(windows, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        if bias is None:
            bias = self.relative_position_bias().unsqueeze(0).to(x.dtype)
        if bias.shape[0] not in (1, windows):  # per-image masks for a batch: (batch · windows, heads, T, T)
            bias = bias.unsqueeze(0).expand(batch, *bias.shape).reshape(windows, *bias.shape[1:])
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(windows, tokens, channels))


class SwinBlock(nn.Module):
    """LN → (shifted) window attention → residual; LN → MLP → residual. ``(N, H, W, C)`` in and out."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, int(dim * mlp_ratio)))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(int(dim * mlp_ratio), dim))
        self.drop_path = DropPath(drop_path)
        self.residual = Residual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.residual(x, self.drop_path(self.attend(self.norm1(x))))
        return self.residual(x, self.drop_path(self.mlp(self.norm2(x))))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """(Shifted) window attention over the normed tokens: ``(N, H, W, C)`` in and out."""
        batch, height, width, channels = x.shape
        window, shift = self.window_size, self.shift_size
        pad_h, pad_w = (-height) % window, (-width) % window
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = height + pad_h, width + pad_w
        # (shifted) window partition and its reverse as one token gather each
        order, inverse = _window_order(padded_h, padded_w, window, shift, x.device)
        tokens = x.reshape(batch, padded_h * padded_w, channels)
        windows = tokens.index_select(1, order).view(-1, window * window, channels)
        bias = self.attn.attention_bias((padded_h, padded_w), shift, x.dtype)
        windows = self.attn(windows, bias, batch)
        x = windows.view(batch, -1, channels).index_select(1, inverse).view(batch, padded_h, padded_w, channels)
        if pad_h or pad_w:
            x = x[:, :height, :width]
        return x


class PatchMerging(nn.Module):
    """2×2 neighbourhood → concatenated channels → LN → linear ``4C → 2C``. ``(N, H, W, C)`` → ``(N, H/2, W/2, 2C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
            height, width = height + height % 2, width + width % 2
        # channel order (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1), as Swin's cat
        x = x.view(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
        x = x.reshape(batch, height // 2, width // 2, 4 * channels)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        *,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_paths: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                0 if index % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_paths[index],
            )
            for index in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None


class SwinTransformer(nn.Module):
    """Swin Transformer body returning normalised feature maps at strides 4, 8, 16, 32.

    Args:
        embed_dim: channels of stage 1 (doubles at every stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window (tokens per side).
        in_channels: input channels.
        patch_size: side of the non-overlapping patches of the stem.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias in the query/key/value projection.
        drop_path_rate: stochastic depth, rising linearly to this value over all blocks.
        out_stages: stages (1..4) returned by ``forward``, increasing.

    Attributes:
        stage_channels, stage_strides: of the returned maps.

    Shapes:
        ``(N, in_channels, H, W)`` → list of ``(N, embed_dim * 2**(s-1), H / 2**(s+1), W / 2**(s+1))``
        (sizes rounded up when ``H``, ``W`` are not multiples of the strides).
    """

    spatial_dims = 2

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        *,
        in_channels: int = 3,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.3,
        out_stages: Sequence[int] = (1, 2, 3, 4),
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} need one entry per stage")
        out_stages = tuple(int(s) for s in out_stages)
        if (
            not out_stages
            or list(out_stages) != sorted(set(out_stages))
            or not 1 <= out_stages[0] <= out_stages[-1] <= len(depths)
        ):
            raise ValueError(
                f"out_stages must be increasing stage numbers from 1..{len(depths)}, got {out_stages!r}"
            )
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.out_stages = out_stages
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.stages = nn.ModuleList(
            SwinStage(
                dims[i],
                depths[i],
                num_heads[i],
                window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_paths=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                downsample=i < len(depths) - 1,
            )
            for i in range(len(depths))
        )
        self.out_norms = nn.ModuleList(nn.LayerNorm(dims[s - 1]) for s in out_stages)
        self.stage_channels = tuple(dims[s - 1] for s in out_stages)
        self.stage_strides = tuple(patch_size * 2 ** (s - 1) for s in out_stages)
        self.num_features = dims[-1]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(N, C, H, W)`` → feature maps of ``out_stages`` (see class docstring)."""
        if x.ndim != 4:
            raise ValueError(f"SwinTransformer expects a (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.patch_size, (-width) % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))  # (N, H, W, C)
        features = []
        norms = iter(self.out_norms)
        for number, stage in enumerate(self.stages[: self.out_stages[-1]], start=1):
            for block in stage.blocks:
                x = block(x)
            if number in self.out_stages:
                features.append(next(norms)(x).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)
        return features
