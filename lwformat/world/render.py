"""Draw a world's hierarchy as text, with parameter and slot counts per block."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tree import World


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render_tree(world: World) -> str:
    from ..adapters.slots import eligible_slots
    from .digest import base_tensors

    canonical = world.block_paths()
    total = sum(t.numel() for b in world.blocks().values() for t in {id(t): t for t in base_tensors(b.module).values()}.values())
    lines = [f"world {world.name!r}  {_count(total)} params  cycle {' -> '.join(world.cycle + world.cycle[:1])}"]

    def branch(items, prefix, draw):
        items = list(items)
        for i, (name, child) in enumerate(items):
            last = i == len(items) - 1
            draw(name, child, prefix + ("└── " if last else "├── "), prefix + ("    " if last else "│   "))

    def draw_block(path):
        def draw(name, block, head, _):
            full = f"{path}/{name}"
            if canonical[full] != full:
                lines.append(f"{head}{name} -> shared with {canonical[full]}")
                return
            params = sum(t.numel() for t in {id(t): t for t in base_tensors(block.module).values()}.values())
            slots = len(eligible_slots(block))
            kind = type(block.module).__name__
            lines.append(f"{head}{name}  [{block.block_type}: {kind}]  {_count(params)} params, {slots} slots")

        return draw

    def draw_graph(path):
        def draw(name, graph, head, tail):
            lines.append(f"{head}{name}  (flow {graph.flow})")
            branch(graph.nodes.items(), tail, draw_block(f"{path}/{name}"))

        return draw

    def draw_pipeline(path):
        def draw(name, pipe, head, tail):
            lines.append(f"{head}{name}")
            branch(pipe.graphs.items(), tail, draw_graph(f"{path}/{name}"))

        return draw

    def draw_stage(name, stage, head, tail):
        lines.append(f"{head}{name}")
        branch(stage.pipelines.items(), tail, draw_pipeline(name))

    branch(world.stages.items(), "", draw_stage)
    return "\n".join(lines)
