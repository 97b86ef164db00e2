"""Light-custom-world mode: only adapters train, every base tensor stays bit-identical."""

import pytest
import torch

from lwformat import LightConfig
from lwformat.zoo import reference_world
from lwformat.zoo.text import byte_tokens, load_text


def base_snapshot(world):
    return {k: v.clone() for k, v in world.state_dict().items()}


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "neuron", "bias"])
def test_training_moves_only_adapters(kind):
    world = reference_world("tiny", seed=0)
    world.stages["creator"].register_parameter("gain", torch.nn.Parameter(torch.ones(3)))  # above the blocks
    before = base_snapshot(world)
    world.customize(LightConfig(kind=kind, rank=4, alpha=8, neurons=4, block_types=["llm", "backbone", "conditioner"]))

    params = world.adapter_parameters()
    trainable = [p for p in world.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable} and len(params) > 0
    assert not world.stages["creator"].gain.requires_grad

    lm = world.block("author/narrate/text/llm").module
    batch = byte_tokens(load_text("noir"), 65)[:16]  # (16, 65)
    opt = torch.optim.AdamW(params, lr=1e-2)
    with torch.no_grad():
        first = lm.loss(batch).item()
    for _ in range(12):
        opt.zero_grad()
        lm.loss(batch).backward()
        opt.step()
    with torch.no_grad():
        last = lm.loss(batch).item()
    assert last < first - 0.05, (first, last)

    world.decustomize()
    after = world.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_adapter_parameters_are_listed_once_for_shared_blocks():
    world = reference_world("tiny", seed=0)
    plan = world.customize(LightConfig(rank=2, blocks=["environment/**"]))  # reaches the shared LLM
    assert {s.block_path for s in plan.slots} == {"author/narrate/text/llm"}
    assert len(world.adapter_parameters()) == 2 * len(plan.slots)
