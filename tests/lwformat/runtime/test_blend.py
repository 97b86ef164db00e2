"""Blending: exact linear sums, optimal svd re-ranks, TIES/DARE, parents, and refusals.

Real bundles written to disk from a small world (embedding, linear and conv2d layers).
Every expectation is computed here, densely or from the parents, never by the code under test.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import shutil
import struct

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lwformat import LightConfig
from lwformat.bundle.read import Bundle
from lwformat.bundle.write import write_bundle
from lwformat.errors import BlendError, BundleFormatError, BundleNotFoundError
from lwformat.runtime.blend import blend
from lwformat.runtime.blend_kinds import TENSOR_ORDER
from lwformat.runtime.blend_merge import dare, ties
from lwformat.runtime.lowrank import lowrank_distance, rerank
from lwformat.world import Block, World

LM, CONV = "author/narrate/text/llm", "creator/render/t2i/backbone"
_count = itertools.count()


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.emb(x))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.tanh(self.conv(x)))


def make_world(seed: int = 0, dtype: torch.dtype = torch.float32) -> World:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return World.from_blocks({LM: Block(TokenNet().to(dtype), "llm"), CONV: Block(ConvNet().to(dtype), "backbone")})


def make_bundle(root, seed: int, *, world_seed: int = 0, name: str = "author/noir", dtype=torch.float32, fill=None, **config) -> Bundle:
    world = make_world(world_seed, dtype)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        world.customize(LightConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in world.adapter_parameters():
            if fill is None:
                p.add_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.1)
            else:
                p.fill_(fill)
    out = root / f"bundle-{next(_count)}"
    write_bundle(world, out, name=name, version="1.0.0")
    return Bundle.open(out)


def outputs(world: World) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return world.block(LM).module(tokens), world.block(CONV).module(images)


def stacked(parts) -> tuple[torch.Tensor, torch.Tensor]:
    world = make_world()
    for i, (bundle, w) in enumerate(parts):
        world.apply(bundle, weight=w, name=f"author/part{i}")
    return outputs(world)


def applied(result) -> tuple[torch.Tensor, torch.Tensor]:
    world = make_world()
    world.apply(result)
    return outputs(world)


def assert_same_outputs(a, b, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def dense(entry, tensors) -> torch.Tensor:
    """A LoRA slot's delta as an (out, fan_in) float64 matrix, by the LoRA formula."""
    A = tensors["lora_A"].double().reshape(entry.rank, -1)
    scaling = entry.alpha / (math.sqrt(entry.rank) if entry.rslora else entry.rank)
    return scaling * tensors["lora_B"].double() @ A


def exact_sum(parts, slot) -> torch.Tensor:
    return sum(w * dense(b.slots[slot], b.slot_tensors(slot)) for b, w in parts if slot in b.slots)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        "r2": make_bundle(root, 1, name="author/noir", rank=2, alpha=3.0),
        "r3": make_bundle(root, 2, name="author/rain", rank=3, rslora=True, rank_pattern={"fc1": 5}),
        "lm_only": make_bundle(root, 3, name="author/fog", rank=4, blocks=["author/**"]),
    }


# -- linear: the exact weighted sum --------------------------------------------------------------


def test_linear_lora_is_the_stacked_sum_at_any_ranks(lora):
    parts = [(lora["r2"], 0.7), (lora["r3"], -0.4), (lora["lm_only"], 1.3)]  # conv slots only in two parents
    result = blend(parts)
    assert_same_outputs(applied(result), stacked(parts))
    assert result.report.relative_error == 0.0
    ranks = {e.slot: e.rank for e in result.manifest.slots}
    assert ranks[f"{LM}:fc1"] == 2 + 5 + 4 and ranks[f"{CONV}:conv"] == 2 + 3
    assert tuple(result.slot_tensors(f"{CONV}:conv")["lora_A"].shape) == (5, 3, 3, 3)


