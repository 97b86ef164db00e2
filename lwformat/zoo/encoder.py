"""A bidirectional transformer text encoder: the zoo's ``conditioner`` block.

    h₀ = tok[x] + pos[0..T)                 x: (B, T) token ids, mask: (B, T) 1 = real token
    hₗ = layerₗ(hₗ₋₁, mask),  l = 1..N     pre-LayerNorm layers, no causal mask
    y  = ln_f(h_N)                          (B, T, D): one embedding per token

Padding positions are masked out as keys, so real tokens never attend to padding;
their own rows are computed but meaningless. Layer names match the decoder's
(``blocks.{i}.attn.qkv`` ...), so one slot pattern addresses both.

Sizes: ``tiny`` is byte-level (vocab 256, D 32, 2 layers); ``small`` shares GPT-2's
vocabulary (50257) so one prompt tokenization feeds every block of the reference
world (D 256, 8 layers, context 512, 19,315,456 parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from ..world.registry import register_block
from .layers import TransformerLayer, gpt2_init

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"vocab_size": 256, "dim": 32, "layers": 2, "heads": 2, "context": 256},
    "small": {"vocab_size": 50257, "dim": 256, "layers": 8, "heads": 4, "context": 512},
}


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.dim, self.context = dim, context
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(TransformerLayer(dim, heads, causal=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        gpt2_init(self, layers)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) for token ids (B, T) and an optional (B, T) padding mask."""
        T = tokens.shape[1]
        if T > self.context:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.context}")
        h = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device).expand_as(tokens))  # (B, T, D)
        for layer in self.blocks:
            h = layer(h, attention_mask)  # (B, T, D)
        return self.ln_f(h)  # (B, T, D)


@register_block("text_encoder", "conditioner")
def text_encoder(**config) -> TextEncoder:
    return TextEncoder(**config)
