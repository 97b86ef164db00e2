"""Content identity of a base world (spec/lwbundle-v1.md, "Digests").

    tensor digest = sha256("lwtensor/1\\0" || dtype || "\\0" || shape || "\\0" || bytes)
        dtype: the safetensors name (F32, BF16, ...); shape: decimal sizes joined by ","
        ("" for a scalar); bytes: the C-contiguous little-endian data.
    block digest  = sha256("lwblock/1\\0" || for each tensor, names sorted by UTF-8 bytes:
                           name || "\\0" || raw 32-byte tensor digest)
    world root    = sha256("lwworld/1\\0" || raw structure digest ||
                           for each canonical block path, sorted: path || "\\0" || raw block digest)
    structure     = sha256 of the canonical JSON (sorted keys, no whitespace) of
                    {"cycle": [...], "order": [every block path, in the world's order],
                     "nodes": {path: {"type": t, "canonical": c, "flow": f}},
                     "extra": tensor digest map of tensors held above the block level}

Digests print as ``sha256:<64 hex>``. Adapters never take part: a block's tensors are
its base tensors under their original names, so customizing does not change a digest.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import TYPE_CHECKING, Any

import msgspec
import torch
from torch import nn

from ..errors import CheckpointError, WorldError

if TYPE_CHECKING:
    from .tree import World

PREFIX = "sha256:"
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def dtype_name(dtype: torch.dtype, where: str = "") -> str:
    """The safetensors name of `dtype`; `where` names the tensor when the spec has none for it."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise WorldError(
            f"{where or 'a tensor'}: dtype {dtype} has no name in the spec, so it cannot be hashed or stored "
            f"(supported: {', '.join(map(str, DTYPE_NAMES))})",
            path=where or None,
        ) from None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy when it is already contiguous on CPU."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    return memoryview(flat.view(torch.uint8).numpy())  # (numel * itemsize,)


def tensor_digest_raw(t: torch.Tensor, where: str = "") -> bytes:
    if t.is_meta:
        raise WorldError(f"{where or 'a tensor'} is on the meta device: it holds no data to hash (load its weights first)", path=where or None)
    h = hashlib.sha256(b"lwtensor/1\0")
    h.update(f"{dtype_name(t.dtype, where)}\0{','.join(map(str, t.shape))}\0".encode())
    h.update(tensor_bytes(t))
    return h.digest()


def tensor_digest(t: torch.Tensor, where: str = "") -> str:
    return PREFIX + tensor_digest_raw(t, where).hex()


def base_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The module's persistent tensors as `state_dict` names them, seen through adapter hosts."""
    if getattr(type(module), "is_adapter_host", False):  # on the class: no Module.__getattr__ miss
        return base_tensors(module.base, prefix)
    out = {prefix + n: p for n, p in module._parameters.items() if p is not None}
    out.update(
        (prefix + n, b)
        for n, b in module._buffers.items()
        if b is not None and n not in module._non_persistent_buffers_set
    )
    for name, child in module._modules.items():
        if child is not None:
            out.update(base_tensors(child, f"{prefix}{name}."))
    return out


def block_digest_raw(tensors: dict[str, torch.Tensor], where: str = "") -> bytes:
    """`where`, the block's path, names a tensor that cannot be hashed (`block/path:name`)."""
    h = hashlib.sha256(b"lwblock/1\0")
    for name in sorted(tensors, key=lambda n: n.encode()):
        h.update(name.encode() + b"\0" + tensor_digest_raw(tensors[name], f"{where}:{name}" if where else name))
    return h.digest()


def block_digest(module: nn.Module) -> str:
    """Digest of one block's base tensors (any module, customized or not)."""
    return PREFIX + block_digest_raw(base_tensors(module)).hex()


Seat = tuple[nn.Module, bool, str, torch.Tensor]  # (owner, is a parameter, name in the owner, tensor)