@pytest.mark.parametrize(
    "kind, first, second",
    [
        ("ia3", {}, {}),
        ("bias", {}, {}),
        ("neuron", {"neurons": [0, 2, 3]}, {"neurons": [1, 2, 3, 7]}),  # unions to 5 channels
    ],
)
def test_linear_is_exact_for_every_blendable_kind(tmp_path, kind, first, second):
    blocks = ["author/**"] if kind == "neuron" else []
    a = make_bundle(tmp_path, 4, name="author/a", kind=kind, blocks=blocks, **first)
    b = make_bundle(tmp_path, 5, name="author/b", kind=kind, blocks=blocks, **second)
    parts = [(a, 0.6), (b, 0.9)]
    for method in ("linear", "svd"):  # nothing to re-rank: svd is the exact sum too
        result = blend(parts, method=method)
        assert_same_outputs(applied(result), stacked(parts))
        assert result.report.relative_error == 0.0
    if kind == "neuron":
        assert result.slot_tensors(f"{LM}:fc1")["neuron_index"].tolist() == [0, 1, 2, 3, 7]


def test_tensor_order_is_each_kinds_declared_order():
    from lwformat.adapters.kinds import KINDS, SlotSettings
    from lwformat.adapters.layers import Geometry

    geo = Geometry("linear", 4, 4, (4,))
    for kind, names in TENSOR_ORDER.items():
        declared = tuple(KINDS[kind].shapes(geo, SlotSettings(kind, 2, 2.0, False, (0, 1))))
        assert names[: len(declared)] == declared


# -- svd: the Eckart–Young optimum, from the factors ----------------------------------------------


def test_svd_error_is_the_eckart_young_optimum(lora):
    parts = [(lora["r2"], 0.7), (lora["r3"], 0.5), (lora["lm_only"], -0.8)]
    result = blend(parts, method="svd", rank=3)
    errors, norms = [], []
    for entry in result.manifest.slots:
        exact = exact_sum(parts, entry.slot)
        sigma = torch.linalg.svdvals(exact)
        optimum = sigma[3:].square().sum().sqrt()
        measured = (dense(entry, result.slot_tensors(entry.slot)) - exact).norm()
        report = result.report.slots[entry.slot]
        assert entry.rank == min(3, sigma.numel())
        assert report.relative_error == pytest.approx(float(optimum / exact.norm()), abs=1e-5)
        assert float(measured / exact.norm()) == pytest.approx(report.relative_error, abs=1e-5)
        errors.append(measured)
        norms.append(exact.norm())
    total = float(torch.stack(errors).norm() / torch.stack(norms).norm())
    assert 0 < result.report.relative_error == pytest.approx(total, abs=1e-5)


def test_svd_at_the_summed_rank_is_exact(lora):
    parts = [(lora["r2"], 0.7), (lora["r3"], 0.3)]
    result = blend(parts, method="svd", rank=2 + 5)
    assert result.report.relative_error == 0.0
    assert_same_outputs(applied(result), stacked(parts))


# -- ties and dare ---------------------------------------------------------------------------------


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    T = torch.tensor([[3.0, -1.0, 0.5], [-2.0, -4.0, 1.0]])
    # trimmed to 2 of 3: [3, -1, 0] and [-2, -4, 0]; elected signs +, -, + (a zero sum counts as +)
    assert ties(T, torch.tensor([1.0, 1.0]), density=2 / 3).tolist() == [3.0, -2.5, 0.0]
    # weights scale what is merged, not the vote (PEFT's rule): the unweighted sums 1, −5, 0 still
    # elect +, −, +; merged are the weighted [1.5, −0.5, 0] and [−4, −8, 0] that agree
    assert ties(T, torch.tensor([0.5, 2.0]), density=2 / 3).tolist() == [1.5, -4.25, 0.0]


def test_ties_is_peft_ties_for_any_weights():
    from peft.utils.merge_utils import ties as peft_ties

    T = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.tensor([0.7, -1.3, 0.0], dtype=torch.float64)  # a negative weight and a zero one
    for density in (0.3, 0.5, 0.9):
        torch.testing.assert_close(ties(T, w, density), peft_ties(list(T), w, density), rtol=0, atol=1e-12)


