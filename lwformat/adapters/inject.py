"""Turn a world into a light custom world: freeze everything, wrap the planned slots.

`customize` plans first (every error is raised before anything changes), then freezes
every parameter of the world, at every level, and wraps each planned slot's layer in
an `AdapterHost` holding one new adapter. Only adapter parameters require grad.
If wrapping fails midway, the wrapped layers are put back and the grad flags restored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..errors import FusedError
from .config import LightConfig
from .host import AdapterHost
from .kinds import KINDS
from .layers import geometry
from .plan import Plan, iter_hosts, parent_index, plan, replace_module

if TYPE_CHECKING:
    from ..world.tree import World

__all__ = ["adapter_parameters", "customize", "decustomize", "plan"]


def customize(world: World, config: LightConfig, *, check_keys: bool = True) -> Plan:
    the_plan = plan(world, config, check_keys=check_keys)
    grads = grad_flags(world)
    try:
        world.requires_grad_(False)
        indexes: dict[str, dict] = {}
        for slot in the_plan.slots:
            block = world.block(slot.block_path)
            if slot.block_path not in indexes:
                indexes[slot.block_path] = parent_index(block.module)
            layer = block.module.get_submodule(slot.module_path)
            host = AdapterHost(layer, geometry(layer), disabled=world.adapters_disabled > 0)
            adapter = KINDS[slot.kind](host.geo, slot.settings, layer)
            adapter.dropout = config.dropout if adapter.geo.layer != "embedding" else 0.0  # indices: as PEFT, none
            host.add(the_plan.name, adapter)
            replace_module(indexes[slot.block_path], layer, host)
    except BaseException:
        _unwrap(world, the_plan.name)
        restore_grad_flags(world, grads)
        raise
    world.customization = (config, the_plan)
    return the_plan


def decustomize(world: World) -> None:
    """Take the customization off: its adapter leaves every host, and a host left empty gives
    its slot back to the base layer (the same object, untouched). Bundles applied stay."""
    if world.fused_state is not None:
        raise FusedError("cannot decustomize while the world is fused; call unfuse() first")
    if world.customization is not None:
        _unwrap(world, world.customization[1].name)
    world.customization = None


def _unwrap(world: World, name: str) -> None:
    indexes: dict[str, dict] = {}
    for slot, host in list(iter_hosts(world)):
        host.adapters._modules.pop(name, None)
        if host.adapters:
            continue  # it holds applied bundles too
        block_path = slot.partition(":")[0]
        if block_path not in indexes:
            indexes[block_path] = parent_index(world.block(block_path).module)
        replace_module(indexes[block_path], host, host.base)


def adapter_parameters(world: World) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for _, host in iter_hosts(world):
        for p in host.adapters.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def grad_flags(world: World) -> dict[int, bool]:
    return {id(p): p.requires_grad for p in world.parameters()}


def restore_grad_flags(world: World, flags: dict[int, bool]) -> None:
    for p in world.parameters():
        p.requires_grad_(flags.get(id(p), p.requires_grad))
