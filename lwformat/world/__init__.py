"""The world tree: hierarchy, paths, config, content digests, save and load."""

from .config import WorldSpec
from .digest import block_digest, tensor_digest
from .registry import register_block, register_flow
from .tree import Block, Graph, Pipeline, Stage, World

__all__ = [
    "Block",
    "Graph",
    "Pipeline",
    "Stage",
    "World",
    "WorldSpec",
    "block_digest",
    "register_block",
    "register_flow",
    "tensor_digest",
]
