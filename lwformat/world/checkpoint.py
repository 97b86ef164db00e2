"""Save and load a world as a directory: config, safetensors weights, cached digests.

    world.json          the config (canonical JSON), enough to rebuild every block
    weights.safetensors "<canonical block path>:<tensor name>", every tensor in a block
    digests.json        {"root", "blocks"} so loading need not rehash the weights

A tensor tied to another inside a block (an LM head sharing its embedding) is stored
once; the rebuilt block re-ties it. A world holding tensors above the block level is not
saved: world.json cannot rebuild them, so it would not load. Writes go to a temporary
sibling directory that replaces the target only when complete, and only where the target
is absent, an empty directory or a saved world (it holds world.json).

A world cast with `World.cast` is saved as it is: its cast weights and their own digests.
What it was cast from is not saved, so the saved world binds bundles to its cast digests;
loading it builds each floating-point tensor in the dtype stored. ``load(dtype=...)``
casts after loading, with the stored digests as what the blocks were cast from.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, FusedError, WorldConfigError
from . import config as cfg
from .cast import cast_world, check_dtype, converted, replace_tensors
from .digest import base_tensors, follow_move, seed_cache, verify_world, world_digests

if TYPE_CHECKING:
    from .tree import World

CONFIG, WEIGHTS, DIGESTS = "world.json", "weights.safetensors", "digests.json"
SAVED = (CONFIG, WEIGHTS, DIGESTS)  # all a saved world directory holds


Digest = Annotated[str, msgspec.Meta(pattern="^sha256:[0-9a-f]{64}$")]


class Digests(msgspec.Struct, forbid_unknown_fields=False):
    root: Digest
    blocks: dict[str, Digest]
    # /2: the root covers the order the blocks run in. A /1 root (from before) is not compared;
    # its block digests, computed the same way, still are.
    format: str = "lwdigests/2"


DIGEST_FORMATS = ("lwdigests/1", "lwdigests/2")


def spec_of(world: World) -> cfg.WorldSpec:
    """The config that rebuilds `world`, read from its tree (so the two never disagree)."""
    canonical = world.block_paths()
    stages: dict[str, cfg.StageSpec] = {}
    for s, stage in world.stages.items():
        pipelines = {}
        for p, pipe in stage.pipelines.items():
            graphs = {}
            for g, graph in pipe.graphs.items():
                nodes = {}
                for n, block in graph.nodes.items():
                    path = f"{s}/{p}/{g}/{n}"
                    if canonical[path] != path:
                        nodes[n] = cfg.NodeSpec(ref=canonical[path])
                    elif block.impl is None:
                        raise WorldConfigError(
                            f"{path}: block was built from a module, not a registered implementation, "
                            "so it cannot be rebuilt on load; register it with register_block",
                            path=path,
                        )
                    else:
                        slots = list(block.declared_slots) if block.declared_slots is not None else None
                        nodes[n] = cfg.NodeSpec(block=block.impl, config=block.config, slots=slots)
                graphs[g] = cfg.GraphSpec(nodes=nodes, flow=graph.flow)
            pipelines[p] = cfg.PipelineSpec(graphs=graphs)
        stages[s] = cfg.StageSpec(pipelines=pipelines)
    return cfg.WorldSpec(stages=stages, name=world.name, cycle=list(world.cycle))


def weights_of(world: World) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path, block in world.blocks().items():
        seen: set[int] = set()
        for name, t in base_tensors(block.module).items():
            if id(t) not in seen:  # tied tensors are stored once
                seen.add(id(t))
                out[f"{path}:{name}"] = t.detach().contiguous()
    return out


def save_world(world: World, path: str | os.PathLike) -> None:
    if world.fused_state is not None:  # its weights hold the adapters' deltas: not the base
        raise FusedError("cannot save a fused world as a base; call unfuse() first")
    target = Path(os.path.abspath(path))  # "." and ".." have no name to stage beside
    spec = spec_of(world)
    extra = next(iter(world.extra_tensors()), None)
    if extra is not None:
        raise WorldConfigError(
            f"{extra}: a tensor held above the block level; {CONFIG} cannot rebuild it, so the saved world "
            "would not load (hold it in a block)",
            path=extra,
        )
    digests = world_digests(world)
    if target.is_symlink():  # replacing it would put a directory where the link was, not save where it points
        raise CheckpointError(f"{target}: a symbolic link; save to the directory it names", path=str(target))
    real, cwd = target.resolve(), Path.cwd()  # cwd is the physical path: compare through links
    if target.exists() and (real == cwd or real in cwd.parents):
        raise CheckpointError(f"{target}: the current directory or one above it; the save replaces the directory "
                              "whole, which would leave this process in a deleted one", path=str(target))  # fmt: skip
    if not _replaceable(target):
        raise CheckpointError(
            f"{target}: exists and is neither empty nor a saved world (only {', '.join(SAVED)}); not replacing it",
            path=str(target),
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / CONFIG).write_bytes(cfg.encode(spec))
        save_file(weights_of(world), str(tmp / WEIGHTS), metadata={"format": "lwworld/1"})
        (tmp / DIGESTS).write_bytes(msgspec.json.encode(Digests(**digests), order="sorted"))
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replaceable(target: Path) -> bool:
    """Absent, an empty directory or a saved world: replacing anything else would delete the user's files
    (a project directory may hold a hand-written world.json config beside them)."""
    if not target.exists():
        return True
    if not target.is_dir():
        return False
    names = {entry.name for entry in target.iterdir()}
    return not names or {CONFIG, WEIGHTS} <= names <= set(SAVED)


def _replace_dir(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def load_world(path: str | os.PathLike, *, device=None, verify: bool = False, dtype: torch.dtype | None = None) -> World:
    from .tree import World

    if dtype is not None:
        check_dtype(dtype)  # before the work of loading
    root = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (root / name).is_file():
            raise CheckpointError(f"{root}: missing {name}; not a saved world", path=str(root / name))
    with torch.random.fork_rng(devices=[]):  # the layers' initial values are overwritten: leave the caller's generator alone
        world = World.from_spec(cfg.read(root / CONFIG))
    try:
        stored = load_file(str(root / WEIGHTS))
    except SafetensorError as exc:
        raise CheckpointError(f"{root / WEIGHTS}: unreadable safetensors file: {exc}", path=str(root)) from exc
    _copy_into(world, stored, root)
    del stored  # before the cast makes its copies
    recorded = _recorded(root / DIGESTS, verify)
    if recorded is not None and verify:
        _verify(world, recorded, root / DIGESTS)
    elif recorded is not None:
        seed_cache(world, recorded.blocks)
    if dtype is not None:  # on the CPU, before the move: the device need not hold the wider copy
        cast_world(world, dtype)
    if device is not None:
        world.to(device)
        follow_move(world._digest_cache, world)  # the same content, moved: the digests hold
        if world.cast_record is not None:
            follow_move(world.cast_record.blocks, world)
    return world


def _recorded(digests_file: Path, verify: bool) -> Digests | None:
    """The checkpoint's digests; None when the file is missing and `verify` does not need it."""
    if not digests_file.is_file():
        if verify:
            raise CheckpointError(f"{digests_file}: missing; nothing to verify the world against", path=str(digests_file))
        return None
    try:
        recorded = msgspec.json.decode(digests_file.read_bytes(), type=Digests)
    except msgspec.DecodeError as exc:  # ValidationError too
        raise CheckpointError(f"{digests_file}: unreadable digests: {exc}", path=str(digests_file)) from exc
    if recorded.format not in DIGEST_FORMATS:
        raise CheckpointError(f"{digests_file}: format {recorded.format!r}, this version reads {', '.join(DIGEST_FORMATS)}",
                              path=str(digests_file))  # fmt: skip
    return recorded


