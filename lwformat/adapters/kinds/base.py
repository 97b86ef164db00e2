"""The contract every adapter kind implements.

An adapter is a small module held by an `AdapterHost` next to a frozen base layer.
It never touches the base; it only says how the layer's output changes:

    y = base(x) + Σ_a  w_a · delta_a(x, base(x))

with ``w_a`` the adapter's weight (a tensor, so changing it recompiles nothing).
Every kind's delta is exactly what merging ``delta_weight`` into the base weight and
bias would change, so fusing at weight ``w`` gives ``W + w·dW`` and ``b + w·db``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ..layers import Geometry, adapter_dtype
from ..module_state import init_module_state


class SlotSettings(NamedTuple):
    """What to build at one slot: the kind and its sizes."""

    kind: str
    rank: int = 8
    alpha: float = 8.0
    rslora: bool = False
    neurons: Sequence[int] = ()  # output channels a `neuron` adapter trains (from a bundle: a range, its count)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class Adapter(nn.Module, abc.ABC):
    """Base class of adapter kinds: declares shapes, computes the output delta, merges."""

    kind: ClassVar[str]
    layers: ClassVar[frozenset[str]] = frozenset({"linear", "gpt2_conv1d", "conv1d", "conv2d", "embedding"})
    uses_rank: ClassVar[bool] = False
    dropout: float = 0.0  # set on trained LoRA/DoRA adapters by `customize`; applied bundles have none

    def __init__(
        self, geo: Geometry, settings: SlotSettings, base: nn.Module, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        """A fresh, trainable adapter; or, given `tensors`, a frozen one bound to them (no copy).

        Bound `tensors` are views into an applied bundle's storage: the kind's tensors, and
        may hold its runtime scalars too (a LoRA ``scaling``), so that nothing is allocated.
        """
        init_module_state(self)  # nn.Module.__init__, faster: an apply builds one adapter per slot
        # Plain attributes and buffers go straight into the Module's dicts, which is all
        # `Module.__setattr__`/`register_buffer` would do here after their checks: an
        # apply builds one adapter per slot, and those checks were most of its cost.
        self.__dict__.update(geo=geo, settings=settings)
        if tensors is None:
            like = base.weight
            dtype = adapter_dtype(like.dtype)  # float32 on a half-precision layer, as PEFT trains them
            for name, shape in self.shapes(geo, settings).items():
                self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=like.device)))
        else:  # bound to a bundle's storage: frozen, so buffers, never among the trainable parameters
            self._buffers.update((name, tensors[name]) for name in self.shapes(geo, settings))
        self.add_buffers(base, tensors)
        if tensors is None:
            with torch.no_grad():
                self.reset(base)

    def add_buffers(self, base: nn.Module, tensors: dict[str, torch.Tensor] | None) -> None:
        """Register the kind's non-trainable tensors (a scaling, neuron indices); none by default."""

    @classmethod
    @abc.abstractmethod
    def shapes(cls, geo: Geometry, settings: SlotSettings) -> dict[str, tuple[int, ...]]:
        """Name and shape of every trainable tensor this kind needs at a slot."""

    @abc.abstractmethod
    def reset(self, base: nn.Module) -> None:
        """Initialise so that the adapter starts as the identity (delta = 0)."""

    @abc.abstractmethod
    def delta(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Change of the layer's output at weight 1; `y` is the base output for `x`."""

    @abc.abstractmethod
    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(dW, db) in the base's own layouts, such that merging reproduces `delta` exactly."""

    def add_to(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, base: nn.Module, *, inplace: bool) -> torch.Tensor:
        """``out + w · delta(x, y)``, where ``w`` is this adapter's weight in its host.

        With ``inplace`` the sum may be written into `out` (no autograd, `out` not needed again).
        """
        return out + self.mix_weight * self.delta(x, y, base)

    def extra_repr(self) -> str:
        s = self.settings
        return f"kind={s.kind!r}, layer={self.geo.layer!r}" + (f", rank={s.rank}, alpha={s.alpha}" if self.uses_rank else "")
