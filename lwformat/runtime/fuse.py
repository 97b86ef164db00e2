"""Fuse adapters into the base weights for zero-overhead inference; unfuse bit-exactly.

    W ← W + Σ_a w_a·dW_a,   b ← b + Σ_a w_a·db_a      (deltas from `Adapter.delta_weight`)

All deltas are computed from the untouched base before any weight is written, and the
base tensors are copied aside first: unfusing copies them back (decision 6), never
subtracts a delta out. A slot whose weight is tied to another layer (an LM head sharing
its embedding) stays live: fusing there would leak the delta into the other layer.
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


@torch.no_grad()
def fuse(world: World) -> list[str]:
    """Fuse every adapter; return the slots kept live because their weight is tied."""
    if world.fused_state is not None:
        raise FusedError("the world is fused already")
    tied = tied_weights(world)
    pending, live = [], []
    for slot, host in iter_hosts(world):
        if id(host.base.weight) in tied:
            live.append(slot)
            continue
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
        pending.append((slot, host, dW, db))
    saved = {}
    for slot, host, dW, db in pending:
        bias = base_bias(host.base)
        saved[slot] = (host.base.weight.clone(), None if bias is None else bias.clone())
        host.base.weight.copy_((host.base.weight.float() + dW).to(host.base.weight.dtype))
        if db is not None:
            bias.copy_((bias.float() + db).to(bias.dtype))
        host.fused = True
    world.fused_state = saved
    return live


@torch.no_grad()
def unfuse(world: World) -> None:
    if world.fused_state is None:
        raise FusedError("the world is not fused")
    for slot, host in iter_hosts(world):
        if slot not in world.fused_state:
            continue  # kept live
        weight, bias = world.fused_state[slot]
        host.base.weight.copy_(weight)
        if bias is not None:
            base_bias(host.base).copy_(bias)
        host.fused = False
    world.fused_state = None