def _walk_base(module: nn.Module) -> list[Seat]:
    """Every base tensor of `module` (hosts seen through) with where it sits, in `base_tensors` order."""
    out: list[Seat] = []
    add = out.append
    stack = [module]
    while stack:  # plain loops, no generators: this runs on every apply
        m = stack.pop()
        if m is None:
            continue
        if getattr(type(m), "is_adapter_host", False):
            stack.append(m.base)
            continue
        for n, t in m._parameters.items():
            if t is not None:
                add((m, True, n, t))
        if m._buffers:
            skip = m._non_persistent_buffers_set
            for n, t in m._buffers.items():
                if t is not None and n not in skip:
                    add((m, False, n, t))
        stack.extend(reversed(m._modules.values()))
    return out


def _fingerprint(seats: list[Seat]) -> tuple:
    """The identity, version and shape of every base tensor, in `base_tensors` order.

    In-place writes bump a tensor's ``_version``, and replacing or moving a tensor changes
    the sequence, so the fingerprint changes whenever the block's digest may have, except
    after writes that bypass the version counter (through ``.data``, a NumPy view or
    another tensor on the same storage): ``World.digests(recompute=True)`` is for those.
    It is much cheaper than `base_tensors` (no names built), which matters on every apply.
    """
    return tuple([(t.data_ptr(), t._version, t.dtype, t.shape, t.stride()) for _, _, _, t in seats])


def record(module: nn.Module, said: str) -> tuple:
    """A per-block record, ``(fingerprint, what it says, seats)``: the block's tensors as they are
    now, and each one held weakly, so that a new tensor at a freed one's address is not it."""
    walked = _walk_base(module)
    return _fingerprint(walked), said, _weakly(walked)


def holds(hit: tuple | None, module: nn.Module) -> bool:
    """Whether record `hit` still describes `module`'s tensors: a walk (modules replaced, added or
    moved are seen), the same fingerprint, and the very tensor objects it recorded."""
    if hit is None:
        return False
    key, _, seats = hit
    walked = _walk_base(module)
    if _fingerprint(walked) != key:
        return False
    return all(ref() is t for (_, _, _, ref), (_, _, _, t) in zip(seats, walked))


def _weakly(seats: list[Seat]) -> tuple:
    owners: dict[int, weakref.ref] = {}
    return tuple([(owners.setdefault(id(m), weakref.ref(m)), p, n, weakref.ref(t)) for m, p, n, t in seats])


def structure(world: World) -> dict[str, Any]:
    canonical = world.block_paths()
    flows = {
        f"{s}/{p}/{g}": graph.flow
        for s, stage in world.stages.items()
        for p, pipe in stage.pipelines.items()
        for g, graph in pipe.graphs.items()
    }
    return {
        "cycle": list(world.cycle),
        # the keys of "nodes" are sorted when encoded, yet the order runs: a sequential graph
        # feeds its nodes in turn, a pipeline its graphs, a stage its pipelines
        "order": [path for path, _ in world.walk()],
        "nodes": {
            path: {"type": block.block_type, "canonical": canonical[path], "flow": flows[path.rsplit("/", 1)[0]]}
            for path, block in world.walk()
        },
        "extra": {name: tensor_digest(t, name) for name, t in sorted(world.extra_tensors().items())},
    }


def cached_block_digest(world: World, path: str, block: nn.Module, *, recompute: bool = False) -> str:
    """One block's digest, from the world's cache unless one of its base tensors changed since."""
    hit = world._digest_cache.get(path)
    if recompute or not holds(hit, block.module):
        hit = record(block.module, PREFIX + block_digest_raw(base_tensors(block.module), path).hex())
        world._digest_cache[path] = hit
    return hit[1]


def untouched_digest(world: World, path: str) -> str | None:
    """Block `path`'s digest from the last full check, if none of its tensors changed since.

    Each tensor recorded (weakly, by the full check) is checked where it sat,
    without walking the modules: a tensor written in place, replaced, resized or dropped
    is seen; modules added, removed or moved since are not, and the next full check
    (`cached_block_digest`) sees them. None when unknown or changed.
    """
    return untouched(world._digest_cache, world, path)


