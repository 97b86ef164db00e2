"""Bundles bound to a float32 base on that base cast to half precision (`World.cast`, `World.load(dtype=)`)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lwformat import World
from lwformat.bundle.check import Outcome, check
from lwformat.errors import (
    FusedError,
    IncompatibleError,
    LayoutError,
    RuntimeStateError,
    WorldError,
)
from lwformat.zoo import reference_world
from tests.lwformat.runtime.conftest import LM, poisoned, tokens

TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 5e-3}  # half-precision matmuls against float32


def lm_out(world, x):
    with torch.no_grad():
        return world.block(LM).module(x).float()


def state(world):
    """Every block tensor by name with its dtype, cloned."""
    return {f"{p}:{n}": t.detach().clone() for p, b in world.blocks().items() for n, t in b.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "base"
    reference_world("tiny", seed=0).save(path)
    return path


@pytest.fixture(params=["load", "cast"])
def cast_world(request, saved):
    """The saved float32 base in half precision, loaded with dtype= or cast after loading."""
    if request.param == "load":
        return World.load(saved, dtype=torch.bfloat16)
    world = World.load(saved)
    world.cast(torch.float16)
    return world


def test_a_float32_bundle_applies_to_a_cast_world_without_hashing_it(bundles, saved, cast_world):
    x = tokens()
    dtype = cast_world.cast_record.dtype
    report = check(bundles["noir"], cast_world)
    (block,) = report.blocks
    assert report.ok and block.outcome is Outcome.OK and block.found is None
    assert block.detail == f"a {str(dtype).removeprefix('torch.')} cast of the bound block"
    cast_world.apply(bundles["noir"], weight=0.7)
    assert LM not in cast_world._digest_cache  # the cast block was never hashed: its source was compared
    reference = World.load(saved)
    reference.apply(bundles["noir"], weight=0.7)
    got = lm_out(cast_world, x)
    assert cast_world.block(LM).module.tok.weight.dtype == dtype
    torch.testing.assert_close(got, lm_out(reference, x), rtol=0, atol=TOLERANCE[dtype])
    assert not torch.equal(got, lm_out(World.load(saved, dtype=dtype), x))  # the adapter is in the output


def test_swap_on_a_cast_world_takes_the_fast_path(bundles, cast_world):
    x = tokens()
    applied = cast_world.apply(bundles["noir"], weight=0.5)
    cast_world.swap("author/noir", bundles["noir2"])
    assert applied.bound and applied.bundle is bundles["noir2"]  # the fast swap keeps the binding; the full one clears it
    again = reference_world("tiny", seed=0)
    again.cast(cast_world.cast_record.dtype)
    again.apply(bundles["noir2"], weight=0.5)
    assert torch.equal(lm_out(cast_world, x), lm_out(again, x))


@pytest.fixture
def saved64(tmp_path):
    path = tmp_path / "base64"
    reference_world("tiny", seed=0).double().save(path)
    return path


def test_a_fast_swap_that_converts_refuses_a_value_past_the_cast_dtype_before_writing(saved64, tmp_path):
    """The converting copy of a cast world's fast swap stored a value past the storage's range as
    inf: float64 bundles of a float64 base on that base cast to float32 (a half base stores its
    adapters in float32, which holds any float32 or half value: nothing narrows there)."""
    from tests.lwformat.runtime.conftest import converted_bundle

    ok, ok2, big = (converted_bundle(tmp_path, seed, value, base=torch.float64, stored=torch.float64)
                    for seed, value in ((1, None), (2, None), (3, 1e39)))  # fmt: skip
    world = World.load(saved64, dtype=torch.float32)
    applied = world.apply(ok, weight=0.5)
    assert applied.packed  # the float64 run, converted as it is copied: the fast path
    x = tokens()
    before = lm_out(world, x)
    with pytest.raises(LayoutError, match=r"value 1e\+39 at .* overflows float32"):
        world.swap("author/noir", big)
    assert applied.bundle is ok and torch.equal(lm_out(world, x), before)
    world.swap("author/noir", ok2)  # one that fits still swaps, on the fast path
    assert applied.bound and applied.bundle is ok2


def test_a_fast_swap_on_a_float16_cast_world_takes_a_value_past_float16(bundles, saved, tmp_path):
    """A half base stores its adapters in float32: the float32 bundle's run is copied as it is,
    and 1e5, which float16 storage refused, goes in exactly."""
    world = World.load(saved, dtype=torch.float16)
    applied = world.apply(bundles["noir"], weight=0.5)
    big, key = poisoned(tmp_path, 3, [1e5], name="author/noir")  # noir's layout: the fast path
    world.swap("author/noir", big)
    assert applied.bound and applied.bundle is big
    slot, _, tensor_name = key.rpartition(".")
    assert getattr(applied.adapters[slot], tensor_name).flatten()[0] == 1e5


@pytest.mark.parametrize("change", ["write", "replace", "move"])
def test_a_block_changed_after_the_cast_is_judged_by_its_own_digest(bundles, cast_world, change):
    lm = cast_world.block(LM).module
    with torch.no_grad():
        if change == "write":
            lm.tok.weight[0, 0] += 1
        elif change == "replace":
            lm.ln_f.weight = torch.nn.Parameter(lm.ln_f.weight.detach().clone())
        else:
            lm.to(torch.float32)  # converts every tensor: Module.to, not world.cast
    before = state(cast_world)
    with pytest.raises(IncompatibleError, match=r"digest mismatch: .* since world.cast\((bfloat16|float16)\)") as info:
        cast_world.apply(bundles["noir"])
    assert info.value.path == LM and info.value.found == cast_world.digest(LM)
    assert not cast_world.applied and same_state(state(cast_world), before)


def test_a_write_after_apply_makes_the_swap_check_everything_and_refuse(bundles, cast_world):
    cast_world.apply(bundles["noir"])
    with torch.no_grad():
        cast_world.block(LM).module.tok.weight[0, 0] += 1
    with pytest.raises(IncompatibleError, match="digest mismatch"):
        cast_world.swap("author/noir", bundles["noir2"])
    assert cast_world.applied["author/noir"].bundle is bundles["noir"]


def test_a_bundle_made_for_another_base_says_what_the_block_was_cast_from(tmp_path, bundles):
    world = reference_world("tiny", seed=1)  # other weights
    world.cast(torch.bfloat16)
    source = world.cast_record.blocks[LM][1]
    with pytest.raises(IncompatibleError, match=f"a bfloat16 cast of {source}, another block than the bound one"):
        world.apply(bundles["noir"])


def test_strict_mode_compares_the_root_the_world_had_before_the_cast(bundles, cast_world):
    report = check(bundles["noir"], cast_world, strict=True)
    assert report.ok and report.root.outcome is Outcome.OK and report.root.detail.endswith("cast of the bound world")
    with torch.no_grad():  # a block the bundle does not touch: the root is the world's own again
        cast_world.block("creator/render/t2i/codec").module.get_parameter(
            next(n for n, _ in cast_world.block("creator/render/t2i/codec").module.named_parameters())
        ).mul_(2)
    report = check(bundles["noir"], cast_world, strict=True)
    assert report.root.outcome is Outcome.ROOT_MISMATCH and report.root.found == cast_world.root_digest()
    with pytest.raises(IncompatibleError, match="root mismatch"):
        cast_world.apply(bundles["noir"], strict=True)
    cast_world.apply(bundles["noir"])  # not strict: the bound block is still an untouched cast


def test_remove_restores_the_cast_base_bit_exactly(bundles, cast_world):
    x = tokens()
    before, out, digests = state(cast_world), lm_out(cast_world, x), cast_world.digests()
    cast_world.apply(bundles["noir"])
    cast_world.apply(bundles["rain"], weight=0.3)
    cast_world.remove("author/noir")
    cast_world.remove("author/rain")
    assert same_state(state(cast_world), before) and torch.equal(lm_out(cast_world, x), out)
    assert cast_world.digests() == digests
    cast_world.apply(bundles["noir2"])  # still an untouched cast


@pytest.mark.parametrize("busy", ["applied", "customized", "fused"])
def test_cast_is_refused_while_adapters_are_attached_and_changes_nothing(bundles, busy):
    from lwformat import LightConfig

    world = reference_world("tiny", seed=0)
    if busy == "customized":
        world.customize(LightConfig(kind="lora", rank=2, blocks=[LM]))
    else:
        world.apply(bundles["noir"])
    if busy == "fused":
        world.fuse()
    before = state(world)
    error = FusedError if busy == "fused" else RuntimeStateError
    with pytest.raises(error, match="cannot cast"):
        world.cast(torch.bfloat16)
    assert same_state(state(world), before) and world.cast_record is None


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, "bfloat16", None])
def test_cast_takes_only_the_dtypes_a_world_computes_in(dtype, saved):
    world = reference_world("tiny", seed=0)
    before = state(world)
    with pytest.raises(WorldError, match="cannot cast a world to"):
        world.cast(dtype)
    assert same_state(state(world), before) and world.cast_record is None
    if dtype is not None:
        with pytest.raises(WorldError, match="cannot cast a world to"):
            World.load(saved, dtype=dtype)


def test_casting_again_keeps_what_the_world_was_first_cast_from(bundles, saved):
    world = World.load(saved, dtype=torch.bfloat16)
    world.cast(torch.float16)
    assert world.cast_record.blocks[LM][1] == World.load(saved).digest(LM)
    report = check(bundles["noir"], world, strict=True)
    assert report.ok and report.blocks[0].detail == "a float16 cast of the bound block"


class _CountAminmax(TorchFunctionMode):
    """Counts torch.aminmax calls: the pass `check_fits` makes over each converted tensor."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.aminmax
        return func(*args, **(kwargs or {}))


