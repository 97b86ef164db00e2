"""A small DiT-style diffusion backbone: the zoo's ``backbone`` block.

Predicts the noise ε in latents x_t (B, C, H, W) at time t ∈ [0, 1] (B,), attending to a
conditioning sequence (B, S, Dc). With P the patch size and N = (H/P)·(W/P) tokens:

    h₀ = patch_embed(x_t) + pos                            Conv2d(C, D, P, stride P): (B, N, D)
    c  = time.proj(silu(time.fc(sinusoid(1000 t))))        (B, D)
    shift₁ scale₁ gate₁ shift₂ scale₂ gate₂ = ada(silu(c))   adaLN modulation, 6 × (B, 1, D)
    h += gate₁ · attn(ln₁(h) · (1 + scale₁) + shift₁)
    h += cross(ln_c(h), cond)
    h += gate₂ · mlp(ln₂(h) · (1 + scale₂) + shift₂)
    ε  = refine(unpatch(out(ln_f(h))))                     Linear(D, P²C), then a 3×3 Conv2d

Unlike DiT's adaLN-Zero, nothing is zero-initialized: a reference block with fresh
weights must respond to every layer, or an adapter on it could not be seen to act.
The block holds convolutions (``patch_embed``, ``refine``) as well as linear layers, so
adapters for both are exercised.

Sizes: ``tiny`` (latents 4×8×8, D 32, 2 blocks, cond 32); ``small`` (latents 4×32×32,
D 512, 8 blocks, cond 256, 44,800,676 parameters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..world.registry import register_block
from .layers import MLP, CrossAttention, SelfAttention

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"channels": 4, "latent_size": 8, "patch": 2, "dim": 32, "layers": 2, "heads": 2, "cond_dim": 32},
    "small": {"channels": 4, "latent_size": 32, "patch": 2, "dim": 512, "layers": 8, "heads": 8, "cond_dim": 256},
}


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style features [cos(t·ωᵢ), sin(t·ωᵢ)], ωᵢ = 10000^(-i/(dim/2)); (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (dim/2,)
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, dim)


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # 1000·t spreads t ∈ [0, 1] over the sinusoid's wavelengths as DiT's integer steps do.
        features = sinusoid(1000.0 * t, self.dim).to(self.fc.weight.dtype)  # (B, D)
        return self.proj(F.silu(self.fc(features)))  # (B, D)


class DiTLayer(nn.Module):
    def __init__(self, dim: int, heads: int, cond_dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, elementwise_affine=False)  # scale and shift come from `ada`
        self.attn = SelfAttention(dim, heads, causal=False)
        self.ln_c = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, cond_dim, heads)
        self.ln2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = MLP(dim)
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(
        self, h: torch.Tensor, c: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)  # 6 x (B, 1, D)
        h = h + gate1 * self.attn(self.ln1(h) * (1 + scale1) + shift1)  # (B, N, D)
        h = h + self.cross(self.ln_c(h), cond, cond_mask)  # (B, N, D)
        return h + gate2 * self.mlp(self.ln2(h) * (1 + scale2) + shift2)  # (B, N, D)


class DiT(nn.Module):
    def __init__(
        self, channels: int, latent_size: int, patch: int, dim: int, layers: int, heads: int, cond_dim: int
    ) -> None:
        super().__init__()
        if latent_size % patch:
            raise ValueError(f"latent size {latent_size} is not divisible by patch {patch}")
        self.channels, self.latent_size, self.patch, self.cond_dim = channels, latent_size, patch, cond_dim
        self.grid = latent_size // patch
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid**2, dim) * 0.02)  # (1, N, D)
        self.time = TimeEmbedding(dim)
        self.blocks = nn.ModuleList(DiTLayer(dim, heads, cond_dim) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, patch * patch * channels)
        self.refine = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(
        self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted noise (B, C, H, W) for latents (B, C, H, W), times (B,) and conditioning (B, S, Dc)."""
        _, C, H, W = latents.shape
        if (C, H, W) != (self.channels, self.latent_size, self.latent_size):
            raise ValueError(
                f"latents {(C, H, W)} do not match {(self.channels, self.latent_size, self.latent_size)}"
            )
        h = self.patch_embed(latents).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        c = self.time(t)  # (B, D)
        for layer in self.blocks:
            h = layer(h, c, cond, cond_mask)  # (B, N, D)
        patches = self.out(self.ln_f(h))  # (B, N, P*P*C)
        return self.refine(self.unpatchify(patches))  # (B, C, H, W)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        B, G, P, C = patches.shape[0], self.grid, self.patch, self.channels
        x = patches.view(B, G, G, P, P, C)  # (B, gh, gw, ph, pw, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, G * P, G * P)  # (B, C, H, W)


@register_block("dit", "backbone")
def dit(**config) -> DiT:
    return DiT(**config)
