"""Transformer parts shared by the zoo's blocks: attention, MLP, a pre-LayerNorm layer.

Shapes: B batch, T query length, S key length, D model width, H heads, Dh = D / H.

    attention(x) = proj(softmax(q kᵀ / √Dh + mask) v),   [q, k, v] = split(qkv(x))
    mlp(x)       = proj(gelu(fc(x))),                     fc: D -> 4D, proj: 4D -> D, tanh-approximate GELU
    layer(x)     = x + attn(ln1(x));  x + mlp(ln2(x))     (pre-LayerNorm, as in GPT-2)

Module names (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``, ``cross.q``,
``cross.kv``, ``cross.proj``) are part of the zoo's contract: slot patterns and the
benchmarks against PEFT address layers by them. No buffers are registered, so a block
built on ``meta`` and materialized with ``to_empty`` needs nothing recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads).transpose(1, 2)  # (B, H, T, Dh)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, D)


def key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, S) 1/0 padding mask as the boolean (B, 1, 1, S) mask SDPA broadcasts over heads and queries."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (the GPT-2 layout)."""

    def __init__(self, dim: int, heads: int, *, causal: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, T, D)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))  # 3 x (B, H, T, Dh)
        # is_causal builds the mask inside the kernel: nothing to store, nothing to rebuild after to_empty.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(attention_mask), is_causal=self.causal)
        return self.proj(merge_heads(y))  # (B, T, D)


class CrossAttention(nn.Module):
    """Queries from ``x``, keys and values (one fused ``kv`` projection) from a conditioning sequence."""

    def __init__(self, dim: int, cond_dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(cond_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = split_heads(self.q(x), self.heads)  # (B, H, T, Dh)
        k, v = (split_heads(t, self.heads) for t in self.kv(cond).chunk(2, dim=-1))  # 2 x (B, H, S, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(cond_mask))  # (B, H, T, Dh)
        return self.proj(merge_heads(y))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden or 4 * dim)
        self.proj = nn.Linear(hidden or 4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's tanh approximation, so GPT-2 weights load into the decoder and compute the same function.
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # (B, T, D)


class TransformerLayer(nn.Module):
    """One pre-LayerNorm transformer layer; ``causal`` picks decoder or encoder attention."""

    def __init__(self, dim: int, heads: int, *, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, causal=causal)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attention_mask)  # (B, T, D)
        return x + self.mlp(self.ln2(x))  # (B, T, D)


def gpt2_init(module: nn.Module, layers: int) -> None:
    """GPT-2 initialization: N(0, 0.02) weights, zero biases, residual projections scaled by 1/√(2·layers).

    The scaling keeps the residual stream's variance independent of depth.
    """
    seen: set[int] = set()  # a tied weight is initialised once, by its first owner
    for name, m in module.named_modules():
        if id(getattr(m, "weight", None)) in seen:
            continue
        seen.add(id(getattr(m, "weight", None)))
        if isinstance(m, nn.Linear):
            std = 0.02 / (2 * layers) ** 0.5 if name.endswith(".proj") else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
