"""Resolve a bundle against a world: every check that applying needs, before anything changes.

Compatibility is per block (decision 2): each block the bundle touches must have the
digest it records; ``strict`` also requires the world root to match. Each slot must
exist, hold a layer of the recorded type, and its tensors must have the shapes the
adapter kind declares for that layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ..adapters.kinds import KINDS, SlotSettings
from ..adapters.layers import Geometry
from ..adapters.slots import eligible_slots
from ..errors import BaseMismatchError, TargetError, UnsupportedLayerError, WorldPathError

if TYPE_CHECKING:
    from ..world.tree import World


@dataclass(frozen=True)
class ResolvedSlot:
    entry: Any  # the manifest's SlotEntry
    slot: str  # canonical "block:module"
    layer: nn.Module
    geo: Geometry
    settings: SlotSettings

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Declared tensor shapes, plus stored extras (neuron indices), as the bundle records them."""
        return {name: tuple(t.shape) for name, t in self.entry.tensors.items()}


def settings_of(entry: Any) -> SlotSettings:
    neurons = tuple(range(entry.tensors["neuron_index"].shape[0])) if "neuron_index" in entry.tensors else ()
    return SlotSettings(entry.kind, entry.rank, entry.alpha, entry.rslora, neurons)


def check_base(world: World, manifest: Any, *, strict: bool = False) -> None:
    digests = world.digests()
    canonical = world.block_paths()
    for block, expected in manifest.base.blocks.items():
        found = digests.get(canonical.get(block, block))
        if found != expected:
            raise BaseMismatchError(
                f"{block}: the bundle was made for block digest {expected}, this world has {found or 'no such block'}",
                path=block, expected=expected, found=found,
            )  # fmt: skip
    if strict and world.root_digest() != manifest.base.root:
        root = world.root_digest()
        raise BaseMismatchError(
            f"strict: the bundle was made for world root {manifest.base.root}, this world is {root}",
            path="", expected=manifest.base.root, found=root,
        )  # fmt: skip


def resolve(world: World, manifest: Any, *, strict: bool = False) -> list[ResolvedSlot]:
    check_base(world, manifest, strict=strict)
    canonical = world.block_paths()
    out, seen, eligible = [], set(), {}
    for entry in manifest.slots:
        if entry.block not in canonical:
            raise WorldPathError(f"{entry.block}: the bundle adapts a block this world does not have", path=entry.block)
        block_path = canonical[entry.block]
        slot = f"{block_path}:{entry.module}"
        if slot in seen:
            raise TargetError(f"{slot}: the bundle lists this slot twice", path=slot)
        seen.add(slot)
        if block_path not in eligible:
            eligible[block_path] = eligible_slots(world.block(block_path), where=block_path)
        found = eligible[block_path].get(entry.module)
        if found is None:
            raise UnsupportedLayerError(f"{slot}: no adaptable layer at this slot", path=slot)
        layer, geo = found
        kind = KINDS.get(entry.kind)
        if kind is None or geo.layer not in kind.layers or geo.layer != entry.layer:
            raise UnsupportedLayerError(
                f"{slot}: a {entry.kind} adapter for a {entry.layer} layer cannot go on this {geo.layer}", path=slot
            )
        settings = settings_of(entry)
        expected = kind.shapes(geo, settings)
        for name, shape in expected.items():
            if name not in entry.tensors or tuple(entry.tensors[name].shape) != tuple(shape):
                got = tuple(entry.tensors[name].shape) if name in entry.tensors else "nothing"
                raise TargetError(f"{slot}: {name} should be {tuple(shape)} for this layer, the bundle has {got}", path=slot)
        out.append(ResolvedSlot(entry, slot, layer, geo, settings))
    return out
