"""Neuron deltas: full-rank updates of a chosen subset of output channels.

    y[idx] += D x      D: (k, *in_shape), idx: (k,) output channels
    merged: W[idx] += D

Indices are given explicitly or, by count, spread evenly over the channels; they are
stored with the adapter (a persistent buffer), so a saved adapter names its neurons.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import BundleFormatError
from ..layers import Geometry
from .base import Adapter, SlotSettings


class NeuronDelta(Adapter):
    kind = "neuron"

    def add_buffers(self, base: nn.Module, tensors: dict[str, torch.Tensor] | None) -> None:
        if tensors is not None:
            index = tensors["neuron_index"]
        else:
            index = torch.tensor(self.settings.neurons, dtype=torch.int64, device=base.weight.device)
        self.register_buffer("neuron_index", index)  # (k,)

    @classmethod
    def shapes(cls, geo: Geometry, settings: SlotSettings) -> dict[str, tuple[int, ...]]:
        return {"neuron_delta": (len(settings.neurons), *geo.in_shape)}

    @staticmethod
    def check_index(index: torch.Tensor, geo: Geometry, slot: str) -> None:
        """Stored indices must name distinct output channels; else every forward would fail (or add twice)."""
        if index.dtype != torch.int64 or index.ndim != 1:
            raise BundleFormatError(f"{slot}: neuron_index must be a 1-D int64 tensor, not {index.dtype} {tuple(index.shape)}", path=slot)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= geo.out):
            raise BundleFormatError(f"{slot}: neuron_index names channels outside 0..{geo.out - 1}", path=slot)
        if index.unique().numel() != index.numel():
            raise BundleFormatError(f"{slot}: neuron_index names a channel twice", path=slot)

    def reset(self, base: nn.Module) -> None:
        nn.init.zeros_(self.neuron_delta)

    def delta(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        h = self.geo.down(x, self.neuron_delta, base)  # (..., k) or (B, k, *S)
        dim = 1 if self.geo.is_conv else y.ndim - 1
        return y.new_zeros(y.shape).index_copy(dim, self.neuron_index, h)  # like y

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, None]:
        M = self.neuron_delta.new_zeros(self.geo.out, self.geo.fan_in)  # (out, fan_in) in the adapter's dtype
        M = M.index_copy(0, self.neuron_index, self.neuron_delta.reshape(len(self.neuron_index), -1))
        return self.geo.unmatrix(M, base.weight), None
