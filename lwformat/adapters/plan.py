"""The dry run: resolve a `LightConfig` against a world into the exact list of slots.

Planning reads the world and changes nothing; every error a customization can meet
is raised here, naming the offending path, before any module is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from torch import nn

from ..errors import (
    AlreadyCustomizedError,
    NothingTargetedError,
    RankError,
    TargetError,
    UnknownBlockTypeError,
    UnsupportedLayerError,
)
from ..world.paths import match_block, match_module
from .config import LightConfig, is_explicit
from .kinds import KINDS, SlotSettings
from .layers import Geometry
from .slots import UNCALLED, eligible_slots, layer_at, uncalled_layers

if TYPE_CHECKING:
    from ..world.tree import World


class SlotPlan(msgspec.Struct, frozen=True, omit_defaults=True):
    slot: str
    block_type: str
    layer: str
    kind: str
    rank: int
    alpha: float
    rslora: bool
    shapes: dict[str, list[int]]
    neurons: list[int] = []

    @property
    def block_path(self) -> str:
        return self.slot.partition(":")[0]

    @property
    def module_path(self) -> str:
        return self.slot.partition(":")[2]

    @property
    def settings(self) -> SlotSettings:
        return SlotSettings(self.kind, self.rank, self.alpha, self.rslora, tuple(self.neurons))

    @property
    def num_params(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


class Plan(msgspec.Struct, frozen=True):
    """What `customize` injects: one entry per slot, plus the slots a pattern matched but skipped."""

    name: str
    slots: list[SlotPlan]
    skipped: dict[str, str] = {}

    @property
    def num_params(self) -> int:
        return sum(s.num_params for s in self.slots)

    def blocks(self) -> list[str]:
        return list(dict.fromkeys(s.block_path for s in self.slots))

    def __str__(self) -> str:
        width = max((len(s.slot) for s in self.slots), default=4)
        lines = [f"{'slot':<{width}}  kind    rank  alpha  layer        params"]
        for s in self.slots:
            rank = str(s.rank) if KINDS[s.kind].uses_rank else (str(len(s.neurons)) if s.neurons else "-")
            lines.append(f"{s.slot:<{width}}  {s.kind:<6}  {rank:>4}  {s.alpha:>5g}  {s.layer:<11}  {s.num_params:>8,}")
        lines.append(f"{len(self.slots)} slots in {len(self.blocks())} blocks, {self.num_params:,} adapter parameters")
        lines.extend(f"skipped {slot}: {why}" for slot, why in self.skipped.items())
        return "\n".join(lines)


def _matches(pattern: str, block_paths: list[str], module_path: str) -> bool:
    if ":" in pattern:
        block_glob, _, module_pattern = pattern.partition(":")
        return any(match_block(p, block_glob) for p in block_paths) and match_module(module_path, module_pattern)
    return match_module(module_path, pattern)


def _first(patterns: dict, block_paths: list[str], module_path: str, default):
    return next((v for k, v in patterns.items() if _matches(k, block_paths, module_path)), default)


def _neurons(config: LightConfig, geo: Geometry, slot: str) -> list[int]:
    if isinstance(config.neurons, int):
        count = config.neurons
        if not 1 <= count <= geo.out:
            raise RankError(f"{slot}: {count} neurons asked, the layer has {geo.out} outputs", path=slot)
        return sorted({round(i * (geo.out - 1) / max(count - 1, 1)) for i in range(count)})  # spread evenly
    picked = list(config.neurons)
    bad = [i for i in picked if not 0 <= i < geo.out]
    if not picked or bad or len(set(picked)) != len(picked):
        raise RankError(f"{slot}: neuron indices {picked} must be distinct and within [0, {geo.out})", path=slot)
    return sorted(picked)


def _slot_plan(config: LightConfig, block, paths: list[str], slot: str, module_path: str, geo: Geometry) -> SlotPlan:
    kind = KINDS[config.kind]
    rank = _first(config.rank_pattern, paths, module_path, config.rank)
    alpha = float(_first(config.alpha_pattern, paths, module_path, config.alpha if config.alpha is not None else rank))
    neurons: list[int] = []
    if kind.uses_rank and not 1 <= rank <= geo.max_rank:
        raise RankError(
            f"{slot}: rank {rank} is outside 1..{geo.max_rank} for this {geo.layer} "
            f"({geo.fan_in} in, {geo.out} out)",
            path=slot,
        )
    if config.kind == "neuron":
        neurons = _neurons(config, geo, slot)
    settings = SlotSettings(config.kind, rank, alpha, config.rslora, tuple(neurons))
    shapes = {n: list(s) for n, s in kind.shapes(geo, settings).items()}
    return SlotPlan(slot, block.block_type, geo.layer, config.kind, rank if kind.uses_rank else 0, alpha, config.rslora, shapes, neurons)


def plan(world: World, config: LightConfig) -> Plan:
    if config.kind not in KINDS:
        raise TargetError(f"unknown adapter kind {config.kind!r} (known: {', '.join(sorted(KINDS))})")
    if (host := next(iter_hosts(world), None)) is not None:
        fix = (
            f"remove() the bundles applied ({', '.join(world.applied)}) first, then customize, then apply them again "
            "(bundles applied after customize stay frozen beside the trainable adapters)"
            if world.applied else "call decustomize() first"
        )  # fmt: skip
        raise AlreadyCustomizedError(f"{host[0]}: the world already carries adapters; {fix}", path=host[0])
    aliases: dict[str, list[str]] = {}
    for path, canonical in world.block_paths().items():
        aliases.setdefault(canonical, []).append(path)
    blocks = world.blocks()
    known_types = {b.block_type for b in blocks.values()}
    for t in config.block_types:
        if t not in known_types:
            raise UnknownBlockTypeError(
                f"block type {t!r}: no block of this world has it (types: {', '.join(sorted(known_types))})", path=t
            )
    kind = KINDS[config.kind]
    slots: list[SlotPlan] = []
    skipped: dict[str, str] = {}
    for path, block in blocks.items():
        paths = aliases[path]
        if config.block_types and block.block_type not in config.block_types:
            continue
        if config.blocks and not any(match_block(p, g) for p in paths for g in config.blocks):
            continue
        eligible = eligible_slots(block, where=path)
        _check_explicit(config, block, paths, path, eligible, kind)
        for module_path, (_, geo) in eligible.items():
            slot = f"{path}:{module_path}"
            if config.slots and not any(_matches(p, paths, module_path) for p in config.slots):
                continue
            if any(_matches(p, paths, module_path) for p in config.exclude):
                continue
            if geo.layer not in kind.layers:
                skipped[slot] = f"{config.kind} does not support {geo.layer} layers"
                continue
            slots.append(_slot_plan(config, block, paths, slot, module_path, geo))
    if not slots:
        raise NothingTargetedError(
            "nothing to adapt: no slot matched "
            f"block_types={config.block_types or 'any'} blocks={config.blocks or 'any'} "
            f"slots={config.slots or 'any'} exclude={config.exclude or 'none'} for kind {config.kind!r}"
        )
    return Plan(config.name, slots, skipped)


def _check_explicit(config: LightConfig, block, paths: list[str], path: str, eligible: dict, kind) -> None:
    for pattern in config.slots:
        block_glob, sep, module_path = pattern.rpartition(":")
        if not is_explicit(module_path) or (sep and not any(match_block(p, block_glob) for p in paths)):
            continue
        layer = layer_at(block.module, module_path)
        if layer is None:
            continue  # this block has no such module; another targeted block may
        slot = f"{path}:{module_path}"
        if module_path not in eligible:
            if id(layer) in uncalled_layers(block.module):
                raise UnsupportedLayerError(f"{slot}: {UNCALLED}", path=slot)
            raise UnsupportedLayerError(f"{slot}: {type(layer).__name__} is not a layer adapters can wrap", path=slot)
        if eligible[module_path][1].layer not in kind.layers:
            raise UnsupportedLayerError(f"{slot}: {config.kind} does not support {type(layer).__name__}", path=slot)


def iter_hosts(world: World):
    """Every (slot, host) of the world, each block once under its canonical path."""
    for path, block in world.blocks().items():
        for module_path, module in block.module.named_modules():
            if getattr(type(module), "is_adapter_host", False):
                yield f"{path}:{module_path}", module


def parent_index(root: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``{id(module): [(parent, attribute), ...]}`` for every module under `root`, in one walk.

    A shared layer has several entries. Build it once per block, then look layers up.
    """
    index: dict[int, list[tuple[nn.Module, str]]] = {}
    stack, seen = [root], {id(root)}
    while stack:  # each module's children are listed once, however many parents it has
        parent = stack.pop()
        for name, child in parent._modules.items():
            if child is not None:
                index.setdefault(id(child), []).append((parent, name))
                if id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)
    return index


# Layers whose eval fast path reads their children's weights instead of calling them; it is
# off while any submodule has a hook (see `AdapterHost.keep_called`).
READS_WEIGHTS_IN_EVAL = (nn.TransformerEncoderLayer,)


def replace_module(index: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` sits (every parent of a shared layer), keeping `index` current."""
    places = index.pop(id(old), [])
    for parent, attr in places:
        setattr(parent, attr, new)
        if isinstance(parent, READS_WEIGHTS_IN_EVAL) and getattr(type(new), "is_adapter_host", False):
            new.keep_called()
    index[id(new)] = places
