"""IA3-style scaling: a learned gain per output channel, i.e. per neuron.

    y' = g ⊙ y     =>  delta = (g − 1) ⊙ y,     merged: W' = g ⊙ W,  b' = g ⊙ b

g: (out,), starting at 1. Stacked with other adapters the gains add as (g − 1) terms
relative to the base output, which keeps stacking an exact weighted sum.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import Geometry, base_bias
from .base import Adapter, SlotSettings


class IA3(Adapter):
    kind = "ia3"

    @classmethod
    def shapes(cls, geo: Geometry, settings: SlotSettings) -> dict[str, tuple[int, ...]]:
        return {"ia3_l": (geo.out,)}

    def reset(self, base: nn.Module) -> None:
        nn.init.ones_(self.ia3_l)

    def delta(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.geo.channels(self.ia3_l - 1) * y

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        gain = self.ia3_l - 1  # (out,)
        dW = self.geo.unmatrix(gain[:, None] * self.geo.matrix(base.weight), base.weight)
        bias = base_bias(base)
        return dW, None if bias is None else gain * bias
