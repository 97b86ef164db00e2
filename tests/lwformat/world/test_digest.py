"""Digests against an independent re-implementation of the spec's byte rules (hashlib + numpy)."""

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from lwformat import Block, LightConfig, World
from lwformat.errors import CheckpointError
from lwformat.world import block_digest, tensor_digest
from lwformat.world.digest import untouched_digest
from lwformat.zoo import reference_world
from tests.conftest import small_world

NUMPY_NAMES = {np.float32: "F32", np.float64: "F64", np.int64: "I64", np.float16: "F16", np.uint8: "U8"}


def spec_tensor_digest(array: np.ndarray) -> bytes:
    data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    header = f"{NUMPY_NAMES[array.dtype.type]}\0{','.join(str(d) for d in array.shape)}\0".encode()
    return hashlib.sha256(b"lwtensor/1\0" + header + data).digest()


def spec_block_digest(named: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(b"lwblock/1\0")
    for name in sorted(named, key=str.encode):
        h.update(name.encode() + b"\0" + spec_tensor_digest(named[name]))
    return "sha256:" + h.hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8])
def test_tensor_digest_matches_the_byte_rule(dtype):
    t = (torch.arange(24) - 5).reshape(2, 3, 4).to(dtype)
    assert tensor_digest(t) == "sha256:" + spec_tensor_digest(t.numpy()).hex()


def test_tensor_digest_of_a_known_vector():
    # sha256(b"lwtensor/1\0F32\0\x32\0" + float32 [1.0, 2.0] little-endian), computed by hand:
    data = b"lwtensor/1\0F32\x002\0" + np.array([1.0, 2.0], dtype="<f4").tobytes()
    assert tensor_digest(torch.tensor([1.0, 2.0])) == "sha256:" + hashlib.sha256(data).hexdigest()


def test_scalar_and_non_contiguous_tensors():
    assert tensor_digest(torch.tensor(3.0)) == "sha256:" + spec_tensor_digest(np.array(3.0, dtype=np.float32)).hex()
    t = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous view
    assert tensor_digest(t) == "sha256:" + spec_tensor_digest(t.numpy()).hex()


def test_block_digest_matches_spec_and_includes_buffers():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    expected = spec_block_digest({k: v.numpy() for k, v in module.state_dict().items()})
    assert block_digest(module) == expected


def test_digests_ignore_adapters_and_track_base_changes(world):
    before = world.digests()
    root = world.root_digest()
    world.customize(LightConfig(rank=2))
    assert world.digests() == before and world.root_digest() == root
    with torch.no_grad():
        world.block("author/narrate/text/llm").module.fc.base.weight[0, 0] += 1.0
    after = world.digests()
    assert after["author/narrate/text/llm"] != before["author/narrate/text/llm"]
    assert after["author/narrate/text/critic"] == before["author/narrate/text/critic"]
    assert world.root_digest() != root


def test_root_covers_structure_and_extra_tensors():
    a, b = small_world(), small_world()
    assert a.root_digest() == b.root_digest()
    with torch.no_grad():
        b.stages["creator"].style_gain[0] = 2.0
    assert a.digests() == b.digests() and a.root_digest() != b.root_digest()
    c = small_world()
    c.cycle.reverse()
    assert c.root_digest() != a.root_digest()


def test_shared_block_is_hashed_once_under_its_canonical_path(world):
    assert "environment/describe/text/llm" not in world.digests()
    unshared = World.from_blocks({"author/narrate/text/llm": world.block("author/narrate/text/llm")})
    assert unshared.digests()["author/narrate/text/llm"] == world.digests()["author/narrate/text/llm"]


def test_verify_names_the_changed_block(world):
    world.digests()
    with torch.no_grad():
        world.block("author/narrate/text/critic").module.fc.weight.data[0, 0] = 7.0  # .data skips _version
    with pytest.raises(CheckpointError) as err:
        world.verify()
    assert err.value.path == "author/narrate/text/critic"


