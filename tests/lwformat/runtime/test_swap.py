"""Hot-swap: same layout copies into the existing storage; nothing is allocated or recompiled."""

import pytest
import torch

from lwformat.errors import LayoutError
from lwformat.zoo import reference_world
from tests.lwformat.runtime.conftest import LM, tokens


def lm_out(world, x):
    with torch.no_grad():
        return world.block(LM).module(x)


def storage_identity(world, name):
    applied = world.applied[name]
    return (
        [id(m) for m in world.modules()],
        {slot: [t.data_ptr() for t in a.state_dict(keep_vars=True).values()] for slot, a in applied.adapters.items()},
        [b.data_ptr() for b in applied.buffers.values()],
    )


def fresh_with(bundle, weight=0.6, **kwargs):
    world = reference_world("tiny", seed=0)
    world.apply(bundle, weight=weight, name="author/noir", **kwargs)
    return world


def test_swap_same_layout_in_place(world, bundles):
    world.apply(bundles["noir"], weight=0.6)
    before = storage_identity(world, "author/noir")
    world.swap("author/noir", bundles["rain"])
    assert storage_identity(world, "author/noir") == before
    x = tokens()
    assert torch.equal(lm_out(world, x), lm_out(fresh_with(bundles["rain"]), x))


def test_smaller_rank_is_zero_padded_exactly(world, bundles):
    world.apply(bundles["noir"], weight=0.6, reserve_rank=8)
    stored = world.applied["author/noir"].adapters[f"{LM}:blocks.0.attn.qkv"]
    assert stored.lora_A.shape == (8, 64)
    before = storage_identity(world, "author/noir")
    x = tokens()
    for name in ("small", "big", "noir"):  # ranks 2, 8, 4 into rank-8 storage
        world.swap("author/noir", bundles[name])
        assert storage_identity(world, "author/noir") == before
        torch.testing.assert_close(lm_out(world, x), lm_out(fresh_with(bundles[name]), x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("incoming", "message"), [("big", "does not fit"), ("creator", "other slots")])
def test_incompatible_swaps_are_refused_before_any_change(world, bundles, incoming, message):
    world.apply(bundles["noir"], weight=0.6)
    x = tokens()
    out = lm_out(world, x)
    with pytest.raises(LayoutError, match=message):
        world.swap("author/noir", bundles[incoming])
    assert torch.equal(lm_out(world, x), out)
    assert world.applied["author/noir"].bundle is bundles["noir"]


def test_compiled_world_does_not_recompile_on_swap_or_weight(world, bundles):
    torch._dynamo.reset()
    world.apply(bundles["noir"], weight=0.6)
    lm = world.block(LM).module
    compiled = torch.compile(lm, backend="eager", dynamic=False)
    x = tokens()
    with torch.no_grad():
        compiled(x)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        world.swap("author/noir", bundles["rain"])
        world.set_weight("author/noir", 0.25)
        got = compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    torch.testing.assert_close(got, lm_out(fresh_with(bundles["rain"], weight=0.25), x), rtol=0, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("swapped_before", [False, True])  # the first swap records where each base tensor sits
def test_a_swap_onto_a_changed_base_is_refused(world, bundles, swapped_before):
    from lwformat.errors import IncompatibleError

    world.apply(bundles["noir2" if swapped_before else "noir"], weight=0.6)
    if swapped_before:
        world.swap("author/noir", bundles["noir"])
    with torch.no_grad():
        world.block(LM).module.ln_f.weight.add_(1.0)  # the base changed after applying
    with pytest.raises(IncompatibleError) as err:
        world.swap("author/noir", bundles["rain"])
    assert err.value.path == LM and world.applied["author/noir"].bundle is bundles["noir"]


@pytest.mark.parametrize("swapped_before", [False, True])
def test_a_swap_after_a_base_tensor_was_replaced_is_refused(world, bundles, swapped_before):
    from lwformat.errors import IncompatibleError

    world.apply(bundles["noir2" if swapped_before else "noir"], weight=0.6)
    if swapped_before:
        world.swap("author/noir", bundles["noir"])
    ln = world.block(LM).module.ln_f
    old = ln.weight  # still alive: only where the tensor sits tells
    ln.weight = torch.nn.Parameter(old.detach() + 1, requires_grad=False)
    with pytest.raises(IncompatibleError) as err:
        world.swap("author/noir", bundles["rain"])
    assert err.value.path == LM and world.applied["author/noir"].bundle is bundles["noir"]


def test_a_strict_swap_walks_the_modules_again(world, bundles):
    from lwformat.errors import IncompatibleError

    world.apply(bundles["noir"], weight=0.6)
    world.block(LM).module.extra = torch.nn.Linear(2, 2)  # a module added: the tensors recorded stay untouched
    with pytest.raises(IncompatibleError) as err:
        world.swap("author/noir", bundles["rain"], strict=True)
    assert err.value.path == LM and world.applied["author/noir"].bundle is bundles["noir"]


def test_a_swap_after_the_world_was_cast_is_refused(world, bundles):
    world.apply(bundles["noir"], weight=0.6)
    x = tokens()
    before = world.block(LM).module(x)
    world.double().float()  # the same base numbers, but every buffer is a converted copy now
    with pytest.raises(LayoutError, match="no longer use the applied storage"):
        world.swap("author/noir", bundles["noir2"])
    assert torch.equal(world.block(LM).module(x), before)
