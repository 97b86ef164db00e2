"""The dry run: resolve a `LightConfig` against a world into the exact list of slots.

Planning reads the world and changes nothing; every error a customization can meet
is raised here, naming the offending path, before any module is touched.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

import msgspec
from torch import nn

from ..errors import (
    AlreadyCustomizedError,
    NothingTargetedError,
    RankError,
    TargetError,
    UnknownBlockTypeError,
    UnmatchedPatternError,
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
    if ":" in pattern:  # a full slot pattern names module paths whole: the exact form `attach` relies on
        block_glob, _, module_pattern = pattern.partition(":")
        return any(match_block(p, block_glob) for p in block_paths) and match_module(module_path, module_pattern)
    if is_explicit(pattern):  # PEFT's target_modules rule: "qkv" and "attn.qkv" match "blocks.0.attn.qkv"
        return module_path == pattern or module_path.endswith("." + pattern)
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


def plan(world: World, config: LightConfig, *, check_keys: bool = True) -> Plan:
    """Every slot `config` selects in `world`, with its kind, rank and alpha; the world is not changed.

    ``check_keys=False`` lets pattern keys that match nothing pass: light checkpoints written
    before such keys were refused (format lwadapters/1) load as they were saved.
    """
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
    seen: list[str] = []  # every slot of the selected blocks, for the example a NothingTargetedError shows
    excluded: set[str] = set()  # the exclude patterns that removed a slot
    chosen: set[str] = set()  # the slots entries that matched a slot (planned, excluded or skipped for the kind)
    planned: list[tuple[list[str], str]] = []  # (block paths, module path) of each slot in `slots`
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
            seen.append(slot)
            if config.slots:
                hits = [p for p in config.slots if _matches(p, paths, module_path)]
                if not hits:
                    continue
                chosen.update(hits)
            if hits := [p for p in config.exclude if _matches(p, paths, module_path)]:
                excluded.update(hits)
                continue
            if geo.layer not in kind.layers:
                skipped[slot] = f"{config.kind} does not support {geo.layer} layers"
                continue
            slots.append(_slot_plan(config, block, paths, slot, module_path, geo))
            planned.append((paths, module_path))
    if not slots:
        raise _nothing_targeted(world, config, seen, skipped)
    if check_keys:
        _check_keys(config, excluded, chosen, planned, [s.slot for s in slots])
    return Plan(config.name, slots, skipped)


SYNTAX = (
    "(a name without wildcards matches a module path or a dotted suffix of it, as in PEFT's target_modules; "
    "with wildcards it is an fnmatch glob over the whole module path, not a regex)"
)


def _nothing_targeted(world: World, config: LightConfig, seen: list[str], skipped: dict[str, str]) -> NothingTargetedError:
    message = (
        "nothing to adapt: no slot matched "
        f"block_types={config.block_types or 'any'} blocks={config.blocks or 'any'} "
        f"slots={config.slots or 'any'} exclude={config.exclude or 'none'} for kind {config.kind!r}"
    )
    if skipped:
        slot, why = next(iter(skipped.items()))
        message += f"; {len(skipped)} matched slot(s) skipped, the first {slot}: {why}"
    if examples := seen or _every_slot(world):
        example = _example(examples, config.slots[0] if config.slots else "")
        message += f". Slot patterns match module paths: {_suggest(example)} {SYNTAX}; world.plan(LightConfig()) lists every slot"
    return NothingTargetedError(message)


def _check_keys(config: LightConfig, excluded: set[str], chosen: set[str], planned: list[tuple[list[str], str]],
                names: list[str]) -> None:  # fmt: skip
    """Refuse a slots, exclude, rank_pattern or alpha_pattern key that matches no selected slot.

    Such a key changes nothing, silently: typically a regex (PEFT's syntax there), a typo, or a
    name that reaches only a module no adapter wraps (a container).
    """
    unmatched = [("slots", k) for k in config.slots if k not in chosen]
    unmatched += [("exclude", k) for k in config.exclude if k not in excluded]
    for field in ("rank_pattern", "alpha_pattern"):
        keys = getattr(config, field)
        unmatched += [(field, k) for k in keys if not any(_matches(k, paths, m) for paths, m in planned)]
    if unmatched:
        field, key = unmatched[0]
        raise UnmatchedPatternError(
            f"LightConfig.{field}: {key!r} matches no selected slot, so it would change nothing. "
            f"Patterns match module paths: {_suggest(_example(names, key))} {SYNTAX}",
            path=field, pattern=key,
        )  # fmt: skip


def _every_slot(world: World) -> list[str]:
    out = []
    for path, block in world.blocks().items():
        try:
            out += [f"{path}:{m}" for m in eligible_slots(block, where=path)]
        except TargetError:  # a block declaring a bad slot: only an example is wanted here
            continue
    return out


def _example(slots: list[str], pattern: str) -> str:
    """The slot of `slots` whose last name is nearest the last name in `pattern` (else the first)."""
    leaf = pattern.rpartition(":")[2].rpartition(".")[2].strip("*?[]^$\\")  # ".*qkv" -> "qkv"
    leaves = [s.rpartition(":")[2].rpartition(".")[2] for s in slots]
    close = difflib.get_close_matches(leaf, leaves, n=1)
    return slots[leaves.index(close[0])] if close else slots[0]


def _suggest(slot: str) -> str:
    module_path = slot.partition(":")[2]
    leaf = module_path.rpartition(".")[2]
    forms = f"'{leaf}' or '*.{leaf}'" if "." in module_path else f"'{leaf}'"
    return f"{forms} matches {slot}"


def _check_explicit(config: LightConfig, block, paths: list[str], path: str, eligible: dict, kind) -> None:
    """Refuse a slots entry that names (exactly, no wildcards) a module of this block no adapter of
    `kind` wraps. A module reached by PEFT's suffix rule that is no slot (a container, a layer the
    block does not declare) just is not selected; an entry selecting nothing is `_check_keys`'s."""
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
