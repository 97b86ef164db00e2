"""Same LoRA/DoRA weights on the same layers: our outputs match PEFT's within 1e-5 (fp32)."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lwformat import LightConfig, World
from lwformat.adapters.plan import iter_hosts
from lwformat.zoo import minilm_block, minilm_tokenize, reference_world

LM = "author/narrate/text/llm"


def randomize_adapters(world, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def copy_into_peft(world, block_path, peft_model, strip=""):
    """Copy our adapter tensors onto PEFT's layers of the same names (PEFT names differ only in nesting)."""
    root = peft_model.base_model.model
    copied = 0
    with torch.no_grad():
        for slot, host in iter_hosts(world):
            if not slot.startswith(block_path + ":"):
                continue
            ours = host.adapters["default"]
            theirs = root.get_submodule(slot.partition(":")[2].removeprefix(strip))
            if hasattr(theirs, "lora_embedding_A") and "default" in theirs.lora_embedding_A:
                theirs.lora_embedding_A["default"].copy_(ours.lora_A)
                theirs.lora_embedding_B["default"].copy_(ours.lora_B)
            else:
                theirs.lora_A["default"].weight.copy_(ours.lora_A)
                theirs.lora_B["default"].weight.copy_(ours.lora_B)
            if ours.settings.kind == "dora":
                theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
            copied += 1
    return copied


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("rslora", [False, True], ids=["scaled", "rslora"])
def test_zoo_lm_matches_peft(dora, rslora):
    world = reference_world("tiny", seed=0)
    lm = world.block(LM).module
    targets = ["qkv", "proj", "fc"] + ([] if dora else ["tok"])
    peft_model = get_peft_model(
        copy.deepcopy(lm),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, use_rslora=rslora, lora_dropout=0.0),
    )
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = lm(tokens)
    plan = world.customize(
        LightConfig(kind="dora" if dora else "lora", rank=4, alpha=8, rslora=rslora, blocks=[LM], slots=[f"*{t}" for t in targets])
    )
    randomize_adapters(world)
    assert copy_into_peft(world, LM, peft_model) == len(plan.slots) == 2 * 4 + (not dora)
    with torch.no_grad():
        ours, theirs = lm(tokens), peft_model(tokens)
    assert (ours - base).abs().max() > 1e-3  # the adapters are live
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_pretrained_minilm_matches_peft(dora):
    block = minilm_block()
    hf = block.module.model
    peft_model = get_peft_model(
        copy.deepcopy(hf),
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"], use_dora=dora, lora_dropout=0.0),
    )
    ids, mask = minilm_tokenize(["Rain fell on the neon sign.", "The detective lit a cigarette."])
    with torch.no_grad():
        base = block(ids, attention_mask=mask)
    world = World.from_blocks({"philosopher/reflect/ideas/conditioner": block})
    world.customize(LightConfig(kind="dora" if dora else "lora", rank=8, alpha=16, slots=["*.query", "*.value", "*.dense"]))
    randomize_adapters(world, seed=3)
    assert copy_into_peft(world, "philosopher/reflect/ideas/conditioner", peft_model, strip="model.") == 6 * 5
    with torch.no_grad():
        ours = block(ids, attention_mask=mask)
    assert (ours - base).abs().max() > 1e-3  # the adapters are live
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dropout_while_training_matches_peft_lora_dropout(dora):
    """The same masks (one dropout call per layer, in the same order) give PEFT's training outputs;
    in eval, dropout changes nothing."""
    world = reference_world("tiny", seed=0)
    lm = world.block(LM).module
    targets = ["qkv", "proj", "fc"]
    peft_model = get_peft_model(copy.deepcopy(lm), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora,
                                                              lora_dropout=0.3))  # fmt: skip
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    kind = "dora" if dora else "lora"
    world.customize(LightConfig(kind=kind, rank=4, alpha=8, dropout=0.3, blocks=[LM], slots=[f"*{t}" for t in targets]))
    randomize_adapters(world)
    copy_into_peft(world, LM, peft_model)
    with torch.no_grad():
        evaluated = lm.eval()(tokens)
        torch.testing.assert_close(evaluated, peft_model.eval()(tokens), rtol=0, atol=1e-5)
        lm.train(), peft_model.train()
        torch.manual_seed(7)
        ours = lm(tokens)
        torch.manual_seed(7)
        theirs = peft_model(tokens)
    assert (ours - evaluated).abs().max() > 1e-3  # the masks took effect
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [{"dropout": 1.0}, {"dropout": -0.1}, {"dropout": float("nan")}, {"dropout": "0.1"},
                                 {"dropout": 0.1, "kind": "ia3"}])  # fmt: skip
def test_a_dropout_that_is_no_probability_or_for_another_kind_is_refused(bad):
    from lwformat.errors import TargetError

    with pytest.raises(TargetError) as err:
        LightConfig(**bad)
    assert err.value.path == "dropout"
