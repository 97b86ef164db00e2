"""Mixed-world batches: each sample of a batch runs with its own bundle, or none.

Every host gets, per applied bundle, a selection vector (B,) with 1 where a sample
chose that bundle; the host then adds only the chosen adapter's delta to each sample
(see `AdapterHost`), gathering LoRA factors per sample so that one batched pass serves
any number of distinct bundles.

A documented limit: the selection runs along dim 0, so every routed layer must get the
batch first. A layer inside a sequence-first module would mix samples up, and the mixed
batch is refused before it starts. Sequence-first is what torch's transformer modules
say: a module whose own ``batch_first`` attribute is False (nn.Transformer), or an
nn.TransformerEncoderLayer / nn.TransformerDecoderLayer whose ``self_attn`` has
``batch_first=False``. Other layouts are not detected: a custom layer that transposes
around a default nn.MultiheadAttention is fine when its routed layers get the batch first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import (
    FusedError,
    LayoutError,
    NotAppliedError,
    RuntimeStateError,
    TargetError,
)

if TYPE_CHECKING:
    from ..adapters.host import AdapterHost
    from ..world.tree import World


@contextmanager
def routed(world: World, bundles: list[str | None]) -> Iterator[None]:
    """Within the block, sample i of any forward runs with applied bundle ``bundles[i]`` only.

    Use it to run one block of a world per sample; `run` wraps a whole pass in it.
    Every layer a sample's bundle adapts must get the batch first: one inside a module
    torch marks sequence-first (see the module docstring) is refused with a `LayoutError`.
    """
    if world.fused_state is not None:
        raise FusedError("a mixed batch needs unfused adapters; call unfuse() first")
    if world.routes_open:  # leaving the inner one would end the outer one's routes too
        raise RuntimeStateError("a mixed batch is open already (`routed` or `run`); they do not nest")
    if world.customization is not None:  # its adapters are no applied bundle: samples could not pick them
        raise RuntimeStateError("a mixed batch picks among applied bundles, and this world carries a customization "
                                "(training adapters): write it as a bundle (write_bundle) and apply that")  # fmt: skip
    _check_picks(bundles)
    for name in bundles:
        if name is not None and name not in world.applied:
            raise NotAppliedError(f"sample asks for {name!r}, which is not applied", path=name)
    names = sorted(set(bundles) - {None})
    keys = [world.applied[name].key for name in names]
    picks = [[float(b == name) for b in bundles] for name in names]  # (n, B)
    hosts, sequence_first = _hosts(world)
    tables: dict[tuple, torch.Tensor] = {}  # one copy to each dtype and device, not one per host and bundle
    routes = []
    for host in hosts:  # every route sorted out, and refused, before any is set
        like = host.base.weight
        dtype = host.adapters_dtype() if host.adapters else like.dtype
        key = (dtype, like.device)  # the adapters' dtype: a pick times a float32 weight stays float32
        if key not in tables:
            tables[key] = torch.tensor(picks, dtype=key[0], device=like.device).reshape(len(names), len(bundles))
        table = tables[key]  # (n, B)
        route = {key: table[i] for i, key in enumerate(keys) if key in host.adapters}
        if route and id(host) in sequence_first:
            _refuse_sequence_first(sequence_first[id(host)])
        routes.append((host, route))
    world.routes_open += 1
    try:
        for host, route in routes:
            host.set_route(route, len(bundles))
        yield
    finally:
        world.routes_open -= 1
        for host in hosts:
            host.set_route(None)


_SELF_ATTN_LAYOUT = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)  # torch keeps their layout on self_attn


def _hosts(world: World) -> tuple[list[AdapterHost], dict[int, str]]:
    """Every host of the world, and {id(host): path of the innermost sequence-first module around it}.

    Sequence-first: a module's own ``batch_first`` is False (nn.Transformer), or it is an
    nn.TransformerEncoderLayer / DecoderLayer, which keeps the flag on its ``self_attn``. Only
    those layers: any other module's ``self_attn`` (a default nn.MultiheadAttention that a custom
    layer transposes around) says nothing of the layout its sibling layers get. Read from the
    instance dicts: a miss through `nn.Module.__getattr__` raises, on every module. One walk
    of each block's modules, as `iter_hosts` makes; a sequence-first module's own subtree is
    walked again, which finds a host shared with a batch-first parent too.
    """
    hosts, outer = [], []
    for path, block in world.blocks().items():
        for module_path, module in block.module.named_modules():
            if getattr(type(module), "is_adapter_host", False):
                hosts.append(module)
                continue
            # Inline, not a call: this runs for every module on every mixed batch.
            flag = module.__dict__.get("batch_first")
            if flag is None and isinstance(module, _SELF_ATTN_LAYOUT):
                attention = module._modules.get("self_attn")
                flag = None if attention is None else attention.__dict__.get("batch_first")
            if flag is False:
                outer.append((f"{path}:{module_path}" if module_path else path, module))
    sequence_first = {}
    for where, module in outer:  # in walk order, so an inner module's path wins over its parent's
        for inner in module.modules():
            if getattr(type(inner), "is_adapter_host", False):
                sequence_first[id(inner)] = where
    return hosts, sequence_first


def _refuse_sequence_first(where: str) -> None:
    raise LayoutError(
        f"{where} is sequence-first (batch_first=False on it, or on a torch transformer layer's self_attn): "
        "a mixed batch selects each sample's bundle along dim 0, which there holds the tokens, so the layers it "
        "adapts would mix samples up. Mixed batches need the batch first at every layer they route (a documented "
        "limit): build it with batch_first=True, or apply one bundle at a time", path=where,
    )  # fmt: skip


def not_routed(world: World, what: str) -> None:
    """Refuse to change the stack or fuse inside a mixed batch: a routed sample would compute
    with storage reused meanwhile, or with the fused sum of every bundle instead of its own."""
    if world.routes_open:
        raise RuntimeStateError(f"cannot {what} inside a mixed batch (`routed`); do it before entering or after leaving")


def _check_picks(bundles: list[str | None]) -> None:
    if not isinstance(bundles, (list, tuple)):
        raise TargetError(f"bundles is a list of applied bundle names or None, one per sample, not {type(bundles).__name__}")
    for name in bundles:
        if name is not None and not isinstance(name, str):
            raise TargetError(f"bundles holds {name!r}: each sample names an applied bundle, or None for the base")


def run(world: World, state: dict[str, torch.Tensor], bundles: list[str | None]) -> dict[str, torch.Tensor]:
    _check_picks(bundles)
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] != len(bundles):
            raise TargetError(f"state[{key!r}] has batch size {value.shape[0]}, but {len(bundles)} bundles were given", path=key)
    with routed(world, bundles):
        return world(state)
