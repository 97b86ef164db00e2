"""The weights file: canonical order, exact layout, and the header checks readers make first."""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lwformat.adapters import LightConfig
from lwformat.adapters.checkpoint import adapter_tensors
from lwformat.bundle.layout import check_header, read_prefix
from lwformat.bundle.read import Bundle
from lwformat.bundle.write import write_bundle
from lwformat.errors import BundleFormatError, BundleLimitError

from tests.lwformat.bundle.tiny import BACKBONE, LLM, VECTORS, make_vectors, tiny_world

ITEM = {"I64": 8, "F32": 4, "BF16": 2}


def parse(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize(
    "kind, order",
    [
        ("lora", [f"{LLM}:0.lora_A", f"{LLM}:0.lora_B", f"{LLM}:1.lora_A", f"{LLM}:1.lora_B",
                  f"{BACKBONE}:0.lora_A", f"{BACKBONE}:0.lora_B"]),
        ("dora", [f"{LLM}:0.lora_A", f"{LLM}:0.lora_B", f"{LLM}:0.magnitude", f"{LLM}:1.lora_A", f"{LLM}:1.lora_B",
                  f"{LLM}:1.magnitude", f"{BACKBONE}:0.lora_A", f"{BACKBONE}:0.lora_B", f"{BACKBONE}:0.magnitude"]),
        ("neuron", [f"{LLM}:0.neuron_index", f"{LLM}:1.neuron_index", f"{BACKBONE}:0.neuron_index",
                    f"{LLM}:0.neuron_delta", f"{LLM}:1.neuron_delta", f"{BACKBONE}:0.neuron_delta"]),
    ],
)  # fmt: skip
def test_canonical_order_and_exact_layout(tmp_path, kind, order):
    world = tiny_world()
    world.customize(LightConfig(kind=kind, rank=2, neurons=2))
    write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
    start, header = parse(tmp_path / "b" / "adapters.safetensors")
    assert "__metadata__" not in header and start % 64 == 0
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"])
    assert by_offset == order
    raw = (tmp_path / "b" / "adapters.safetensors").read_bytes()
    end = 0
    live = adapter_tensors(world)
    for key in by_offset:
        b, e = header[key]["data_offsets"]
        assert b == end and b % ITEM[header[key]["dtype"]] == 0  # contiguous, each run item-aligned
        t = live[key].detach()
        want = t.view(torch.int16).numpy().astype("<i2") if t.dtype == torch.bfloat16 else t.numpy()
        assert raw[start + b : start + e] == np.ascontiguousarray(want).astype(want.dtype.newbyteorder("<")).tobytes()
        end = e
    assert start + end == len(raw)
    with safe_open(str(tmp_path / "b" / "adapters.safetensors"), framework="pt") as f:  # a plain safetensors file
        assert sorted(f.keys()) == sorted(order)


def test_packed_runs_are_views_of_the_file_in_canonical_order(tmp_path):
    world = tiny_world()
    world.customize(LightConfig(kind="neuron", neurons=2))
    for key, t in adapter_tensors(world).items():  # the backbone's stored in its layer's BF16: a third run
        if key.startswith(BACKBONE) and t.is_floating_point():
            t.data = t.data.to(torch.bfloat16)
    write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
    with Bundle.open(tmp_path / "b") as bundle:
        packed, tensors = bundle.packed(), bundle.tensors()
        assert list(packed) == ["I64", "F32", "BF16"]
        for dtype, run in packed.items():
            parts = [t.reshape(-1) for t in tensors.values() if t.dtype == run.dtype]
            assert torch.equal(run, torch.cat(parts))


def _read_runs(bundle) -> dict[str, torch.Tensor]:
    runs = {name: torch.empty_like(run) for name, run in bundle.packed().items()}
    bundle.read_runs(runs)
    return runs


def test_read_runs_equal_the_mapped_runs_in_a_forked_child_too(tmp_path, monkeypatch):
    import os
    import signal

    from lwformat.bundle import read

    from torch import nn

    from lwformat.world import Block, World

    world = World.from_blocks({LLM: Block(nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256)), "llm")})
    world.customize(LightConfig(rank=16))
    for p in world.adapter_parameters():
        torch.nn.init.normal_(p)
    write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
    monkeypatch.setattr(read, "_SPLIT_READ", 8192)  # the 64 KiB run is read in two halves, by two threads
    with Bundle.open(tmp_path / "b") as bundle:
        packed = bundle.packed()
        assert packed["F32"].numel() * 4 >= 2 * 8192
        assert all(torch.equal(_read_runs(bundle)[name], run) for name, run in packed.items())
        pid = os.fork()  # the parent's reader thread is not in the child: it must make its own
        if pid == 0:
            signal.alarm(20)  # a hang ends the child, and so fails the test
            os._exit(0 if all(torch.equal(_read_runs(bundle)[n], r) for n, r in packed.items()) else 3)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def _valid_manifest():
    from lwformat.bundle.canonical import loads

    return loads((VECTORS / "valid-dir" / "manifest.json").read_bytes())


