"""apply / stack / set_weight / remove against references built from scratch."""

import math

import pytest
import torch

from lwformat.errors import (
    AlreadyAppliedError,
    IncompatibleError,
    LayoutError,
    NotAppliedError,
    TargetError,
)
from lwformat.zoo import reference_world
from tests.lwformat.runtime.conftest import LM, make_bundle, tokens, trained_world


def lm_out(world, x):
    with torch.no_grad():
        return world.block(LM).module(x)


def weighted_reference(seed, weight, **kwargs):
    """The customized world the bundle was written from, its adapter at `weight`."""
    world = trained_world(seed, **kwargs)
    for p in world.modules():
        if getattr(p, "is_adapter_host", False):
            p.adapters["default"].mix_weight.fill_(weight)
    return world


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "neuron", "bias"])
def test_apply_equals_the_trained_world_and_weight_zero_is_base(tmp_path, world, kind):
    bundle = make_bundle(tmp_path, 7, kind=kind)
    x = tokens()
    base = lm_out(world, x)
    world.apply(bundle, weight=0.7)
    torch.testing.assert_close(lm_out(world, x), lm_out(weighted_reference(7, 0.7, kind=kind), x), rtol=0, atol=1e-6)
    world.set_weight("author/noir", 0.0)
    assert torch.equal(lm_out(world, x), base)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "neuron", "bias"])
@pytest.mark.parametrize("grad", [False, True])
def test_autocast_inference_keeps_each_layers_dtype(tmp_path, world, kind, grad):
    """Under `torch.autocast` a host gives what its base layer gives (PEFT does too), and weight 0 is that base."""
    x = tokens()
    lm = world.block(LM).module
    qkv = lm.blocks[0].attn.qkv
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        base, layer = lm(x), qkv(torch.randn(2, qkv.in_features))
    world.apply(make_bundle(tmp_path, 7, kind=kind), weight=0.7)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        got = lm(x)
        assert qkv(torch.randn(2, qkv.in_features)).dtype == layer.dtype == torch.bfloat16
    assert got.dtype == base.dtype
    torch.testing.assert_close(got.float(), lm_out(world, x), rtol=0, atol=0.05)  # bfloat16 matmuls
    world.set_weight("author/noir", 0.0)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(lm(x), base)


def test_a_bundle_applied_under_inference_mode_changes_outside_it(world, bundles):
    """A server may apply inside `torch.inference_mode()`; weights and swaps come later, outside."""
    x = tokens()
    with torch.inference_mode():
        world.apply(bundles["noir"], weight=0.7)
        lm_out(world, x)
    world.set_weight("author/noir", 0.4)
    world.swap("author/noir", bundles["noir2"])
    reference = reference_world("tiny", seed=0)
    reference.apply(bundles["noir2"], weight=0.4)
    assert torch.equal(lm_out(world, x), lm_out(reference, x))
    world.remove("author/noir")
    assert torch.equal(lm_out(world, x), lm_out(reference_world("tiny", seed=0), x))


def test_stacking_is_the_exact_weighted_sum_per_layer(world, bundles):
    noir, rain = bundles["noir"], bundles["rain"]
    world.apply(noir, weight=0.7)
    world.apply(rain, weight=0.3)
    layer = world.block(LM).module.blocks[0].attn.qkv  # a host holding both adapters
    x = torch.randn(2, 5, 64)
    expected = layer.base(x)
    for bundle, w in ((noir, 0.7), (rain, 0.3)):
        t = bundle.slot_tensors(f"{LM}:blocks.0.attn.qkv")
        expected = expected + w * (8 / 4) * (x @ t["lora_A"].T @ t["lora_B"].T)  # alpha/r = 8/4
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_per_block_weights(world, bundles):
    world.apply(bundles["noir"], weight={"environment/**": 0.5})  # reaches the shared LLM through its alias
    world.apply(bundles["creator"], weight={"creator/*/*/backbone": 0.25})
    assert {a.mix_weight.item() for a in world.applied["author/noir"].adapters.values()} == {0.5}
    creator = world.applied["creator/ink"].adapters
    assert {s.split(":")[0] for s, a in creator.items() if a.mix_weight.item() == 0.25} == {"creator/render/t2i/backbone"}
    assert {a.mix_weight.item() for s, a in creator.items() if "backbone" not in s} == {1.0}
    world.set_weight("creator/ink", {"creator/render/t2i/codec": 0.0})
    assert {a.mix_weight.item() for s, a in creator.items() if "codec" in s} == {0.0}
    assert {a.mix_weight.item() for s, a in creator.items() if "backbone" in s} == {0.25}  # no glob matched: kept
    with pytest.raises(TargetError, match="matches no block"):
        world.set_weight("creator/ink", {"author/**": 1.0})


