"""Hot-swap: same layout copies into the existing storage; nothing is allocated or recompiled."""

import pytest
import torch

from lwformat.errors import LayoutError
from lwformat.zoo import reference_world
from tests.lwformat.runtime.conftest import LM, tokens


def lm_out(world, x):
    with torch.no_grad():
        return world.block(LM).module(x)


def storage_identity(world, name):
    applied = world.applied[name]
    return (
        [id(m) for m in world.modules()],
        {slot: [t.data_ptr() for t in a.state_dict(keep_vars=True).values()] for slot, a in applied.adapters.items()},
        [b.data_ptr() for b in applied.buffers.values()],
    )


def fresh_with(bundle, weight=0.6, **kwargs):
    world = reference_world("tiny", seed=0)
    world.apply(bundle, weight=weight, name="author/noir", **kwargs)
    return world


def test_swap_same_layout_in_place(world, bundles):
    world.apply(bundles["noir"], weight=0.6)
    before = storage_identity(world, "author/noir")
    world.swap("author/noir", bundles["rain"])
    assert storage_identity(world, "author/noir") == before
    x = tokens()
    assert torch.equal(lm_out(world, x), lm_out(fresh_with(bundles["rain"]), x))


def test_smaller_rank_is_zero_padded_exactly(world, bundles):
    world.apply(bundles["noir"], weight=0.6, reserve_rank=8)
    stored = world.applied["author/noir"].adapters[f"{LM}:blocks.0.attn.qkv"]
    assert stored.lora_A.shape == (8, 64)
    before = storage_identity(world, "author/noir")
    x = tokens()
    for name in ("small", "big", "noir"):  # ranks 2, 8, 4 into rank-8 storage
        world.swap("author/noir", bundles[name])
        assert storage_identity(world, "author/noir") == before
        torch.testing.assert_close(lm_out(world, x), lm_out(fresh_with(bundles[name]), x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("incoming", "message"), [("big", "does not fit"), ("creator", "other slots")])
def test_incompatible_swaps_are_refused_before_any_change(world, bundles, incoming, message):
    world.apply(bundles["noir"], weight=0.6)
    x = tokens()
    out = lm_out(world, x)
    with pytest.raises(LayoutError, match=message):
        world.swap("author/noir", bundles[incoming])
    assert torch.equal(lm_out(world, x), out)
    assert world.applied["author/noir"].bundle is bundles["noir"]


def test_compiled_world_does_not_recompile_on_swap_or_weight(world, bundles):
    torch._dynamo.reset()
    world.apply(bundles["noir"], weight=0.6)
    lm = world.block(LM).module
    compiled = torch.compile(lm, backend="eager", dynamic=False)
    x = tokens()
    with torch.no_grad():
        compiled(x)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        world.swap("author/noir", bundles["rain"])
        world.set_weight("author/noir", 0.25)
        got = compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    torch.testing.assert_close(got, lm_out(fresh_with(bundles["rain"], weight=0.25), x), rtol=0, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("swapped_before", [False, True])  # the first swap records where each base tensor sits
def test_a_swap_onto_a_changed_base_is_refused(world, bundles, swapped_before):
    from lwformat.errors import IncompatibleError

    world.apply(bundles["noir2" if swapped_before else "noir"], weight=0.6)
    if swapped_before:
        world.swap("author/noir", bundles["noir"])
    with torch.no_grad():
        world.block(LM).module.ln_f.weight.add_(1.0)  # the base changed after applying
    with pytest.raises(IncompatibleError) as err:
        world.swap("author/noir", bundles["rain"])
    assert err.value.path == LM and world.applied["author/noir"].bundle is bundles["noir"]


@pytest.mark.parametrize("swapped_before", [False, True])
def test_a_swap_after_a_base_tensor_was_replaced_is_refused(world, bundles, swapped_before):
    from lwformat.errors import IncompatibleError

    world.apply(bundles["noir2" if swapped_before else "noir"], weight=0.6)
    if swapped_before:
        world.swap("author/noir", bundles["noir"])
    ln = world.block(LM).module.ln_f
    old = ln.weight  # still alive: only where the tensor sits tells
    ln.weight = torch.nn.Parameter(old.detach() + 1, requires_grad=False)
    with pytest.raises(IncompatibleError) as err:
        world.swap("author/noir", bundles["rain"])
    assert err.value.path == LM and world.applied["author/noir"].bundle is bundles["noir"]


def test_a_swap_trusting_the_base_is_the_copy_alone(world, bundles):
    """check_base=False skips the re-check of the base tensors, as PEFT's hotswap_adapter does."""
    from lwformat.errors import IncompatibleError

    world.apply(bundles["noir"], weight=0.6)
    before = storage_identity(world, "author/noir")
    x = tokens()
    world.swap("author/noir", bundles["rain"], check_base=False)
    assert storage_identity(world, "author/noir") == before
    assert torch.equal(lm_out(world, x), lm_out(fresh_with(bundles["rain"]), x))
    with torch.no_grad():
        world.block(LM).module.ln_f.weight.add_(1.0)  # the base changed after applying
    with pytest.raises(IncompatibleError):
        world.swap("author/noir", bundles["noir"])  # the default sees it
    world.swap("author/noir", bundles["noir"], check_base=False)  # trusted, as documented
    assert world.applied["author/noir"].bundle is bundles["noir"]


def test_a_swap_trusting_the_base_still_checks_a_new_binding(tmp_path, world, bundles):
    """Only a bundle bound to the same blocks as the applied one skips the check."""
    from lwformat.errors import IncompatibleError
    from tests.lwformat.runtime.conftest import make_bundle

    elsewhere = make_bundle(tmp_path, 7, world_seed=1)  # the same layout, trained on another base
    world.apply(bundles["noir"], weight=0.6)
    x = tokens()
    out = lm_out(world, x)
    with pytest.raises(IncompatibleError) as err:
        world.swap("author/noir", elsewhere, check_base=False)
    assert err.value.path == LM and world.applied["author/noir"].bundle is bundles["noir"]
    assert torch.equal(lm_out(world, x), out)


def test_a_swap_to_another_kind_of_the_same_shapes_is_refused(tmp_path, world):
    """LoRA's factors fit DoRA's storage, but DoRA also scales by a magnitude: not the same adapter."""
    from tests.lwformat.runtime.conftest import make_bundle

    dora, lora = make_bundle(tmp_path, 8, kind="dora", slots=("*.qkv",)), make_bundle(tmp_path, 9, slots=("*.qkv",))
    world.apply(dora, weight=0.6, name="author/noir")
    x = tokens()
    out = lm_out(world, x)
    with pytest.raises(LayoutError, match="dora applied, the new bundle has lora"):
        world.swap("author/noir", lora)
    assert torch.equal(lm_out(world, x), out) and world.applied["author/noir"].bundle is dora


def test_a_swap_takes_the_new_bundles_scaling(tmp_path, world, bundles):
    """alpha / rank comes with the bundle: noir's is 8 / 4, this one's 2 / 4."""
    from tests.lwformat.runtime.conftest import make_bundle

    quiet = make_bundle(tmp_path, 10, alpha=2.0)
    world.apply(bundles["noir"], weight=0.6)
    world.swap("author/noir", quiet)
    x = tokens()
    assert torch.equal(lm_out(world, x), lm_out(fresh_with(quiet), x))


def test_a_strict_swap_walks_the_modules_again(world, bundles):
    from lwformat.errors import IncompatibleError

    world.apply(bundles["noir"], weight=0.6)
    world.block(LM).module.extra = torch.nn.Linear(2, 2)  # a module added: the tensors recorded stay untouched
    with pytest.raises(IncompatibleError) as err:
        world.swap("author/noir", bundles["rain"], strict=True)
    assert err.value.path == LM and world.applied["author/noir"].bundle is bundles["noir"]


def test_a_swap_after_the_world_was_cast_is_refused(world, bundles):
    world.apply(bundles["noir"], weight=0.6)
    x = tokens()
    before = world.block(LM).module(x)
    world.double().float()  # the same base numbers, but every buffer is a converted copy now
    with pytest.raises(LayoutError, match="no longer use the applied storage"):
        world.swap("author/noir", bundles["noir2"])
    assert torch.equal(world.block(LM).module(x), before)


def _state(world):
    return {k: v.clone() for k, v in world.state_dict(keep_vars=False).items()}


def _unchanged(world, before, x, out):
    after = _state(world)
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items()) and torch.equal(lm_out(world, x), out)


@pytest.mark.parametrize("reserve_rank", [0, 8])  # one copy of the packed runs, or slot by slot into wider storage
def test_a_bundle_file_cut_short_since_it_was_mapped_is_refused_and_changes_nothing(tmp_path, world, reserve_rank):
    """Reading its map past the new end would kill the process (SIGBUS); it is an IntegrityError."""
    from lwformat.bundle.read import Bundle
    from lwformat.errors import IntegrityError
    from tests.lwformat.runtime.conftest import make_bundle

    noir, rain = make_bundle(tmp_path, 1), make_bundle(tmp_path, 2)
    world.apply(noir, weight=0.6, reserve_rank=reserve_rank)
    world.swap("author/noir", rain)  # maps rain's file
    world.swap("author/noir", noir)
    x, before = tokens(), _state(world)
    out = lm_out(world, x)
    weights = rain.weights_path
    with open(weights, "r+b") as f:  # cut in place, as `cp` over the file or a failing copy would
        f.truncate(weights.stat().st_size - 20000)
    with pytest.raises(IntegrityError) as caught:
        world.swap("author/noir", rain)
    assert caught.value.path == "adapters.safetensors"
    assert world.applied["author/noir"].bundle is noir and _unchanged(world, before, x, out)
    with pytest.raises(IntegrityError):
        Bundle.open(rain.path)  # and opening it again says the same


def test_a_swap_to_a_bundle_whose_file_changed_since_open_writes_nothing(tmp_path, world):
    """The per-slot path: every slot is read from the bundle's size-checked map before the first write."""
    from lwformat.errors import IntegrityError
    from tests.lwformat.runtime.conftest import make_bundle

    noir, rain, other = make_bundle(tmp_path, 1), make_bundle(tmp_path, 2), make_bundle(tmp_path, 3, rank=2)
    world.apply(noir, weight=0.6, reserve_rank=8)  # wider storage: the slot-by-slot path
    x, before = tokens(), _state(world)
    out = lm_out(world, x)
    other.weights_path.replace(rain.weights_path)  # another (smaller) file under rain's name, before rain maps it
    with pytest.raises(IntegrityError):
        world.swap("author/noir", rain)
    assert world.applied["author/noir"].bundle is noir and _unchanged(world, before, x, out)


def test_a_scaling_the_storage_cannot_hold_is_refused_before_any_write(tmp_path, world):
    from lwformat.errors import WeightError
    from tests.lwformat.runtime.conftest import make_bundle

    noir = make_bundle(tmp_path, 1)
    huge = make_bundle(tmp_path, 2, alpha=1e40)  # alpha / rank overflows float32
    world.apply(noir, weight=0.6)
    x, before = tokens(), _state(world)
    out = lm_out(world, x)
    for strict in (False, True):
        with pytest.raises(WeightError):
            world.swap("author/noir", huge, strict=strict)
        assert world.applied["author/noir"].bundle is noir and _unchanged(world, before, x, out)
    with pytest.raises(WeightError):
        reference_world("tiny", seed=0).apply(huge)


def test_a_swap_from_a_saved_blend_to_an_unsaved_one_of_the_same_layout(tmp_path, world, bundles):
    from lwformat.bundle.read import Bundle
    from lwformat.runtime.blend import blend

    saved = blend([(bundles["noir"], 0.5), (bundles["noir2"], 0.5)], method="svd", rank=4)
    mix = blend([(bundles["noir"], 0.2), (bundles["noir2"], 0.8)], method="svd", rank=4)  # the same layout
    saved.save(tmp_path / "saved")
    world.apply(Bundle.open(tmp_path / "saved"), weight=0.6, name="author/noir")
    world.swap("author/noir", mix)
    fresh = reference_world("tiny", seed=0)
    fresh.apply(mix, weight=0.6, name="author/noir")
    x = tokens()
    assert torch.equal(lm_out(world, x), lm_out(fresh, x))


@pytest.mark.parametrize("strict", [False, True])  # the one-copy swap, and the swap that walks the modules
def test_a_swap_to_a_bundle_holding_nan_is_refused_before_any_write(tmp_path, world, bundles, strict):
    from lwformat.errors import BundleFormatError
    from tests.lwformat.runtime.conftest import poisoned

    bad, _ = poisoned(tmp_path, 13, [float("nan")])
    world.apply(bundles["noir"])
    x = tokens()
    before = lm_out(world, x)
    with pytest.raises(BundleFormatError, match="NaN or inf"):
        world.swap("author/noir", bad, strict=strict)
    assert world.applied["author/noir"].bundle is bundles["noir"]
    assert torch.equal(lm_out(world, x), before)


def test_a_bundle_rewritten_in_place_since_it_was_read_is_refused_and_changes_nothing(tmp_path, world, bundles):
    """Same size, new bytes: what the map reads now was never checked (here a channel index named twice)."""
    import os
    import time

    from lwformat.errors import IntegrityError
    from tests.lwformat.runtime.conftest import make_bundle

    a, b = make_bundle(tmp_path, 1, kind="neuron"), make_bundle(tmp_path, 2, kind="neuron")
    world.apply(a)
    world.swap("author/noir", b)  # b is read and its indices checked
    world.swap("author/noir", a)
    x, before = tokens(), _state(world)
    out = lm_out(world, x)
    span = next(s for s in b.spans if s.name == "neuron_index")
    time.sleep(0.01)  # past the file system's timestamp granularity
    with open(b.weights_path, "r+b") as f:
        f.seek(b.data_offset + span.begin)
        first = f.read(8)
        f.write(first)  # the second index now names the first channel again
        f.flush()
        os.fsync(f.fileno())
    with pytest.raises(IntegrityError, match="written in place"):
        world.swap("author/noir", b)
    assert world.applied["author/noir"].bundle is a and _unchanged(world, before, x, out)


def test_a_bundle_deleted_or_closed_since_it_was_opened_is_a_typed_error(tmp_path, world, bundles):
    import shutil

    from lwformat.bundle.archive import pack
    from lwformat.bundle.read import Bundle
    from lwformat.errors import BundleNotFoundError
    from tests.lwformat.runtime.conftest import make_bundle

    gone = make_bundle(tmp_path, 2)
    world.apply(bundles["noir"])
    x, before = tokens(), _state(world)
    out = lm_out(world, x)
    shutil.rmtree(gone.path)
    with pytest.raises(BundleNotFoundError, match="deleted or moved since the bundle was opened"):
        world.swap("author/noir", gone)
    assert _unchanged(world, before, x, out)
    closed = Bundle.open(pack(bundles["noir2"].path, tmp_path / "noir2.lwb"))
    closed.close()  # an archive's private copy goes with it
    with pytest.raises(BundleNotFoundError, match="the bundle was closed"):
        world.swap("author/noir", closed)
    assert _unchanged(world, before, x, out)


@pytest.mark.parametrize("strict", [False, True])
def test_a_bundle_stored_in_float8_swaps_in_as_it_applies(tmp_path, world, strict):
    """The spec allows F8 tensors and the runtime converts them; the value check must read them too."""
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.write import write_bundle
    from tests.lwformat.runtime.conftest import make_bundle, trained_world

    trained = trained_world(3)
    with torch.no_grad():
        for m in trained.modules():
            for n, p in list(m.named_parameters(recurse=False)):
                if "lora" in n:
                    p.data = p.data.to(torch.float8_e4m3fn)
    write_bundle(trained, tmp_path / "f8", name="author/noir", version="1.0.0")
    f8 = Bundle.open(tmp_path / "f8")
    assert {s.dtype for s in f8.spans} == {"F8_E4M3"}
    alone = reference_world("tiny", seed=0)
    alone.apply(Bundle.open(tmp_path / "f8"))
    world.apply(make_bundle(tmp_path, 1))
    world.swap("author/noir", f8, strict=strict)
    x = tokens()
    assert torch.equal(lm_out(world, x), lm_out(alone, x))


def test_a_rewrite_whose_mtime_was_set_back_is_still_checked_again(tmp_path, world, bundles):
    """`cp -p`, `rsync -t` or os.utime restore the mtime; the ctime tells the file changed."""
    import os
    import struct

    from lwformat.errors import BundleFormatError, IntegrityError
    from tests.lwformat.runtime.conftest import make_bundle

    b = make_bundle(tmp_path, 2)
    world.apply(bundles["noir"])
    world.swap("author/noir", b)  # b's values pass
    world.swap("author/noir", bundles["noir"])
    x, before = tokens(), _state(world)
    out = lm_out(world, x)
    st = os.stat(b.weights_path)
    with open(b.weights_path, "r+b") as f:
        f.seek(b.data_offset + b.spans[-1].begin)
        f.write(struct.pack("<f", float("nan")))
    os.utime(b.weights_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises((BundleFormatError, IntegrityError)):
        world.swap("author/noir", b)
    assert world.applied["author/noir"].bundle is bundles["noir"] and _unchanged(world, before, x, out)


@pytest.mark.parametrize("strict", [False, True])
def test_a_swap_to_a_value_beyond_the_storage_dtype_is_refused_before_any_write(tmp_path, strict):
    """A float64 bundle on a float32 base: the swap checked the file only, then stored 1e39 as inf; and
    the file having passed, a fresh apply of it took the inf too."""
    import re

    from tests.lwformat.runtime.conftest import narrowing_bundle

    ok, other, big = (narrowing_bundle(tmp_path, seed, value) for seed, value in ((1, None), (2, None), (3, 1e39)))
    slot = big.manifest.slots[0]
    where = f"{slot.block}:{slot.module}:{next(iter(slot.tensors))}"
    message = re.escape(f"author/noir@1.0.0: value 1e+39 at {where} overflows float32")
    world = reference_world("tiny", seed=0)
    world.apply(ok)
    x, before = tokens(), _state(world)
    out = lm_out(world, x)
    with pytest.raises(LayoutError, match=message) as caught:
        world.swap("author/noir", big, strict=strict)
    assert caught.value.path == where
    assert world.applied["author/noir"].bundle is ok and _unchanged(world, before, x, out)
    fresh = reference_world("tiny", seed=0)
    with pytest.raises(LayoutError, match=message):
        fresh.apply(big)
    assert fresh.applied == {}
    world.swap("author/noir", other, strict=strict)  # converted values that fit go in as an apply puts them
    fresh.apply(other, name="author/noir")
    assert torch.equal(lm_out(world, x), lm_out(fresh, x))


@pytest.mark.parametrize("strict", [False, True])
def test_a_swap_to_a_value_beyond_float16_goes_into_a_float16_bases_float32_storage(tmp_path, strict):
    """A half base stores its adapters in float32: a float32 bundle holding 1e5, refused before
    (float16 storage would have made it inf), now swaps in exactly and computes a finite output."""
    from tests.lwformat.runtime.conftest import half_base_bundle

    ok, big = (half_base_bundle(tmp_path, seed, value) for seed, value in ((1, None), (3, 1e5)))
    slot = big.manifest.slots[0]
    world = reference_world("tiny", seed=0).to(torch.float16)
    applied = world.apply(ok, weight=1e-3)
    world.swap("author/noir", big, strict=strict)
    assert applied.bundle is big and applied.adapters[f"{slot.block}:{slot.module}"].bias_delta[0] == 1e5
    assert lm_out(world, tokens()).isfinite().all()