def _header(entries: dict) -> bytes:
    return json.dumps(entries).encode()


def _valid_entries() -> tuple[dict, int]:
    _, header = parse(VECTORS / "valid-dir" / "adapters.safetensors")
    return header, max(v["data_offsets"][1] for v in header.values())


def test_a_header_claiming_a_terabyte_tensor_is_refused_without_allocating():
    entries, data_len = _valid_entries()
    key = f"{BACKBONE}:0.lora_B"
    entries[key] = {"dtype": "F32", "shape": [1 << 38], "data_offsets": [data_len, data_len + (1 << 40)]}
    tracemalloc.start()
    try:
        with pytest.raises(BundleFormatError, match="out of bounds") as info:
            check_header(_header(entries), data_len, _valid_manifest())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.field == key and peak < 1 << 20


def test_a_huge_header_length_is_refused_before_reading():
    with pytest.raises(BundleLimitError) as info:
        read_prefix(struct.pack("<Q", 1 << 63), 1 << 64)
    assert info.value.limit == "MAX_HEADER_BYTES"
    with pytest.raises(BundleFormatError, match="past the end"):
        read_prefix(struct.pack("<Q", 100), 50)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda e, n: e.pop(f"{LLM}:0.lora_A"), "gap of 64 bytes"),
        (lambda e, n: e[f"{BACKBONE}:0.lora_B"].update(dtype="X9"), "unknown dtype"),
        (lambda e, n: e[f"{BACKBONE}:0.lora_B"].update(shape=[4, 2, 1]), "the manifest says"),
        (lambda e, n: e[f"{BACKBONE}:0.lora_B"].update(extra=1), "exactly"),
        (lambda e, n: e.update({"x:y.z": {"dtype": "U8", "shape": [0], "data_offsets": [n, n]}}), "not listed"),
        (lambda e, n: e[f"{BACKBONE}:0.lora_B"].update(data_offsets=[288, 300]), "span 12 bytes"),
    ],
)
def test_header_refusals(edit, match):
    entries, data_len = _valid_entries()
    edit(entries, data_len)
    with pytest.raises(BundleFormatError, match=match):
        check_header(_header(entries), data_len, _valid_manifest())


def test_trailing_bytes_and_metadata():
    entries, data_len = _valid_entries()
    with pytest.raises(BundleFormatError, match="belong to no tensor"):
        check_header(_header(entries), data_len + 4, _valid_manifest())
    spans = check_header(_header({**entries, "__metadata__": {"format": "pt"}}), data_len, _valid_manifest())
    assert [s.key for s in spans] == sorted(entries, key=lambda k: entries[k]["data_offsets"])


def test_open_checks_the_header_before_loading(tmp_path):
    shutil.copytree(VECTORS / "valid-dir", tmp_path / "b")

    def claim_terabyte(header: dict, data: bytes) -> bytes:
        header[f"{LLM}:0.lora_A"] = {"dtype": "F32", "shape": [1 << 38], "data_offsets": [0, 1 << 40]}
        return data

    make_vectors.edit_header(tmp_path / "b", claim_terabyte)
    with pytest.raises(BundleFormatError, match="out of bounds"):
        Bundle.open(tmp_path / "b")


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 32, None])
def test_a_dtype_that_is_no_string_is_a_format_error(tmp_path, dtype):
    """A list or dict would not even hash: the lookup raised TypeError."""
    world = tiny_world()
    world.customize(LightConfig(kind="lora", rank=2))
    write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0")
    path = tmp_path / "b" / "adapters.safetensors"
    start, header = parse(path)
    key = min(header)
    header[key]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    data = struct.pack("<Q", len(text)) + text + path.read_bytes()[start:]
    path.write_bytes(data)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_bytes())  # its size, as the file now is
    manifest["files"][0]["size"] = len(data)
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, separators=(",", ":")))
    with pytest.raises(BundleFormatError, match="dtype") as caught:
        Bundle.open(tmp_path / "b")
    assert caught.value.field == key