def test_remove_restores_the_base_bit_exactly(world, bundles):
    x = tokens()
    base, root = lm_out(world, x), world.root_digest()
    qkv = world.block(LM).module.blocks[0].attn.qkv
    world.apply(bundles["noir"], weight=0.7)
    world.apply(bundles["rain"], weight=0.3)
    world.remove("author/noir")
    world.remove("author/rain")
    assert world.block(LM).module.blocks[0].attn.qkv is qkv
    assert torch.equal(lm_out(world, x), base) and world.root_digest() == root
    assert not any(getattr(m, "is_adapter_host", False) for m in world.modules())


def test_errors_are_typed_and_change_nothing(world, bundles, tmp_path):
    world.apply(bundles["noir"])
    before = repr(world)
    with pytest.raises(AlreadyAppliedError):
        world.apply(bundles["noir2"])
    with pytest.raises(NotAppliedError):
        world.remove("author/nope")
    foreign = make_bundle(tmp_path, 1, name="author/foreign", world_seed=1)
    with pytest.raises(IncompatibleError) as err:
        world.apply(foreign)
    assert err.value.path == LM and err.value.outcome == "digest mismatch"
    assert err.value.expected == foreign.manifest.base.blocks[LM] and err.value.found == world.digests()[LM]
    assert repr(world) == before and list(world.applied) == ["author/noir"]


def test_apply_under_another_name_and_strict_mode(world, bundles):
    world.apply(bundles["noir2"], name="author/noir-v2", strict=True)
    other = reference_world("tiny", seed=0)
    other.cycle.reverse()  # same blocks, another structure: fine per block, refused strictly
    other.apply(bundles["noir"])
    with pytest.raises(IncompatibleError, match="root mismatch"):
        other.apply(bundles["rain"], strict=True)


def test_applied_bundles_are_frozen_and_not_trainable_parameters(world, bundles):
    world.apply(bundles["noir"])
    adapters = world.applied["author/noir"].adapters.values()
    assert all(not list(a.parameters()) for a in adapters)  # storage views, held as buffers
    assert all(a.lora_A.data_ptr() and not a.lora_A.requires_grad for a in adapters)
    assert world.adapter_parameters() == []


