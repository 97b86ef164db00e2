"""lwformat: light custom worlds — the world tree, adapters, bundles and the runtime.

A world is a frozen base assembled from blocks; a light custom world adds small
trainable adapters at the slots that need them, and ships them as a signed bundle
bound to its base by content. See README.md for a tour.
"""

from .adapters import LightConfig, Plan
from .bundle import Bundle, write_bundle
from .errors import LWFormatError
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