def _verify(world: World, recorded: Digests, digests_file: Path) -> None:
    """Every block digest recomputed, for exactly the world's blocks, and the root they make as recorded."""
    _same_keys(world.blocks(), recorded.blocks, f"{digests_file}: records other blocks than the world's")
    verify_world(world, recorded.blocks)
    seed_cache(world, recorded.blocks)  # verified: the root below need not hash the blocks again
    if recorded.format == "lwdigests/1":  # its root was made without the order: not comparable
        return
    found = world_digests(world)["root"]
    if found != recorded.root:  # the blocks match: the structure differs
        raise CheckpointError(
            f"{digests_file}: root {found} does not match the recorded {recorded.root} ({CONFIG} changed)",
            path=str(digests_file),
        )


def _same_keys(expected, found, what: str) -> None:
    """Refuse `found` unless it has exactly the keys of `expected`, naming the first difference."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise CheckpointError(f"{what}: {len(missing)} missing, {len(unexpected)} unexpected (first: {first})", path=first)


@torch.no_grad()
def _copy_into(world: World, stored: dict[str, torch.Tensor], root: Path) -> None:
    _same_keys(weights_of(world), stored, f"{root / WEIGHTS}: weights do not fit the config")
    live = _live_tensors(world)
    # A world saved after a cast holds its weights in that dtype; world.json builds the default one
    adopt = {id(t): stored[key].dtype for key, t in live.items()
             if key in stored and t.is_floating_point() and stored[key].is_floating_point()}  # fmt: skip
    replace_tensors(world, converted(world.blocks(), lambda t: adopt.get(id(t), t.dtype)))
    live = _live_tensors(world)
    for key, value in stored.items():
        target = live[key]
        if target.shape != value.shape or target.dtype != value.dtype:
            raise CheckpointError(
                f"{key}: stored {value.dtype} {tuple(value.shape)}, config builds "
                f"{target.dtype} {tuple(target.shape)}",
                path=key,
            )
        target.copy_(value)


def _live_tensors(world: World) -> dict[str, torch.Tensor]:
    out = {f"{p}:{n}": t for p, b in world.blocks().items() for n, t in base_tensors(b.module).items()}
    return out
