import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lwformat import Block, LightConfig, World
from lwformat.errors import (
    AlreadyCustomizedError,
    NothingTargetedError,
    RankError,
    TargetError,
    UnknownBlockTypeError,
    UnmatchedPatternError,
    UnsupportedLayerError,
)

LLM = "author/narrate/text/llm"


def snapshot(world):
    return (
        repr(world),
        {k: v.clone() for k, v in world.state_dict().items()},
        {n: p.requires_grad for n, p in world.named_parameters()},
    )


def assert_unchanged(world, snap):
    structure, tensors, grads = snap
    assert repr(world) == structure
    now = world.state_dict()
    assert now.keys() == tensors.keys() and all(torch.equal(now[k], v) for k, v in tensors.items())
    assert {n: p.requires_grad for n, p in world.named_parameters()} == grads


def slots(plan):
    return [s.slot for s in plan.slots]


def test_dry_run_lists_exactly_what_customize_injects(world):
    config = LightConfig(rank=2, block_types=["llm"])
    snap = snapshot(world)
    planned = world.plan(config)
    assert_unchanged(world, snap)
    assert slots(planned) == [f"{LLM}:{m}" for m in ("emb", "fc", "seq", "img", "head")]
    assert world.customize(config) == planned


def test_select_by_type_glob_and_slot_pattern(world):
    assert slots(world.plan(LightConfig(blocks=["creator/**"], rank=2))) == [
        "creator/render/t2i/backbone:0",
        "creator/render/t2i/backbone:2",
    ]
    # a shared block is selected through any of its paths, and planned once, canonically
    assert slots(world.plan(LightConfig(blocks=["environment/**"], slots=["fc"]))) == [f"{LLM}:fc"]
    assert slots(world.plan(LightConfig(slots=["author/*/*/critic:fc", "*/*/*/llm:head"]))) == [
        f"{LLM}:head",
        "author/narrate/text/critic:fc",
    ]
    plan = world.plan(LightConfig(block_types=["conditioner"], exclude=["emb", "seq", "i*"]))
    assert slots(plan) == ["author/narrate/text/critic:fc", "author/narrate/text/critic:head"]


def test_rank_and_alpha_overrides(world):
    plan = world.plan(LightConfig(rank=4, blocks=[LLM], rank_pattern={"fc": 2, "*": 3}, alpha_pattern={"head": 1.0}))
    by_slot = {s.module_path: s for s in plan.slots}
    assert by_slot["fc"].rank == 2 and by_slot["fc"].alpha == 2.0  # alpha defaults to the slot's rank
    assert by_slot["emb"].rank == 3 and by_slot["head"].alpha == 1.0
    assert by_slot["fc"].shapes == {"lora_A": [2, 8], "lora_B": [8, 2]}


def test_kind_that_cannot_host_a_layer_skips_it_and_reports(world):
    plan = world.plan(LightConfig(kind="dora", rank=2, blocks=[LLM]))
    assert f"{LLM}:emb" not in slots(plan)
    assert "embedding" in plan.skipped[f"{LLM}:emb"]
    assert "skipped" in str(plan)


@pytest.mark.parametrize(
    ("config", "error", "path"),
    [
        (LightConfig(blocks=["nowhere/**"]), NothingTargetedError, None),
        (LightConfig(block_types=["vocoder"]), UnknownBlockTypeError, "vocoder"),
        (LightConfig(blocks=[LLM], slots=["norm"]), UnsupportedLayerError, f"{LLM}:norm"),
        (LightConfig(kind="dora", blocks=[LLM], slots=["emb"]), UnsupportedLayerError, f"{LLM}:emb"),
        (LightConfig(rank=0), RankError, f"{LLM}:emb"),
        (LightConfig(rank=9, blocks=[LLM]), RankError, f"{LLM}:emb"),
        (LightConfig(rank_pattern={"img": 19}, blocks=[LLM]), RankError, f"{LLM}:img"),
        (LightConfig(kind="neuron", neurons=[0, 99], blocks=[LLM], slots=["fc"]), RankError, f"{LLM}:fc"),
        (LightConfig(kind="neuron", neurons=9, blocks=[LLM], slots=["fc"]), RankError, f"{LLM}:fc"),
        (LightConfig(kind="nope"), TargetError, None),
    ],
)
def test_bad_requests_name_the_path_and_change_nothing(world, config, error, path):
    snap = snapshot(world)
    with pytest.raises(error) as err:
        world.customize(config)
    assert err.value.path == path
    if path:
        assert path in str(err.value)
    assert_unchanged(world, snap)


def test_customizing_twice_is_refused_and_changes_nothing(world):
    world.customize(LightConfig(rank=2, blocks=[LLM], slots=["fc"]))
    snap = snapshot(world)
    with pytest.raises(AlreadyCustomizedError) as err:
        world.customize(LightConfig(rank=2))
    assert err.value.path == f"{LLM}:fc"
    assert_unchanged(world, snap)


