"""Where adapters can go inside a block: its slots.

By default every layer inside the block that some adapter kind can wrap is a slot
(see `layers.geometry`); a block may instead declare its own list. Layers already
wrapped by a host are seen through it, so a customized block lists the same slots.

A layer its parent reads by weight and never calls (``nn.MultiheadAttention.out_proj``)
is no slot: an adapter there would do nothing until fused.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedLayerError
from .layers import Geometry, geometry

UNCALLED = (
    "nn.MultiheadAttention reads its out_proj's weight directly and never calls the layer: "
    "an adapter there would do nothing until fused"
)


def _unhosted(layer: nn.Module) -> nn.Module:
    return layer.base if getattr(type(layer), "is_adapter_host", False) else layer


def layer_at(block_module: nn.Module, module_path: str) -> nn.Module | None:
    try:
        layer = block_module.get_submodule(module_path)
    except AttributeError:
        return None
    return _unhosted(layer)


def uncalled_layers(block_module: nn.Module) -> set[int]:
    """The ids of the layers that a parent reads by weight instead of calling them (see `UNCALLED`)."""
    return {id(_unhosted(m.out_proj)) for m in block_module.modules() if isinstance(m, nn.MultiheadAttention)}


def _is_out_proj(block_module: nn.Module, module_path: str) -> bool:
    parent, _, name = module_path.rpartition(".")
    return name == "out_proj" and isinstance(block_module.get_submodule(parent), nn.MultiheadAttention)


def eligible_slots(block, *, where: str | None = None) -> dict[str, tuple[nn.Module, Geometry]]:
    """``{module path: (base layer, geometry)}`` for every slot of `block`, in module order."""
    where = where or block.block_type
    if block.declared_slots is not None:
        out = {}
        for module_path in block.declared_slots:
            layer = layer_at(block.module, module_path)
            geo = geometry(layer) if layer is not None else None
            if geo is None:
                found = "nothing" if layer is None else type(layer).__name__
                raise UnsupportedLayerError(
                    f"{where}:{module_path}: declared slot holds {found}, not a supported layer", path=f"{where}:{module_path}"
                )
            if _is_out_proj(block.module, module_path):  # its parent only: this runs on every apply
                raise UnsupportedLayerError(f"{where}:{module_path}: declared slot: {UNCALLED}", path=f"{where}:{module_path}")
            out[module_path] = (layer, geo)
        return out
    out = {}
    uncalled = {id(_unhosted(block.module.out_proj))} if isinstance(block.module, nn.MultiheadAttention) else set()
    seen = {id(block.module)}
    stack = [(child, name) for name, child in reversed(block.module._modules.items()) if child is not None]
    while stack:  # depth first in module order, each module once, as `named_modules` goes
        module, module_path = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if getattr(type(module), "is_adapter_host", False):  # on the class: no Module.__getattr__ miss
            out[module_path] = (module.base, module.geo)  # not entered: the base layer and the adapters
            continue
        if (geo := geometry(module)) is not None:
            out[module_path] = (module, geo)
        elif isinstance(module, nn.MultiheadAttention):
            uncalled.add(id(_unhosted(module.out_proj)))
        children = module._modules
        for name in reversed(children):  # a plain loop: this walk runs on every apply
            if (child := children[name]) is not None:
                stack.append((child, f"{module_path}.{name}"))
    if uncalled:  # after the walk: a shared layer may have been met before its MultiheadAttention
        out = {p: slot for p, slot in out.items() if id(slot[0]) not in uncalled}
    return out