def test_a_weights_file_cut_short_after_opening_fails_apply_and_changes_nothing(tmp_path, world):
    import os

    from lwformat.errors import IntegrityError

    bundle = make_bundle(tmp_path, 11)
    x = tokens()
    before = lm_out(world, x)
    modules = [type(m) for m in world.modules()]
    os.truncate(bundle.weights_path, os.path.getsize(bundle.weights_path) - 100)
    with pytest.raises(IntegrityError, match="ends"):
        world.apply(bundle)
    assert world.applied == {} and [type(m) for m in world.modules()] == modules
    assert torch.equal(lm_out(world, x), before)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf"), 1e40, pytest.param(10**400, id="10**400"), "0.5", None, True, {"author/**": None},
                                    {"author/**": float("nan")}, {"author/**": 1e40}, {"author/**": 10**400}])  # fmt: skip
def test_weights_are_finite_numbers_the_storage_holds(world, bundles, weight):
    """NaN in one bundle's weight would turn every sample of a mixed batch to NaN, base samples too."""
    from lwformat.errors import WeightError

    x = tokens()
    base = lm_out(world, x)
    world.apply(bundles["rain"])
    world.remove("author/rain")  # its storage waits in the spare pool for the next apply
    spare = [b.data_ptr() for b in world.spare_storage.buffers]
    with pytest.raises(WeightError):
        world.apply(bundles["noir"], weight=weight)
    assert not world.applied and torch.equal(lm_out(world, x), base)
    assert [b.data_ptr() for b in world.spare_storage.buffers] == spare
    world.apply(bundles["noir"], weight=0.5)
    applied = lm_out(world, x)
    with pytest.raises(WeightError):
        world.set_weight("author/noir", weight)
    assert torch.equal(lm_out(world, x), applied)


def test_set_weight_checks_every_glob_before_writing_any(world, bundles):
    from lwformat.errors import WeightError

    world.apply(bundles["creator"], weight=0.5)
    before = {slot: float(a.mix_weight) for slot, a in world.applied["creator/ink"].adapters.items()}
    with pytest.raises(WeightError):  # the first glob is fine, the second overflows float32
        world.set_weight("creator/ink", {"creator/render/t2i/conditioner": 0.3, "creator/**": 1e40})
    assert {slot: float(a.mix_weight) for slot, a in world.applied["creator/ink"].adapters.items()} == before
    with pytest.raises(TargetError):
        world.set_weight("creator/ink", {5: 1.0})


def test_a_bundle_applied_beside_a_customization_keeps_the_trainable_adapters(world, bundles):
    from lwformat import LightConfig

    world.customize(LightConfig(kind="lora", rank=2, blocks=[LM]))  # its adapters are named "default"
    trainable = [id(p) for p in world.adapter_parameters()]
    world.apply(bundles["noir"], name="default")
    assert [id(p) for p in world.adapter_parameters()] == trainable
    world.remove("default")
    assert [id(p) for p in world.adapter_parameters()] == trainable


def test_decustomize_leaves_applied_bundles_and_refuses_while_fused(world, bundles):
    from lwformat import LightConfig
    from lwformat.errors import AlreadyCustomizedError, FusedError

    x = tokens()
    base = lm_out(world, x)
    world.apply(bundles["noir"], weight=0.7)
    with pytest.raises(AlreadyCustomizedError, match="remove"):
        world.customize(LightConfig(kind="lora", rank=2, blocks=[LM]))
    applied = lm_out(world, x)
    world.fuse()
    with pytest.raises(FusedError):
        world.decustomize()
    world.unfuse()
    world.decustomize()  # no customization: the applied bundle stays
    assert list(world.applied) == ["author/noir"] and torch.equal(lm_out(world, x), applied)
    world.remove("author/noir")
    assert torch.equal(lm_out(world, x), base)


def test_a_world_cast_by_module_to_points_to_world_cast_and_takes_bundles_applied_before(bundles):
    x = tokens()
    cast = reference_world("tiny", seed=0).to(torch.bfloat16)
    with pytest.raises(IncompatibleError, match=r"bfloat16 weights: .* cast it with world.cast\(dtype\) or load it with World.load\(dir, dtype=...\)"):
        cast.apply(bundles["noir"])
    world = reference_world("tiny", seed=0)
    world.apply(bundles["noir"], weight=0.7)
    world.to(torch.bfloat16)
    world.set_weight("author/noir", 0.0)
    assert torch.equal(lm_out(world, x), lm_out(cast, x))


def _with_indices(bundle, values):
    """The bundle's file with its first neuron slot's stored channel indices overwritten in place (same size)."""
    span = next(s for s in bundle.spans if s.name == "neuron_index")
    data = torch.tensor(values, dtype=torch.int64)
    assert data.numel() * 8 == span.end - span.begin
    with open(bundle.weights_path, "r+b") as f:
        f.seek(bundle.data_offset + span.begin)
        f.write(data.numpy().tobytes())
    return span.slot


@pytest.mark.parametrize("fault", ["outside", "negative", "twice"])
def test_stored_neuron_indices_must_name_distinct_channels(tmp_path, world, fault):
    """The compatibility check sees shapes, not values: without this every forward raised IndexError."""
    from lwformat.bundle.read import Bundle
    from lwformat.errors import BundleFormatError

    good, bad = make_bundle(tmp_path, 1, kind="neuron"), make_bundle(tmp_path, 2, kind="neuron")
    k = next(s for s in bad.spans if s.name == "neuron_index").shape[0]
    values = {"outside": [10**6] * k, "negative": [-1] + list(range(1, k)), "twice": [0] * k}[fault]
    slot = _with_indices(bad, values)
    bad = Bundle.open(bad.path)
    x = tokens()
    base = lm_out(world, x)
    with pytest.raises(BundleFormatError) as caught:
        world.apply(bad)
    assert caught.value.path.endswith(slot.partition(":")[2]) and not world.applied and torch.equal(lm_out(world, x), base)
    world.apply(good)
    out = lm_out(world, x)
    for strict in (False, True):
        with pytest.raises(BundleFormatError):
            world.swap("author/noir", bad, strict=strict)
        assert world.applied["author/noir"].bundle is good and torch.equal(lm_out(world, x), out)


def test_apply_takes_a_path_and_refuses_what_is_not_a_bundle(world, bundles):
    from lwformat.errors import TargetError as Target

    world.apply(str(bundles["noir"].path), weight=0.5)
    reference = reference_world("tiny", seed=0)
    reference.apply(bundles["noir"], weight=0.5)
    assert torch.equal(lm_out(world, tokens()), lm_out(reference, tokens()))
    assert repr(world.applied["author/noir"]).startswith("Applied('author/noir', author/noir@1.0.0, ")
    assert len(repr(world.applied["author/noir"])) < 200
    for bad in (None, 5, object()):
        with pytest.raises(Target):
            world.apply(bad, name="other")
    for name in (5, ""):
        with pytest.raises(Target):
            world.apply(bundles["rain"], name=name)
    assert list(world.applied) == ["author/noir"]


def test_reserve_rank_is_a_rank_and_stops_at_each_layers_full_rank(world, bundles):
    from lwformat.errors import RankError

    for bad in (-1, 4.5, "8", True):
        with pytest.raises(RankError):
            world.apply(bundles["noir"], reserve_rank=bad)
    assert not world.applied
    applied = world.apply(bundles["creator"], reserve_rank=10**9)  # as much as every layer allows, no more
    full = {rs.slot: min(rs.geo.out, math.prod(rs.geo.in_shape)) for rs in applied.slots}
    ranks = {p.slot: p.shape[0] for p in applied.places if p.name == "lora_A"}  # (r, *in_shape)
    assert ranks == full


def test_a_lora_slot_of_rank_zero_does_not_fit(world, bundles):
    import msgspec

    from lwformat.bundle.check import check

    m = bundles["noir"].manifest
    zero = msgspec.structs.replace(m, slots=[msgspec.structs.replace(m.slots[0], rank=0), *m.slots[1:]])
    report = check(zero, world)
    assert not report.ok and report.problems[0].path == m.slots[0].slot and "rank 0" in report.problems[0].detail


def test_apply_and_remove_wait_for_a_mixed_batch_to_end(world, bundles):
    from lwformat.errors import RuntimeStateError
    from lwformat.errors import TargetError as Target

    world.apply(bundles["noir"])
    with world.routed(["author/noir", None]):
        with pytest.raises(RuntimeStateError):
            world.remove("author/noir")
        with pytest.raises(RuntimeStateError):
            world.apply(bundles["rain"])
    world.remove("author/noir")
    with pytest.raises(Target):
        world.run({"tokens": tokens(batch=2)}, (b for b in [None, None]))


def test_the_first_matching_glob_weights_a_block(world, bundles):
    """The LLM is shared by author/ and environment/: one block, which the first matching glob weights."""
    x = tokens()
    reference = reference_world("tiny", seed=0)
    reference.apply(bundles["noir"], weight=0.2)
    world.apply(bundles["noir"], weight=0.5)
    world.set_weight("author/noir", {"author/**": 0.2, "environment/**": 0.9})
    assert torch.equal(lm_out(world, x), lm_out(reference, x))
    world.set_weight("author/noir", {"environment/**": 0.9, "**": 1.0})  # either path names it; a catch-all last
    reference.set_weight("author/noir", 0.9)
    assert torch.equal(lm_out(world, x), lm_out(reference, x))
    with pytest.raises(LayoutError, match="reserve_rank"):
        world.swap("author/noir", bundles["big"])


def test_training_on_top_of_an_applied_style_follows_the_order_the_refusal_names(world, bundles):
    """customize refuses while bundles are applied and says how: remove, customize, apply again."""
    from lwformat import LightConfig
    from lwformat.errors import AlreadyCustomizedError

    x = tokens()
    world.apply(bundles["noir"], weight=0.7)
    styled = lm_out(world, x)
    config = LightConfig(kind="lora", rank=2, blocks=[LM], slots=["*.attn.qkv"])
    with pytest.raises(AlreadyCustomizedError, match=r"remove\(\) the bundles applied \(author/noir\) first, then customize"):
        world.customize(config)
    world.remove("author/noir")
    world.customize(config)
    world.apply(bundles["noir"], weight=0.7)
    assert torch.equal(lm_out(world, x), styled)  # fresh LoRA starts at zero: the style alone
    trainable = list(world.adapter_parameters())
    frozen = [t for a in world.applied["author/noir"].adapters.values() for t in a.state_dict(keep_vars=True).values()]
    assert trainable and all(t.requires_grad for t in trainable) and not any(t.requires_grad for t in frozen)
    assert not {id(t) for t in trainable} & {id(t) for t in frozen}


def test_an_apply_failing_midway_leaves_the_world_as_it_was(world, bundles, monkeypatch):
    """A failure after some hosts were made (here the third adapter added: memory, say) undoes them all."""
    from lwformat.adapters.host import AdapterHost

    x = tokens()
    base, root = lm_out(world, x), world.root_digest()
    modules = [id(m) for m in world.modules()]
    real_add, calls = AdapterHost.add, []

    def failing_add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("out of memory on the third slot")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(AdapterHost, "add", failing_add)
    with pytest.raises(MemoryError):
        world.apply(bundles["noir"], weight=0.7)
    monkeypatch.undo()
    assert len(calls) == 3 and world.applied == {}
    assert [id(m) for m in world.modules()] == modules and not any(getattr(m, "is_adapter_host", False) for m in world.modules())
    assert torch.equal(lm_out(world, x), base) and world.root_digest() == root
    world.apply(bundles["noir"], weight=0.7)  # and the world takes it afterwards
    assert not torch.equal(lm_out(world, x), base)


@pytest.mark.parametrize("reserve_rank", [0, 8])  # one copy of the file's runs; slot by slot into wider storage
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_bundle_holding_nan_or_inf_is_refused_and_changes_nothing(tmp_path, world, value, reserve_rank):
    from lwformat.errors import BundleFormatError
    from tests.lwformat.runtime.conftest import poisoned

    bundle, key = poisoned(tmp_path, 12, [value])
    x = tokens()
    before, root = lm_out(world, x), world.root_digest()
    modules = [type(m) for m in world.modules()]
    slot, tensor = key.rsplit(".", 1)
    with pytest.raises(BundleFormatError, match="NaN or inf") as caught:
        world.apply(bundle, reserve_rank=reserve_rank)
    assert caught.value.path == f"{slot}:{tensor}"
    assert world.applied == {} and [type(m) for m in world.modules()] == modules
    assert torch.equal(lm_out(world, x), before) and world.root_digest() == root


def test_huge_finite_adapter_values_are_not_taken_for_inf(tmp_path, world):
    """Two values near float32's maximum overflow a sum; the exact check clears them."""
    from tests.lwformat.runtime.conftest import poisoned

    bundle, _ = poisoned(tmp_path, 12, [3e38, 3e38])
    world.apply(bundle)
    assert "author/noir" in world.applied


def test_a_weights_file_rewritten_with_nan_after_it_passed_is_checked_again(tmp_path, world):
    """A file whose values passed is remembered by its identity; written in place, it is another file."""
    import struct
    import time

    from lwformat.bundle.read import Bundle
    from lwformat.errors import BundleFormatError

    bundle = make_bundle(tmp_path, 14)
    world.apply(bundle)
    world.remove("author/noir")
    time.sleep(0.01)  # past the file system's timestamp granularity
    span = bundle.spans[-1]
    with open(bundle.weights_path, "r+b") as f:
        f.seek(bundle.data_offset + span.begin)
        f.write(struct.pack("<f", float("nan")))
    with pytest.raises(BundleFormatError, match="NaN or inf"):
        world.apply(Bundle.open(bundle.path))
    assert world.applied == {}


# float32 rounds the first to its largest value, the rest to inf
@pytest.mark.parametrize("value", [3.4028235e38, 3.4028236e38, -1e39, 1e300])
def test_a_value_beyond_the_storage_dtype_is_refused_by_name_and_changes_nothing(tmp_path, value):
    """A float64 bundle on a float32 base is stored converted; a finite value that float32 cannot
    hold was refused as 'NaN or inf (a diverged training run?)'."""
    import re

    from tests.lwformat.runtime.conftest import narrowing_bundle

    bundle = narrowing_bundle(tmp_path, 1, value)
    slot = bundle.manifest.slots[0]
    where = f"{slot.block}:{slot.module}:{next(iter(slot.tensors))}"
    assert next(iter(slot.tensors.values())).dtype == "F64"
    world = reference_world("tiny", seed=0)
    x = tokens()
    before, modules = lm_out(world, x), [type(m) for m in world.modules()]
    if value == 3.4028235e38:
        world.apply(bundle)
        assert world.applied["author/noir"].adapters[where.rpartition(":")[0]].bias_delta[0] == torch.finfo(torch.float32).max
        return
    with pytest.raises(LayoutError, match=re.escape(f"author/noir@1.0.0: value {value:g} at {where} overflows float32")) as caught:
        world.apply(bundle)
    assert caught.value.path == where
    assert world.applied == {} and [type(m) for m in world.modules()] == modules
    assert torch.equal(lm_out(world, x), before)


def test_a_value_beyond_float16_applies_to_a_float16_base_in_float32_and_the_output_is_finite(tmp_path):
    """A half base stores its adapters in float32 (as PEFT computes them): a float32 bundle holding
    1e5 was refused on a float16 base, as float16 storage would have made it inf."""
    from tests.lwformat.runtime.conftest import half_base_bundle

    bundle = half_base_bundle(tmp_path, 1, 1e5)
    slot = bundle.manifest.slots[0]
    world = reference_world("tiny", seed=0).to(torch.float16)
    applied = world.apply(bundle, weight=1e-3)  # 1e5 · 1e-3 = 100 in the output: finite in float16 too
    adapter = applied.adapters[f"{slot.block}:{slot.module}"]
    assert adapter.bias_delta.dtype == torch.float32 and adapter.bias_delta[0] == 1e5
    assert applied.packed  # the file's float32 run, copied as it is
    out = lm_out(world, tokens())
    assert out.isfinite().all()