def test_neurons_by_count_are_spread_evenly(world):
    plan = world.plan(LightConfig(kind="neuron", neurons=3, blocks=[LLM], slots=["head"]))
    assert plan.slots[0].neurons == [0, 8, 15]


def test_decustomize_restores_the_very_same_layers(world):
    fc = world.block(LLM).module.fc
    before = world.root_digest()
    world.customize(LightConfig(rank=2))
    assert world.block(LLM).module.fc is not fc
    world.decustomize()
    assert world.block(LLM).module.fc is fc
    assert world.root_digest() == before and world.customization is None


@pytest.mark.parametrize("field, value", [("rank", "4"), ("rank", True), ("kind", 3), ("blocks", "author/**"),
                                          ("alpha", "x"), ("neurons", [1.5]), ("name", ""), ("rslora", "no"),
                                          ("alpha", float("nan")), ("alpha", float("inf")), ("rank_pattern", ["*"]),
                                          ("rank_pattern", {"*": "4"}), ("rank_pattern", {"*": 2.5}), ("rank_pattern", {"*": True}),
                                          ("alpha_pattern", {"*": "x"}), ("alpha_pattern", {"*": float("-inf")}),
                                          ("alpha_pattern", {"fc": 1.0, "*": float("nan")})])  # fmt: skip
def test_a_config_built_in_python_is_checked_like_one_decoded(field, value):
    """Decoding JSON checks the types; LightConfig(...) did not, and customize failed deep inside
    (or took a NaN alpha, or rslora="no", silently)."""
    with pytest.raises(TargetError) as caught:
        LightConfig(**{field: value})
    assert caught.value.path == field
    if isinstance(value, dict):
        assert repr(list(value)[-1]) in str(caught.value)  # the pattern at fault


@pytest.mark.parametrize("data, field", [('{"rank_pattern": {"*": "4"}}', "rank_pattern"), ('{"rank_pattern": {"*": 2.5}}', "rank_pattern"),
                                         ('{"alpha": 1e999}', "alpha"), ('{"name": ""}', "name"), ("{not json", None)])  # fmt: skip
def test_a_config_decoded_is_refused_with_a_target_error(data, field):
    with pytest.raises(TargetError) as caught:
        LightConfig.from_json(data)
    assert caught.value.path == field and isinstance(caught.value.__cause__, msgspec.DecodeError)


@settings(deadline=None)  # microseconds each; a stalled machine must not fail it
@given(st.dictionaries(st.text(min_size=1), st.integers(1, 64)), st.dictionaries(st.text(min_size=1), st.floats(0, 64)))
def test_pattern_order_survives_json(ranks, alphas):
    """The first matching pattern wins, so to_json must keep the keys' order (it sorted them)."""
    loaded = LightConfig.from_json(LightConfig(rank_pattern=ranks, alpha_pattern=alphas).to_json())
    assert list(loaded.rank_pattern.items()) == list(ranks.items())
    assert list(loaded.alpha_pattern.items()) == list(alphas.items())


def encoder_world(**block):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return World.from_blocks({"s/p/g/enc": Block(layer, "conditioner", **block)})


def test_multihead_attention_out_proj_is_no_slot():
    """MHA reads out_proj.weight and never calls out_proj: its adapter did nothing until fused."""
    assert slots(encoder_world().plan(LightConfig(rank=2))) == ["s/p/g/enc:linear1", "s/p/g/enc:linear2"]
    bare = World.from_blocks({"s/p/g/mha": Block(nn.MultiheadAttention(8, 2), "conditioner")})
    with pytest.raises(NothingTargetedError):
        bare.plan(LightConfig(rank=2))


@pytest.mark.parametrize("how", ["explicit", "declared"])
def test_targeting_multihead_attention_out_proj_says_why(how):
    world = encoder_world(slots=["self_attn.out_proj"]) if how == "declared" else encoder_world()
    config = LightConfig(rank=2, slots=["self_attn.out_proj"] if how == "explicit" else [])
    snap = snapshot(world)
    with pytest.raises(UnsupportedLayerError) as err:
        world.customize(config)
    assert err.value.path == "s/p/g/enc:self_attn.out_proj"
    assert "s/p/g/enc:self_attn.out_proj" in str(err.value) and "never calls" in str(err.value)
    assert_unchanged(world, snap)


NESTED = "s/p/g/lm"


def nested_world():
    """blocks.{0,1}.attn.{qkv,proj} and blocks.{0,1}.fc: the module paths of a transformer's layers."""

    def layer() -> nn.Module:
        return nn.ModuleDict({"attn": nn.ModuleDict({"qkv": nn.Linear(8, 24), "proj": nn.Linear(8, 8)}), "fc": nn.Linear(8, 8)})

    torch.manual_seed(0)
    return World.from_blocks({NESTED: Block(nn.ModuleDict({"blocks": nn.ModuleList([layer(), layer()])}), "llm")})


