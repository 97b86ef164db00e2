"""Does each slot of a bundle fit the world's layer there? Its layer, kind, shapes and dtype.

Kept apart from `check` because it needs the adapter kinds, and so torch, which
`import lwformat.bundle` (opening, verifying and signing bundles) must not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..adapters.kinds import KINDS, SlotSettings
from ..adapters.slots import UNCALLED, eligible_slots, layer_at, uncalled_layers
from ..errors import TargetError
from ..world.digest import dtype_name
from .check import Finding, Outcome
from .manifest import SlotEntry

if TYPE_CHECKING:
    from ..world.tree import World


def slot_settings(entry: SlotEntry) -> SlotSettings:
    index = entry.tensors.get("neuron_index")  # a neuron adapter's size is its index's length
    # A range, not a tuple: only its length counts here, and a shape such as [2**40, 0] holds no bytes at all.
    neurons = range(index.shape[0]) if index is not None and index.shape else ()
    return SlotSettings(entry.kind, entry.rank, entry.alpha, entry.rslora, neurons)


def check_slot(world: World, paths: dict[str, str], entry: SlotEntry, seen: dict) -> Finding:
    slot = entry.slot
    if entry.block not in paths:
        return Finding(slot, Outcome.MISSING_BLOCK, f"the world has no block {entry.block}")
    try:
        block = paths[entry.block]  # canonical: a shared block is scanned once, under one key
        if block not in seen:  # one scan per block, not per slot
            seen[block] = eligible_slots(world.block(block), where=block)
        eligible = seen[block]
    except TargetError as exc:
        return Finding(slot, Outcome.MISSING_SLOT, str(exc))
    if entry.module not in eligible:
        module = world.block(block).module
        layer = layer_at(module, entry.module)
        why = f": {UNCALLED}" if layer is not None and id(layer) in uncalled_layers(module) else ""
        return Finding(slot, Outcome.MISSING_SLOT, f"block {entry.block} has no adaptable layer {entry.module}{why}")
    layer, geo = eligible[entry.module]
    if geo.layer != entry.layer:
        return Finding(slot, Outcome.LAYER_MISMATCH, f"stored for a {entry.layer}, the world has a {geo.layer}",
                       expected=entry.layer, found=geo.layer)  # fmt: skip
    kind = KINDS.get(entry.kind)
    if kind is None:
        return Finding(slot, Outcome.UNKNOWN_KIND, f"adapter kind {entry.kind!r} (known: {', '.join(sorted(KINDS))})")
    if kind.uses_rank and entry.rank < 1:  # its scaling alpha / rank would divide by zero
        return Finding(slot, Outcome.SHAPE_MISMATCH, f"rank {entry.rank}: a {entry.kind} adapter has rank 1 or more",
                       expected="rank >= 1", found=str(entry.rank))  # fmt: skip
    want = kind.shapes(geo, slot_settings(entry))
    for name, shape in want.items():
        stored = entry.tensors.get(name)
        if stored is None or tuple(stored.shape) != tuple(shape):
            has = "absent" if stored is None else f"stored {stored.shape}"
            return Finding(slot, Outcome.SHAPE_MISMATCH, f"{name}: {has}, this layer needs {list(shape)}",
                           expected=str(list(shape)), found=None if stored is None else str(stored.shape))  # fmt: skip
    index = entry.tensors.get("neuron_index") if entry.kind == "neuron" else None
    if index is not None and (index.dtype != "I64" or len(index.shape) != 1):
        return Finding(slot, Outcome.SHAPE_MISMATCH, f"neuron_index: stored {index.dtype} {index.shape}, the spec needs (k,) I64",
                       expected="(k,) I64", found=f"{index.dtype} {index.shape}")  # fmt: skip
    base = dtype_name(layer.weight.dtype)
    stored_dtypes = sorted({entry.tensors[name].dtype for name in want} - {base})
    if stored_dtypes:
        return Finding(slot, Outcome.DTYPE_CONVERSION, f"stored {', '.join(stored_dtypes)}, the layer is {base}",
                       expected=base, found=stored_dtypes[0])  # fmt: skip
    return Finding(slot, Outcome.OK)
