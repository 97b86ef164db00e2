"""The stack of bundles on a loaded world: apply, weight, swap and remove.

Every operation checks everything first (compatibility, layout, names, weights) and
only then changes the world; if a change still fails midway, it is rolled back.

Stacking is the exact weighted sum: each applied bundle is one named adapter in the
bank of each host it touches, ``y = base(x) + Σ_a w_a·delta_a``. A weight may be one
number or ``{block glob: weight}``; the first glob matching a slot's block (by any of
its paths) sets that slot's weight, and slots no glob matches keep theirs (1.0 when
applying).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..adapters.host import AdapterHost
from ..adapters.kinds import KINDS, Adapter
from ..adapters.kinds.neuron import NeuronDelta
from ..adapters.plan import parent_index, replace_module
from ..bundle.manifest import slot_layout
from ..bundle.read import Bundle
from ..errors import (AlreadyAppliedError, FusedError, LayoutError, NotAppliedError, RankError, RuntimeStateError, TargetError,
                      WeightError)
from ..world.digest import untouched_digest
from ..world.paths import match_block
from .resolve import ResolvedSlot, resolve
from .spare import Spare
from .storage import Place, allocate, check_scalar, copy_packed, copy_runs, fill, fits, plan_layout, scalars, slot_views, view

if TYPE_CHECKING:
    from ..world.tree import World

Weight = float | dict[str, float]


@dataclass(repr=False)
class Applied:
    """One bundle applied to a world: its adapters, their storage and where they sit."""

    name: str
    key: str  # the adapters' name in every host's bank
    bundle: Any
    slots: list[ResolvedSlot]
    places: list[Place]
    buffers: dict
    adapters: dict[str, Adapter] = field(default_factory=dict)  # slot -> adapter
    hosts: dict[str, AdapterHost] = field(default_factory=dict)  # slot -> the host holding its adapter
    sentinels: list[Place] = field(default_factory=list)  # the first place of each block in each buffer
    packed: bool = False  # its storage matches the file's dtype runs one to one
    bound: tuple[tuple[str | None, str], ...] = ()  # (canonical path, digest) of each bound block, at the first fast swap
    indexed: tuple[ResolvedSlot, ...] = ()  # the slots whose stored channel indices each new bundle must get right

    def __repr__(self) -> str:  # the generated one prints every tensor: tens of KB in a notebook
        m = self.bundle.manifest
        size = sum(b.numel() * b.element_size() for b in self.buffers.values())
        return f"Applied({self.name!r}, {m.name}@{m.version}, {len(self.slots)} slots, {size / 1e6:.2f} MB)"


def _same_layout_swap(world: World, applied: Applied, bundle: Any) -> bool:
    """The fast swap: same binding and layout as the applied bundle, one copy per buffer.

    The full check already passed for the applied bundle's identical binding, so it is
    enough that the bound blocks' tensors are unwritten since (`untouched_digest`; a
    module replaced since is seen by the full check of the next apply, or by
    ``swap(strict=True)``). Returns False, having changed nothing, when it does not apply.
    """
    old = applied.bundle.manifest
    if not (applied.packed and isinstance(bundle, Bundle)) or bundle.manifest.base.blocks != old.base.blocks or _layout(bundle) != _layout(applied.bundle):
        return False
    if not applied.bound:  # kept for later swaps: their bindings are equal
        canonical = world.block_paths()
        applied.bound = tuple((canonical.get(path), expected) for path, expected in old.base.blocks.items())
    for path, expected in applied.bound:
        if path is None or untouched_digest(world, path) != expected:
            return False  # the full check will say what changed
    _check_indices(applied.indexed, lambda rs: bundle.slot_tensors(rs.entry.slot))
    copy_runs(applied.buffers, bundle)  # equal layouts give equal runs (the reader checked the order)
    applied.bundle = bundle
    return True


def _indexed(slots: list[ResolvedSlot]) -> tuple[ResolvedSlot, ...]:
    return tuple(rs for rs in slots if rs.entry.kind == "neuron")


def _check_indices(slots: tuple[ResolvedSlot, ...], tensors_of) -> None:
    """Neuron slots' stored channel indices (values, which the compatibility check cannot see)."""
    for rs in slots:
        NeuronDelta.check_index(tensors_of(rs)["neuron_index"], rs.geo, rs.slot)


