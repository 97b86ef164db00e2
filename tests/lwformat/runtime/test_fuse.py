import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from lwformat import Block, LightConfig, World
from lwformat.adapters.plan import iter_hosts
from lwformat.bundle.read import Bundle
from lwformat.bundle.write import write_bundle
from lwformat.errors import FusedError
from lwformat.world.digest import block_digest, untouched_digest
from tests.conftest import small_world
from tests.lwformat.runtime.conftest import LM, tokens


def world_out(world, x):
    with torch.no_grad():
        return world({"tokens": x})


def test_fuse_matches_unfused_and_unfuse_is_bit_exact(world, bundles):
    x = tokens()
    world.apply(bundles["noir"], weight=0.7)
    world.apply(bundles["creator"], weight=0.5)
    unfused = world_out(world, x)
    base_weights = {k: v.clone() for k, v in world.state_dict().items()}
    live = world.fuse()
    assert live == [f"{LM}:tok", f"{LM}:head"]  # tied to each other: fusing would leak
    fused = world_out(world, x)
    for key in ("author.logits", "creator.image"):
        torch.testing.assert_close(fused[key], unfused[key], rtol=1e-4, atol=1e-5)
    world.unfuse()
    assert all(torch.equal(world.state_dict()[k], v) for k, v in base_weights.items())
    assert all(torch.equal(world_out(world, x)[k], unfused[k]) for k in unfused)


def test_changes_while_fused_are_refused(world, bundles):
    world.apply(bundles["noir"])
    world.fuse()
    for action in (
        lambda: world.apply(bundles["rain"]),
        lambda: world.set_weight("author/noir", 0.1),
        lambda: world.swap("author/noir", bundles["noir2"]),
        lambda: world.remove("author/noir"),
        lambda: world.run({"tokens": tokens()}, ["author/noir"] * 3),
        world.fuse,
    ):
        with pytest.raises(FusedError):
            action()
    world.unfuse()
    with pytest.raises(FusedError, match="not fused"):
        world.unfuse()


def test_bias_adapter_on_a_layer_without_bias_cannot_fuse(tmp_path):
    trained = small_world()
    trained.customize(LightConfig(kind="bias", blocks=["author/narrate/text/llm"], slots=["fc", "head"]))
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)  # fc's shift is fused first, then head fails: fc must be undone
    write_bundle(trained, tmp_path / "shift", name="author/shift", version="1.0.0")
    world = small_world()
    world.apply(Bundle.open(tmp_path / "shift"))
    weights = {k: v.clone() for k, v in world.state_dict().items()}
    with pytest.raises(FusedError) as err:
        world.fuse()
    assert err.value.path == "author/narrate/text/llm:head"  # nn.Linear(bias=False)
    assert world.fused_state is None
    assert all(torch.equal(world.state_dict()[k], v) for k, v in weights.items())
    assert not any(host.fused for _, host in iter_hosts(world))


def test_fuse_and_unfuse_a_bfloat16_world(tmp_path):
    """Sums are taken in float32 and rounded once into the bfloat16 weights; unfuse restores them bit-exactly."""
    trained = small_world().to(torch.bfloat16)
    trained.customize(LightConfig(rank=4, blocks=["author/narrate/text/llm"], slots=["fc", "seq"]))
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    write_bundle(trained, tmp_path / "b16", name="author/b16", version="1.0.0")
    world = small_world().to(torch.bfloat16)
    weights = {k: v.clone() for k, v in world.state_dict().items()}
    world.apply(Bundle.open(tmp_path / "b16"), weight=0.5)
    fc = world.block(LM).module.fc
    expected = (fc.base.weight.float() + 0.5 * fc.adapters["author/b16"].delta_weight(fc.base)[0].float()).bfloat16()
    world.fuse()
    assert fc.base.weight.dtype == torch.bfloat16 and torch.equal(fc.base.weight, expected)
    world.unfuse()
    world.remove("author/b16")
    assert all(torch.equal(world.state_dict()[k], v) for k, v in weights.items())


def shared_world() -> World:
    """A bias shared by two layers of one block, and a weight shared by two blocks."""
    torch.manual_seed(0)
    text = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    image = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    text[1].bias = text[0].bias
    image[0].weight = text[3].weight
    return World.from_blocks({LM: Block(text, "llm"), "creator/render/t2i/backbone": Block(image, "backbone")})


@pytest.mark.parametrize("kind", ["lora", "ia3", "dora"])
def test_layers_sharing_a_weight_or_bias_stay_live(tmp_path, kind):
    trained = shared_world()
    trained.customize(LightConfig(kind=kind, rank=2, blocks=["**"], slots=["*"]))
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    write_bundle(trained, tmp_path / "b", name="author/shared", version="1.0.0")
    world = shared_world()
    weights = {k: v.clone() for k, v in world.state_dict().items()}
    world.apply(Bundle.open(tmp_path / "b"), weight=0.7)
    x = torch.randn(3, 8)
    blocks = [world.block(path).module for path in (LM, "creator/render/t2i/backbone")]
    with torch.no_grad():
        unfused = [block(x) for block in blocks]
        live = world.fuse()
        fused = [block(x) for block in blocks]
    assert sorted(live) == sorted([f"{LM}:0", f"{LM}:1", f"{LM}:3", "creator/render/t2i/backbone:0"])
    assert [slot for slot in world.fused_state] == [f"{LM}:2", "creator/render/t2i/backbone:1"]
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    world.unfuse()
    world.remove("author/shared")
    assert all(torch.equal(world.state_dict()[k], v) for k, v in weights.items())


