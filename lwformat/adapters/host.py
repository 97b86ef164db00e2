"""The adapter host: the one module that wraps a slot's base layer.

The host keeps the base layer untouched (same object, frozen) and holds a bank of
named adapters, each with its weight as a 0-d tensor buffer:

    y = base(x) + Σ_a  w_a · delta_a(x, base(x))

Changing a weight writes into that buffer, so it allocates nothing and changes no module.
While fused, the deltas live in the base weights and the host returns ``base(x)``.

In a mixed-world batch, `set_route` gives each adapter a per-sample selection (B,):
sample b gets ``Σ_a pick_a[b] · w_a · delta_a`` (sequence b, in a nested batch). LoRA adapters of one rank on linear
layers are gathered per sample and computed in one batched pass, so the cost stays
nearly flat in the number of distinct adapters:

    A_b = A[pick_b] (B, r, in),  B_b = B[pick_b] (B, out, r),  y_b += c_b · B_b A_b x_b

On a half-precision layer the adapters live in float32 (`layers.adapter_dtype`): x and
base(x) are widened, the deltas summed onto base(x) there, and the sum rounded once to
the layer's dtype, as PEFT does. Under autocast the inputs are left to autocast.

Attributes the host does not have (``weight``, ``in_features``...) are read from the
base layer, so code that reaches into layers keeps working.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import LayoutError
from .kinds import Adapter, LoRA
from .kinds.lora import MATMUL_LAYERS
from .layers import Geometry, adapter_dtype
from .module_state import init_module_state, new_module_dict


class Route(NamedTuple):
    """A host's part of a mixed batch, sorted out once per `routed` block.

    It holds the adapters' own tensors (weights, scalings, factors), which weights and
    swaps write in place, so it stays current; applying or removing a bundle inside the
    block is not seen.
    """

    batch: int
    picks: torch.Tensor | None  # (n, B) the selections of the LoRA adapters gathered per sample
    weights: tuple[torch.Tensor, ...]  # their 0-d weights
    scalings: tuple[torch.Tensor, ...]  # their 0-d scalings
    A: tuple[torch.Tensor, ...]  # (r, in) each
    B: tuple[torch.Tensor, ...]  # (out, r) each
    others: tuple[tuple[Adapter, torch.Tensor], ...]  # adapters computed one by one, with their selection (B,)

    def sample(self, i: int) -> Route:
        """Sample i's part alone, a batch of one: for the sequences of a nested batch, run one at a time."""
        picks = None if self.picks is None else self.picks[:, i : i + 1]  # (n, 1)
        others = tuple((adapter, pick[i : i + 1]) for adapter, pick in self.others)  # (1,) each
        return self._replace(batch=1, picks=picks, others=others)


