"""Resolve a bundle against a world: the full compatibility check, then where each slot goes.

Compatibility (decision 2) is `lwformat.bundle.check`: every touched block's digest,
every slot's layer, kind and shapes, and in ``strict`` mode the world root. Any problem
raises `IncompatibleError` naming the first block or slot, before anything changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from torch import nn

from ..adapters.kinds import SlotSettings
from ..adapters.layers import Geometry
from ..adapters.slots import eligible_slots
from ..bundle.check import check
from ..bundle.fit import slot_settings
from ..errors import TargetError

if TYPE_CHECKING:
    from ..world.tree import World


class ResolvedSlot(NamedTuple):
    entry: Any  # the manifest's SlotEntry
    slot: str  # canonical "block:module"
    layer: nn.Module
    geo: Geometry
    settings: SlotSettings

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every stored tensor's shape (the kind's tensors and extras such as neuron indices)."""
        return {name: tuple(t.shape) for name, t in self.entry.tensors.items()}


def resolve(world: World, manifest: Any, *, strict: bool = False) -> list[ResolvedSlot]:
    eligible: dict = {}  # each block's slot scan, shared with the check
    check(manifest, world, strict=strict, scans=eligible).raise_for_problems()
    canonical = world.block_paths()
    out, seen = [], set()
    for entry in manifest.slots:
        block_path = canonical[entry.block]
        slot = f"{block_path}:{entry.module}"
        if slot in seen:
            raise TargetError(f"{slot}: the bundle lists this slot twice", path=slot)
        seen.add(slot)
        if block_path not in eligible:
            eligible[block_path] = eligible_slots(world.block(block_path), where=block_path)
        layer, geo = eligible[block_path][entry.module]
        out.append(ResolvedSlot(entry, slot, layer, geo, slot_settings(entry)))
    return out