def test_ties_matches_peft_add_weighted_adapter_at_different_alphas_and_ranks(tmp_path):
    import warnings

    from peft import LoraConfig, get_peft_model

    from lwformat.interop import import_peft

    base = make_world().block(LM).module
    targets = ["emb", "fc1", "fc2"]
    # PEFT's ties needs one r per adapter; per-module ranks and alphas may differ, and do here
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                           rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 3}), adapter_name="one")  # fmt: skip
    model.add_adapter("two", LoraConfig(r=4, lora_alpha=32, target_modules=targets, rank_pattern={"fc2": 2}))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    parents = []
    for adapter in ("one", "two"):  # not "a": PEFT warns of a name inside its "lora_" prefix
        model.save_pretrained(tmp_path / "peft", selected_adapters=[adapter])
        world = World.from_blocks({LM: Block(copy.deepcopy(base), "llm")})
        import_peft(world, LM, tmp_path / "peft" / adapter)
        write_bundle(world, tmp_path / adapter, name=f"author/{adapter}", version="1.0.0")
        parents.append(Bundle.open(tmp_path / adapter))
    weights = [0.7, -0.4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["one", "two"], weights, "mix", combination_type="ties", density=0.5)
    result = blend(list(zip(parents, weights)), method="ties", density=0.5)
    for module in targets:
        slot = f"{LM}:{module}"
        theirs = dict(model.named_modules())[f"base_model.model.{module}"].get_delta_weight("mix").double()
        ours = dense(next(e for e in result.manifest.slots if e.slot == slot), result.slot_tensors(slot))
        ours = ours.T if module == "emb" else ours  # PEFT's embedding delta is (num_embeddings, dim)
        assert float((ours - theirs).norm() / theirs.norm()) < 1e-6, module


def test_dare_keeps_about_density_and_rescales():
    T = torch.ones(1, 20000, dtype=torch.float64)
    out = dare(T, torch.tensor([2.0], dtype=torch.float64), 0.25, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0.0, 8.0}  # 2 · 1 / 0.25
    assert (out != 0).double().mean().item() == pytest.approx(0.25, abs=0.02)


