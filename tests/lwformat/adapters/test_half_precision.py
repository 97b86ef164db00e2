"""Adapters on a half-precision base live and compute in float32 and are rounded once into the
layer's dtype, as PEFT's ``autocast_adapter_dtype=True`` (its default) does; float32 bases unchanged."""

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model

from lwformat import LightConfig
from lwformat.adapters.plan import iter_hosts
from lwformat.zoo import reference_world
from tests.lwformat.adapters.test_peft_agreement import (
    copy_into_peft,
    randomize_adapters,
)

LM = "author/narrate/text/llm"
HALF = [torch.bfloat16, torch.float16]


def tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_adapter_dtype_is_float32_on_a_half_layer_else_the_layers(dtype):
    from lwformat.adapters.layers import adapter_dtype

    assert adapter_dtype(dtype) == (torch.float32 if dtype in HALF else dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "bias", "neuron"])
def test_customized_adapters_on_a_half_base_are_float32_parameters(dtype, kind):
    world = reference_world("tiny", seed=0).to(dtype)
    world.customize(LightConfig(kind=kind, rank=4, neurons=4, blocks=[LM], slots=["*fc", "*qkv"]))
    assert {p.dtype for p in world.adapter_parameters()} == {torch.float32}
    for _, host in iter_hosts(world):
        adapter = host.adapters["default"]
        assert adapter.mix_weight.dtype == torch.float32 and host.base.weight.dtype == dtype
        if hasattr(adapter, "scaling"):
            assert adapter.scaling.dtype == torch.float32
    randomize_adapters(world)
    lm = world.block(LM).module
    out = lm(tokens())  # with autograd: the out-of-place path
    assert out.dtype == dtype  # rounded back to the layer's dtype
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in world.adapter_parameters())
    with torch.no_grad():
        torch.testing.assert_close(lm(tokens()), out.detach(), rtol=0, atol=0)  # the in-place path: the same sums


def test_a_float32_base_keeps_float32_adapters_and_computes_as_before():
    world = reference_world("tiny", seed=0)
    world.customize(LightConfig(kind="lora", rank=4, blocks=[LM], slots=["*fc"]))
    assert {p.dtype for p in world.adapter_parameters()} == {torch.float32}
    assert all(host._widened() is None for _, host in iter_hosts(world))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_on_a_half_base_matches_peft(dtype, dora):
    """The same float32 factors: PEFT (autocast_adapter_dtype=True, its default) sums them onto the
    half base output in float32 and rounds once; so do we."""
    world = reference_world("tiny", seed=0).to(dtype)
    lm = world.block(LM).module
    targets = ["qkv", "proj", "fc"]
    peft_model = get_peft_model(copy.deepcopy(lm), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, lora_dropout=0.0))
    x = tokens()
    with torch.no_grad():
        base = lm(x).float()
    world.customize(LightConfig(kind="dora" if dora else "lora", rank=4, alpha=8, blocks=[LM], slots=[f"*{t}" for t in targets]))
    randomize_adapters(world)
    copy_into_peft(world, LM, peft_model)
    with torch.no_grad():
        ours, theirs = lm(x).float(), peft_model(x).float()
    effect = (theirs - base).abs().max()
    assert effect > 0.05  # the adapters are live
    # The same float32 sums rounded once: equal here. Half adapters were 0.1% (float16) to 1.5% off.
    assert (ours - theirs).abs().max() <= 1e-4 * effect


@pytest.mark.parametrize("dtype", HALF)
def test_a_small_ia3_gain_on_a_half_base_changes_the_output_as_peft(dtype):
    """A gain of 1.003 is 1.0 in bfloat16: half adapters did nothing at all. In float32 it scales y,
    rounded once, as PEFT's IA3 does."""
    world = reference_world("tiny", seed=0).to(dtype)
    lm = world.block(LM).module
    peft_model = get_peft_model(copy.deepcopy(lm), IA3Config(target_modules=["fc", "proj"], feedforward_modules=[]))
    x = tokens()
    with torch.no_grad():
        base = lm(x)
    world.customize(LightConfig(kind="ia3", blocks=[LM], slots=["*fc", "*proj"]))
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.fill_(1.003)
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                assert p.dtype == torch.float32
                p.fill_(1.003)
        ours, theirs = lm(x), peft_model(x)
    assert ours.dtype == dtype and not torch.equal(ours, base)
    effect = (theirs.float() - base.float()).abs().max()
    assert effect > 0 and (ours.float() - theirs.float()).abs().max() <= 0.05 * effect


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_training_with_dropout_on_a_half_base_gives_float32_gradients(kind):
    """DoRA re-runs the base layer on the dropped input, which is float32 there: it goes in the layer's dtype."""
    world = reference_world("tiny", seed=0).to(torch.bfloat16)
    world.customize(LightConfig(kind=kind, rank=4, dropout=0.1, blocks=[LM], slots=["*fc", "*qkv"]))
    lm = world.block(LM).module.train()
    out = lm(tokens())
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in world.adapter_parameters())


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_training_with_dropout_on_a_bfloat16_base_matches_peft(dora):
    """DoRA's base term on the dropped input ran in bfloat16 (input rounded back), PEFT's in float32."""
    world = reference_world("tiny", seed=0).to(torch.bfloat16)
    lm = world.block(LM).module
    peft = get_peft_model(copy.deepcopy(lm), LoraConfig(r=4, lora_alpha=8, target_modules=["fc"], use_dora=dora, lora_dropout=0.1))
    world.customize(LightConfig(kind="dora" if dora else "lora", rank=4, alpha=8, dropout=0.1, blocks=[LM], slots=["*fc"]))
    randomize_adapters(world)
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.mul_(4)
    copy_into_peft(world, LM, peft)
    lm.train(), peft.train()
    x = tokens()
    with torch.no_grad():
        torch.manual_seed(5)
        ours = lm(x).float()
        torch.manual_seed(5)  # the same dropout masks
        theirs = peft(x).float()
    assert torch.equal(ours, theirs)