def test_a_float64_world_fuses_in_float64(tmp_path):
    trained = small_world().double()
    trained.customize(LightConfig(rank=4, blocks=[LM], slots=["fc"]))
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    write_bundle(trained, tmp_path / "f64", name="author/f64", version="1.0.0")
    world = small_world().double()
    world.apply(Bundle.open(tmp_path / "f64"), weight=0.3)
    fc = world.block(LM).module.fc
    expected = fc.base.weight + 0.3 * fc.adapters["author/f64"].delta_weight(fc.base)[0]  # all float64
    world.fuse()
    assert fc.base.weight.dtype == torch.float64 and torch.equal(fc.base.weight, expected)


def storage_tied_world(tie: str) -> World:
    """Layer 2's weight a distinct Parameter on layer 0's memory (all of it, or some rows, through the
    same storage or through a second one over the same numpy array), or on rows of one buffer that
    layer 0's weight does not use (disjoint: nothing shared)."""
    torch.manual_seed(0)
    text = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4 if tie != "copy" else 8))
    array = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    if tie == "copy":
        text[2].weight = nn.Parameter(text[0].weight.detach())  # (8, 8) the same bytes
    elif tie == "rows":
        text[2].weight = nn.Parameter(text[0].weight.detach()[2:6])  # (4, 8) a view of rows 2..5
    elif tie == "numpy-rows":  # two storages, one memory: each from_numpy wraps its own
        text[0].weight = nn.Parameter(torch.from_numpy(array[:8]))  # (8, 8)
        text[2].weight = nn.Parameter(torch.from_numpy(array[2:6]))  # (4, 8) rows 2..5 of the same bytes
    elif tie == "numpy-disjoint":
        text[0].weight = nn.Parameter(torch.from_numpy(array[:8]))  # (8, 8)
        text[2].weight = nn.Parameter(torch.from_numpy(array[8:]))  # (4, 8) the rows after them
    else:
        flat = torch.randn(12, 8)
        text[0].weight, text[2].weight = nn.Parameter(flat[:8]), nn.Parameter(flat[8:])  # (8, 8), (4, 8) one storage
    return World.from_blocks({LM: Block(text, "llm")})


@pytest.mark.parametrize("tie", ["copy", "rows", "numpy-rows", "disjoint", "numpy-disjoint"])
def test_layers_sharing_a_weights_memory_through_distinct_parameters_stay_live(tmp_path, tie):
    """Sharing was seen by Parameter identity only: a Parameter made from another's detached
    weight (or a view of it) was fused, and its delta leaked into the other layer. Then by
    storage: two storages over one memory (numpy-rows) were never compared."""
    trained = storage_tied_world(tie)
    trained.customize(LightConfig(kind="lora", rank=2, slots=["0"]))  # layer 0 only
    for p in trained.adapter_parameters():
        torch.nn.init.normal_(p, std=0.3)
    write_bundle(trained, tmp_path / "b", name="author/tied", version="1.0.0")
    world = storage_tied_world(tie)
    weights = {k: v.clone() for k, v in world.state_dict().items()}
    world.apply(Bundle.open(tmp_path / "b"))
    x = torch.randn(3, 8)
    block = world.block(LM).module
    with torch.no_grad():
        unfused = block(x)
        live = world.fuse()
        fused = block(x)
    assert live == ([] if tie.endswith("disjoint") else [f"{LM}:0"])
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    world.unfuse()
    world.remove("author/tied")
    assert all(torch.equal(world.state_dict()[k], v) for k, v in weights.items())


def test_unfuse_keeps_the_digests_known_before_fuse(world, bundles):
    """The restore is bit-exact, yet it bumped the version counters, so the next apply hashed every fused block again."""
    before = world.digests()
    world.apply(bundles["noir"], weight=0.7)
    world.fuse()
    assert world.digests()[LM] != before[LM]  # fused: the weights hold the deltas
    world.unfuse()
    assert untouched_digest(world, LM) == before[LM]  # known again without hashing
    world.verify()  # and true


def test_unfuse_carries_over_only_records_that_still_held_when_fuse_began(world, bundles):
    """A buffer added to the block before fuse was missed by the check that fuse used (it does not
    walk the modules), and unfuse recorded the old digest as holding for the changed block."""
    world.apply(bundles["noir"], weight=0.7)
    stale = world.digest(LM)
    lm = world.block(LM).module
    lm.ln_f.register_buffer("calib", torch.full((lm.ln_f.weight.shape[0],), 2.0))
    world.fuse()
    world.unfuse()
    assert world.digest(LM) != stale and world.digest(LM) == block_digest(lm)


def test_recomputed_digests_while_fused_are_not_undone_by_unfuse(world, bundles):
    world.apply(bundles["noir"], weight=0.7)
    world.digest(LM)
    lm = world.block(LM).module
    with torch.no_grad():
        lm.ln_f.weight.data.add_(1)  # behind the version counter: the cached digest goes stale
    world.fuse()
    world.digests(recompute=True)  # what is done after such a write
    world.unfuse()
    assert world.digest(LM) == block_digest(lm)
    world.verify()


def test_a_hashed_world_pickles_and_its_copy_hashes_again(world, bundles):
    """Per-block records hold tensors weakly, which pickle refused (torch.save of a world, multiprocessing)."""
    world.apply(bundles["noir"], weight=0.7)
    digest = world.digest(LM)
    assert pickle.dumps(world)  # made, never loaded: the project unpickles nothing
    twin = copy.deepcopy(world)  # the same state, through __getstate__
    assert twin._digest_cache == {} and twin.digest(LM) == digest