def trim_own(T: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim of one task over its own entries: its ⌊density · numel⌋ largest in magnitude kept."""
    flat = T.reshape(-1)
    kept = torch.zeros_like(flat)
    top = flat.abs().topk(int(density * flat.numel())).indices
    kept[top] = flat[top]
    return kept.view(T.shape)


def disjoint_mean(tasks: list[torch.Tensor]) -> torch.Tensor:
    """TIES' vote and disjoint mean at equal weights 1: the mean of the nonzero values of the elected sign."""
    T = torch.stack(tasks)
    agree = T.sign() == torch.where(T.sum(0) >= 0, 1.0, -1.0).to(T.dtype)
    return (T * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_ties_trims_each_parent_among_its_own_entries_not_the_padding(tmp_path):
    # rank 2 beside rank 4, both at scaling 1 and weight 1: each factor is trimmed over its own
    # r_i rows (A) or columns (B), then zero-padded to rank 4 and merged
    r2 = make_bundle(tmp_path, 1, name="author/a", rank=2, alpha=2.0)
    r4 = make_bundle(tmp_path, 2, name="author/b", rank=4, alpha=4.0)
    result = blend([(r2, 1.0), (r4, 1.0)], method="ties", density=0.5)
    for entry in result.manifest.slots:
        A, B = [], []
        for parent in (r2, r4):
            t, r = parent.slot_tensors(entry.slot), parent.slots[entry.slot].rank
            A.append(F.pad(trim_own(t["lora_A"].double().reshape(r, -1), 0.5), (0, 0, 0, 4 - r)))  # (4, fan_in)
            B.append(F.pad(trim_own(t["lora_B"].double(), 0.5), (0, 4 - r)))  # (out, 4)
        got = result.slot_tensors(entry.slot)
        torch.testing.assert_close(got["lora_A"].double().reshape(4, -1), disjoint_mean(A), rtol=0, atol=1e-6)
        torch.testing.assert_close(got["lora_B"].double(), disjoint_mean(B), rtol=0, atol=1e-6)
    # neuron parents on disjoint channels: the union's other rows are not a parent's entries,
    # so each parent keeps half of its own rows' entries, and alone holds them
    na = make_bundle(tmp_path, 3, name="author/na", kind="neuron", neurons=[0, 1], blocks=["author/**"])
    nb = make_bundle(tmp_path, 4, name="author/nb", kind="neuron", neurons=[2, 3, 4, 5, 6, 7], blocks=["author/**"])
    result = blend([(na, 1.0), (nb, 1.0)], method="ties", density=0.5)
    for entry in result.manifest.slots:
        got = result.slot_tensors(entry.slot)
        for parent in (na, nb):
            t = parent.slot_tensors(entry.slot)
            rows = [got["neuron_index"].tolist().index(i) for i in t["neuron_index"].tolist()]
            expected = trim_own(t["neuron_delta"].double(), 0.5)
            torch.testing.assert_close(got["neuron_delta"][rows].double(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method, rank", [("ties", None), ("dare", None), ("ties", 2), ("dare", 2)])
def test_ties_and_dare_are_seeded_and_report_honest_errors(lora, method, rank):
    parts = [(lora["r2"], 0.7), (lora["r3"], 0.6)]
    result = blend(parts, method=method, rank=rank, density=0.6, seed=1)
    again = blend(parts, method=method, rank=rank, density=0.6, seed=1)
    assert all(torch.equal(t, again.tensors()[k]) for k, t in result.tensors().items())
    if method == "dare":
        other = blend(parts, method=method, rank=rank, density=0.6, seed=2)
        assert any(not torch.equal(t, other.tensors()[k]) for k, t in result.tensors().items())
    for entry in result.manifest.slots:
        exact = exact_sum(parts, entry.slot)
        measured = (dense(entry, result.slot_tensors(entry.slot)) - exact).norm() / exact.norm()
        assert result.report.slots[entry.slot].relative_error == pytest.approx(float(measured), abs=1e-5)
        assert entry.rank == (rank or 5 if entry.slot == f"{LM}:fc1" else rank or 3)
    assert result.report.relative_error > 0.01  # neither method is the exact sum
    world = make_world()
    world.apply(result)  # and the result is a valid bundle for the world


# -- parents and base ------------------------------------------------------------------------------


def test_parents_base_and_layout_are_recorded(lora):
    parts = [(lora["lm_only"], 0.25), (lora["r2"], 0.75)]
    result = blend(parts, method="svd", rank=2, version="2.0.0")
    m = result.manifest
    assert [(p.name, p.version, p.weight) for p in m.parents] == [("author/fog", "1.0.0", 0.25), ("author/noir", "1.0.0", 0.75)]
    on_disk = [hashlib.sha256((b.path / "manifest.json").read_bytes()).hexdigest() for b, _ in parts]
    assert [p.manifest_sha256 for p in m.parents] == on_disk  # writers write canonical bytes
    world = make_world()
    assert m.base.blocks == {LM: world.digests()[LM], CONV: world.digests()[CONV]}
    assert m.version == "2.0.0" and m.files == [] and m.name.startswith("author/blend-")
    assert [e.slot for e in m.slots] == [e.slot for e in lora["lm_only"].manifest.slots] + [
        e.slot for e in lora["r2"].manifest.slots if e.block == CONV
    ]
    expected_keys = [f"{e.slot}.{n}" for e in m.slots for n in ("lora_A", "lora_B")]
    assert list(result.tensors()) == expected_keys
    assert blend(parts, method="svd", rank=2).manifest.name == m.name  # the default name is deterministic


def test_a_blend_blends_again(lora):
    inner = blend([(lora["r2"], 0.5), (lora["r3"], 0.5)])
    outer = blend([(inner, 2.0), (lora["lm_only"], 1.0)], name="author/mix")
    assert outer.manifest.parents[0].name == inner.manifest.name
    assert_same_outputs(applied(outer), stacked([(lora["r2"], 1.0), (lora["r3"], 1.0), (lora["lm_only"], 1.0)]))


# -- refusals ---------------------------------------------------------------------------------------


def test_different_bases_are_refused_naming_the_block(tmp_path, lora):
    other = make_bundle(tmp_path, 6, world_seed=1, name="author/other", rank=2, blocks=["creator/**"])
    with pytest.raises(BlendError, match="different bases") as info:
        blend([(lora["r2"], 0.5), (other, 0.5)])
    assert info.value.path == CONV and info.value.parents == ("author/noir", "author/other")


def test_dora_and_mixed_kinds_are_refused_naming_the_slot(tmp_path, lora):
    dora = make_bundle(tmp_path, 7, name="author/dora", kind="dora", rank=2, slots=["fc2"])
    with pytest.raises(BlendError, match="DoRA") as info:
        blend([(lora["r2"], 0.5), (dora, 0.5)])
    assert info.value.path == f"{LM}:fc2"
    ia3 = make_bundle(tmp_path, 8, name="author/gain", kind="ia3", slots=["fc1"])
    with pytest.raises(BlendError, match="different kinds") as info:
        blend([(lora["r2"], 0.5), (ia3, 0.5)])
    assert info.value.path == f"{LM}:fc1" and info.value.parents == ("author/noir", "author/gain")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "cat"}, "unknown blend method"),
        ({"rank": 4}, "linear blend is exact"),
        ({"method": "svd", "rank": 0}, "positive integer"),
        ({"method": "ties", "density": 0.0}, "density"),
        ({"name": "no-owner"}, "no-owner"),
        ({"version": "1.0"}, "1.0"),
    ],
)
def test_bad_requests_are_refused(lora, kwargs, match):
    with pytest.raises(BlendError, match=match):
        blend([(lora["r2"], 1.0)], **kwargs)