def _fit_passes(world, bundle) -> int:
    """The aminmax passes of one padded (so, tensor by tensor) apply of `bundle`, then removed."""
    with _CountAminmax() as count:
        world.apply(bundle, reserve_rank=8)
    world.remove(bundle.manifest.name)
    return count.calls


def test_a_padded_apply_checks_a_files_fit_into_the_cast_dtype_once(saved64, tmp_path):
    """The slow fill checked every converted tensor's extremes on every apply, even of a file
    that had passed, which the NaN/inf check remembers. Once per file and target dtypes now;
    a Blend, which has no file, each time."""
    from lwformat import blend
    from tests.lwformat.runtime.conftest import converted_bundle

    # float64, new to this process; into float32 storage, the one conversion that narrows
    bundle = converted_bundle(tmp_path, 7, base=torch.float64, stored=torch.float64)
    world = World.load(saved64, dtype=torch.float32)
    assert _fit_passes(world, bundle) > 0
    assert _fit_passes(world, bundle) == 0  # the same file into the same dtypes: a stat
    # A float16 cast stores the adapters in float32 too: the same dtypes, nothing checked again.
    assert _fit_passes(World.load(saved64, dtype=torch.float16), bundle) == 0
    blended = blend([(bundle, 1.0)], name="author/noir")
    assert _fit_passes(world, blended) > 0 and _fit_passes(world, blended) > 0


