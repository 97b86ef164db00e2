"""World.cast and World.load(dtype=): the cast content has its own digests and remembers its sources."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lwformat import World
from lwformat.errors import CheckpointError, WorldError
from lwformat.world import Block, block_digest
from lwformat.world.cast import cast_root, cast_source
from lwformat.zoo import reference_world

LM = "author/narrate/text/llm"


def test_cast_converts_every_floating_tensor_and_records_the_digests_before():
    world = reference_world("tiny", seed=0)
    before, root = world.digests(), world.root_digest()
    world.cast(torch.bfloat16)
    assert {t.dtype for t in world.parameters()} == {torch.bfloat16}
    lm = world.block(LM).module
    assert lm.head.weight is lm.tok.weight  # the tie holds
    assert {path: cast_source(world, path) for path in before} == before
    assert cast_root(world) == root
    fresh = {path: block_digest(block.module) for path, block in world.blocks().items()}  # hashed now, not cached
    assert world.digests() == fresh and not set(fresh.values()) & set(before.values())  # the cast content's own
    assert world.root_digest() != root


def test_cast_leaves_integer_tensors_and_converts_buffers_not_saved():
    module = nn.Linear(3, 3)
    module.register_buffer("index", torch.arange(3))
    module.register_buffer("table", torch.ones(3), persistent=False)  # a cache, as rotary tables are
    world = World.from_blocks({"a/b/c/d": Block(module, "llm")})
    index = module.index
    world.cast(torch.float16)
    assert module.index is index and module.table.dtype == module.weight.dtype == torch.float16
    assert isinstance(module.weight, nn.Parameter) and module.weight.requires_grad


def test_load_with_a_dtype_takes_the_checkpoints_digests_as_sources(tmp_path):
    reference_world("tiny", seed=0).save(tmp_path / "w")
    digests = json.loads((tmp_path / "w/digests.json").read_text())
    world = World.load(tmp_path / "w", dtype=torch.float16, device="cpu")
    assert {p: cast_source(world, p) for p in digests["blocks"]} == digests["blocks"]
    assert cast_root(world) == digests["root"] and world.cast_record.dtype == torch.float16
    # Trusted as load trusts them (not hashed again); verify=True recomputes and refuses
    digests["blocks"][LM] = "sha256:" + "0" * 64
    (tmp_path / "w/digests.json").write_text(json.dumps(digests))
    assert cast_source(World.load(tmp_path / "w", dtype=torch.float16), LM) == digests["blocks"][LM]
    with pytest.raises(CheckpointError, match=LM):
        World.load(tmp_path / "w", dtype=torch.float16, verify=True)


def test_a_saved_cast_world_holds_its_cast_weights_and_binds_to_their_digests(tmp_path):
    world = reference_world("tiny", seed=0)
    world.cast(torch.bfloat16)
    world.save(tmp_path / "w")
    with safe_open(str(tmp_path / "w/weights.safetensors"), "pt") as f:
        names = f.keys()  # safe_open is no mapping
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    assert json.loads((tmp_path / "w/digests.json").read_text())["blocks"] == world.digests()
    loaded = World.load(tmp_path / "w", verify=True)
    assert loaded.cast_record is None and loaded.digests() == world.digests()
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), world.state_dict().values()))


def test_a_world_saved_in_half_precision_loads_in_it(tmp_path):
    world = reference_world("tiny", seed=0).to(torch.float16)  # Module.to: world.json still builds float32
    world.save(tmp_path / "w")
    loaded = World.load(tmp_path / "w", verify=True)
    assert {t.dtype for t in loaded.parameters()} == {torch.float16} and loaded.digests() == world.digests()
    lm = loaded.block(LM).module
    assert lm.head.weight is lm.tok.weight


def test_a_base_value_the_dtype_cannot_hold_is_refused_and_nothing_is_cast():
    """float16 turned a base weight of 1e6 into inf without a word."""
    world = reference_world("tiny", seed=0)
    lm = world.block(LM).module
    with torch.no_grad():
        lm.ln_f.weight[3] = 1e6
    before = {k: v.clone() for k, v in world.state_dict().items()}
    with pytest.raises(WorldError, match=r"ln_f.weight: holds 1e\+06, which float16 cannot hold") as err:
        world.cast(torch.float16)
    assert err.value.path == f"{LM}:ln_f.weight"
    after = world.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert world.cast_record is None
    world.cast(torch.bfloat16)  # its range holds it
    assert torch.isfinite(lm.ln_f.weight).all()


def test_masks_and_sentinels_cast_as_module_to_casts_them():
    """The finite check refused a float32 mask filled with finfo.min, a common buffer, which
    .half() turns into -inf as the model means it."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("mask", torch.full((4, 4), torch.finfo(torch.float32).min), persistent=False)
            self.register_buffer("floor", torch.full((4,), torch.finfo(torch.float32).min))  # saved, a sentinel

        def forward(self, x):
            return self.fc(x)

    world = World.from_blocks({"s/p/g/m": Block(Masked(), "llm")})
    world.cast(torch.float16)
    module = world.block("s/p/g/m").module
    assert torch.isneginf(module.mask).all() and torch.isneginf(module.floor).all()
