"""Bundles on a half-precision base: float32 adapters (as PEFT keeps them) from customize to the
applied storage, a mixed batch, fuse and remove; an older half-precision bundle widens exactly."""

import pytest
import torch

from lwformat import LightConfig, blend
from lwformat.bundle.read import Bundle
from lwformat.bundle.write import write_bundle
from lwformat.zoo import reference_world
from tests.lwformat.runtime.conftest import LM, tokens

GAIN = 1.003  # 1.0 in bfloat16: a half-precision adapter holding it does nothing


def half_world(dtype=torch.bfloat16):
    return reference_world("tiny", seed=0).to(dtype)


def half_bundle(root, name, kind, *, dtype=torch.bfloat16, stored=None, fill=None, seed=0):
    """A `kind` bundle customized on the `dtype` reference world, its values random (or `fill`),
    its tensors kept as customize made them or, rounded to bfloat16, stored in `stored`."""
    world = half_world(dtype)
    world.customize(LightConfig(kind=kind, rank=4, blocks=[LM], slots=["*fc", "*qkv"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.copy_(torch.full(p.shape, fill) if fill is not None else torch.randn(p.shape, generator=gen) * 0.05)
            if stored is not None:
                p.data = p.data.to(torch.bfloat16).to(stored)  # values bfloat16 holds, in either dtype
    out = root / name.replace("/", "-")
    write_bundle(world, out, name=name, version="1.0.0")
    return Bundle.open(out)


def lm_out(world, x):
    with torch.no_grad():
        return world.block(LM).module(x)


def state(world):
    return {f"{p}:{n}": t.detach().clone() for p, b in world.blocks().items() for n, t in b.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_bundle_written_from_a_half_base_is_float32_and_applies_into_float32_storage(tmp_path, dtype):
    bundle = half_bundle(tmp_path, "author/lora", "lora", dtype=dtype)
    assert {t.dtype for s in bundle.manifest.slots for t in s.tensors.values()} == {"F32"}  # as PEFT saves them
    world = half_world(dtype)
    applied = world.apply(bundle)
    assert {dtype for dtype, _ in applied.buffers} == {torch.float32} and applied.packed
    assert lm_out(world, tokens()).dtype == dtype


def test_an_older_bfloat16_bundle_widens_exactly_into_float32_storage(tmp_path):
    """The same values stored in bfloat16 or float32: one applied output (widening is exact)."""
    old = half_bundle(tmp_path, "author/old", "lora", stored=torch.bfloat16, seed=1)
    new = half_bundle(tmp_path, "author/new", "lora", stored=torch.float32, seed=1)
    assert {t.dtype for s in old.manifest.slots for t in s.tensors.values()} == {"BF16"}
    world, x = half_world(), tokens()
    applied = world.apply(old)
    assert set(applied.buffers) == {(torch.float32, torch.device("cpu"))}
    for slot, adapter in applied.adapters.items():
        stored = old.slot_tensors(slot)
        assert torch.equal(adapter.lora_A, stored["lora_A"].float()) and torch.equal(adapter.lora_B, stored["lora_B"].float())
    got = lm_out(world, x)
    world.swap("author/old", new)  # the same values: the converting fast swap
    assert torch.equal(lm_out(world, x), got)


def test_a_small_ia3_gain_changes_a_bfloat16_world_and_remove_restores_it_bit_exactly(tmp_path):
    bundle = half_bundle(tmp_path, "author/gain", "ia3", fill=GAIN)
    world, x = half_world(), tokens()
    before, modules, base = state(world), [type(m) for m in world.modules()], lm_out(world, x)
    world.apply(bundle)
    assert not torch.equal(lm_out(world, x), base)
    world.remove("author/gain")
    after = state(world)
    assert [type(m) for m in world.modules()] == modules and after.keys() == before.keys()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(lm_out(world, x), base)


def test_a_mixed_batch_on_a_bfloat16_world_matches_each_bundle_alone(tmp_path):
    """The routed sum widens as the plain one: a gain of 1.003 reaches its sample, LoRA gives its
    sample what applying it alone gives, and a sample that picked nothing gets the base exactly."""
    gain = half_bundle(tmp_path, "author/gain", "ia3", fill=GAIN)
    lora = half_bundle(tmp_path, "author/lora", "lora", seed=2)
    x = tokens().repeat(2, 1)[:3]  # (3, T): one sequence per sample
    base = lm_out(half_world(), x)
    alone = {}
    for bundle in (gain, lora):
        single = half_world()
        single.apply(bundle, weight=0.7)
        alone[bundle.manifest.name] = lm_out(single, x)
    world = half_world()
    world.apply(gain, weight=0.7)
    world.apply(lora, weight=0.7)
    with torch.no_grad(), world.routed(["author/gain", None, "author/lora"]):
        mixed = world.block(LM).module(x)
    assert not torch.equal(mixed[0], base[0]) and torch.equal(mixed[1], base[1])
    for i, name in ((0, "author/gain"), (2, "author/lora")):
        effect = (alone[name][i].float() - base[i].float()).abs().max()
        assert effect > 0 and (mixed[i].float() - alone[name][i].float()).abs().max() <= 0.05 * effect


@pytest.mark.parametrize("kind", ["ia3", "lora", "dora", "neuron"])  # neuron: its delta was made in the layer's dtype
def test_fuse_rounds_float32_adapters_once_into_bfloat16_weights_and_unfuse_is_bit_exact(tmp_path, kind):
    bundle = half_bundle(tmp_path, "author/b", kind, fill=GAIN if kind == "ia3" else None)
    world, x = half_world(), tokens()
    world.apply(bundle, weight=0.5)
    before, live = state(world), lm_out(world, x)
    host = world.applied["author/b"].hosts[next(iter(world.applied["author/b"].hosts))]
    dW = host.adapters[world.applied["author/b"].key].delta_weight(host.base)[0]
    assert dW.dtype == torch.float32
    original = host.base.weight.clone()
    expected = (original.float() + 0.5 * dW).bfloat16()  # summed in float32, rounded once
    world.fuse()
    assert torch.equal(host.base.weight, expected)
    assert kind == "ia3" or not torch.equal(expected, original)  # 0.5 · 0.003 of a weight is below its bfloat16 step
    fused = lm_out(world, x)
    torch.testing.assert_close(fused.float(), live.float(), rtol=0, atol=0.1)  # the weights rounded to bfloat16
    world.unfuse()
    after = state(world)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(lm_out(world, x), live)



def test_a_bank_of_two_dtypes_computes_each_adapter_in_its_own(tmp_path):
    """A world converted with .to(bfloat16) after one bundle was applied holds it in bfloat16, and the
    next bundle comes in float32: the forward took the first adapter's dtype for all and failed."""
    first, second = half_bundle(tmp_path, "author/first", "lora", seed=1), half_bundle(tmp_path, "author/second", "ia3", seed=2)
    x = tokens()
    world = half_world()
    world.apply(first, weight=0.5)  # into float32 storage
    world.to(torch.bfloat16)  # the base is bfloat16 already; the applied storage follows: bfloat16 now
    world.apply(second, weight=0.5)  # float32, as every bundle on a half layer
    both = lm_out(world, x)
    with world.routed(["author/first", "author/second", None]):
        mixed = lm_out(world, x)  # a sample per bundle, each in its own dtype
    world.remove("author/second")
    only_first = lm_out(world, x)
    world.remove("author/first")
    base = lm_out(world, x)
    world.apply(second, weight=0.5)
    only_second = lm_out(world, x)
    expected = only_first.float() + only_second.float() - base.float()
    torch.testing.assert_close(both.float(), expected, rtol=0, atol=0.1)  # each rounded to bfloat16 on its own
    assert not torch.equal(both, only_first) and not torch.equal(both, only_second)
    for i, alone in enumerate((only_first, only_second, base)):
        torch.testing.assert_close(mixed[i].float(), alone[i].float(), rtol=0, atol=0.05)


def test_an_older_bfloat16_bundle_and_a_float32_one_blend_in_float32(tmp_path):
    """Parents for one bfloat16 base, one stored in BF16 (as written before) and one in F32, were
    refused as 'disagree on the dtype', though both apply into the same float32 storage."""
    old = half_bundle(tmp_path, "author/old", "lora", stored=torch.bfloat16, seed=1)
    new = half_bundle(tmp_path, "author/new", "lora", seed=2)
    mix = blend([(old, 0.5), (new, 0.5)], method="linear")
    assert {t.dtype for t in mix.tensors().values()} == {torch.float32}
    x = tokens()
    world = half_world()
    world.apply(mix)
    blended = lm_out(world, x)
    world.remove(next(iter(world.applied)))
    world.apply(old, weight=0.5)
    world.apply(new, weight=0.5)
    torch.testing.assert_close(blended.float(), lm_out(world, x).float(), rtol=0, atol=0.05)  # the exact sum, rounded