def test_bad_weights_are_refused(lora):
    for weight in (math.nan, 10**400):  # an int beyond any float is no finite number either
        with pytest.raises(BlendError, match="finite"):
            blend([(lora["r2"], weight)])
    with pytest.raises(BlendError, match="at least one"):
        blend([])


def test_parents_may_be_given_by_path_as_apply_takes_them(lora, tmp_path):
    """apply("rain/") works, so blend([("noir-style", .7), ("rain", .3)]) must too."""
    by_path = blend([(str(lora["r2"].path), 0.7), (lora["r3"].path, 0.3)])  # a str and a PathLike
    by_bundle = blend([(lora["r2"], 0.7), (lora["r3"], 0.3)])
    assert by_path.manifest == by_bundle.manifest
    assert by_path.tensors().keys() == by_bundle.tensors().keys()
    assert all(torch.equal(t, by_bundle.tensors()[k]) for k, t in by_path.tensors().items())
    with pytest.raises(BundleNotFoundError):
        blend([(tmp_path / "nowhere", 1.0)])


@pytest.mark.parametrize(
    "parts, said",
    [
        ("author/noir", "not str 'author/noir'"),
        ([lambda: 1], "part 0 is function"),
        ([("a", "b", "c")], "part 0 is tuple ('a', 'b', 'c'), not a pair"),
        ([(3, 0.5)], "part 0 holds int 3, not a Bundle, a Blend or a bundle's path"),
    ],
)
def test_parts_that_are_not_pairs_of_bundle_and_weight_say_what_they_got(parts, said):
    with pytest.raises(BlendError, match="parts is a list of \\(bundle, weight\\) pairs") as info:
        blend(parts)
    assert said in str(info.value)


