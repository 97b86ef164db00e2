"""The digest definitions of spec section 6, re-implemented here with hashlib and numpy only.

The committed spec/vectors/digests.json must match both this independent version and
`lwformat.world.digest` on the tiny world.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from lwformat.world.digest import tensor_digest

from tests.lwformat.bundle.tiny import BACKBONE, LLM, VECTORS, tiny_custom_world, tiny_world

NUMPY = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "BOOL": "?"}


def tensor_digest_raw(dtype: str, shape: list[int], data: bytes) -> bytes:
    h = hashlib.sha256(b"lwtensor/1\0" + dtype.encode() + b"\0" + ",".join(map(str, shape)).encode() + b"\0")
    h.update(data)
    return h.digest()


def block_digest_raw(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    h = hashlib.sha256(b"lwblock/1\0")
    for name in sorted(tensors, key=str.encode):
        h.update(name.encode() + b"\0" + tensor_digest_raw(*tensors[name]))
    return h.digest()


def le_bytes(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """(dtype, shape, bytes) of a tensor, its bytes through numpy in explicit little-endian order."""
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the top 16 bits of the float32 pattern
        bits = t.float().numpy().astype("<f4").view("<u4") >> 16
        return "BF16", list(t.shape), bits.astype("<u2").tobytes()
    name = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.bool: "BOOL"}[t.dtype]
    return name, list(t.shape), np.ascontiguousarray(t.numpy()).astype(NUMPY[name]).tobytes()


def load() -> dict:
    return json.loads((VECTORS / "digests.json").read_text())


def test_tensor_vectors():
    for name, v in load()["tensors"].items():
        raw = bytes.fromhex(v["bytes"])
        assert "sha256:" + tensor_digest_raw(v["dtype"], v["shape"], raw).hex() == v["digest"], name
        if v["dtype"] in NUMPY:  # the stored bytes are the tensor's little-endian bytes
            t = torch.from_numpy(np.frombuffer(raw, dtype=NUMPY[v["dtype"]]).reshape(v["shape"]).copy())
            assert tensor_digest(t) == v["digest"], name


def test_block_vector():
    vectors = load()
    tensors = {n: (vectors["tensors"][n]["dtype"], vectors["tensors"][n]["shape"],
                   bytes.fromhex(vectors["tensors"][n]["bytes"])) for n in vectors["block"]["tensors"]}  # fmt: skip
    assert "sha256:" + block_digest_raw(tensors).hex() == vectors["block"]["digest"]


def _independent_world_digests(world) -> tuple[str, dict[str, str]]:
    blocks = {}
    for path in (LLM, BACKBONE):
        module = world.block(path).module
        blocks[path] = block_digest_raw({n: le_bytes(t.detach()) for n, t in module.state_dict().items()})
    structure = {  # the tiny world's structure, written out by hand
        "cycle": ["author", "creator"],
        "order": [LLM, BACKBONE],
        "nodes": {
            LLM: {"type": "llm", "canonical": LLM, "flow": "sequential"},
            BACKBONE: {"type": "backbone", "canonical": BACKBONE, "flow": "sequential"},
        },
        "extra": {},
    }
    text = json.dumps(structure, sort_keys=True, separators=(",", ":")).encode()
    h = hashlib.sha256(b"lwworld/1\0" + hashlib.sha256(text).digest())
    for path in sorted(blocks, key=str.encode):
        h.update(path.encode() + b"\0" + blocks[path])
    return "sha256:" + h.hexdigest(), {p: "sha256:" + d.hex() for p, d in blocks.items()}


def test_world_vector_matches_independent_and_implementation():
    committed = load()["tiny_world"]
    world = tiny_world()
    root, blocks = _independent_world_digests(world)
    assert (root, blocks) == (committed["root"], committed["blocks"])
    assert (world.root_digest(), world.digests()) == (root, blocks)


def test_customizing_does_not_change_the_digests():
    custom = tiny_custom_world()
    root, blocks = _independent_world_digests(tiny_world())
    assert (custom.root_digest(), custom.digests()) == (root, blocks)
