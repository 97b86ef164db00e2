"""Build a `World` from its typed config through the block registry."""

from __future__ import annotations

import contextlib

import torch

from ..errors import WorldConfigError
from . import registry
from .config import WorldSpec
from .paths import check_name, split_block_path
from .tree import Block, Graph, Pipeline, Stage, World


def build_world(spec: WorldSpec, *, device: torch.device | str | None = None) -> World:
    """Build every block of `spec` (on `device`, ``"meta"`` for shape-only worlds) and assemble them.

    A ``ref`` node must name a block path built earlier in config order, so that the
    canonical path of a shared block is the one that builds it.
    """
    built: dict[str, Block] = {}
    stages = {}
    for s, stage in spec.stages.items():
        pipelines = {}
        for p, pipeline in stage.pipelines.items():
            graphs = {}
            for g, graph in pipeline.graphs.items():
                nodes = {}
                for n, node in graph.nodes.items():
                    path = "/".join((check_name(s, "stage"), check_name(p, "pipeline"), check_name(g, "graph"), check_name(n, "node")))
                    nodes[n] = built[path] = _node(node, path, built, device)
                graphs[g] = Graph(nodes, graph.flow, where=f"{s}/{p}/{g}")
            pipelines[p] = Pipeline(graphs)
        stages[s] = Stage(pipelines)
    return World(stages, cycle=spec.cycle or None, name=spec.name, spec=spec)


def _node(node, path: str, built: dict[str, Block], device) -> Block:
    if (node.block is None) == (node.ref is None):
        raise WorldConfigError(f"{path}: a node needs exactly one of 'block' and 'ref'", path=path)
    if node.ref is not None:
        split_block_path(node.ref)
        if node.ref not in built:
            raise WorldConfigError(f"{path}: ref {node.ref!r} names no block built before it", path=path)
        return built[node.ref]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        module, block_type = registry.build_block(node.block, node.config, where=path)
    return Block(module, block_type, slots=node.slots, impl=node.block, config=node.config)
