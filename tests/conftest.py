"""Shared fixtures: small real worlds built from plain torch modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lwformat import Block, World


class TinyNet(nn.Module):
    """Every layer kind adapters support, in one block: embedding, linear, conv1d, conv2d."""

    def __init__(self, vocab: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.seq = nn.Conv1d(dim, dim, 3, padding=1)
        self.img = nn.Conv2d(2, 4, 3, padding=1, stride=1)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.emb(tokens))  # (B, T, D)
        h = self.seq(h.transpose(1, 2)).transpose(1, 2)  # (B, T, D)
        return self.head(self.norm(h))  # (B, T, V)


def small_world(seed: int = 0) -> World:
    torch.manual_seed(seed)
    lm = Block(TinyNet(), "llm")
    world = World.from_blocks(
        {
            "author/narrate/text/llm": lm,
            "author/narrate/text/critic": Block(TinyNet(), "conditioner"),
            "creator/render/t2i/backbone": Block(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), "backbone"),
            "environment/describe/text/llm": lm,  # one LLM serving two stages
        }
    )
    # A parameter held above the block level: freezing must cover it too.
    world.stages["creator"].register_parameter("style_gain", nn.Parameter(torch.ones(8)))
    return world


@pytest.fixture
def world() -> World:
    return small_world()
