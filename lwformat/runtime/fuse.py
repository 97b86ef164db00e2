"""Fuse adapters into the base weights for zero-overhead inference; unfuse bit-exactly.

    W ← W + Σ_a w_a·dW_a,   b ← b + Σ_a w_a·db_a      (deltas from `Adapter.delta_weight`)

The base tensors are copied aside first: unfusing copies them back (decision 6), never
subtracts a delta out. Then each slot's delta is computed from its untouched base and
written, one slot at a time, so fusing holds one layer's delta beyond the copies, not the
whole model's; a slot that fails undoes the slots written before it. A slot whose weight
is tied to another layer (an LM head sharing its embedding) stays live: fusing there would
leak the delta into the other layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..adapters.layers import base_bias
from ..adapters.plan import iter_hosts
from ..errors import FusedError

if TYPE_CHECKING:
    from ..world.tree import World


def tied_weights(world: World) -> set[int]:
    """Ids of base weights that more than one layer of a block uses."""
    tied = set()
    for block in world.blocks().values():
        counts: dict[int, int] = {}
        for _, p in block.module.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        tied.update(i for i, n in counts.items() if n > 1)
    return tied


def _delta(slot: str, host) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The slot's weighted delta (float32), from its base as it is now."""
    weight, bias = host.base.weight, base_bias(host.base)
    dW = torch.zeros_like(weight, dtype=torch.float32)
    db = None
    for adapter in host.adapters.values():
        w = adapter.mix_weight.float()
        a_dW, a_db = adapter.delta_weight(host.base)
        if a_dW is not None:
            dW += w * a_dW.float()
        if a_db is not None:
            if bias is None:
                raise FusedError(f"{slot}: a bias adapter cannot be fused into a layer without a bias", path=slot)
            db = w * a_db.float() if db is None else db + w * a_db.float()
    return dW, db


def _add(target: torch.Tensor, delta: torch.Tensor) -> None:
    if target.dtype == torch.float32:
        target.add_(delta)
    else:
        target.copy_((target.float() + delta).to(target.dtype))


@torch.no_grad()
def fuse(world: World) -> list[str]:
    """Fuse every adapter; return the slots kept live because their weight is tied."""
    if world.fused_state is not None:
        raise FusedError("the world is fused already")
    tied = tied_weights(world)
    hosts, live = {}, []
    for slot, host in iter_hosts(world):
        if id(host.base.weight) in tied:
            live.append(slot)
        else:
            hosts[slot] = host
    saved = {}
    for slot, host in hosts.items():
        bias = base_bias(host.base)
        saved[slot] = (host.base.weight.clone(), None if bias is None else bias.clone())
    written = []
    try:
        for slot, host in hosts.items():
            dW, db = _delta(slot, host)  # float32, shaped like the weight and the bias (or None)
            written.append(slot)
            _add(host.base.weight, dW)
            if db is not None:
                _add(base_bias(host.base), db)
            host.fused = True
    except BaseException:
        _restore(hosts, saved, written)
        raise
    world.fused_state = saved
    return live


def _restore(hosts: dict, saved: dict, slots: list[str]) -> None:
    for slot in slots:
        host, (weight, bias) = hosts[slot], saved[slot]
        host.base.weight.copy_(weight)
        if bias is not None:
            base_bias(host.base).copy_(bias)
        host.fused = False


@torch.no_grad()
def unfuse(world: World) -> None:
    if world.fused_state is None:
        raise FusedError("the world is not fused")
    hosts = {slot: host for slot, host in iter_hosts(world) if slot in world.fused_state}  # the others were kept live
    _restore(hosts, world.fused_state, list(hosts))
    world.fused_state = None
