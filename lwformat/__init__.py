"""lwformat: light custom worlds — the world tree, adapters, bundles and the runtime.

A world is a frozen base assembled from blocks; a light custom world adds small
trainable adapters at the slots that need them, and ships them as a signed bundle
bound to its base by content. See README.md for a tour.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .errors import LWFormatError

if TYPE_CHECKING:
    from .adapters import LightConfig, Plan
    from .bundle import Bundle, write_bundle
    from .runtime import blend
    from .world import Block, Graph, Pipeline, Stage, World, register_block, register_flow

__all__ = [
    "Block",
    "Bundle",
    "Graph",
    "LWFormatError",
    "LightConfig",
    "Pipeline",
    "Plan",
    "Stage",
    "World",
    "blend",
    "register_block",
    "register_flow",
    "write_bundle",
]
__version__ = "0.1.0"

# The exports are imported on first use (PEP 562): most of them import torch, which the hub
# client and the `lwhub` command never need, though they read bundles through this package.
_HOME = {
    "Block": ".world", "Graph": ".world", "Pipeline": ".world", "Stage": ".world", "World": ".world",
    "register_block": ".world", "register_flow": ".world",
    "LightConfig": ".adapters", "Plan": ".adapters",
    "Bundle": ".bundle", "write_bundle": ".bundle",
    "blend": ".runtime",
}  # fmt: skip
# `import lwformat` used to import these, so `lwformat.world.World` works without importing them first.
_SUBPACKAGES = {"adapters", "bundle", "runtime", "world"}


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBPACKAGES)