def poisoned(bundle: Bundle, key: str, value: float, out) -> Bundle:
    """A copy of `bundle` whose float32 tensor `key` starts with `value`, its bytes patched as another tool might."""
    shutil.copytree(bundle.path, out)
    path = out / bundle.weights_path.name
    data = bytearray(path.read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    at = 8 + size + json.loads(data[8 : 8 + size])[key]["data_offsets"][0]
    data[at : at + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    return Bundle.open(out)


@pytest.mark.parametrize("method", ["linear", "svd", "ties", "dare"])
def test_a_parent_holding_nan_or_inf_is_refused_naming_it_and_the_tensor(tmp_path, lora, method):
    slot = f"{LM}:fc2"
    for i, value in enumerate((math.nan, math.inf)):
        bad = poisoned(lora["lm_only"], f"{slot}.lora_B", value, tmp_path / f"bad{i}")
        with pytest.raises(BundleFormatError, match="author/fog@1.0.0: .*NaN or inf.*; nothing was blended") as info:
            blend([(lora["r2"], 0.5), (bad, 0.5)], method=method)
        assert info.value.path == f"{slot}:lora_B"


@pytest.mark.parametrize("weight", [1e160, 1e-160])
def test_huge_and_tiny_weights_blend_and_report_finite_numbers(tmp_path, weight):
    # the blends (entries ≈ 1e159 or 1e-161) fit float64; their factors' Gram matrices (≈ 1e318, 1e-322) do not
    a = make_bundle(tmp_path, 1, name="author/big", rank=2, dtype=torch.float64, blocks=["author/**"])
    for method, kwargs in (("linear", {}), ("svd", {"rank": 2}), ("ties", {"density": 1.0}), ("dare", {"density": 1.0})):
        result = blend([(a, weight)], method=method, **kwargs)
        for entry in result.manifest.slots:
            exact = dense(a.slots[entry.slot], a.slot_tensors(entry.slot))  # at weight 1
            got = dense(entry, result.slot_tensors(entry.slot)) / weight
            torch.testing.assert_close(got, exact, rtol=0, atol=1e-9 * float(exact.abs().max()))
            report = result.report.slots[entry.slot]
            assert report.norm == pytest.approx(weight * float(exact.norm()), rel=1e-9)
            assert report.error <= 1e-7 * report.norm
    shift = make_bundle(tmp_path, 2, name="author/shift", kind="bias", dtype=torch.float64, blocks=["author/**"])
    for entry, report in zip(shift.manifest.slots, blend([(shift, weight)]).report.slots.values()):
        c = shift.slot_tensors(entry.slot)["bias_delta"]
        assert report.norm == pytest.approx(weight * float(c.norm()), rel=1e-9)


def test_a_blend_whose_norm_overflows_float64_is_refused_not_reported_as_inf(tmp_path):
    # A and B all ones at rank 2: Δ = 2·ones(24, 16); at weight 5e306 every entry, 1e307, fits
    # float64, while ‖Δ‖_F = √384 · 1e307 does not
    flat = make_bundle(tmp_path, 1, name="author/flat", rank=2, alpha=2.0, dtype=torch.float64, slots=["fc1"], fill=1.0)
    for method in ("linear", "svd"):
        with pytest.raises(BlendError, match="overflows float64") as info:
            blend([(flat, 5e306)], method=method)
        assert info.value.path == f"{LM}:fc1"
    # weight × scaling 2 is beyond float64 itself: refused before any decomposition sees inf
    steep = make_bundle(tmp_path, 2, name="author/steep", rank=2, alpha=4.0, dtype=torch.float64, slots=["fc1"])
    with pytest.raises(BlendError, match="weight × scaling × lora_B overflows float64"):
        blend([(steep, 1.7e308)], method="svd", rank=1)


# -- the factor maths, for random shapes and ranks ---------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    keep=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_rerank_is_the_optimal_truncation(m, n, ranks, keep, seed):
    gen = torch.Generator().manual_seed(seed)
    B = torch.cat([torch.randn(m, r, generator=gen, dtype=torch.float64) for r in ranks], dim=1)  # (m, R)
    A = torch.cat([torch.randn(r, n, generator=gen, dtype=torch.float64) for r in ranks])  # (R, n)
    M = B @ A
    sigma = torch.linalg.svdvals(M)
    B_k, A_k, discarded, total = rerank(B, A, keep)
    assert B_k.shape[1] == A_k.shape[0] == min(keep, m, n, sum(ranks))
    scale = 1 + float(sigma[0])
    measured = float((M - B_k @ A_k).norm())
    optimum = float(sigma[keep:].square().sum().sqrt())
    assert measured == pytest.approx(optimum, abs=1e-9 * scale)
    assert float(discarded) == pytest.approx(optimum, abs=1e-9 * scale)
    assert float(total) == pytest.approx(float(M.norm()), abs=1e-9 * scale)
    naive = float((M - B[:, :keep] @ A[:keep]).norm())  # another rank-≤k candidate: the first factors
    assert measured <= naive + 1e-9 * scale
    # distances come from Gram matrices: accurate to about √ε of the matrices' size
    assert float(lowrank_distance(B_k, A_k, B, A)) == pytest.approx(measured, abs=1e-7 * scale)


@settings(max_examples=30, deadline=None)
@given(exponent=st.integers(-40, 40), seed=st.integers(0, 2**16))
def test_rerank_does_not_lose_a_term_its_factors_carry_unevenly(exponent, seed):
    """B/λ with A·λ is the same matrix: a term carried mostly by one factor is no noise."""
    gen = torch.Generator().manual_seed(seed)
    B, A = torch.randn(12, 4, generator=gen, dtype=torch.float64), torch.randn(4, 10, generator=gen, dtype=torch.float64)
    lam = 10.0**exponent * (1 + torch.rand((), generator=gen, dtype=torch.float64))  # not a power of two
    B[:, :2] /= lam  # the first parent's two terms, rescaled as a trainer may leave them
    A[:2] *= lam
    M = B @ A  # (12, 10)
    sigma = torch.linalg.svdvals(M)
    B_k, A_k, _, total = rerank(B, A, 4)
    scale = float(sigma[0])
    assert float((M - B_k @ A_k).norm()) == pytest.approx(float(sigma[4:].square().sum().sqrt()), abs=1e-9 * scale)
    assert float(total) == pytest.approx(float(M.norm()), rel=1e-9)


def test_a_blend_saves_as_a_bundle_that_applies_like_the_blend(tmp_path, bundles):
    from lwformat.bundle import Bundle, verify_files
    from lwformat.zoo import reference_world

    mix = blend([(bundles["noir"], 0.7), (bundles["rain"], 0.3)], method="svd", rank=4, name="me/noir-rain")
    manifest = mix.save(tmp_path / "mix", version="1.0.0")
    saved = Bundle.open(tmp_path / "mix")
    verify_files(saved)
    assert manifest.version == "1.0.0" and [p.name for p in saved.manifest.parents] == ["author/noir", "author/rain"]
    a, b = reference_world("tiny", seed=0), reference_world("tiny", seed=0)
    a.apply(mix)
    b.apply(saved)
    x = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        assert torch.equal(a({"tokens": x})["author.logits"], b({"tokens": x})["author.logits"])


def test_requests_that_make_no_sense_are_blend_errors(bundles):
    noir, rain = bundles["noir"], bundles["rain"]
    for kwargs in ({"parts": [noir]}, {"parts": noir}, {"parts": [(noir, 0.5, 1)]},
                   {"parts": [(noir, 0.5), (rain, 0.5)], "method": "ties", "density": "0.5"},
                   {"parts": [(noir, 0.5), (rain, 0.5)], "method": "dare", "seed": 2**70},
                   {"parts": [(noir, 0.5), (rain, 0.5)], "method": "dare", "seed": "x"},
                   {"parts": [(noir, 1e39)]}):  # fmt: skip
        with pytest.raises(BlendError):
            blend(**kwargs)


# -- ties: the vote on a zero sum; negative weights in the factor-wise merge; non-LoRA errors -------


def test_ties_elects_plus_on_a_zero_sum():
    # equal weights, density 1: the weighted values +1 and −1 sum to 0, which elects +,
    # so only the first task agrees and the disjoint mean is its value alone
    T = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    assert ties(T, torch.tensor([1.0, 1.0], dtype=torch.float64), density=1.0).tolist() == [1.0, 1.0]
    assert ties(T, torch.tensor([0.5, 0.5], dtype=torch.float64), density=1.0).tolist() == [0.5, 0.5]


def test_ties_through_blend_votes_with_the_unweighted_values(tmp_path):
    # one bias bundle at +1 and at −1: both tasks hold c, so both agree with sign(c) whatever
    # their weights (PEFT's vote), and the disjoint mean of c and −c is 0, the exact sum
    b = make_bundle(tmp_path, 9, name="author/shift", kind="bias")
    result = blend([(b, 1.0), (b, -1.0)], method="ties", density=1.0)
    for entry in b.manifest.slots:
        assert bool((b.slot_tensors(entry.slot)["bias_delta"] != 0).any())
        assert not bool(result.slot_tensors(entry.slot)["bias_delta"].any())


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_a_negative_weight_keeps_its_sign_in_lora_ties_and_dare(lora, method):
    b = lora["r3"]  # rsLoRA, ranks 3 and 5
    result = blend([(b, -0.5)], method=method, density=1.0)
    assert result.report.relative_error < 1e-6
    for entry in result.manifest.slots:
        expected = -0.5 * dense(b.slots[entry.slot], b.slot_tensors(entry.slot))
        got = dense(entry, result.slot_tensors(entry.slot))
        assert float((got - expected).norm() / expected.norm()) < 1e-6
    assert_same_outputs(applied(result), stacked([(b, -0.5)]))


def _flat_delta(kind, tensors, rows) -> torch.Tensor:
    """A non-LoRA slot's task tensor in float64, by its kind's definition: IA3 g − 1, bias c,
    neuron the rows D scattered to their channels (zero elsewhere) of a (rows, fan_in) matrix."""
    if kind == "ia3":
        return tensors["ia3_l"].double() - 1
    if kind == "bias":
        return tensors["bias_delta"].double()
    D = tensors["neuron_delta"].double().reshape(len(tensors["neuron_index"]), -1)
    return torch.zeros(rows, D.shape[1], dtype=torch.float64).index_copy(0, tensors["neuron_index"].long(), D)


@pytest.mark.parametrize("method", ["ties", "dare"])
@pytest.mark.parametrize(
    "kind, first, second",
    [
        ("ia3", {}, {}),
        ("bias", {}, {}),
        ("neuron", {"neurons": [0, 2, 3]}, {"neurons": [1, 2, 3, 7]}),
    ],
)
def test_ties_and_dare_report_the_measured_error_for_non_lora_kinds(tmp_path, kind, first, second, method):
    blocks = ["author/**"] if kind == "neuron" else []
    a = make_bundle(tmp_path, 4, name="author/a", kind=kind, blocks=blocks, **first)
    b = make_bundle(tmp_path, 5, name="author/b", kind=kind, blocks=blocks, **second)
    parts = [(a, 0.6), (b, -0.9)]
    result = blend(parts, method=method, density=0.5, seed=3)
    errors, norms = [], []
    for entry in result.manifest.slots:
        rows = 64  # above every channel index of these small layers
        exact = sum(w * _flat_delta(kind, p.slot_tensors(entry.slot), rows) for p, w in parts if entry.slot in p.slots)
        merged = _flat_delta(kind, result.slot_tensors(entry.slot), rows)
        measured = float((merged - exact).norm())
        report = result.report.slots[entry.slot]
        assert report.kind == kind and report.method == method
        assert report.norm == pytest.approx(float(exact.norm()), rel=1e-6)
        assert report.error == pytest.approx(measured, abs=1e-5 * float(exact.norm()))
        assert report.error > 0 and measured > 0
        errors.append(measured)
        norms.append(float(exact.norm()))
    assert result.report.relative_error == pytest.approx(math.hypot(*errors) / math.hypot(*norms), abs=1e-5)
    assert result.report.relative_error > 0.01
