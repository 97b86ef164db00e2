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

import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..adapters.host import AdapterHost
from ..adapters.kinds import KINDS, Adapter
from ..adapters.kinds.neuron import NeuronDelta
from ..adapters.plan import parent_index, replace_module
from ..bundle.manifest import slot_layout
from ..bundle.read import Bundle
from ..errors import (
    AlreadyAppliedError,
    FusedError,
    LayoutError,
    NotAppliedError,
    RankError,
    TargetError,
    WeightError,
)
from ..world.cast import untouched_source
from ..world.digest import untouched_digest
from ..world.paths import match_block
from . import finiteness
from .mixed import not_routed
from .resolve import ResolvedSlot, resolve
from .spare import Spare
from .storage import (
    RANKED,
    Place,
    allocate,
    check_scalar,
    check_scalars,
    copy_packed,
    copy_runs,
    fill,
    finite,
    fits,
    plan_layout,
    scalars,
    slot_views,
    view,
)

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


def _same_layout_swap(world: World, applied: Applied, bundle: Any, *, check_base: bool) -> bool:
    """The fast swap: same binding and layout as the applied bundle, one copy per buffer.

    The full check already passed for the applied bundle's identical binding, so it is
    enough that the bound blocks' tensors are unwritten since (`untouched_digest`, or
    `untouched_source` on a cast world; a module replaced since is seen by the full check
    of the next apply, or after ``world.digests()``, which walks the modules again);
    `check_base=False` trusts that too. Returns False, having changed nothing, when it does not apply.
    """
    old = applied.bundle.manifest
    if not (applied.packed and isinstance(bundle, Bundle)):  # a Blend holds no file runs to copy
        return False
    if bundle.manifest.base.blocks != old.base.blocks or _layout(bundle) != _layout(applied.bundle):
        return False
    if check_base:
        if not applied.bound:  # kept for later swaps: their bindings are equal
            canonical = world.block_paths()
            applied.bound = tuple((canonical.get(path), expected) for path, expected in old.base.blocks.items())
        for path, expected in applied.bound:  # an untouched cast of the bound block (`World.cast`) first: no hash either way
            if path is None or expected not in (untouched_source(world, path), untouched_digest(world, path)):
                return False  # the full check will say what changed
    if applied.indexed and _INDICES_CHECKED.get(bundle) != (identity := bundle.weights_identity()):  # once per file
        _check_indices(applied.indexed, lambda rs: bundle.slot_tensors(rs.entry.slot))
        _INDICES_CHECKED[bundle] = identity
    finiteness.check_bundle(bundle, applied.slots)
    copy_runs(applied.buffers, bundle)  # equal layouts give equal runs (the reader checked the order)
    applied.bundle = bundle
    return True


_INDICES_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # bundle -> the file identity whose indices passed


def _indexed(slots: list[ResolvedSlot]) -> tuple[ResolvedSlot, ...]:
    return tuple(rs for rs in slots if rs.entry.kind == NeuronDelta.kind)


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


