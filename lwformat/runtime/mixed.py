"""Mixed-world batches: each sample of a batch runs with its own bundle, or none.

Every host gets, per applied bundle, a selection vector (B,) with 1 where a sample
chose that bundle; the host then adds only the chosen adapter's delta to each sample
(see `AdapterHost`), gathering LoRA factors per sample so that one batched pass serves
any number of distinct bundles.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..adapters.plan import iter_hosts
from ..errors import FusedError, NotAppliedError, RuntimeStateError, TargetError

if TYPE_CHECKING:
    from ..world.tree import World


@contextmanager
def routed(world: World, bundles: list[str | None]) -> Iterator[None]:
    """Within the block, sample i of any forward runs with applied bundle ``bundles[i]`` only.

    Use it to run one block of a world per sample; `run` wraps a whole pass in it.
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
    hosts = [host for _, host in iter_hosts(world)]
    tables: dict[tuple, torch.Tensor] = {}  # one copy to each dtype and device, not one per host and bundle
    world.routes_open += 1
    try:
        for host in hosts:
            like = host.base.weight
            if (like.dtype, like.device) not in tables:
                tables[like.dtype, like.device] = torch.tensor(picks, dtype=like.dtype, device=like.device).reshape(len(names), len(bundles))
            table = tables[like.dtype, like.device]  # (n, B)
            host.set_route({key: table[i] for i, key in enumerate(keys) if key in host.adapters}, len(bundles))
        yield
    finally:
        world.routes_open -= 1
        for host in hosts:
            host.set_route(None)


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