QKV = [f"{NESTED}:blocks.0.attn.qkv", f"{NESTED}:blocks.1.attn.qkv"]


@pytest.mark.parametrize(
    "patterns, expected",
    [
        (["qkv"], QKV),  # PEFT's target_modules=["qkv"]
        (["attn.qkv"], QKV),  # any dotted suffix
        (["*qkv"], QKV),  # a wildcard keeps fnmatch's meaning: "*" crosses dots
        (["0.attn.qkv"], QKV[:1]),
        ([f"{NESTED}:blocks.1.attn.qkv"], QKV[1:]),  # the full form names a module path whole
    ],
)
def test_a_name_without_wildcards_matches_as_a_dotted_suffix_like_peft(patterns, expected):
    assert slots(nested_world().plan(LightConfig(rank=2, slots=patterns))) == expected


def test_suffix_names_work_in_exclude_rank_pattern_and_alpha_pattern():
    plan = nested_world().plan(LightConfig(rank=2, exclude=["fc"], rank_pattern={"qkv": 4}, alpha_pattern={"attn.proj": 1.0}))
    assert {s.module_path: (s.rank, s.alpha) for s in plan.slots} == {
        "blocks.0.attn.qkv": (4, 4.0), "blocks.0.attn.proj": (2, 1.0),
        "blocks.1.attn.qkv": (4, 4.0), "blocks.1.attn.proj": (2, 1.0),
    }  # fmt: skip


@pytest.mark.parametrize(
    "config, field, key",
    [
        (LightConfig(rank=2, rank_pattern={".*qkv": 4}), "rank_pattern", ".*qkv"),  # a regex, as PEFT takes it
        (LightConfig(rank=2, alpha_pattern={"qkv": 1.0, "q_proj": 2.0}), "alpha_pattern", "q_proj"),
        (LightConfig(rank=2, exclude=["zzz"]), "exclude", "zzz"),
        (LightConfig(rank=2, exclude=["*.fc"], rank_pattern={"fc": 4}), "rank_pattern", "fc"),  # matches excluded slots only
        (LightConfig(rank=2, slots=["n.qkv"], exclude=["tn.qkv"]), None, "n.qkv"),  # a suffix ends at a dot: nothing planned
    ],
)
def test_a_pattern_that_matches_no_selected_slot_is_refused_naming_it_and_a_real_slot(config, field, key):
    world = nested_world()
    snap = snapshot(world)
    with pytest.raises(UnmatchedPatternError if field else NothingTargetedError) as err:
        world.customize(config)
    if field:
        assert (err.value.path, err.value.pattern) == (field, key)
    assert repr(key) in str(err.value)
    assert f"{NESTED}:blocks.0.attn." in str(err.value)  # a real slot, as an example
    assert_unchanged(world, snap)


def test_nothing_targeted_suggests_the_star_dot_form_with_a_real_slot():
    with pytest.raises(NothingTargetedError) as err:
        nested_world().plan(LightConfig(rank=2, slots=["q_proj"]))
    assert f"'*.proj' matches {NESTED}:blocks.0.attn.proj" in str(err.value)  # the nearest name


def test_a_suffix_name_reaching_a_container_selects_nothing_and_an_entry_selecting_nothing_is_refused():
    with pytest.raises(NothingTargetedError):
        nested_world().plan(LightConfig(rank=2, slots=["attn"]))  # blocks.*.attn: containers, no slots
    with pytest.raises(UnmatchedPatternError) as err:
        nested_world().plan(LightConfig(rank=2, slots=["qkv", "attn"]))  # a typo among good entries changed nothing
    assert (err.value.path, err.value.pattern) == ("slots", "attn")


def test_a_suffix_name_skips_modules_that_are_no_slot_where_the_exact_name_plans():
    """slots=['proj'] also reached a container at mlp.proj, or a Linear the block does not
    declare, and refused the plan (which exclude could not rescue)."""

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.mlp = nn.ModuleDict({"proj": nn.Sequential(nn.Linear(8, 8), nn.GELU())})  # a container named proj
            self.cross = nn.ModuleDict({"qkv": nn.Linear(8, 24)})  # not a declared slot
            self.attn = nn.ModuleDict({"qkv": nn.Linear(8, 24)})

    world = World.from_blocks({NESTED: Block(Layer(), "llm", slots=["proj", "attn.qkv", "mlp.proj.0"])})
    assert slots(world.plan(LightConfig(rank=2, slots=["proj"]))) == [f"{NESTED}:proj"]
    assert slots(world.plan(LightConfig(rank=2, slots=["qkv"]))) == [f"{NESTED}:attn.qkv"]
    with pytest.raises(UnsupportedLayerError):  # named exactly, a module that is no slot is still refused by name
        world.plan(LightConfig(rank=2, slots=["mlp.proj"]))
