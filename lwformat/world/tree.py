"""The world hierarchy as torch modules: World > Stage > Pipeline > Graph > Block.

Every level is an ``nn.Module`` whose children sit in an ``nn.ModuleDict``, so a world
moves, freezes and serializes like any model. A block may be shared by several graphs:
the same ``Block`` object is then a child of each, torch keeps one copy of its weights,
and the first path that reaches it (in config order) is its canonical path.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import WorldConfigError, WorldPathError
from . import registry
from .paths import check_name, split_block_path

if TYPE_CHECKING:
    from .config import WorldSpec


class Block(nn.Module):
    """One node's weights: any ``nn.Module`` tagged with its block type.

    ``slots`` optionally lists the module paths where adapters may go; by default every
    supported layer inside the module is a slot. ``impl``/``config`` record how to
    rebuild the block from a config, which saving a world requires.
    """

    def __init__(
        self,
        module: nn.Module,
        type: str,
        *,
        slots: list[str] | None = None,
        impl: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.block_type = check_name(type, "block type")
        self.declared_slots = tuple(slots) if slots is not None else getattr(module, "lw_slots", None)
        self.impl = impl
        self.config = dict(config or {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"type={self.block_type!r}"


class Graph(nn.Module):
    """Nodes (each holding one block) and the flow that runs them."""

    def __init__(self, nodes: Mapping[str, Block], flow: str = "sequential", *, where: str | None = None) -> None:
        super().__init__()
        for name, block in nodes.items():
            check_name(name, "node")
            if not isinstance(block, Block):
                raise WorldConfigError(f"node {name!r} holds {type(block).__name__}, not a Block", path=name)
        self.nodes = nn.ModuleDict(nodes)
        self.flow = flow
        registry.flow(flow, where=where or f"flow of graph with nodes {list(nodes)}")  # where: the graph's path

    def forward(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return registry.flow(self.flow)(self, state)


class _Level(nn.Module):
    """A level whose children run in order, each adding its outputs to a shared state."""

    def __init__(self, children: Mapping[str, nn.Module], kind: str) -> None:
        super().__init__()
        for name in children:
            check_name(name, kind)
        self.parts = nn.ModuleDict(children)

    def forward(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = dict(state)
        for part in self.parts.values():
            state.update(part(state))
        return state


class Pipeline(_Level):
    """Graphs that run one after another."""

    def __init__(self, graphs: Mapping[str, Graph]) -> None:
        super().__init__(graphs, "graph")

    @property
    def graphs(self) -> nn.ModuleDict:
        return self.parts


class Stage(_Level):
    """Pipelines that run one after another; one role of the world (author, creator...)."""

    def __init__(self, pipelines: Mapping[str, Pipeline]) -> None:
        super().__init__(pipelines, "pipeline")

    @property
    def pipelines(self) -> nn.ModuleDict:
        return self.parts


class World(nn.Module):
    """Stages joined in a cycle; ``forward`` runs one pass of the cycle.

    The stage cycle is ``cycle[0] -> cycle[1] -> ... -> cycle[0]``; by default the
    stages in the order given.
    """

    def __init__(
        self,
        stages: Mapping[str, Stage],
        *,
        cycle: list[str] | None = None,
        name: str = "world",
        spec: WorldSpec | None = None,
    ) -> None:
        super().__init__()
        for stage in stages:
            check_name(stage, "stage")
        self.stages = nn.ModuleDict(stages)
        self.cycle = list(cycle or stages)
        unknown = [s for s in self.cycle if s not in self.stages]
        if unknown or len(set(self.cycle)) != len(self.cycle):
            raise WorldConfigError(f"cycle {self.cycle} must list distinct stages of {list(stages)}")
        self.name = name
        self.spec = spec
        self._digest_cache: dict[str, Any] = {}
        self.customization: tuple[Any, Any] | None = None  # (LightConfig, Plan) while customized
        self.applied: dict[str, Any] = {}  # bundle name -> runtime.Applied
        self.fused_state: dict[str, Any] | None = None  # slot -> saved base tensors while fused
        self.spare_storage: Any = None  # runtime.Spare: adapter storage released by remove, for the next apply
        self.routes_open = 0  # `runtime.routed` blocks entered and not yet left
        self.adapters_disabled = 0  # `runtime.disabled` blocks entered and not yet left
        self.cast_record: Any = None  # cast.CastRecord: what `cast` converted the blocks from

    def forward(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One pass of the cycle: each stage in cycle order adds its outputs to the state."""
        state = dict(state)
        for name in self.cycle:
            state.update(self.stages[name](state))
        return state

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: WorldSpec, *, device: torch.device | str | None = None) -> World:
        """Build a world, with fresh weights, from a `WorldSpec` (what `from_config` reads from a file);
        every block is built on `device` (``"meta"`` for a world of shapes only)."""
        from .build import build_world

        return build_world(spec, device=device)

    @classmethod
    def from_config(cls, path: Any, *, device: torch.device | str | None = None) -> World:
        """Build a world, with fresh weights, from a JSON or TOML config file."""
        from . import config

        return cls.from_spec(config.read(path), device=device)

    @classmethod
    def from_blocks(
        cls, blocks: Mapping[str, Block], *, flows: Mapping[str, str] | None = None, name: str = "world"
    ) -> World:
        """Assemble a world from ``{block path: Block}``; one ``Block`` under two paths is shared.

        ``flows`` maps ``stage/pipeline/graph`` to a flow name (default ``sequential``); a key naming
        no graph of `blocks` raises WorldConfigError.
        """
        tree: dict[str, dict[str, dict[str, dict[str, Block]]]] = {}
        for path, block in blocks.items():
            s, p, g, n = split_block_path(path)
            tree.setdefault(s, {}).setdefault(p, {}).setdefault(g, {})[n] = block
        flows = flows or {}
        unknown = sorted(set(flows) - {f"{s}/{p}/{g}" for s, ps in tree.items() for p, gs in ps.items() for g in gs})
        if unknown:  # a typo would leave its graph on the default flow without a word
            raise WorldConfigError(f"flows: {unknown[0]!r} names no graph of the blocks given", path=unknown[0])
        stages = {
            s: Stage({
                p: Pipeline({g: Graph(nodes, flows.get(f"{s}/{p}/{g}", "sequential"), where=f"{s}/{p}/{g}") for g, nodes in graphs.items()})
                for p, graphs in pipelines.items()
            })
            for s, pipelines in tree.items()
        }
        return cls(stages, name=name)

    @classmethod
    def load(
        cls, path: Any, *, device: torch.device | str | None = None, verify: bool = False, dtype: torch.dtype | None = None
    ) -> World:
        """Load a world saved with `save`; ``verify=True`` recomputes every digest and refuses a checkpoint
        whose digests.json is missing or records other blocks or another root.

        ``dtype`` (a floating-point dtype) casts the world as `cast` does, on the CPU before it moves to
        `device`, with the checkpoint's digests (verified, with ``verify=True``) as the sources: bundles
        bound to the saved world apply to the cast one.
        """
        from .checkpoint import load_world

        return load_world(path, device=device, verify=verify, dtype=dtype)

    def save(self, path: Any) -> None:
        """Write config, weights (safetensors) and cached digests to directory `path`.

        `path` is replaced whole, so it must be absent, empty, or a world saved before.
        Only the base is written: adapters being trained (`customize`) and applied bundles are
        not, and a `UserWarning` says so; `save_adapters` and `lwformat.write_bundle` save them.
        """
        from .checkpoint import save_world

        save_world(self, path)
        if self.customization is not None or self.applied:  # saving the base is legitimate: warn, not refuse
            warnings.warn(_base_only(self, path), UserWarning, stacklevel=2)

    # -- traversal ---------------------------------------------------------------------

    def walk(self) -> Iterator[tuple[str, Block]]:
        """Every (block path, block), shared blocks once per path that uses them."""
        for s, stage in self.stages.items():
            for p, pipeline in stage.pipelines.items():
                for g, graph in pipeline.graphs.items():
                    for n, block in graph.nodes.items():
                        yield f"{s}/{p}/{g}/{n}", block

    def block_paths(self) -> dict[str, str]:
        """Every block path mapped to the canonical path of the block it holds."""
        canonical: dict[int, str] = {}
        return {path: canonical.setdefault(id(block), path) for path, block in self.walk()}

    def blocks(self) -> dict[str, Block]:
        """Each distinct block once, under its canonical path, in config order."""
        seen: dict[int, str] = {}
        out: dict[str, Block] = {}
        for path, block in self.walk():
            if id(block) not in seen:
                seen[id(block)] = path
                out[path] = block
        return out

    def block(self, path: str) -> Block:
        """The block at `path` (``stage/pipeline/graph/node``, any path of a shared block); WorldPathError if none."""
        s, p, g, n = _split_or_missing(path)
        try:
            return self.stages[s].pipelines[p].graphs[g].nodes[n]
        except KeyError:
            raise WorldPathError(f"no block at {path!r}", path=path) from None

    def stage(self, name: str) -> Stage:
        """The stage called `name`; WorldPathError, listing the stages, if there is none."""
        if name not in self.stages:
            raise WorldPathError(f"no stage {name!r} (stages: {list(self.stages)})", path=name)
        return self.stages[name]

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers held above the block level, by dotted module name."""
        inside = {id(t) for b in self.blocks().values() for t in _tensors(b)}
        return {name: t for name, t in _named_tensors(self) if id(t) not in inside and not _is_adapter_name(name)}

    # -- content identity -------------------------------------------------------------------

    def digests(self, *, recompute: bool = False) -> dict[str, str]:
        """``{canonical block path: digest}``, cached until a base tensor changes.

        "Changes" as tensors record it: replaced, moved, or written in place through
        autograd's version counter. A write that bypasses it (through ``.data``, a NumPy
        view or another tensor sharing the storage) is not seen; after one,
        ``recompute=True`` hashes every block again and keeps the new digests, and forgets
        what a `cast` world was cast from (that cannot be checked again).
        """
        from ..runtime.fuse import forget_held
        from .digest import world_digests

        blocks = world_digests(self, recompute=recompute)["blocks"]
        if recompute:
            self.cast_record = None
            forget_held(self)  # nor does unfuse bring back the digests from before fuse
        return blocks

    def __getstate__(self) -> dict[str, Any]:
        # The per-block records hold tensors weakly (no pickling) and name tensors of this
        # process: a copy hashes its blocks again, and keeps no cast record.
        return super().__getstate__() | {"_digest_cache": {}, "cast_record": None}

    def digest(self, path: str) -> str:
        """The digest of the block at `path` (any of its paths), computing only that block."""
        from .digest import cached_block_digest

        canonical = self.block_paths().get(path)
        if canonical is None:
            raise WorldPathError(f"no block at {path!r}", path=path)
        return cached_block_digest(self, canonical, self.block(canonical))

    def root_digest(self) -> str:
        """The world's identity: a digest over its structure (cycle, block paths in run order, block types,
        shared blocks, flows) and every block's digest. Adapters beside the base leave it as it is; fusing changes it."""
        from .digest import world_digests

        return world_digests(self)["root"]

    def verify(self) -> None:
        """Recompute every digest and compare with what `digests()` answers; raise CheckpointError
        naming the first block that differs: one written behind its version counter (``.data``,
        a NumPy view, another tensor on its storage). Such a change stays refused, whatever is
        called meanwhile, until ``digests(recompute=True)`` accepts it; an ordinary in-place
        write is a change `digests()` already reports, and passes."""
        from .digest import verify_world

        verify_world(self)

    def cast(self, dtype: torch.dtype) -> None:
        """Convert every floating-point tensor of every block to `dtype` (float16, bfloat16, float32,
        float64), in place of the old ones, keeping what each block was cast from.

        Digests cover dtypes, so the cast blocks have digests of their own (`digests` answers
        them), yet a bundle bound to the blocks as they were still applies, and swaps, while each
        block is untouched since the cast; a block written, replaced or moved since is judged by
        its own digest: move the world to its device first (or ``World.load(dir, dtype=...,
        device=...)``). `fuse` then `unfuse` keeps it (the restore is bit-exact), unless the
        block was written while fused. A write behind the version counters (``.data``) is not
        seen, as for the digest cache, and `verify` cannot check a source it does not hold:
        ``digests(recompute=True)`` forgets the record. Refused, with nothing changed, while the
        world is customized, carries applied bundles or is fused. The digests it was cast from
        come from the digest cache (`load` fills it) or are computed once. `save` writes the
        cast weights and their own digests, not where they came from: a saved cast world binds
        to its cast digests.
        """
        from .cast import cast_world

        cast_world(self, dtype)

    # -- light custom world ----------------------------------------------------------------

    def plan(self, config: Any) -> Any:
        """Dry run: the exact slots, kinds, ranks and shapes `customize` would inject."""
        from ..adapters.inject import plan

        return plan(self, config)

    def customize(self, config: Any) -> Any:
        """Freeze every base weight and inject adapters per `config`; returns the plan."""
        from ..adapters.inject import customize

        return customize(self, config)

    def decustomize(self) -> None:
        """Remove every adapter host; the base layers are put back untouched."""
        from ..adapters.inject import decustomize

        decustomize(self)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Exactly the trainable adapter parameters, each once."""
        from ..adapters.inject import adapter_parameters

        return adapter_parameters(self)

    def save_adapters(self, path: Any) -> None:
        """Write the adapters and their config to one safetensors file (the light checkpoint)."""
        from ..adapters.checkpoint import save_adapters

        save_adapters(self, path)

    def load_adapters(self, path: Any) -> Any:
        """Customize this world from a light checkpoint written by `save_adapters`."""
        from ..adapters.checkpoint import load_adapters

        return load_adapters(self, path)

    # -- runtime: bundles on a loaded world ---------------------------------------------

    def apply(self, bundle: Any, weight: Any = 1.0, *, name: str | None = None, strict: bool = False, reserve_rank: int = 0) -> Any:
        """Check `bundle` (a Bundle, a Blend, or a bundle's path) against this world, then add its adapters with
        `weight` (a number or {glob: w}); returns the `runtime.Applied` record (its storage and slots).

        Every block the bundle touches must have the digest it records; ``strict=True`` also requires
        the world's root digest to match. ``name`` is what `remove`, `set_weight`, `swap` and `run`
        call it: the bundle's own name by default (``author/noir-style``); give another to apply one
        bundle twice. ``reserve_rank`` makes room for LoRA ranks up to it (capped at each layer's
        full rank), so a later `swap` to a larger-rank bundle fits. All or nothing: a failure
        leaves the world as it was.
        """
        from ..runtime import apply

        return apply(self, bundle, weight, name=name, strict=strict, reserve_rank=reserve_rank)

    def remove(self, name: str) -> None:
        """Take an applied bundle off; with nothing applied the base is bit-exact again.

        Its CPU storage is kept for the next apply (at most 256 MiB); ``spare_storage = None`` frees it.
        """
        from ..runtime import remove

        remove(self, name)

    def set_weight(self, name: str, weight: Any) -> None:
        """Change an applied bundle's weight, for all its blocks or per block glob ({glob: w}; the
        first glob matching a block weights it, and blocks no glob matches keep their weight)."""
        from ..runtime import set_weight

        set_weight(self, name, weight)

    def swap(self, name: str, bundle: Any, *, strict: bool = False, check_base: bool = True) -> None:
        """Replace an applied bundle in place by one of the same layout (no allocation, no recompile).

        ``check_base=False`` trusts that the base is unchanged since apply (see `runtime.swap`).
        """
        from ..runtime import swap

        swap(self, name, bundle, strict=strict, check_base=check_base)

    def fuse(self) -> list[str]:
        """Merge every adapter into the base weights; returns slots kept live (tied weights)."""
        from ..runtime import fuse

        return fuse(self)

    def unfuse(self) -> None:
        """Restore the base weights saved by `fuse`, bit-exactly."""
        from ..runtime import unfuse

        unfuse(self)

    def disabled(self) -> Any:
        """Context manager: inside it the world computes as its base alone, as PEFT's
        ``disable_adapter()`` (training adapters and applied bundles left out, untouched)."""
        from ..runtime import disabled

        return disabled(self)

    def run(self, state: dict[str, torch.Tensor], bundles: list[str | None]) -> dict[str, torch.Tensor]:
        """One pass where sample i runs with applied bundle ``bundles[i]`` (None: the base)."""
        from ..runtime import run

        return run(self, state, bundles)

    def routed(self, bundles: list[str | None]) -> Any:
        """Context manager: inside it, sample i of any block's forward uses ``bundles[i]`` only."""
        from ..runtime import routed

        return routed(self, bundles)

    def tree(self) -> str:
        """The hierarchy drawn as text: stages > pipelines > graphs > blocks."""
        from .render import render_tree

        return render_tree(self)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, cycle={self.cycle}"


def _base_only(world: World, path: Any) -> str:
    left = []
    if world.customization is not None:
        config, plan = world.customization
        left.append(f"the adapters being trained ({config.name!r}, {len(plan.slots)} slots; world.save_adapters(file) "
                    "writes a light checkpoint, lwformat.write_bundle(world, dir, name=..., version=...) a bundle)")  # fmt: skip
    if world.applied:
        left.append(f"the applied bundles ({', '.join(world.applied)}; apply them again after World.load)")
    return f"World.save wrote the base world only to {path}, not {' nor '.join(left)}"


def _split_or_missing(path: str) -> tuple[str, str, str, str]:
    parts = path.split("/")
    if len(parts) != 4:
        raise WorldPathError(f"{path!r} is not a block path (expected stage/pipeline/graph/node)", path=path)
    return parts[0], parts[1], parts[2], parts[3]


def _is_adapter_name(name: str) -> bool:
    return ".adapters." in name or name.startswith("adapters.")


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    for _, t in _named_tensors(module):
        yield t
