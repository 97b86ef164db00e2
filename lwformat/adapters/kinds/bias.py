"""Bias-only adaptation (BitFit-style): a learned shift per output channel.

    y += c          c: (out,), starting at 0
    merged: b += c  (an embedding has no bias: every row of its table shifts instead)
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import Geometry
from .base import Adapter, SlotSettings


class BiasDelta(Adapter):
    kind = "bias"

    @classmethod
    def shapes(cls, geo: Geometry, settings: SlotSettings) -> dict[str, tuple[int, ...]]:
        return {"bias_delta": (geo.out,)}

    def reset(self, base: nn.Module) -> None:
        nn.init.zeros_(self.bias_delta)

    def delta(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.geo.channels(self.bias_delta).expand_as(y)

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.geo.layer == "embedding":
            return self.bias_delta.expand_as(base.weight), None  # (num, dim): every row shifts
        return None, self.bias_delta
