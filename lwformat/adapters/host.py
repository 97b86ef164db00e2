"""The adapter host: the one module that wraps a slot's base layer.

The host keeps the base layer untouched (same object, frozen) and holds a bank of
named adapters, each with its weight as a 0-d tensor buffer:

    y = base(x) + Σ_a  w_a · delta_a(x, base(x))

Changing a weight writes into that buffer, so it allocates nothing and changes no module.
Attributes the host does not have (``weight``, ``in_features``...) are read from the
base layer, so code that reaches into layers keeps working.
"""

from __future__ import annotations

import torch
from torch import nn

from .kinds import Adapter
from .layers import Geometry


class AdapterHost(nn.Module):
    is_adapter_host = True

    def __init__(self, base: nn.Module, geo: Geometry) -> None:
        super().__init__()
        self.base = base
        self.geo = geo
        self.adapters = nn.ModuleDict()

    def add(self, name: str, adapter: Adapter, weight: float = 1.0) -> None:
        like = next(iter(adapter.parameters()))
        adapter.register_buffer("mix_weight", torch.tensor(weight, dtype=like.dtype, device=like.device), persistent=False)
        self.adapters[name] = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        out = y
        for adapter in self.adapters.values():
            out = out + adapter.mix_weight * adapter.delta(x, y, self.base)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"