def test_a_write_past_the_version_counter_is_seen_once_recomputed(world):
    path = "author/narrate/text/critic"
    fc = world.block(path).module.fc
    before = world.digests()[path]
    fc.weight.data[0, 0] += 1.0  # .data has a version counter of its own: the cache cannot tell
    assert world.digests()[path] == before  # the documented limit
    fresh = {p: spec_block_digest({n: t.detach().numpy() for n, t in b.module.state_dict().items()}) for p, b in world.blocks().items()}
    assert world.digests(recompute=True)[path] == fresh[path] != before
    assert world.digests() == world.digests(recompute=True)  # kept
    world.verify()  # the cache now holds the new bytes


def test_a_tensor_on_the_meta_device_is_named_not_hashed(world):
    """A meta tensor holds no data: the digest names it (a bare NotImplementedError before)."""
    from lwformat.errors import WorldError

    path = next(iter(world.blocks()))
    module = world.block(path).module
    owner_name, owner = next((n, m) for n, m in module.named_modules() if n and next(m.parameters(recurse=False), None) is not None)
    owner.to("meta")  # one layer moved to meta: its parameters are replaced by data-less ones
    with pytest.raises(WorldError, match="is on the meta device") as err:
        world.digests()
    assert err.value.path.startswith(f"{path}:{owner_name}.")


def test_verify_keeps_refusing_a_change():
    """verify() kept the digests it recomputed: a second call passed on the change the first refused."""
    path = "author/narrate/text/critic"
    world = small_world()
    world.digests()
    world.block(path).module.fc.weight.data[0, 0] += 1.0  # .data skips _version: only verify sees it
    for call in (lambda: None, world.digests, world.root_digest):  # nor do digests() or root_digest() take it in
        call()
        with pytest.raises(CheckpointError) as err:
            world.verify()
        assert err.value.path == path
    before = world.digests()[path]
    world.digests(recompute=True)
    world.verify()
    assert world.digests()[path] != before


def test_verify_passes_a_write_the_version_counter_saw():
    """An ordinary in-place write is a change digests() reports at once: verify() agrees with it."""
    path = "author/narrate/text/critic"
    world = small_world()
    before = world.digests()[path]
    with torch.no_grad():
        world.block(path).module.fc.weight[0, 0] += 1.0
    world.verify()
    assert world.digests()[path] != before


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint16, torch.uint32])
def test_a_dtype_the_spec_does_not_name_is_a_typed_error(dtype):
    """digests() raised a bare KeyError(torch.dtype), naming neither the block nor the tensor."""
    from lwformat.errors import WorldError

    module = nn.Linear(2, 2)
    module.register_buffer("table", torch.zeros(3, dtype=dtype))
    world = World.from_blocks({"s/p/g/n": Block(module, "backbone")})
    with pytest.raises(WorldError, match=str(dtype)) as err:
        world.digests()
    assert err.value.path == "s/p/g/n:table"


def test_the_root_covers_the_order_that_runs():
    """Worlds running the same blocks in another order (nodes of a sequential graph, graphs of a
    pipeline) computed otherwise under the same root: the structure's node map is sorted."""
    torch.manual_seed(0)
    a, b = Block(nn.Linear(4, 4), "x"), Block(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "x")
    for first, second in (("s/p/g/a", "s/p/g/b"), ("s/p/g1/n", "s/p/g2/n")):
        one = World.from_blocks({first: a, second: b})
        other = World.from_blocks({second: b, first: a})
        x = torch.randn(2, 4)
        assert not torch.equal(one({"x": x})["x"], other({"x": x})["x"])
        assert one.root_digest() != other.root_digest()
        assert one.digests() == other.digests()


def test_the_swap_check_sees_a_weight_transposed_through_data():
    """`.data = .data.t()` on a square weight keeps its object, address, version, dtype and shape."""
    world = reference_world("tiny", seed=0)
    path = "author/narrate/text/llm"
    world.digest(path)
    proj = world.block(path).module.blocks[0].attn.proj
    assert untouched_digest(world, path) is not None
    proj.weight.data = proj.weight.data.t()
    assert untouched_digest(world, path) is None