def _attached(applied: Applied) -> None:
    """Refuse to swap when the adapters no longer compute from the applied storage.

    `Module.to`, `.half()` and the like give every buffer a converted copy, so a copy
    into the storage would change nothing the world computes with. They convert whole
    modules, so one tensor per block and buffer tells.
    """
    for place in applied.sentinels:
        buffer = applied.buffers[(place.dtype, place.device)]
        tensor = applied.adapters[place.slot]._buffers.get(place.name)
        if tensor is None or tensor.data_ptr() != buffer.data_ptr() + place.offset * buffer.element_size():
            raise LayoutError(
                f"{applied.name}: the adapters at {place.slot} no longer use the applied storage (was the world "
                "moved or cast since apply?); remove the bundle and apply it again", path=place.slot,
            )  # fmt: skip


def _layout(bundle: Any) -> bytes:
    return bundle.slot_layout if isinstance(bundle, Bundle) else slot_layout(bundle.manifest)


def _weights(world: World, slots: list[ResolvedSlot], weight: Weight, name: str) -> dict[str, float]:
    """Each slot's new weight; slots no glob matches are left out. Refuses non-numbers and globs that match nothing."""
    if not isinstance(weight, dict):
        number = _number(weight, name)
        return {rs.slot: number for rs in slots}
    numbers = {glob: _number(w, glob) for glob, w in weight.items() if _is_glob(glob)}
    aliases: dict[str, list[str]] = {}
    for path, canonical in world.block_paths().items():
        aliases.setdefault(canonical, []).append(path)
    out, used = {}, set()
    for rs in slots:
        paths = aliases[rs.slot.partition(":")[0]]
        hit = next((glob for glob in numbers if any(match_block(p, glob) for p in paths)), None)
        if hit is not None:
            out[rs.slot] = numbers[hit]
            used.add(hit)
    for glob in numbers:
        if glob not in used:  # it matches nothing, or only blocks an earlier glob weights (a shared block's other path)
            matches = any(match_block(p, glob) for rs in slots for p in aliases[rs.slot.partition(":")[0]])
            why = "only blocks an earlier glob already weights (a block shared by several paths is one block)" if matches else "no block this bundle adapts"
            raise TargetError(f"weight glob {glob!r} matches {why}", path=glob)
    return out


def _is_glob(glob: Any) -> bool:
    if not isinstance(glob, str):
        raise TargetError(f"weight globs are block paths or globs (strings), not {glob!r}", path=str(glob))
    return True


