"""Random sequences of runtime operations leave the world equal to a reference built from scratch."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lwformat.errors import FusedError, LayoutError
from lwformat.zoo import reference_world
from tests.lwformat.runtime.conftest import tokens

RANKS = {"noir": 4, "rain": 4, "noir2": 4, "small": 2, "big": 8, "creator": 2}
NAMES = sorted(RANKS)
weights = st.sampled_from([0.0, 0.3, 0.7, 1.0, -0.5])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("apply"), st.sampled_from(NAMES), weights, st.sampled_from([0, 8])),
        st.tuples(st.just("set_weight"), st.sampled_from(NAMES), weights),
        st.tuples(st.just("swap"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
        st.tuples(st.just("remove"), st.sampled_from(NAMES)),
        st.tuples(st.just("fuse")),
        st.tuples(st.just("unfuse")),
    ),
    max_size=8,
)


def outputs(world, x):
    with torch.no_grad():
        out = world({"tokens": x})
    return out["author.logits"], out["creator.image"]


def reference(model, bundles, x):
    world = reference_world("tiny", seed=0)
    for name, (source, weight, _) in model.items():
        world.apply(bundles[source], weight=weight, name=name)
    return outputs(world, x)


def call(world, bundles, op):
    kind, *args = op
    if kind == "apply":
        return world.apply(bundles[args[0]], weight=args[1], name=args[0], reserve_rank=args[2])
    if kind == "swap":
        return world.swap(args[0], bundles[args[1]])
    return getattr(world, kind)(*args)


def step(world, bundles, model, fused, op):
    """Run `op` on the world and on the model; return the new fused flag."""
    kind, *args = op
    if fused and kind != "unfuse":
        with pytest.raises(FusedError):
            call(world, bundles, op)
        return fused
    if kind == "apply" and args[0] not in model:
        name, weight, reserve = args
        call(world, bundles, op)
        model[name] = (name, weight, max(reserve, RANKS[name]))
    elif kind == "set_weight" and args[0] in model:
        world.set_weight(args[0], args[1])
        model[args[0]] = (model[args[0]][0], args[1], model[args[0]][2])
    elif kind == "swap" and args[0] in model:
        name, incoming = args
        source, weight, stored = model[name]
        fits = (incoming == "creator") == (source == "creator") and RANKS[incoming] <= stored
        if fits:
            world.swap(name, bundles[incoming])
            model[name] = (incoming, weight, stored)
        else:
            with pytest.raises(LayoutError):
                world.swap(name, bundles[incoming])
    elif kind == "remove" and args[0] in model:
        world.remove(args[0])
        del model[args[0]]
    elif kind == "fuse":
        world.fuse()
        return True
    elif kind == "unfuse" and fused:
        world.unfuse()
        return False
    return fused


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=ops)
def test_random_sequences_match_a_fresh_reference(bundles, sequence):
    world = reference_world("tiny", seed=0)
    root = world.root_digest()
    x = tokens(batch=2, length=8)
    model: dict[str, tuple[str, float, int]] = {}
    fused = False
    for op in sequence:
        fused = step(world, bundles, model, fused, op)
    got, expected = outputs(world, x), reference(model, bundles, x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if fused:
        world.unfuse()
    for name in list(model):
        world.remove(name)
    assert world.root_digest() == root
    assert all(torch.equal(a, b) for a, b in zip(outputs(world, x), outputs(reference_world("tiny", seed=0), x)))
