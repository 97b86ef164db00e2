import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lwformat import LightConfig
from lwformat.adapters.checkpoint import adapter_tensors
from lwformat.errors import BaseMismatchError, CheckpointError, TargetError
from lwformat.zoo import reference_world
from tests.conftest import small_world

LLM = "author/narrate/text/llm"


def trained(kind="lora"):
    world = small_world()
    world.customize(LightConfig(kind=kind, rank=2, neurons=[1, 3], blocks=["author/**"]))
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.add_(torch.randn_like(p))
    return world


def rewritten(tmp_path, tensors=None, **meta):
    """A copy of a saved light checkpoint with some tensors and metadata replaced."""
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        old_meta, old = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file({**old, **(tensors or {})}, str(tmp_path / "b.safetensors"), metadata={**old_meta, **meta})
    return tmp_path / "b.safetensors"


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "neuron", "bias"])
def test_light_checkpoint_round_trip(tmp_path, kind):
    world = trained(kind)
    world.save_adapters(tmp_path / "noir.safetensors")
    fresh = small_world()
    fresh.load_adapters(tmp_path / "noir.safetensors")
    ours, theirs = adapter_tensors(world), adapter_tensors(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    tokens = torch.randint(0, 16, (2, 5))
    assert torch.equal(world.block(LLM)(tokens), fresh.block(LLM)(tokens))


def test_file_holds_only_adapters_and_their_config(tmp_path):
    world = trained()
    world.save_adapters(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    assert meta["format"] == "lwadapters/2" and LightConfig.from_json(meta["config"]).rank == 2
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 20_000


def test_adapters_for_another_base_are_refused_untouched(tmp_path):
    trained().save_adapters(tmp_path / "a.safetensors")
    other = small_world(seed=1)
    before = repr(other)
    with pytest.raises(BaseMismatchError) as err:
        other.load_adapters(tmp_path / "a.safetensors")
    assert err.value.path in {LLM, "author/narrate/text/critic"} and err.value.expected != err.value.found
    assert repr(other) == before and other.customization is None


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError):
        small_world().load_adapters(tmp_path / "junk.safetensors")
    with pytest.raises(TargetError, match="no adapters"):
        small_world().save_adapters(tmp_path / "none.safetensors")
    assert not (tmp_path / "none.safetensors").exists()


def test_a_fused_world_saves_no_adapters(tmp_path):
    """Fused, the base weights hold the deltas: adapters saved then would be bound to that other base."""
    from lwformat.adapters.checkpoint import save_adapters
    from lwformat.errors import FusedError

    world = trained()
    world.fuse()
    with pytest.raises(FusedError, match="unfuse"):
        save_adapters(world, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []
    world.unfuse()
    save_adapters(world, tmp_path / "a.safetensors")


def test_pattern_order_survives_a_save(tmp_path):
    """The first matching rank/alpha pattern wins: sorted keys ('*' before 'fc') reloaded other sizes."""
    world = small_world()
    config = LightConfig(rank=4, blocks=[LLM], rank_pattern={"fc": 2, "*": 3}, alpha_pattern={"head": 1.0, "*": 16.0})
    plan = world.customize(config)
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.add_(torch.randn_like(p))
    world.save_adapters(tmp_path / "a.safetensors")
    fresh = small_world()
    assert fresh.load_adapters(tmp_path / "a.safetensors") == plan
    loaded = fresh.customization[0]
    assert list(loaded.rank_pattern.items()) == list(config.rank_pattern.items())
    assert list(loaded.alpha_pattern.items()) == list(config.alpha_pattern.items())
    tokens = torch.randint(0, 16, (2, 5))
    assert torch.equal(world.block(LLM)(tokens), fresh.block(LLM)(tokens))


def test_a_config_the_file_cannot_hold_is_a_checkpoint_error(tmp_path):
    trained().save_adapters(tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="alpha"):
        small_world().load_adapters(rewritten(tmp_path, config='{"alpha_pattern": {"*": 1e999}}'))


@pytest.mark.parametrize("index", [[5, 6], [3, 3], [1, 99], [-1, 3], torch.tensor([1, 3], dtype=torch.int32)], ids=str)
def test_stored_neuron_indices_must_be_the_plans(tmp_path, index):
    """The file's neuron_index overrode the plan's silently; out of range, forward then raised IndexError."""
    trained("neuron").save_adapters(tmp_path / "a.safetensors")
    key = f"{LLM}:fc.neuron_index"
    path = rewritten(tmp_path, {key: torch.as_tensor(index)})
    world = small_world()
    before = repr(world), {n: p.requires_grad for n, p in world.named_parameters()}
    with pytest.raises(CheckpointError) as err:
        world.load_adapters(path)
    assert err.value.path == key and key in str(err.value)
    assert (repr(world), {n: p.requires_grad for n, p in world.named_parameters()}) == before
    assert world.customization is None


@pytest.mark.parametrize("bound", [[], [LLM]], ids=["none", "one"])
def test_a_file_must_bind_every_block_it_adapts(tmp_path, bound):
    """Only the blocks the file listed were checked: with base={} adapters loaded onto another base."""
    world = trained()
    world.save_adapters(tmp_path / "a.safetensors")
    other = small_world(seed=1)
    base = json.dumps({b: other.digests()[b] for b in bound})  # what is listed matches this world
    before = repr(other)
    with pytest.raises(CheckpointError) as err:
        other.load_adapters(rewritten(tmp_path, base=base))
    assert err.value.path in world.customization[1].blocks() and err.value.path not in bound
    assert err.value.path in str(err.value)
    assert repr(other) == before and other.customization is None


def test_a_checkpoint_written_before_suffix_names_loads_with_the_meaning_it_had(tmp_path):
    """lwadapters/1 configs were read with exact names: there rank_pattern "fc" matched no slot
    of the tiny LM (its fc layers sit at blocks.N.mlp.fc), where it now matches them all."""
    lm = "author/narrate/text/llm"
    world = reference_world("tiny", seed=0)
    world.customize(LightConfig(kind="lora", rank=2, blocks=[lm]))  # the plan the old config made
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.add_(torch.randn_like(p))
    world.save_adapters(tmp_path / "a.safetensors")
    old_config = json.loads(LightConfig(kind="lora", rank=2, blocks=[lm]).to_json()) | {"rank_pattern": {"fc": 1}}
    fresh = reference_world("tiny", seed=0)
    fresh.load_adapters(rewritten(tmp_path, format="lwadapters/1", config=json.dumps(old_config)))
    ours, theirs = adapter_tensors(world), adapter_tensors(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert theirs[f"{lm}:blocks.0.mlp.fc.lora_A"].shape[0] == 2
    current = rewritten(tmp_path, format="lwadapters/2", config=json.dumps(old_config))
    with pytest.raises(CheckpointError, match="the plan needs"):  # today's meaning: rank 1 at every mlp.fc
        reference_world("tiny", seed=0).load_adapters(current)


def test_a_checkpoint_re_saved_from_an_old_one_loads_again(tmp_path):
    """The old file's unused key, carried into the re-saved (lwadapters/2) file, refused it."""
    world = trained()
    world.save_adapters(tmp_path / "a.safetensors")
    old_config = json.loads(LightConfig(kind="lora", rank=2, neurons=[1, 3], blocks=["author/**"]).to_json())
    old_config |= {"exclude": ["no_such_layer"]}
    fresh = small_world()
    fresh.load_adapters(rewritten(tmp_path, format="lwadapters/1", config=json.dumps(old_config)))
    fresh.save_adapters(tmp_path / "again.safetensors")
    again = small_world()
    again.load_adapters(tmp_path / "again.safetensors")
    ours, theirs = adapter_tensors(world), adapter_tensors(again)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
