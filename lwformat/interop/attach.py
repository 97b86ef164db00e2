"""Customize one block of a world from LoRA/DoRA tensors made elsewhere (PEFT, kohya).

A foreign adapter gives, per module of the block, a rank, an alpha and its tensors.
`attach` turns that into a `LightConfig` for the block alone (rank and alpha the most
common values, the others as ``rank_pattern``/``alpha_pattern`` entries, exactly as PEFT
records them), customizes the world, and copies the tensors in: all or nothing.

Foreign layouts differ from ours only by singleton dimensions, for convolutions:

    ours                      PEFT / kohya
    lora_A     (r, *in_shape)     (r, in, *kernel)          the same
    lora_B     (out, r)           (out, r, 1[, 1])          a 1×1 convolution
    magnitude  (out,)             (1, out, 1[, 1])          PEFT's DoRA, broadcast-shaped
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from ..adapters.config import LightConfig
from ..adapters.inject import customize, decustomize, grad_flags, restore_grad_flags
from ..adapters.kinds import KINDS, SlotSettings
from ..adapters.layers import Geometry
from ..adapters.plan import Plan, iter_hosts
from ..adapters.slots import eligible_slots, layer_at
from ..bundle.limits import MAX_HEADER_BYTES, MAX_TENSORS, ensure
from ..errors import InteropError
from ..runtime.finiteness import nonfinite

if TYPE_CHECKING:
    from ..world.tree import World


@dataclass(frozen=True)
class ForeignSlot:
    """One module's adapter as read from a foreign file, its tensors already in our layout."""

    rank: int
    alpha: float
    tensors: dict[str, torch.Tensor]  # our tensor name -> tensor


def foreign_shape(name: str, geo: Geometry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PEFT/kohya shape of our tensor `name` of `shape` at a layer of geometry `geo`."""
    spatial = (1,) * (len(geo.in_shape) - 1) if geo.is_conv else ()
    if name == "lora_B":
        return (*shape, *spatial)  # (out, r, 1[, 1])
    if name == "magnitude" and geo.is_conv:
        return (1, *shape, *spatial)  # (1, out, 1[, 1])
    return shape


def to_ours(name: str, geo: Geometry, want: tuple[int, ...], t: torch.Tensor, key: str) -> torch.Tensor:
    """`t` (foreign layout) reshaped to ours, after checking it is exactly the expected foreign shape."""
    expected = foreign_shape(name, geo, want)
    if tuple(t.shape) != expected:
        raise InteropError(f"{key}: shape {tuple(t.shape)}, this {geo.layer} layer needs {expected}", path=key)
    return t.reshape(want)


def block_slots(world: World, block_path: str) -> tuple[str, dict[str, Geometry]]:
    """(canonical block path, {module path: geometry}) of every slot of the block."""
    block = world.block(block_path)  # WorldPathError when there is no such block
    canonical = world.block_paths()[block_path]
    return canonical, {m: geo for m, (_, geo) in eligible_slots(block, where=canonical).items()}


def check_module(world: World, block_path: str, slots: dict[str, Geometry], module: str, key: str) -> Geometry:
    if module in slots:
        return slots[module]
    found = layer_at(world.block(block_path).module, module)
    what = "no such module" if found is None else f"{type(found).__name__} is not a slot adapters can wrap"
    raise InteropError(f"{key}: module {module!r} of {block_path}: {what}", path=key)


def check_rank(geo: Geometry, rank: int, key: str) -> None:
    """Refuse a rank above min(in, out), which PEFT allows (B·A cannot use it) and adapters here do not."""
    if rank > geo.max_rank:
        raise InteropError(
            f"{key}: rank {rank} is above min(in, out) = {geo.max_rank} of this {geo.layer} ({geo.fan_in} in, "
            f"{geo.out} out), which PEFT allows but B·A cannot use; adapters here hold at most {geo.max_rank}: "
            "re-rank the adapter first",
            path=key,
        )


def shapes_for(kind: str, geo: Geometry, rank: int) -> dict[str, tuple[int, ...]]:
    return KINDS[kind].shapes(geo, SlotSettings(kind, rank))


def most_common(values: list):
    return Counter(values).most_common(1)[0][0]  # ties: the first seen


def config_for(block_path: str, slots: dict[str, ForeignSlot], *, kind: str, rslora: bool, name: str) -> LightConfig:
    rank = most_common([s.rank for s in slots.values()])
    alpha = most_common([s.alpha for s in slots.values()])
    return LightConfig(
        kind=kind,
        rank=rank,
        alpha=alpha,
        rslora=rslora,
        blocks=[block_path],
        # The full slot form names a module path whole ("fc" alone would match "inner.fc" too).
        slots=[f"{block_path}:{m}" for m in slots],
        rank_pattern={f"{block_path}:{m}": s.rank for m, s in slots.items() if s.rank != rank},
        alpha_pattern={f"{block_path}:{m}": s.alpha for m, s in slots.items() if s.alpha != alpha},
        name=name,
    )


def attach(world: World, block_path: str, slots: dict[str, ForeignSlot], *, kind: str, rslora: bool, name: str) -> Plan:
    """Customize `world` with exactly `slots` on one block and copy their tensors in; all or nothing."""
    if not slots:
        raise InteropError(f"{block_path}: the adapter holds no module of this block", path=block_path)
    config = config_for(block_path, slots, kind=kind, rslora=rslora, name=name)
    grads = grad_flags(world)
    plan = customize(world, config)
    try:
        planned = {s.module_path for s in plan.slots}
        if planned != set(slots):  # cannot happen unless the plan rules change; never copy half
            raise InteropError(f"{block_path}: planned slots {sorted(planned ^ set(slots))} differ", path=block_path)
        hosts = {slot.partition(":")[2]: host for slot, host in iter_hosts(world) if slot.startswith(block_path + ":")}
        with torch.no_grad():
            for module, foreign in slots.items():
                adapter = hosts[module].adapters[name]
                for tensor_name, value in foreign.tensors.items():
                    param = getattr(adapter, tensor_name)
                    param.copy_(value)
                    if nonfinite([(tensor_name, param)]):  # finite in the file, beyond the block's dtype
                        slot = f"{block_path}:{module}"
                        raise InteropError(f"{slot}: {tensor_name} holds values beyond {param.dtype} (inf once converted)", path=slot)
    except BaseException:
        decustomize(world)
        restore_grad_flags(world, grads)
        raise
    return plan


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, the header bounded before the library allocates it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise InteropError(f"{path}: cannot read: {exc.strerror}", path=str(path)) from exc
    if len(head) < 8:
        raise InteropError(f"{path}: not a safetensors file (shorter than its 8-byte header length)", path=str(path))
    header_size = struct.unpack("<Q", head)[0]
    ensure(header_size, MAX_HEADER_BYTES, "MAX_HEADER_BYTES", "the safetensors header size", path=str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            ensure(len(f.keys()), MAX_TENSORS, "MAX_TENSORS", "the tensor count", path=str(path))
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except SafetensorError as exc:
        raise InteropError(f"{path}: not a valid safetensors file: {exc}", path=str(path)) from exc
