"""Fuse adapters into the base weights for zero-overhead inference; unfuse bit-exactly.

    W ← W + Σ_a w_a·dW_a,   b ← b + Σ_a w_a·db_a      (deltas from `Adapter.delta_weight`)

The base tensors are copied aside first: unfusing copies them back (decision 6), never
subtracts a delta out. Then each slot's delta is computed from its untouched base and
written, one slot at a time, so fusing holds one layer's delta beyond the copies, not the
whole model's; a slot that fails undoes the slots written before it. A slot whose weight
or bias another layer also uses (an LM head sharing its embedding, within a block or
across blocks) stays live: fusing there would leak the delta into the other layer, and
the other layer's own delta would be computed from an already fused base. Uses are seen
by Parameter identity and by memory: distinct Parameters whose bytes overlap (one made
from the other's `.detach()` or a view of it, or two storages over the same memory) share
a weight as much as one Parameter does.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..adapters.host import AdapterHost
from ..adapters.layers import base_bias
from ..adapters.plan import iter_hosts
from ..errors import FusedError
from ..world.digest import carry_records, held_records, holds, record
from .mixed import not_routed

if TYPE_CHECKING:
    from ..world.tree import World


def shared_parameters(world: World) -> set[int]:
    """Ids of base parameters that more than one layer of the world uses, in one block or across
    blocks: the same Parameter in several places, or distinct ones whose bytes overlap."""
    counts: dict[int, int] = {}
    params: dict[int, torch.Tensor] = {}
    modules = {id(block.module): block.module for block in world.blocks().values()}
    for module in modules.values():
        for _, p in module.named_parameters(remove_duplicate=False):  # hosts show their base's parameters too
            counts[id(p)] = counts.get(id(p), 0) + 1
            params[id(p)] = p
    return {i for i, n in counts.items() if n > 1} | overlapping(params.values())


def overlapping(tensors: Iterable[torch.Tensor]) -> set[int]:
    """Ids of the tensors whose bytes overlap another's (same device, intersecting byte ranges).

    Ranges are absolute addresses, not per storage: two storages can wrap the same memory
    (torch.from_numpy of an array and of a view of it, frombuffer, DLPack), and their tensors
    share bytes all the same. Sorted by start within each device, a tensor overlaps an
    earlier one exactly when it starts before the furthest end so far; that end's owner
    overlaps it too. Ranges are spans, so views that interleave (every other column each)
    count as overlapping: kept live, which is safe, where fusing might have been.
    """
    spans = []
    for t in tensors:
        if t.numel() == 0 or t.device.type == "meta":  # no bytes to share
            continue
        start = t.data_ptr()  # its lowest element's address, in bytes: torch strides are never negative
        extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))  # elements spanned
        spans.append((str(t.device), start, start + extent * t.element_size(), id(t)))
    spans.sort()
    out: set[int] = set()
    space, end, owner = None, 0, 0
    for device, start, stop, i in spans:
        if device != space:  # one address space per device
            space, end, owner = device, stop, i
            continue
        if start < end:
            out.update((i, owner))
        if stop > end:
            end, owner = stop, i
    return out


def _delta(slot: str, host: AdapterHost) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The slot's weighted delta, from its base as it is now, summed in float32 or the base's wider dtype."""
    weight, bias = host.base.weight, base_bias(host.base)
    wide = torch.promote_types(weight.dtype, torch.float32)
    dW = torch.zeros_like(weight, dtype=wide)
    db = None
    for adapter in host.adapters.values():
        w = adapter.mix_weight.to(wide)
        a_dW, a_db = adapter.delta_weight(host.base)
        if a_dW is not None:
            dW += w * a_dW.to(wide)
        if a_db is not None:
            if bias is None:
                raise FusedError(f"{slot}: a bias adapter cannot be fused into a layer without a bias", path=slot)
            db = w * a_db.to(wide) if db is None else db + w * a_db.to(wide)
    return dW, db


@torch.no_grad()
def fuse(world: World) -> list[str]:
    """Fuse every adapter; return the slots kept live because another layer shares their weight or bias."""
    if world.fused_state is not None:
        raise FusedError("the world is fused already")
    not_routed(world, "fuse")
    if world.adapters_disabled:  # the fused base would carry the adapters the block leaves out
        raise FusedError("cannot fuse inside world.disabled(): leave the block first")
    shared = shared_parameters(world)
    hosts, saved, live = {}, {}, []
    for slot, host in iter_hosts(world):
        weight, bias = host.base.weight, base_bias(host.base)
        if id(weight) in shared or (bias is not None and id(bias) in shared):
            live.append(slot)
            continue
        hosts[slot] = host
        saved[slot] = (weight.clone(), None if bias is None else bias.clone())
    held = held_records(world, {slot.partition(":")[0] for slot in hosts})
    written = []
    try:
        for slot, host in hosts.items():
            dW, db = _delta(slot, host)  # shaped like the weight and the bias (or None)
            written.append(slot)  # before writing: a write cut short is undone too
            host.base.weight.add_(dW)  # computed in the wider dtype, rounded once into the weight's
            if db is not None:
                base_bias(host.base).add_(db)
            host.fused = True
        world.fused_state = saved
    except BaseException:
        _restore(hosts, saved, written)
        world.fused_state = None
        carry_records(world, held)  # restored bit-exactly, nothing else written
        raise
    # What unfuse carries over, if the blocks are then exactly as fuse left them.
    _HELD[world] = {path: (record(world.block(path).module, "fused"), hits) for path, hits in held.items()}
    return live


def _restore(hosts: dict[str, AdapterHost], saved: dict, slots: list[str]) -> None:
    """Copy the saved base tensors of `slots` back (bit-exact) and mark their hosts unfused."""
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
    marks = _HELD.pop(world, {})
    # A block written since fuse (beyond fuse's own writes) is judged by its content again.
    intact = {path: hits for path, (mark, hits) in marks.items() if holds(mark, world.block(path).module)}
    _restore(hosts, world.fused_state, list(hosts))
    world.fused_state = None
    # The digests (and a cast world's sources) from before fuse hold again: no hashing after an
    # unfuse, and a cast world keeps taking bundles bound to what it was cast from.
    carry_records(world, intact)


_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # world -> what `fuse` found holding, for `unfuse`


def forget_held(world: World) -> None:
    """Let unfuse carry nothing over (the digests were recomputed meanwhile: they count)."""
    _HELD.pop(world, None)
