"""The spare pool: storage released by remove backs the next apply, and never leaks old numbers."""

import pytest
import torch

from lwformat.runtime.spare import Spare
from tests.lwformat.runtime.conftest import LM, make_bundle, tokens


def lm_out(world, x):
    with torch.no_grad():
        return world.block(LM).module(x)


def test_take_gives_back_the_smallest_fit_within_twice_the_size():
    spare = Spare()
    big, small, half = torch.zeros(100), torch.zeros(60), torch.zeros(25, dtype=torch.float16)
    for b in (big, small, half):
        spare.give(b)
    got = spare.take(torch.float32, 50)
    assert got.shape == (50,) and got.data_ptr() == small.data_ptr()  # 60 fits better than 100
    assert spare.take(torch.float32, 40).data_ptr() != big.data_ptr()  # 100 > 2 * 40: a new buffer
    assert spare.take(torch.float32, 50).data_ptr() == big.data_ptr()
    assert spare.take(torch.float16, 10).data_ptr() != half.data_ptr()  # 25 > 2 * 10
    assert spare.buffers == [half]


def test_the_oldest_are_dropped_past_the_limit():
    spare = Spare(limit=1000)
    first, second, third = (torch.zeros(100) for _ in range(3))  # 400 bytes each
    for b in (first, second, third):
        spare.give(b)
    assert [b.data_ptr() for b in spare.buffers] == [second.data_ptr(), third.data_ptr()]


def test_reused_storage_gives_exactly_a_fresh_apply(world, bundles):
    x = tokens()
    world.apply(bundles["noir"], weight=0.5)
    first = world.applied["author/noir"]
    pointers = {b.data_ptr() for b in first.buffers.values()}
    world.remove("author/noir")
    assert first.buffers == {} and first.adapters == {}  # the removed record lets go of its storage
    world.apply(bundles["rain"], weight=0.5)  # the same layout: the released buffer is taken again
    assert {b.data_ptr() for b in world.applied["author/rain"].buffers.values()} == pointers
    reused = lm_out(world, x)
    world.remove("author/rain")
    world.spare_storage.buffers.clear()
    world.apply(bundles["rain"], weight=0.5)  # fresh storage
    assert torch.equal(reused, lm_out(world, x))


def test_a_smaller_bundle_in_reused_storage_keeps_nothing_of_the_larger(world, bundles):
    x = tokens()
    world.apply(bundles["big"], reserve_rank=8)  # rank 8
    pointers = {b.data_ptr() for b in world.applied["author/big"].buffers.values()}
    world.remove("author/big")
    world.apply(bundles["noir"], reserve_rank=6)  # rank 4 padded to 6: 3/4 of the released buffer, zero-padded
    assert {b.data_ptr() for b in world.applied["author/noir"].buffers.values()} == pointers
    reused = lm_out(world, x)
    world.remove("author/noir")
    world.spare_storage.buffers.clear()
    world.apply(bundles["noir"])
    assert torch.allclose(reused, lm_out(world, x), rtol=0, atol=1e-6)


def test_dropping_the_pool_lets_the_storage_go(world, bundles):
    import gc
    import weakref

    world.apply(bundles["noir"])
    buffer = weakref.ref(next(iter(world.applied["author/noir"].buffers.values())))
    world.remove("author/noir")
    gc.collect()
    assert buffer() is not None  # kept for the next apply
    world.spare_storage = None
    gc.collect()
    assert buffer() is None


def test_remove_after_the_pool_was_dropped_succeeds(world, bundles):
    """``spare_storage = None`` is the documented way to drop the pool; a remove then must not fail after the fact."""
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = world({"tokens": x})
    world.apply(bundles["noir"])
    world.spare_storage = None
    world.remove("author/noir")
    assert world.applied == {} and world.spare_storage is None
    with torch.no_grad():
        after = world({"tokens": x})
    assert all(torch.equal(after[k], base[k]) for k in base)


def test_storage_reused_while_a_backward_pass_needs_it_fails_that_pass(tmp_path, bundles):
    """Training on top of a bundle: remove it and apply another between forward and backward. The new
    bundle is read straight into the reused storage; the backward must refuse, not use the new values."""
    from lwformat import LightConfig
    from lwformat.zoo import reference_world

    world = reference_world("tiny", seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        world.customize(LightConfig(kind="lora", rank=2, blocks=[LM]))
    world.apply(bundles["noir"], weight=0.8)
    loss = world.block(LM).module.loss(tokens())
    world.remove("author/noir")
    rain = make_bundle(tmp_path, 2, name="author/rain")
    assert not rain.mapped
    world.apply(rain, weight=0.8)  # its file not mapped: read straight into noir's old storage
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
