"""Casting a base world to another floating-point dtype, keeping what it was cast from.

A digest covers its tensors' dtype (spec, "Digests"), so a world cast to bfloat16 has
other digests than the float32 world that bundles were trained on and bound to.
`cast_world` converts every floating-point tensor of every block and records, for each
block, the digest it had before (its *source*) with the fingerprint of its tensors right
after (`digest.record`: the same tensor objects, addresses, versions, dtypes, strides and
shapes). While that fingerprint holds, the block is an untouched cast of its source, and
the compatibility check accepts a bundle bound to the source without hashing the block.
A block written, replaced or moved since is judged by its own digest again.

Its own digest (`World.digests`) stays the cast content's: the record only says where the
content came from. Casting again keeps the source of each block still untouched since
the last cast, so a float32-bound bundle fits a world cast float32 -> bfloat16 -> float16
too (each a cast of what the bundle was trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import FusedError, RuntimeStateError, WorldError
from .digest import cached_block_digest, holds, record, root_of, untouched

if TYPE_CHECKING:
    from .tree import World

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # the dtypes a world computes in


@dataclass
class CastRecord:
    """What `World.cast` left: its dtype, and per canonical block path
    ``(fingerprint right after the cast, source digest, tensor seats or None)``, as the digest cache."""

    dtype: torch.dtype
    blocks: dict[str, tuple]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@torch.no_grad()
def cast_world(world: World, dtype: torch.dtype) -> None:
    """Convert every floating-point tensor of every block to `dtype`, recording each block's source.

    The sources come from the digest cache (a walk per block; `World.load` seeds it) or are
    computed once. Every converted tensor is made before the first is put in place, so a
    failure leaves the world as it was; that needs room for the new tensors beside the old.
    """
    _castable(world, dtype)
    blocks = world.blocks()
    sources = {path: cast_source(world, path) or cached_block_digest(world, path, block) for path, block in blocks.items()}
    replace_tensors(world, converted(blocks, lambda t: dtype, finite=True))  # every new tensor made before the first goes in
    records = {}
    for path, block in blocks.items():
        records[path] = record(block.module, sources[path])
        if path in world._digest_cache and not holds(world._digest_cache[path], block.module):
            del world._digest_cache[path]  # it names the tensors replaced (kept, `follow_move` would carry it over)
    world.cast_record = CastRecord(dtype, records)


def _castable(world: World, dtype: Any) -> None:
    """Refuse, before anything changes, a dtype the world cannot compute in or a world with adapters."""
    check_dtype(dtype)
    if world.fused_state is not None:
        raise FusedError("cannot cast a fused world: its weights hold the adapters' deltas; call unfuse() first")
    if world.customization is not None:
        raise RuntimeStateError("cannot cast a customized world: its adapters were made for the base's dtype; "
                                "decustomize() first, or cast before customizing")  # fmt: skip
    if world.applied:
        raise RuntimeStateError(f"cannot cast while bundles are applied ({', '.join(world.applied)}): their storage "
                                "was made for the base's dtype; remove them, cast, and apply them again")  # fmt: skip


def check_dtype(dtype: Any) -> None:
    if not isinstance(dtype, torch.dtype) or dtype not in FLOATS:
        raise WorldError(f"cannot cast a world to {dtype!r}: a base casts to one of "
                         f"{', '.join(str(d).removeprefix('torch.') for d in FLOATS)}")  # fmt: skip


def converted(blocks, dtype_of, *, finite: bool = False) -> dict[int, torch.Tensor]:
    """``{id(old): new}`` for every floating-point tensor of `blocks` (``{path: Block}``; buffers not saved too, as
    `Module.to` does) whose dtype `dtype_of(tensor)` changes; a tied tensor once. With `finite`,
    a finite weight the new dtype turns into inf (past float16's 65504) is a `WorldError`; a
    buffer not saved (a mask) and the old dtype's own extremes (sentinels) become inf as in `.to`."""
    out: dict[int, torch.Tensor] = {}
    for path, block in blocks.items():
        for m in block.module.modules():
            saved = [t for n, t in m._buffers.items() if n not in m._non_persistent_buffers_set]
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is None or id(t) in out or not t.is_floating_point() or (dtype := dtype_of(t)) == t.dtype:
                    continue
                new = t.detach().to(dtype)  # same shape and device
                weight = isinstance(t, nn.Parameter) or any(t is b for b in saved)
                if finite and weight and not torch.isfinite(new).all() and (bad := _overflowed(t.detach(), new)).any():
                    value, name = t.detach()[bad][0].item(), f"{path}:{_name_of(block.module, t)}"
                    raise WorldError(f"{name}: holds {value:g}, which {str(dtype).removeprefix('torch.')} cannot hold "
                                     "(it would be inf); the world is unchanged", path=name)  # fmt: skip
                if isinstance(t, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=t.requires_grad)
                    if t.grad is not None:
                        new.grad = t.grad.to(dtype)
                out[id(t)] = new
    return out


def _overflowed(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Where a finite value that is not its dtype's own extreme (a sentinel) became inf."""
    top = torch.finfo(old.dtype).max
    return torch.isfinite(old) & ~torch.isfinite(new) & (old.abs() != top)  # same shape as old


def _name_of(module: nn.Module, tensor: torch.Tensor) -> str:
    return next((n for n, t in (*module.named_parameters(), *module.named_buffers()) if t is tensor), "a tensor")


def replace_tensors(world: World, converted: dict[int, torch.Tensor]) -> None:
    """Put each new tensor wherever its old one sits in the world, so ties stay ties."""
    if not converted:
        return
    for m in world.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None and id(t) in converted:
                    table[name] = converted[id(t)]


def cast_source(world: World, path: str) -> str | None:
    """The digest block `path` (canonical) was cast from, if it is an untouched cast; else None. A walk."""
    record = world.cast_record
    hit = None if record is None else record.blocks.get(path)
    return hit[1] if holds(hit, world.block(path).module) else None


def untouched_source(world: World, path: str) -> str | None:
    """`cast_source` checked as `untouched_digest` checks the digest cache: tensor by tensor, no walk."""
    record = world.cast_record
    return None if record is None else untouched(record.blocks, world, path)


def cast_root(world: World) -> str | None:
    """The root the world had before its cast, while every block is an untouched cast.

    Computed from the sources over the world's structure as it is now rather than kept
    from the cast, so a graph's flow or a block added or dropped since counts.
    """
    sources = {}
    for path in world.blocks():
        source = cast_source(world, path)
        if source is None:
            return None
        sources[path] = source
    return root_of(world, sources)
