"""Compatibility: per block by digest, per slot by layer, kind and shape; strict adds the root."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lwformat.bundle.check import Outcome, check
from lwformat.bundle.read import Bundle
from lwformat.errors import IncompatibleError
from lwformat.world import Block, World

from tests.lwformat.bundle.tiny import BACKBONE, LLM, VECTORS, make_vectors, tiny_world


@pytest.fixture(scope="module")
def bundle():
    with Bundle.open(VECTORS / "valid-dir") as b:
        yield b


def outcomes(report) -> dict[str, Outcome]:
    return {f.path: f.outcome for f in (*report.blocks, *report.slots)}


def test_the_base_world_fits(bundle):
    report = check(bundle, tiny_world(), strict=True)
    assert report.ok and set(outcomes(report).values()) == {Outcome.OK}
    report.raise_for_problems()
    assert "fits" in str(report)


def test_a_changed_base_weight_is_a_digest_mismatch_naming_the_block(bundle):
    world = tiny_world()
    with torch.no_grad():
        world.block(BACKBONE).module[0].bias[0] += 1
    report = check(bundle, world)
    assert outcomes(report)[BACKBONE] == Outcome.DIGEST_MISMATCH and outcomes(report)[LLM] == Outcome.OK
    with pytest.raises(IncompatibleError) as info:
        report.raise_for_problems()
    err = info.value
    assert (err.path, err.outcome) == (BACKBONE, "digest mismatch")
    assert err.expected == bundle.manifest.base.blocks[BACKBONE] and err.found == world.digests()[BACKBONE]
    assert BACKBONE in str(report) and "digest mismatch" in str(report)


def test_other_blocks_may_differ_unless_strict(bundle):
    world = make_vectors.tiny_world()
    world = World.from_blocks({
        LLM: world.block(LLM), BACKBONE: world.block(BACKBONE),
        "architect/plan/text/extra": Block(nn.Sequential(nn.Linear(2, 2)), "extra"),
    })  # fmt: skip
    assert check(bundle, world).ok
    strict = check(bundle, world, strict=True)
    assert not strict.ok and [(p.path, p.outcome) for p in strict.problems] == [("root", Outcome.ROOT_MISMATCH)]


def test_missing_block_and_missing_slot(bundle):
    only_llm = World.from_blocks({LLM: make_vectors.tiny_world().block(LLM)})
    assert outcomes(check(bundle, only_llm))[BACKBONE] == Outcome.MISSING_BLOCK
    assert outcomes(check(bundle, only_llm))[f"{BACKBONE}:0"] == Outcome.MISSING_BLOCK
    moved = World.from_blocks({
        LLM: Block(nn.Sequential(nn.Linear(8, 8)), "llm"),  # no layer "1" any more
        BACKBONE: make_vectors.tiny_world().block(BACKBONE),
    })  # fmt: skip
    report = check(bundle, moved)
    assert outcomes(report)[f"{LLM}:1"] == Outcome.MISSING_SLOT and outcomes(report)[f"{LLM}:0"] == Outcome.OK


def test_shape_layer_and_dtype(bundle):
    world = World.from_blocks({
        LLM: Block(nn.Sequential(nn.Linear(8, 16), nn.Conv1d(8, 8, 1)), "llm"),
        BACKBONE: Block(nn.Sequential(nn.Linear(8, 4)), "backbone"),  # float32 where the bundle stores BF16
    })  # fmt: skip
    report = check(bundle, world)
    found = {f.path: f for f in report.slots}
    assert found[f"{LLM}:0"].outcome == Outcome.SHAPE_MISMATCH and "lora_B" in found[f"{LLM}:0"].detail
    assert found[f"{LLM}:1"].outcome == Outcome.LAYER_MISMATCH
    note = found[f"{BACKBONE}:0"]
    assert note.outcome == Outcome.DTYPE_CONVERSION and (note.expected, note.found) == ("F32", "BF16")
    assert note not in report.problems  # the runtime converts: a note, not a problem


def test_check_takes_a_manifest_too(bundle):
    assert check(bundle.manifest, tiny_world()).ok


def test_a_neuron_index_of_a_huge_empty_shape_is_a_shape_mismatch(tmp_path):
    """[2**40, 0] holds no bytes and passes every limit; its count must not be spelled out (MemoryError)."""
    import json

    from lwformat.adapters import LightConfig
    from lwformat.bundle.canonical import encode, loads
    from lwformat.bundle.layout import header_bytes, plan_layout
    from lwformat.bundle.write import write_bundle

    world = tiny_world()
    world.customize(LightConfig(kind="neuron", neurons=2))
    write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_bytes())
    slot = manifest["slots"][0]
    slot["tensors"]["neuron_index"]["shape"] = [1 << 40, 0]
    spans = plan_layout(loads(encode(manifest)))
    data = header_bytes(spans) + bytes(spans[-1].end)
    (tmp_path / "b" / "adapters.safetensors").write_bytes(data)
    manifest["files"][0]["size"] = len(data)
    (tmp_path / "b" / "manifest.json").write_bytes(encode(manifest))
    with Bundle.open(tmp_path / "b") as b:
        report = check(b, tiny_world())
    assert outcomes(report)[f"{slot['block']}:{slot['module']}"] == Outcome.SHAPE_MISMATCH


def test_a_slot_on_a_multihead_attentions_out_proj_says_why_it_is_gone(tmp_path):
    """Bundles written before out_proj stopped being a slot: the refusal gives the reason."""
    from lwformat import LightConfig
    from lwformat.bundle.write import write_bundle

    class Attention(nn.Module):  # holds an out_proj it calls, as nn.MultiheadAttention does not
        def __init__(self):
            super().__init__()
            self.out_proj = nn.Linear(8, 8)

    def world(attn: nn.Module) -> World:
        return World.from_blocks({LLM: Block(nn.ModuleDict({"attn": attn}), "llm")})

    trained = world(Attention())
    trained.customize(LightConfig(rank=2))
    write_bundle(trained, tmp_path / "b", name="me/attn", version="1.0.0")
    report = check(Bundle.open(tmp_path / "b"), world(nn.MultiheadAttention(8, 2)))
    (finding,) = [f for f in report.slots if f.path == f"{LLM}:attn.out_proj"]
    assert finding.outcome == Outcome.MISSING_SLOT and "never calls" in finding.detail