def _number(value: Any, where: str) -> float:
    """A weight as a float: any finite real number; bool, None and strings are refused."""
    if value is not None and not isinstance(value, (bool, str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
            pass
        else:
            if math.isfinite(number):
                return number
    raise WeightError(f"{where}: the weight {value!r} is not a finite number", path=where)


def _bank_key(world: World, name: str) -> str:
    key = name.replace(".", "_")  # module names cannot hold dots
    taken = {a.key for a in world.applied.values()}
    if world.customization is not None:  # the trainable adapters' name in the same hosts
        taken.add(world.customization[1].name)
    n, candidate = 1, key
    while candidate in taken:
        n += 1
        candidate = f"{key}~{n}"
    return candidate


class _Parents:
    """Parent indexes of the blocks an operation touches, each built once (one walk per block)."""

    def __init__(self, world: World) -> None:
        self.world, self.indexes = world, {}

    def of(self, slot: str) -> dict:
        block_path = slot.partition(":")[0]
        if block_path not in self.indexes:
            self.indexes[block_path] = parent_index(self.world.block(block_path).module)
        return self.indexes[block_path]


def _host(parents: _Parents, rs: ResolvedSlot) -> AdapterHost:
    """The host around the slot's layer, made and put in the layer's place(s) if there is none yet."""
    index = parents.of(rs.slot)
    places = index.get(id(rs.layer), [])
    if len(places) == 1 and getattr(type(places[0][0]), "is_adapter_host", False):
        return places[0][0]  # the layer sits in a host already
    host = AdapterHost(rs.layer, rs.geo)
    replace_module(index, rs.layer, host)
    return host


def _unhost(parents: _Parents, slot: str, host: AdapterHost) -> None:
    if not host.adapters:
        replace_module(parents.of(slot), host, host.base)


def _not_routed(world: World, what: str) -> None:
    if world.routes_open:  # a routed sample would compute with whatever reuses the storage
        raise RuntimeStateError(f"cannot {what} inside a mixed batch (`routed`); do it before entering or after leaving")


def _opened(bundle: Any) -> Any:
    """A `Bundle`, a `Blend`, or a path to open (a bundle directory or `.lwb` archive)."""
    if isinstance(bundle, (str, os.PathLike)):
        return Bundle.open(bundle)
    if not hasattr(bundle, "manifest"):
        raise TargetError(f"expected a Bundle, a Blend or the path of a bundle, not {type(bundle).__name__}")
    return bundle


def _check_reserve(reserve_rank: Any) -> None:
    if isinstance(reserve_rank, bool) or not isinstance(reserve_rank, int) or reserve_rank < 0:
        raise RankError(f"reserve_rank is a rank (an integer, 0 for none), not {reserve_rank!r}")


def _not_fused(world: World, what: str) -> None:
    if world.fused_state is not None:
        raise FusedError(f"cannot {what} while the world is fused; call unfuse() first")


@torch.inference_mode(False)  # storage made under inference mode could not be written outside it (set_weight, swap)
@torch.no_grad()
def apply(world: World, bundle: Any, weight: Weight = 1.0, *, name: str | None = None, strict: bool = False, reserve_rank: int = 0) -> Applied:
    _not_fused(world, "apply")
    _not_routed(world, "apply")
    bundle = _opened(bundle)
    if name is not None and not (isinstance(name, str) and name):
        raise TargetError(f"name is a non-empty string naming the applied bundle, not {name!r}", path=str(name))
    name = name or bundle.manifest.name
    if name in world.applied:
        raise AlreadyAppliedError(f"{name} is applied already; swap() it or apply under another name", path=name)
    slots = resolve(world, bundle.manifest, strict=strict)
    weights = _weights(world, slots, weight, name) if isinstance(weight, dict) else {}
    default = 1.0 if isinstance(weight, dict) else _number(weight, name)
    _check_reserve(reserve_rank)
    places = plan_layout(slots, reserve_rank)
    spare = world.spare_storage = world.spare_storage or Spare()
    buffers = allocate(places, spare)
    applied = Applied(name, _bank_key(world, name), bundle, slots, places, buffers)
    applied.sentinels = list({(p.slot.partition(":")[0], p.dtype, p.device): p for p in reversed(places)}.values())
    by_slot = slot_views(buffers, places)
    applied.packed = copy_packed(places, buffers, bundle)
    if not applied.packed:
        for rs in slots:
            source = bundle.slot_tensors(rs.entry.slot)
            for tensor_name, target in by_slot[rs.slot].items():
                fill(target, source[tensor_name], tensor_name)
    applied.indexed = _indexed(slots)
    _check_indices(applied.indexed, lambda rs: by_slot[rs.slot])  # as stored: the values, converted
    scalar_views = scalars(slots, [weights.get(rs.slot, default) for rs in slots], places)
    hosts: list[tuple[str, AdapterHost]] = []
    parents = _Parents(world)
    try:
        for rs, (mix_weight, scaling) in zip(slots, scalar_views):
            host = _host(parents, rs)
            hosts.append((rs.slot, host))
            tensors = {**by_slot[rs.slot], "scaling": scaling}
            adapter = KINDS[rs.entry.kind](rs.geo, rs.settings, rs.layer, tensors=tensors)
            host.add(applied.key, adapter, mix_weight)
            applied.adapters[rs.slot] = adapter
            applied.hosts[rs.slot] = host
    except BaseException:
        for slot, host in hosts:
            host.adapters.pop(applied.key, None)
            _unhost(parents, slot, host)
        _release(world, applied)
        raise
    world.applied[name] = applied
    return applied


def _applied(world: World, name: str) -> Applied:
    if name not in world.applied:
        known = ", ".join(world.applied) or "none"
        raise NotAppliedError(f"no bundle named {name!r} is applied (applied: {known})", path=name)
    return world.applied[name]


def remove(world: World, name: str) -> None:
    """Take a bundle off; hosts left empty give their slot back to the untouched base layer.

    Its CPU storage is kept for the next apply (`spare.Spare`, at most 256 MiB a world);
    ``world.spare_storage = None`` lets it go.
    """
    _not_fused(world, "remove a bundle")
    _not_routed(world, "remove a bundle")
    applied = _applied(world, name)
    parents = _Parents(world)
    for slot, host in applied.hosts.items():
        del host.adapters[applied.key]
        _unhost(parents, slot, host)
    del world.applied[name]
    _release(world, applied)


def _release(world: World, applied: Applied) -> None:
    """Hand the storage to the world's spare pool; the removed record lets go of it."""
    for buffer in applied.buffers.values():
        world.spare_storage.give(buffer)
    applied.buffers, applied.adapters, applied.hosts = {}, {}, {}


@torch.no_grad()
def set_weight(world: World, name: str, weight: Weight) -> None:
    """Write new weights into the adapters' weight buffers: no allocation, no recompilation."""
    _not_fused(world, "change weights")
    applied = _applied(world, name)
    weights = _weights(world, applied.slots, weight, name)
    for slot, w in weights.items():  # every weight checked before the first is written
        check_scalar(w, applied.adapters[slot].mix_weight.dtype, slot, "weight")
    for slot, w in weights.items():
        applied.adapters[slot].mix_weight.fill_(w)


@torch.no_grad()
def swap(world: World, name: str, bundle: Any, *, strict: bool = False) -> None:
    """Copy another bundle of the same layout into the applied storage, in place.

    The new bundle must adapt the same slots with the same kinds; LoRA ranks may be
    smaller than the stored rank (zero-padded: the same sum, though the wider matmul may
    round differently, about 1e-7). Weights are kept.
    """
    _not_fused(world, "swap")
    bundle = _opened(bundle)
    applied = _applied(world, name)
    _attached(applied)
    if not strict and _same_layout_swap(world, applied, bundle):
        return
    slots = resolve(world, bundle.manifest, strict=strict)
    old = {rs.slot: rs for rs in applied.slots}
    if [rs.slot for rs in slots] != [rs.slot for rs in applied.slots]:
        missing = sorted(set(old) ^ {rs.slot for rs in slots})
        raise LayoutError(f"{name}: the new bundle adapts other slots (first difference: {missing[0] if missing else 'order'})", path=name)
    places = {(p.slot, p.name): p for p in applied.places}
    for rs in slots:
        if rs.entry.kind != old[rs.slot].entry.kind:
            raise LayoutError(f"{rs.slot}: {old[rs.slot].entry.kind} applied, the new bundle has {rs.entry.kind}", path=rs.slot)
        for tensor_name, shape in rs.shapes().items():
            place = places.get((rs.slot, tensor_name))
            if place is None or not fits(place, shape):
                stored = place.shape if place else "nothing"
                raise LayoutError(f"{rs.slot}: {tensor_name} {tuple(shape)} does not fit the stored {stored} (apply with "
                                  "reserve_rank=R to leave room for ranks up to R)", path=rs.slot)  # fmt: skip
    _check_indices(_indexed(slots), lambda rs: bundle.slot_tensors(rs.entry.slot))
    for rs in slots:  # the new scalings too, before the first write
        if hasattr(applied.adapters[rs.slot], "scaling"):
            check_scalar(rs.settings.scaling, applied.adapters[rs.slot].scaling.dtype, rs.slot, "scaling (alpha / rank)")
    saved = {key: buffer.clone() for key, buffer in applied.buffers.items()}  # a failed read puts these back
    try:
        packed = copy_packed(applied.places, applied.buffers, bundle)
        if not packed:
            for rs in slots:
                source = bundle.slot_tensors(rs.entry.slot)
                for tensor_name in rs.shapes():
                    fill(view(applied.buffers, places[(rs.slot, tensor_name)]), source[tensor_name], tensor_name)
    except BaseException:
        for key, buffer in applied.buffers.items():
            buffer.copy_(saved[key])
        raise
    for rs in slots:
        adapter = applied.adapters[rs.slot]
        adapter.settings = rs.settings
        if hasattr(adapter, "scaling"):
            adapter.scaling.fill_(adapter.settings.scaling)
    applied.packed, applied.bundle, applied.bound = packed, bundle, ()  # another binding, perhaps
    applied.slots, applied.indexed = slots, _indexed(slots)
