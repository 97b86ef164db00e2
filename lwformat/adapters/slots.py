"""Where adapters can go inside a block: its slots.

By default every layer inside the block that some adapter kind can wrap is a slot
(see `layers.geometry`); a block may instead declare its own list. Layers already
wrapped by a host are seen through it, so a customized block lists the same slots.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedLayerError
from .layers import Geometry, geometry


def layer_at(block_module: nn.Module, module_path: str) -> nn.Module | None:
    try:
        layer = block_module.get_submodule(module_path)
    except AttributeError:
        return None
    return layer.base if getattr(type(layer), "is_adapter_host", False) else layer


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
            out[module_path] = (layer, geo)
        return out
    out = {}
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
        children = module._modules
        for name in reversed(children):  # a plain loop: this walk runs on every apply
            if (child := children[name]) is not None:
                stack.append((child, f"{module_path}.{name}"))
    return out
