"""lwformat: light custom worlds — the world tree, adapters, and (soon) bundles.

A world is a frozen base assembled from blocks; a light custom world adds small
trainable adapters at the slots that need them. See README.md for a tour.
"""

from .adapters import LightConfig, Plan
from .errors import LWFormatError
from .world import Block, Graph, Pipeline, Stage, World, register_block, register_flow

__all__ = [
    "Block",
    "Graph",
    "LWFormatError",
    "LightConfig",
    "Pipeline",
    "Plan",
    "Stage",
    "World",
    "register_block",
    "register_flow",
]
__version__ = "0.1.0"
