"""A GPT-2-style causal decoder language model: the zoo's ``llm`` block.

    h₀      = tok[x] + pos[0..T)                    x: (B, T) token ids
    hₗ      = layerₗ(hₗ₋₁),  l = 1..N              causal pre-LayerNorm layers
    logits  = ln_f(h_N) · tokᵀ                      the head is tied to the token embedding
    loss(x) = CE(logits(x[:, :-1]), x[:, 1:])       next-token cross-entropy

Layer names follow GPT-2 (``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
``blocks.{i}.mlp.fc``, ``blocks.{i}.mlp.proj``), so LoRA on "every attention and MLP
projection" is 4 × N layers here, as in PEFT on GPT-2. The head is an ``nn.Linear``
whose weight *is* ``tok.weight`` (the Hugging Face convention), so the tie is visible
to anyone walking the parameters (fusing an adapter into a tied weight would leak into
the other user), and the weight is counted and stored once.

Sizes: ``tiny`` is byte-level (vocab 256, D 64, 2 layers, 4 heads, context 256);
``small`` is GPT-2 small exactly (vocab 50257, D 768, 12 layers, 12 heads, context
1024, 124,439,808 parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..world.registry import register_block
from .layers import TransformerLayer, gpt2_init

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"vocab_size": 256, "dim": 64, "layers": 2, "heads": 4, "context": 256},
    "small": {"vocab_size": 50257, "dim": 768, "layers": 12, "heads": 12, "context": 1024},
}


class DecoderLM(nn.Module):
    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(TransformerLayer(dim, heads, causal=True) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        gpt2_init(self, layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) for token ids (B, T)."""
        T = tokens.shape[1]
        if T > self.context:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.context}")
        positions = torch.arange(T, device=tokens.device).expand_as(tokens)  # (B, T): every layer sees the batch
        h = self.tok(tokens) + self.pos(positions)  # (B, T, D)
        for layer in self.blocks:
            h = layer(h)  # (B, T, D)
        return self.head(self.ln_f(h))  # (B, T, V)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over (B, T) token ids; a scalar."""
        logits = self(tokens[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@register_block("decoder_lm", "llm")
def decoder_lm(**config) -> DecoderLM:
    return DecoderLM(**config)
