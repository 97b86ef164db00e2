"""The reference world: layout, determinism, one full pass, sharing, sizes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lwformat
from lwformat.world import World
from lwformat.world import config as cfg
from lwformat.world.digest import base_tensors
from lwformat.zoo import reference_spec, reference_world
from lwformat.zoo.world import STAGES

LLM, ENV_LLM = "author/narrate/text/llm", "environment/describe/text/llm"
GPT2_SMALL = 124_439_808


def n_params(block) -> int:
    return sum(t.numel() for t in {id(t): t for t in base_tensors(block.module).values()}.values())  # tied once


def test_stages_cycle_and_layout(tiny_world):
    assert list(tiny_world.stages) == list(STAGES)
    assert tiny_world.cycle == list(STAGES)
    for stage in tiny_world.stages.values():
        assert len(stage.pipelines) >= 1
        assert all(len(p.graphs) >= 1 for p in stage.pipelines.values())


def test_every_block_type_and_impl_present(tiny_world):
    blocks = tiny_world.blocks().values()
    assert {b.block_type for b in blocks} == {"llm", "conditioner", "backbone", "codec"}
    assert {b.impl for b in blocks} == {"decoder_lm", "text_encoder", "dit", "conv_codec"}


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (reference_world("tiny", seed=s).state_dict() for s in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].std() > 0)


def test_building_neither_reads_nor_moves_the_global_rng():
    before = torch.random.get_rng_state()
    torch.manual_seed(123)
    w1 = reference_world("tiny", seed=0)
    torch.manual_seed(456)
    w2 = reference_world("tiny", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(w1.state_dict().values(), w2.state_dict().values()))
    torch.random.set_rng_state(before)


def test_full_pass_shapes_and_finiteness(tiny_world, prompt):
    with torch.no_grad():
        out = tiny_world(prompt)
    expected = {
        "philosopher.embedding": (2, 16, 32),
        "author.logits": (2, 16, 256),
        "author.tokens": (2, 16),
        "environment.logits": (2, 16, 256),
        "architect.embedding": (2, 16, 32),
        "creator.latents": (2, 4, 8, 8),
        "creator.image": (2, 3, 32, 32),
    }
    for key, shape in expected.items():
        assert tuple(out[key].shape) == shape, key
        assert torch.isfinite(out[key].float()).all(), key
    assert out["creator.image"].abs().max() <= 1
    # The environment reads the author's continuation, so the shared LLM gives two different readings.
    assert not torch.equal(out["author.logits"], out["environment.logits"])


def test_pass_is_deterministic_and_leaves_global_rng_alone(tiny_world, prompt):
    state = torch.random.get_rng_state()
    with torch.no_grad():
        a, b = tiny_world(prompt), tiny_world(prompt)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_t2i_takes_noise_from_state(tiny_world, prompt):
    noise = torch.zeros(2, 4, 8, 8)
    with torch.no_grad():
        default = tiny_world(prompt)["creator.image"]
        given = tiny_world({**prompt, "noise": noise})["creator.image"]
    assert not torch.equal(default, given)


def test_a_prompts_outputs_do_not_depend_on_its_batch(tiny_world, prompt):
    alone = {k: v[1:] for k, v in prompt.items()}
    with torch.no_grad():
        batched, single = tiny_world(prompt), tiny_world(alone)
    for key in ("creator.image", "author.logits", "architect.embedding"):
        torch.testing.assert_close(batched[key][1:], single[key], rtol=1e-5, atol=1e-5)


def test_world_forward_is_one_pass_of_the_cycle(tiny_world, prompt):
    manual = dict(prompt)
    with torch.no_grad():
        for stage in tiny_world.cycle:
            manual.update(tiny_world.stages[stage](manual))
        out = tiny_world(prompt)
    assert out.keys() == manual.keys() and all(torch.equal(out[k], manual[k]) for k in out)


def test_one_llm_serves_two_stages(tiny_world):
    assert tiny_world.block(ENV_LLM) is tiny_world.block(LLM)
    assert tiny_world.block_paths()[ENV_LLM] == LLM
    blocks = tiny_world.blocks()
    assert LLM in blocks and ENV_LLM not in blocks
    assert sum(b is tiny_world.block(LLM) for b in blocks.values()) == 1
    # torch counts the shared weights once as well
    assert sum(p.numel() for p in tiny_world.parameters()) == sum(n_params(b) for b in blocks.values())


def test_conditioners_are_distinct_blocks(tiny_world):
    paths = [f"{s}/conditioner" for s in ("philosopher/reflect/ideas", "architect/layout/scene", "creator/render/t2i")]
    assert len({id(tiny_world.block(p)) for p in paths}) == 3


def test_small_world_sizes_on_meta():
    world = reference_world("small", device="meta")
    assert all(t.is_meta for t in world.state_dict().values())
    sizes = {path: n_params(b) for path, b in world.blocks().items()}
    assert abs(sizes[LLM] - 124.44e6) / 124.44e6 < 0.02
    assert sizes[LLM] == GPT2_SMALL  # GPT-2 small, head tied to the token embedding
    assert sum(sizes.values()) < 300e6


def test_spec_is_plain_json_and_round_trips():
    for size in ("tiny", "small"):
        spec = reference_spec(size)
        assert cfg.decode(cfg.encode(spec)) == spec
    with pytest.raises(ValueError):
        reference_spec("huge")


def test_save_and_load_rebuild_the_same_world(tiny_world, prompt, tmp_path):
    tiny_world.save(tmp_path / "w")
    loaded = World.load(tmp_path / "w", verify=True)
    assert loaded.root_digest() == tiny_world.root_digest()
    assert loaded.block(ENV_LLM) is loaded.block(LLM)
    with torch.no_grad():
        a, b = tiny_world(prompt), loaded(prompt)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_meta_world_materializes_without_buffers(tiny_world, prompt):
    # Nothing the blocks compute with lives in a non-persistent buffer, so to_empty + load suffices.
    world = reference_world("tiny", device="meta").to_empty(device="cpu")
    world.load_state_dict(tiny_world.state_dict())
    with torch.no_grad():
        a, b = tiny_world(prompt), world(prompt)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_config_alone_builds_the_world_without_transformers(tmp_path):
    # The registry imports the zoo on its own when a config names a zoo block or flow;
    # registering hf_bert must not pull in transformers.
    (tmp_path / "world.json").write_bytes(cfg.encode(reference_spec("tiny")))
    code = (
        "import sys, torch; from lwformat.world import World; "
        f"w = World.from_config({str(tmp_path / 'world.json')!r}); "
        "out = w({'tokens': torch.zeros(1, 4, dtype=torch.long)}); "
        "assert out['creator.image'].shape == (1, 3, 32, 32); "
        "assert 'lwformat.zoo' in sys.modules and 'transformers' not in sys.modules"
    )
    root = Path(lwformat.__file__).parents[1]  # importable from there whether installed or not
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