def test_fuse_then_unfuse_keeps_a_cast_world_taking_float32_bundles(bundles, cast_world):
    """unfuse's bit-exact restore bumped the version counters: the cast record no longer held,
    and the world refused the bundles bound to what it was cast from."""
    applied = cast_world.apply(bundles["noir"], weight=0.5)
    cast_world.fuse()
    cast_world.unfuse()
    cast_world.swap("author/noir", bundles["noir2"])
    assert applied.bound  # the fast path: the base check passed without hashing
    cast_world.apply(bundles["rain"], weight=0.3)
    assert LM not in cast_world._digest_cache  # never hashed: its source was compared


def test_a_block_written_while_fused_is_judged_by_its_content_after_unfuse(bundles, cast_world):
    cast_world.apply(bundles["noir"], weight=0.5)
    cast_world.fuse()
    with torch.no_grad():
        cast_world.block(LM).module.ln_f.weight.add_(1)  # not a fused layer: unfuse does not restore it
    cast_world.unfuse()
    with pytest.raises(IncompatibleError, match="since world.cast"):
        cast_world.apply(bundles["rain"])


def test_a_cast_record_holds_only_for_the_very_tensors_it_recorded(bundles, cast_world):
    """A fingerprint of addresses, versions, dtypes and shapes vouched for a transposed square
    weight (`.data = .data.t()`) and for another tensor object at the same address."""
    lm = cast_world.block(LM).module
    proj = lm.blocks[0].attn.proj
    assert proj.weight.shape[0] == proj.weight.shape[1]
    proj.weight.data = proj.weight.data.t()  # same address, version, dtype and shape; other strides
    with pytest.raises(IncompatibleError, match="digest mismatch"):
        cast_world.apply(bundles["noir"])
    proj.weight.data = proj.weight.data.t()  # back as it was: the cast of the source again
    cast_world.apply(bundles["noir"])
    cast_world.remove("author/noir")
    lm.ln_f.weight = torch.nn.Parameter(lm.ln_f.weight.detach())  # another object on the same memory
    assert not check(bundles["noir"], cast_world).blocks[0].detail.startswith("a ")  # judged by its content


def test_recomputing_the_digests_forgets_what_the_world_was_cast_from(bundles, cast_world):
    with torch.no_grad():
        cast_world.block(LM).module.ln_f.weight.data.zero_()  # behind the version counter: unseen
    cast_world.digests(recompute=True)  # what is done after such a write
    assert cast_world.cast_record is None
    with pytest.raises(IncompatibleError, match="digest mismatch"):
        cast_world.apply(bundles["noir"])
