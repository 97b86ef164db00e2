"""World -> bundle directory -> archive -> open: round trips, determinism, all-or-nothing writes."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

from lwformat.adapters import LightConfig, LoRA, SlotSettings
from lwformat.adapters.checkpoint import adapter_tensors
from lwformat.bundle.archive import pack
from lwformat.bundle.canonical import manifest_id
from lwformat.bundle.limits import MAX_MANIFEST_BYTES
from lwformat.bundle.manifest import Parent
from lwformat.bundle.read import Bundle
from lwformat.bundle.write import write_bundle, write_tensors
from lwformat.errors import (
    BundleExistsError,
    BundleFormatError,
    BundleLimitError,
    BundleNotFoundError,
    SlotNotFoundError,
    TargetError,
    UnsafePathError,
)
from tests.lwformat.bundle.tiny import (
    BACKBONE,
    LLM,
    VECTORS,
    tiny_custom_world,
    tiny_world,
    tree_bytes,
    write_tiny,
)


def test_round_trip_through_both_forms(tmp_path):
    world = tiny_custom_world()
    parent = Parent(name="author/plain", version="0.1.0", weight=0.5, manifest_sha256="ab" * 32)
    m = write_bundle(world, tmp_path / "b", name="author/noir", version="1.2.3-rc.1", description="noir",
                     license="Apache-2.0", tags=["style"], provenance={"steps": 10, "lr": 1e-4}, parents=[parent])  # fmt: skip
    live = {k: t.detach() for k, t in adapter_tensors(world).items()}
    digests = world.digests()
    assert m.base.blocks == {LLM: digests[LLM], BACKBONE: digests[BACKBONE]}
    assert m.base.root == world.root_digest()
    assert [s.slot for s in m.slots] == [f"{LLM}:0", f"{LLM}:1", f"{BACKBONE}:0"]
    pack(tmp_path / "b", tmp_path / "b.lwb")
    for source in (tmp_path / "b", tmp_path / "b.lwb"):
        with Bundle.open(source) as bundle:
            assert bundle.manifest == m and bundle.source == source
            assert bundle.manifest_id == manifest_id((tmp_path / "b" / "manifest.json").read_bytes())
            tensors = bundle.tensors()
            assert list(tensors) == [s.key for s in bundle.spans] and set(tensors) == set(live)
            for key, t in tensors.items():
                assert t.dtype == live[key].dtype and torch.equal(t, live[key]), key
            slot = bundle.slot_tensors(f"{BACKBONE}:0")
            assert set(slot) == {"lora_A", "lora_B"} and torch.equal(slot["lora_B"], live[f"{BACKBONE}:0.lora_B"])
            with pytest.raises(SlotNotFoundError):
                bundle.slot_tensors(f"{BACKBONE}:7")


@pytest.mark.parametrize("kind", ["dora", "ia3", "bias", "neuron"])
def test_every_kind_round_trips(tmp_path, kind):
    world = tiny_world()
    world.customize(LightConfig(kind=kind, rank=2, neurons=3))
    write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
    live = adapter_tensors(world)
    with Bundle.open(tmp_path / "b") as bundle:
        assert {k: t.tolist() for k, t in bundle.tensors().items()} == {k: t.detach().tolist() for k, t in live.items()}
        assert {s.kind for s in bundle.manifest.slots} == {kind}


def test_writing_and_packing_are_deterministic(tmp_path):
    a, b = write_tiny(tmp_path, "a"), write_tiny(tmp_path, "b")
    assert tree_bytes(a) == tree_bytes(b)
    pack(a, tmp_path / "a.lwb")
    pack(b, tmp_path / "b.lwb")
    assert (tmp_path / "a.lwb").read_bytes() == (tmp_path / "b.lwb").read_bytes()


def test_archive_copy_is_removed_on_close(tmp_path):
    pack(write_tiny(tmp_path), tmp_path / "b.lwb")
    bundle = Bundle.open(tmp_path / "b.lwb", tmp_dir=tmp_path)
    folder = bundle.path
    assert folder.name == "b" and (folder / "adapters.safetensors").is_file()
    bundle.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.lwb"]


def test_write_refuses_what_it_cannot_do_and_writes_nothing(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(BundleExistsError):
        write_tiny(tmp_path, "taken")
    with pytest.raises(TargetError):
        write_bundle(tiny_world(), tmp_path / "x", name="a/b", version="1.0.0")
    with pytest.raises(BundleFormatError) as info:
        write_tiny(tmp_path, "y", version="v1")
    assert info.value.field == "$.version"
    with pytest.raises(BundleNotFoundError):
        write_tiny(tmp_path / "missing", "z")
    assert sorted(os.listdir(tmp_path)) == ["taken"] and not os.listdir(tmp_path / "taken")


def test_a_manifest_readers_would_refuse_as_too_large_is_not_written(tmp_path):
    with pytest.raises(BundleLimitError) as info:
        write_tiny(tmp_path, description="x" * MAX_MANIFEST_BYTES)
    assert (info.value.limit, info.value.path) == ("MAX_MANIFEST_BYTES", "manifest.json")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "given, found",
    [(torch.full((2, 8), -1, dtype=torch.int32), "I32 [2, 8]"), (torch.zeros(8, 2), "F32 [8, 2]")],
    ids=["dtype", "shape"],
)
def test_tensors_unlike_their_manifest_entry_are_refused_before_anything_is_written(tmp_path, given, found):
    with Bundle.open(VECTORS / "valid-dir") as vector:
        draft, tensors = vector.manifest, {k: t.clone() for k, t in vector.tensors().items()}
    key = f"{LLM}:0.lora_A"  # F32 [2, 8] in the manifest: the same bytes, read as something else
    with pytest.raises(BundleFormatError, match=rf"given as {re.escape(found)}, the manifest says F32 \[2, 8\]") as info:
        write_tensors(draft, tensors | {key: given}, tmp_path / "b")
    assert (info.value.path, info.value.field) == ("adapters.safetensors", key)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapters_holding_nan_or_inf_are_refused_before_anything_is_written(tmp_path, bad):
    world = tiny_custom_world()
    adapter = world.block(BACKBONE).module[0].adapters["noir"]
    with torch.no_grad():
        adapter.lora_B[0, 0] = bad  # as a diverged training run leaves it
    with pytest.raises(BundleFormatError, match="NaN or infinite") as info:
        write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
    assert info.value.field.endswith("lora_B") and os.listdir(tmp_path) == []


def test_only_the_customization_is_written_when_a_host_holds_more(tmp_path):
    world = tiny_custom_world()
    host = world.block(LLM).module[0]
    host.add("second", LoRA(host.geo, SlotSettings("lora", rank=2, alpha=2.0), host.base))  # e.g. an applied bundle
    manifest = write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
    bundle = Bundle.open(tmp_path / "b")
    mine = host.adapters[world.customization[0].name]
    assert torch.equal(bundle.slot_tensors(f"{LLM}:0")["lora_A"], mine.lora_A)
    assert manifest.slots[0].rank == mine.settings.rank


def test_a_write_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    """The disk fills up once the weights are written (their fsync fails): no bundle, no partial directory."""
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_bundle(tiny_custom_world(), tmp_path / "b", name="a/b", version="1.0.0")
    assert os.listdir(tmp_path) == []


def test_adapters_on_the_meta_device_are_refused_by_name(tmp_path):
    world = tiny_custom_world()
    adapter = world.block(BACKBONE).module[0].adapters["noir"]
    # a parameter on the meta device (as lazy initialisation leaves it) has no data to write
    adapter.lora_B = nn.Parameter(torch.empty(adapter.lora_B.shape, dtype=adapter.lora_B.dtype, device="meta"))
    with pytest.raises(BundleFormatError, match="on the meta device") as info:
        write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
    assert info.value.field.endswith("lora_B") and os.listdir(tmp_path) == []


def test_directory_form_refuses_links_and_subdirectories(tmp_path):
    folder = write_tiny(tmp_path)
    (folder / "sub").mkdir()
    with pytest.raises(BundleFormatError, match="subdirectory"):
        Bundle.open(folder)
    (folder / "sub").rmdir()
    weights = folder / "adapters.safetensors"
    weights.rename(tmp_path / "elsewhere")
    weights.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError) as info:
        Bundle.open(folder)
    assert info.value.path == "adapters.safetensors"
    with pytest.raises(BundleNotFoundError):
        Bundle.open(tmp_path / "nothing-here")


def test_every_file_of_a_directory_counts_toward_the_total_size(tmp_path, monkeypatch):
    from lwformat.bundle import limits

    folder = write_tiny(tmp_path)
    # the listed files alone are at the limit; manifest.json takes the directory past it, as it would an archive
    monkeypatch.setattr(limits, "MAX_BUNDLE_BYTES", (folder / "adapters.safetensors").stat().st_size)
    with pytest.raises(BundleLimitError) as info:
        Bundle.open(folder)
    assert (info.value.limit, info.value.value) == ("MAX_BUNDLE_BYTES", sum(p.stat().st_size for p in folder.iterdir()))


def test_names_versions_and_archive_paths_are_explained(tmp_path):
    from lwformat import LightConfig
    from lwformat.zoo import reference_world

    world = reference_world("tiny")
    world.customize(LightConfig(kind="lora", rank=2, blocks=["author/narrate/text/llm"]))
    with pytest.raises(BundleFormatError, match=r"a version is semver, e\.g\. 1\.2\.3"):
        write_bundle(world, tmp_path / "a", name="author/x", version="1.0")
    with pytest.raises(BundleFormatError, match="a bundle name is 'owner/name'"):
        write_bundle(world, tmp_path / "b", name="noir", version="1.0.0")
    with pytest.raises(BundleFormatError, match="pack"):
        write_bundle(world, tmp_path / "c.lwb", name="author/x", version="1.0.0")
    assert list(tmp_path.iterdir()) == []



def test_opening_a_peft_directory_or_a_safetensors_file_points_to_the_importers(tmp_path):
    from lwformat.bundle.read import Bundle

    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    (tmp_path / "lora.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(BundleFormatError, match="import_peft"):
        Bundle.open(tmp_path / "peft")
    with pytest.raises(BundleFormatError, match="import_kohya"):
        Bundle.open(tmp_path / "lora.safetensors")


def test_applying_a_light_checkpoint_says_how_to_make_it_a_bundle(tmp_path):
    """A file from save_adapters is no bundle, and no kohya file either: say load_adapters, then write_bundle."""
    from safetensors.torch import save_file

    world = tiny_custom_world()
    world.save_adapters(tmp_path / "ck.safetensors")
    for attempt in (lambda: Bundle.open(tmp_path / "ck.safetensors"), lambda: tiny_world().apply(str(tmp_path / "ck.safetensors"))):
        with pytest.raises(BundleFormatError, match=r"light checkpoint.*load_adapters.*write_bundle") as info:
            attempt()
        assert "import_kohya" not in str(info.value) and info.value.path == str(tmp_path / "ck.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "kohya.safetensors", metadata={"ss_network_dim": "2"})
    with pytest.raises(BundleFormatError, match="import_kohya"):  # another tool's file keeps the kohya hint
        Bundle.open(tmp_path / "kohya.safetensors")


def test_a_fused_world_writes_no_bundle(tmp_path):
    """Fused, the base digests are those of base + deltas: the bundle would fit no real base."""
    from lwformat.errors import FusedError

    world = tiny_custom_world()
    world.fuse()
    with pytest.raises(FusedError, match="unfuse"):
        write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
    assert os.listdir(tmp_path) == []
    world.unfuse()
    write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
