"""Transformer building blocks shared by MaskFormer and Mask2Former.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on CPU and
GPU, masks broadcast over heads instead of being repeated per head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "FeedForward", "MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Multi-head attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``.

    Position embeddings are added by the caller (to what goes into ``query`` / ``key``), as DETR does.

    Shapes:
        ``query (N, Q, C)``, ``key (N, S, C)``, ``value (N, S, C)`` → ``(N, Q, C)``.
        ``attn_mask``: boolean ``(N or 1, 1 or heads, Q, S)`` with ``True`` where attention is allowed,
        or an additive float mask of that shape.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, num_queries, channels = query.shape
        head_dim = channels // self.num_heads
        q = self.q_proj(query).view(batch, num_queries, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, key.shape[1], self.num_heads, head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, value.shape[1], self.num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, num_queries, channels))


class FeedForward(nn.Module):
    """``fc2(dropout(relu(fc1(x))))``: ``(N, L, C)`` → ``(N, L, C)``."""

    def __init__(self, embed_dim: int, hidden_dim: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))  # fc1's output is fresh


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (DETR's box / mask-embedding head).

    ``(..., in_dim)`` → ``(..., out_dim)``; parameters ``layers.{i}.weight`` / ``.bias``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims_in = [in_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = F.relu(x, inplace=True)  # the linear layer's fresh output
        return x