def _widen(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` when it is floating; an embedding's indices stay as they are."""
    return x.to(dtype) if x.is_floating_point() else x


def _as(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y in an adapter's `dtype` (under autocast, as they are)."""
    return (x, y) if autocast or y.dtype == dtype else (_widen(x, dtype), y.to(dtype))


def _called(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing: its presence turns a parent's fast path off."""


class AdapterHost(nn.Module):
    is_adapter_host = True
    base: nn.Module
    adapters: nn.ModuleDict
    geo: Geometry
    fused: bool
    disabled: bool  # inside `World.disabled()`: the base alone
    route: Route | None

    def __init__(self, base: nn.Module, geo: Geometry, *, disabled: bool = False) -> None:
        init_module_state(self)  # nn.Module.__init__, faster: an apply builds a host per slot
        # Straight into the Module's dicts, as `Module.__setattr__` would put them after its
        # checks, which were much of a host's cost.
        self._modules.update(base=base, adapters=new_module_dict())
        self.__dict__.update(geo=geo, fused=False, route=None, disabled=disabled)

    def keep_called(self) -> None:
        """Make the parent call this host. In eval, nn.TransformerEncoderLayer's fast path reads
        linear1/linear2's weights itself, skipping every adapter there, unless some submodule
        has a hook: this one, which does nothing."""
        if _called not in self._forward_pre_hooks.values():
            self.register_forward_pre_hook(_called)

    def add(self, name: str, adapter: Adapter, weight: float | torch.Tensor = 1.0) -> None:
        """Put `adapter` in the bank; `weight` a number, or a 0-d tensor to use as its weight buffer."""
        if not isinstance(weight, torch.Tensor):
            like = self.base.weight  # adapters live on the base layer's device, in its dtype or float32
            weight = torch.tensor(weight, dtype=adapter_dtype(like.dtype), device=like.device)
        # What register_buffer(persistent=False) and ModuleDict's setitem do, minus their
        # checks (the name is the runtime's own): this runs once per slot on every apply.
        adapter._buffers["mix_weight"] = weight
        adapter._non_persistent_buffers_set.add("mix_weight")
        self.adapters._modules[name] = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused or self.disabled or not self.adapters:
            return self.base(x)
        if x.is_nested:  # nn.TransformerEncoder packs a padded batch so in eval: one sequence at a time
            return torch.nested.as_nested_tensor(self._unpacked(x.unbind()))  # (B, T_i, out)
        if self.geo.is_conv and x.ndim == len(self.geo.in_shape):
            # Unbatched (C, L) or (C, H, W), which nn.Conv1d/Conv2d take: the kinds' maths wants the batch first.
            return self.forward(x[None])[0]  # (1, C, *S) -> (out, *S')
        if self.route is not None:
            return self._routed(x, self.base(x))
        # Without autograd, sums accumulate in place: into y itself when no adapter reads it.
        # Not under autocast, which casts the inputs of out-of-place matmuls only.
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        inplace = not torch.is_grad_enabled() and not autocast
        adapters = self.adapters.values()
        # The adapters' dtype (float32 on a half layer), read from their weight so that a world
        # converted whole since (``.half()``) is followed; under autocast, autocast's.
        wide = None if autocast else next(iter(adapters))._buffers["mix_weight"].dtype
        if wide is not None and len(self.adapters) > 1 and any(a._buffers["mix_weight"].dtype != wide for a in adapters):
            return self._each_in_its_dtype(x)  # a bank of two dtypes: a world converted (`.to`) between applies
        if self.geo.layer in MATMUL_LAYERS and all(type(a) is LoRA for a in adapters):
            if wide is not None and x.dtype != wide:  # a half layer: x widened, base(x) too, summed, rounded once
                return self._widened_lora(x, wide, inplace)
            # The down-projections first, while x is still in cache from the layer that
            # made it: after the base's matmul it has to come from memory again.
            downs = [a.down(x) for a in adapters]  # (..., r) each
            out = self.base(x)
            for adapter, h in zip(adapters, downs):
                out = adapter.up_add(out, h, inplace=inplace)
            return out
        y = self.base(x)
        xa, ya = (x, y) if wide is None or y.dtype == wide else (_widen(x, wide), y.to(wide))  # what the adapters see
        reads_y = any(type(a) is not LoRA for a in adapters)
        out = ya
        for adapter in adapters:
            out = adapter.add_to(out, xa, ya, self.base, inplace=inplace and (out is not ya or not reads_y))
        # Under autocast the sum may have widened, and widened on a half layer: the layer's own dtype, as PEFT keeps it.
        return out if out.dtype == y.dtype else out.to(y.dtype)

    def _each_in_its_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """Each adapter computed in its own dtype, the sum in the widest of them, rounded once."""
        y = self.base(x)
        wide = y.dtype
        for adapter in self.adapters.values():
            wide = torch.promote_types(wide, adapter._buffers["mix_weight"].dtype)
        out = y.to(wide)
        for adapter in self.adapters.values():
            dtype = adapter._buffers["mix_weight"].dtype
            delta = adapter.mix_weight * adapter.delta(_widen(x, dtype), y.to(dtype), self.base)  # like y, in `dtype`
            out = out + delta.to(wide)
        return out.to(y.dtype)

    def _widened_lora(self, x: torch.Tensor, wide: torch.dtype, inplace: bool) -> torch.Tensor:
        """The LoRA fast path on a half layer: x and base(x) in the adapters' `wide` dtype, the sum rounded once."""
        adapters = self.adapters.values()
        downs = [a.down(x.to(wide)) for a in adapters]  # (..., r) each
        y = self.base(x)
        out = y.to(wide)  # a new tensor: summed into in place without autograd
        for adapter, h in zip(adapters, downs):
            out = adapter.up_add(out, h, inplace=inplace)
        return out.to(y.dtype)  # (..., out) in the layer's dtype

    def adapters_dtype(self) -> torch.dtype:
        """The dtype the adapters compute in (`layers.adapter_dtype` of the layer's, as made).

        Read from an adapter's own weight, so that a world converted whole since (``.half()``) is followed.
        """
        return next(iter(self.adapters._modules.values()))._buffers["mix_weight"].dtype  # every forward: no __getattr__

    def _widened(self) -> torch.dtype | None:
        """The adapters' dtype where it is not the layer's (float32 on a half layer), else None."""
        dtype = self.adapters_dtype()
        return dtype if dtype != self.base.weight.dtype else None

    def set_route(self, picks: dict[str, torch.Tensor] | None, batch: int = 0) -> None:
        """Select adapters per sample (`picks`: name -> (B,) selection), or end the mixed batch (None)."""
        if picks is None:
            self.route = None
            return
        lora, lora_picks, others = [], [], []
        for name, adapter in self.adapters.items():
            if (pick := picks.get(name)) is None:
                continue
            if type(adapter) is LoRA and self.geo.layer in MATMUL_LAYERS and (
                not lora or (lora[0].lora_A.shape, lora[0].lora_A.dtype) == (adapter.lora_A.shape, adapter.lora_A.dtype)
            ):
                lora.append(adapter)
                lora_picks.append(pick)
            else:
                others.append((adapter, pick))
        self.route = Route(
            batch, torch.stack(lora_picks) if lora else None,
            tuple(a.mix_weight for a in lora), tuple(a.scaling for a in lora),
            tuple(a.lora_A for a in lora), tuple(a.lora_B for a in lora), tuple(others),
        )  # fmt: skip

    def _unpacked(self, sequences: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Each sequence of a nested batch on its own; in a mixed batch, sequence i with sample i's route."""
        route = self.route
        if route is None or not (route.A or route.others):
            return [self.forward(t) for t in sequences]  # (T_i, out) each
        if len(sequences) != route.batch:
            raise LayoutError(f"a {self.geo.layer} layer got a nested batch of {len(sequences)} sequences in a mixed batch of {route.batch}")
        # As a batch of one, which the routed sum takes first (the sequence alone is (T_i, in)).
        return [self._routed(t[None], self.base(t[None]), route.sample(i))[0] for i, t in enumerate(sequences)]  # (T_i, out)

    def _routed(self, x: torch.Tensor, y: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        route = self.route if route is None else route
        if (route.A or route.others) and x.shape[0] != route.batch:
            raise LayoutError(f"a {self.geo.layer} layer got input {tuple(x.shape)} without the batch of {route.batch} first; "
                              "a mixed batch needs the batch first at every layer it routes (a documented limit)")  # fmt: skip
        per_sample = (-1,) + (1,) * (y.ndim - 1)
        layer_dtype = y.dtype
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        if (route.A or route.others) and not autocast and (wide := self._widened()) is not None:
            x, y = _widen(x, wide), y.to(wide)  # (B, ..., in), (B, ..., out) in the adapters' float32
        out = y
        # A sample that did not pick an adapter gets exactly 0 from it (`where`, not a product
        # with 0: the adapter's delta on that sample's input may overflow, and 0·inf is NaN).
        for adapter, pick in route.others:
            coef = (pick * adapter.mix_weight).view(per_sample)  # (B, 1, ...)
            xd, yd = _as(x, y, adapter._buffers["mix_weight"].dtype, autocast)  # a bank of two dtypes: each in its own
            out = out + torch.where(coef != 0, coef * adapter.delta(xd, yd, self.base), 0)
        if route.A:
            # Stacked, so the work per layer does not grow with the number of bundles (on a GPU
            # every small operation is a kernel launch, which costs more than its arithmetic).
            coefs = route.picks * (torch.stack(route.weights) * torch.stack(route.scalings))[:, None]  # (n, B)
            pick = coefs.ne(0).to(torch.int64).argmax(0)  # (B,) the adapter each sample selected
            A = torch.stack(route.A)[pick]  # (B, r, in)
            B = torch.stack(route.B)[pick]  # (B, out, r)
            coef = coefs.sum(0).view(per_sample)  # (B, 1, ...)
            # Scaled before the up-projection, as `LoRA.down` does: a small w·s keeps h @ Bᵀ in range.
            xa, _ = _as(x, y, A.dtype, autocast)
            h = torch.where(coef != 0, torch.einsum("b...i,bri->b...r", xa, A) * coef, 0)  # (B, ..., r)
            out = out + torch.einsum("b...r,bor->b...o", h, B)  # (B, ..., out)
        return out if out.dtype == layer_dtype else out.to(layer_dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}" + (", fused" if self.fused else "")
