"""world.disabled(): the base alone for a while, as PEFT's disable_adapter()."""

import pytest
import torch

from lwformat.errors import FusedError
from lwformat.zoo import reference_world
from tests.lwformat.runtime.conftest import tokens, trained_world

KEYS = ("author.logits", "environment.logits", "creator.image")


def outputs(world, x):
    with torch.no_grad():
        return world({"tokens": x})


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in KEYS)


def test_inside_the_block_a_trained_and_applied_world_computes_as_its_base(bundles):
    x = tokens()
    base = outputs(reference_world("tiny", seed=0), x)
    world = trained_world(7)
    world.apply(bundles["creator"], weight=0.5)
    adapted = outputs(world, x)
    assert not same(adapted, base)
    with world.disabled():
        assert same(outputs(world, x), base)
        with world.disabled():  # nested: the inner end does not enable the outer block's hosts
            pass
        assert same(outputs(world, x), base)
    assert same(outputs(world, x), adapted)


def test_a_reference_pass_inside_the_block_is_out_of_the_adapters_graph():
    world = trained_world(7)
    x = tokens()
    with world.disabled():
        reference = world({"tokens": x})["author.logits"]  # the frozen base alone: nothing to train
    assert not reference.requires_grad
    loss = (world({"tokens": x})["author.logits"] - reference).square().mean()  # enabled again: they train
    loss.backward()
    assert all(p.grad is not None for p in world.adapter_parameters())


def test_a_bundle_applied_inside_the_block_is_left_out_until_it_ends(world, bundles):
    x = tokens()
    base = outputs(world, x)
    with world.disabled():
        world.apply(bundles["noir"], weight=0.7)
        assert same(outputs(world, x), base)
    after = outputs(world, x)
    assert not same(after, base)
    fresh = reference_world("tiny", seed=0)
    fresh.apply(bundles["noir"], weight=0.7)
    assert same(after, outputs(fresh, x))


def test_an_error_inside_the_block_still_enables_the_world(world, bundles):
    world.apply(bundles["noir"], weight=0.7)
    x = tokens()
    adapted = outputs(world, x)
    with pytest.raises(RuntimeError, match="boom"), world.disabled():
        raise RuntimeError("boom")
    assert same(outputs(world, x), adapted)


def test_fused_worlds_and_fusing_inside_are_refused(world, bundles):
    world.apply(bundles["noir"], weight=0.7)
    x = tokens()
    with world.disabled():
        with pytest.raises(FusedError, match="inside world.disabled"):
            world.fuse()
        assert world.fused_state is None
    world.fuse()
    with pytest.raises(FusedError, match="unfuse"), world.disabled():
        pass
    assert world.adapters_disabled == 0
    world.unfuse()
    world.remove("author/noir")
    assert same(outputs(world, x), outputs(reference_world("tiny", seed=0), x))