def _fill_slots(bundle: Any, slots: list[ResolvedSlot], targets: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy each slot's tensors into `targets` ({slot: {tensor name: view into the storage}}),
    converting to the storage's dtype, which must hold every value: checked before the first copy,
    once per file and target dtypes."""
    sources = {rs.slot: bundle.slot_tensors(rs.entry.slot) for rs in slots}  # mapped: the identity is of these bytes
    finiteness.check_fits_once(bundle, lambda: ((f"{slot}:{n}", sources[slot][n], t.dtype) for slot, ts in targets.items() for n, t in ts.items()))
    for slot, ts in targets.items():
        for tensor_name, target in ts.items():
            fill(target, sources[slot][tensor_name], tensor_name)


def _layout(bundle: Any) -> bytes:
    return bundle.slot_layout if isinstance(bundle, Bundle) else slot_layout(bundle.manifest)


def _weights(world: World, slots: list[ResolvedSlot], weight: Weight, name: str) -> dict[str, float]:
    """Each slot's new weight; slots no glob matches are left out. Refuses non-numbers and globs that match nothing."""
    if not isinstance(weight, dict):
        number = _number(weight, name)
        return {rs.slot: number for rs in slots}
    if bad := [glob for glob in weight if not isinstance(glob, str)]:  # a list: the key 0 is falsy
        raise TargetError(f"weight globs are block paths or globs (strings), not {bad[0]!r}", path=str(bad[0]))
    numbers = {glob: _number(w, glob) for glob, w in weight.items()}
    aliases: dict[str, list[str]] = {}
    for path, canonical in world.block_paths().items():
        aliases.setdefault(canonical, []).append(path)
    out = {}
    for rs in slots:
        paths = aliases[rs.slot.partition(":")[0]]
        hit = next((w for glob, w in numbers.items() if any(match_block(p, glob) for p in paths)), None)
        if hit is not None:
            out[rs.slot] = hit
    unused = [g for g in numbers if not any(match_block(p, g) for rs in slots for p in aliases[rs.slot.partition(":")[0]])]
    if unused:
        raise TargetError(f"weight glob {unused[0]!r} matches no block this bundle adapts", path=unused[0])
    return out


def _number(value: Any, where: str) -> float:
    """A weight as a float: any finite real number; bool, None and strings are refused."""
    number = finite(value)
    if number is None:
        raise WeightError(f"{where}: the weight {value!r} is not a finite number", path=where)
    return number


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
    host = AdapterHost(rs.layer, rs.geo, disabled=parents.world.adapters_disabled > 0)
    replace_module(index, rs.layer, host)
    return host


def _unhost(parents: _Parents, slot: str, host: AdapterHost) -> None:
    if not host.adapters:
        replace_module(parents.of(slot), host, host.base)


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
    not_routed(world, "apply")
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
    values = [weights.get(rs.slot, default) for rs in slots]
    check_scalars(slots, values)  # all before the storage is taken or the weights read
    indexed = _indexed(slots)
    _check_indices(indexed, lambda rs: bundle.slot_tensors(rs.entry.slot))
    identity = finiteness.file_identity(bundle)  # before the read: the bytes checked are those read after it
    places = plan_layout(slots, reserve_rank)
    spare = world.spare_storage = world.spare_storage or Spare()
    applied = Applied(name, _bank_key(world, name), bundle, slots, places, allocate(places, spare), indexed=indexed)
    hosts: list[tuple[str, AdapterHost]] = []
    parents = _Parents(world)
    try:
        buffers = applied.buffers
        applied.sentinels = list({(p.slot.partition(":")[0], p.dtype, p.device): p for p in reversed(places)}.values())
        by_slot = slot_views(buffers, places)
        applied.packed = copy_packed(places, buffers, bundle)
        if not applied.packed:
            _fill_slots(bundle, slots, by_slot)
        finiteness.check_storage(bundle, identity, buffers, by_slot, applied.packed)
        for rs, (mix_weight, scaling) in zip(slots, scalars(slots, values, places)):
            host = _host(parents, rs)
            hosts.append((rs.slot, host))
            tensors = {**by_slot[rs.slot], "scaling": scaling}
            adapter = KINDS[rs.entry.kind](rs.geo, rs.settings, rs.layer, tensors=tensors)
            host.add(applied.key, adapter, mix_weight)
            applied.adapters[rs.slot] = adapter
            applied.hosts[rs.slot] = host
    except BaseException:  # the storage goes back to the spare pool, the hosts as they were
        for slot, host in hosts:
            host.adapters._modules.pop(applied.key, None)  # ModuleDict.pop takes no default
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
    not_routed(world, "remove a bundle")
    applied = _applied(world, name)
    parents = _Parents(world)
    for slot, host in applied.hosts.items():
        del host.adapters[applied.key]
        _unhost(parents, slot, host)
    del world.applied[name]
    _release(world, applied)


def _release(world: World, applied: Applied) -> None:
    """Hand the storage to the world's spare pool; the removed record lets go of it."""
    if world.spare_storage is not None:  # None: the world keeps no spare storage
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
def swap(world: World, name: str, bundle: Any, *, strict: bool = False, check_base: bool = True) -> None:
    """Copy another bundle of the same layout into the applied storage, in place.

    The new bundle must adapt the same slots with the same kinds; LoRA ranks may be
    smaller than the stored rank (zero-padded: the same sum, though the wider matmul may
    round differently, about 1e-7). Weights are kept.

    A bundle bound to the same blocks as the applied one needs no new compatibility
    check, only that the base is unchanged since: every base tensor of the bound blocks
    is the same object, at the same address, with the same version counter. That costs
    about as much as half the copy; ``check_base=False`` trusts the base instead, as
    PEFT's ``hotswap_adapter`` does, and the swap is one copy.
    """
    _not_fused(world, "swap")
    bundle = _opened(bundle)
    applied = _applied(world, name)
    _attached(applied)
    if not strict and _same_layout_swap(world, applied, bundle, check_base=check_base):
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
                hint = " (apply with reserve_rank=R to leave room for ranks up to R)" if tensor_name in RANKED else ""
                raise LayoutError(f"{rs.slot}: {tensor_name} {tuple(shape)} does not fit the stored {stored}{hint}", path=rs.slot)
    _check_indices(_indexed(slots), lambda rs: bundle.slot_tensors(rs.entry.slot))
    for rs in slots:  # the new scalings too, before the first write
        if hasattr(applied.adapters[rs.slot], "scaling"):
            check_scalar(rs.settings.scaling, applied.adapters[rs.slot].scaling.dtype, rs.slot, "scaling (alpha / rank)")
    finiteness.check_bundle(bundle, slots)
    # Read from the bundle's map, whose size is checked before each read: nothing fails once
    # writing has begun (reading a file straight into the storage could stop halfway).
    packed = copy_packed(applied.places, applied.buffers, bundle, read=False)
    if not packed:
        targets = {rs.slot: {n: view(applied.buffers, places[(rs.slot, n)]) for n in rs.shapes()} for rs in slots}
        _fill_slots(bundle, slots, targets)
    for rs in slots:
        adapter = applied.adapters[rs.slot]
        adapter.settings = rs.settings
        if hasattr(adapter, "scaling"):
            adapter.scaling.fill_(adapter.settings.scaling)
    applied.packed, applied.bundle, applied.bound = packed, bundle, ()  # another binding, perhaps
    applied.slots, applied.indexed = slots, _indexed(slots)
