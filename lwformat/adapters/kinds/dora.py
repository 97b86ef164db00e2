"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖        (norms per output channel, m: (out,))
    y' = W'x + b  =>  delta = (m/n − 1) ⊙ (y − b) + (m/n) ⊙ s·B(A(x)),   n = ‖W + s·BA‖

The norm is detached, as the paper (section 4.3) and PEFT do. m starts at ‖W‖, so
with B = 0 the adapter starts as the identity. Embeddings are not supported.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import Geometry, base_bias
from .base import SlotSettings
from .lora import LoRA


class DoRA(LoRA):
    kind = "dora"
    layers = frozenset({"linear", "gpt2_conv1d", "conv1d", "conv2d"})

    @classmethod
    def shapes(cls, geo: Geometry, settings: SlotSettings) -> dict[str, tuple[int, ...]]:
        return {**super().shapes(geo, settings), "magnitude": (geo.out,)}

    def reset(self, base: nn.Module) -> None:
        super().reset(base)
        self.magnitude.copy_(self.geo.matrix(base.weight).to(self.magnitude.dtype).norm(dim=1))  # (out,) in the adapter's dtype

    def norm_scale(self, base: nn.Module) -> torch.Tensor:
        merged = self.geo.matrix(base.weight) + self.lora_matrix()  # (out, fan_in)
        return self.magnitude / merged.norm(dim=1).detach()  # (out,)

    def delta(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        scale = self.geo.channels(self.norm_scale(base))  # broadcasts against y
        if self.dropout and self.training:  # as PEFT: both terms on the dropped input, the layer's own output not
            x = self.dropped(x)
            # W x in x's dtype (float32 on a half layer, where the adapters compute), as PEFT does
            W = self.geo.matrix(base.weight).to(x.dtype).reshape(self.geo.out, *self.geo.in_shape)  # (out, *in)
            return (scale - 1) * self.geo.down(x, W, base) + scale * self.lora_delta(x, base)
        bias = base_bias(base)
        y0 = y if bias is None else y - self.geo.channels(bias)  # W x, without the bias
        return (scale - 1) * y0 + scale * self.lora_delta(x, base)

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, None]:
        W = self.geo.matrix(base.weight)  # (out, fan_in)
        merged = self.norm_scale(base)[:, None] * (W + self.lora_matrix())  # (out, fan_in)
        return self.geo.unmatrix(merged - W, base.weight), None