def untouched(records: dict[str, Any], world: World, path: str) -> str | None:
    """The digest `records` holds for `path` (a ``(fingerprint, digest, seats)`` entry) while the
    block's tensors are as fingerprinted: `untouched_digest` for any such record."""
    hit = records.get(path)
    if hit is None:
        return None
    key, digest, seats = hit
    for (owner_ref, is_param, name, tensor_ref), (ptr, version, dtype, shape, stride) in zip(seats, key):
        owner, t = owner_ref(), tensor_ref()
        if owner is None or t is None or (owner._parameters if is_param else owner._buffers).get(name) is not t:
            return None
        if t._version != version or t.data_ptr() != ptr or t.dtype != dtype or t.shape != shape or t.stride() != stride:
            return None
    return digest


def world_digests(world: World, *, recompute: bool = False) -> dict[str, Any]:
    """``{"root": digest, "blocks": {canonical path: digest}}``, reusing cached block digests."""
    blocks = {path: cached_block_digest(world, path, block, recompute=recompute) for path, block in world.blocks().items()}
    return {"root": root_of(world, blocks), "blocks": blocks}


def root_of(world: World, blocks: dict[str, str]) -> str:
    """The root of `world`'s structure over the block digests given (its own, or those it was cast from)."""
    h = hashlib.sha256(b"lwworld/1\0")
    h.update(hashlib.sha256(msgspec.json.encode(structure(world), order="sorted")).digest())
    for path in sorted(blocks, key=lambda p: p.encode()):
        h.update(path.encode() + b"\0" + bytes.fromhex(blocks[path].removeprefix(PREFIX)))
    return PREFIX + h.hexdigest()


def seed_cache(world: World, blocks: dict[str, str]) -> None:
    """Trust digests read from a checkpoint for the tensors just loaded from it."""
    for path, block in world.blocks().items():
        if path in blocks:
            world._digest_cache[path] = record(block.module, blocks[path])


def held_records(world: World, paths) -> dict[str, list[tuple[dict, str]]]:
    """For each block of `paths`, the per-block records that hold now (the digest cache, the
    cast record) with what they say: what `carry_records` puts back after a bit-exact restore."""
    records = [world._digest_cache] + ([world.cast_record.blocks] if world.cast_record is not None else [])
    held = {}
    for path in paths:
        module = world.block(path).module
        if hits := [(r, r[path][1]) for r in records if path in r and holds(r[path], module)]:
            held[path] = hits
    return held


def carry_records(world: World, held: dict[str, list[tuple[dict, str]]]) -> None:
    """Record again what `held` said, for blocks just restored bit-exactly to the content they had
    when it was taken (`fuse` then `unfuse`): the restore bumped their tensors' version counters."""
    for path, hits in held.items():
        module = world.block(path).module
        for records, said in hits:
            records[path] = record(module, said)


def follow_move(records: dict[str, Any], world: World) -> None:
    """Fingerprint `records` (``path -> (fingerprint, digest, seats)``) again after the caller moved
    every block to another device: same content, other storage. Only right after such a move."""
    blocks = world.blocks()
    for path, (_, digest, _) in list(records.items()):
        records[path] = record(blocks[path].module, digest)


def verify_world(world: World, expected: dict[str, str] | None = None) -> None:
    """Recompute every block digest; raise naming the first block that differs from `expected`.

    By default `expected` is what `digests()` answers now: a write the version counters saw
    is a change the world knows of, and only writes that bypass them are caught. The digests
    recomputed here are not kept: were they, a second check would pass on the very change
    the first one refused.
    """
    blocks = world.blocks()
    if expected is None:  # a block never hashed, or changed visibly, is what digests() would hash now: nothing to compare
        cache = world._digest_cache
        expected = {path: cache[path][1] for path, block in blocks.items()
                    if path in cache and holds(cache[path], block.module)}  # fmt: skip
    for path, digest in expected.items():
        block = blocks.get(path)
        found = None if block is None else PREFIX + block_digest_raw(base_tensors(block.module), path).hex()
        if found != digest:
            raise CheckpointError(f"block {path}: digest {found} does not match the recorded {digest}", path=path)
