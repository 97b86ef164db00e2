"""The weights file, adapters.safetensors, exact to the byte (spec/lwbundle-v1.md, "Weights").

    file   = u64 little-endian N || header (N bytes) || data
    header = canonical JSON {key: {"data_offsets": [begin, end], "dtype": d, "shape": [...]}}
             padded with spaces (0x20) so that 8 + N is a multiple of 64 (the data is 64-aligned)
    data   = every tensor's C-contiguous little-endian bytes, back to back, no gaps, in
             CANONICAL ORDER: sorted by (-itemsize(dtype), dtype, slot index in the manifest,
             tensor name by code point)

So the tensors of one dtype form one contiguous run, each run starts at a multiple of its
item size, and a runtime holding one packed buffer per dtype fills it with one copy.
Readers check the header against the manifest before any tensor is loaded: the keys,
dtypes and shapes listed there, offsets in bounds, no overlap, no gap, canonical order.
"""

from __future__ import annotations

import struct
from math import prod
from typing import NamedTuple

import msgspec

from ..errors import BundleFormatError
from . import limits
from .canonical import encode, parse
from .manifest import WEIGHTS, Manifest
from .rules import ITEMSIZE

ALIGN = 64
_ENTRY_KEYS = {"data_offsets", "dtype", "shape"}


class TensorSpan(NamedTuple):
    """One tensor of the weights file; ``begin``/``end`` are offsets into the data section."""

    key: str  # "<block path>:<module path>.<name>"
    slot: str  # "<block path>:<module path>"
    name: str  # the adapter's tensor name: lora_A, magnitude...
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def plan_layout(manifest: Manifest) -> list[TensorSpan]:
    """Every tensor of the manifest in canonical order, with its offsets."""
    entries = sorted(
        (-ITEMSIZE[t.dtype], t.dtype, i, name, slot.slot, t)
        for i, slot in enumerate(manifest.slots)
        for name, t in slot.tensors.items()
    )  # names are unique within a slot, so the sort never compares two entries' last items
    spans, offset = [], 0
    for _, dtype, _, name, slot, t in entries:
        shape = tuple(t.shape)
        end = offset + prod(shape) * ITEMSIZE[dtype]
        spans.append(TensorSpan(t.key, slot, name, dtype, shape, offset, end))
        offset = end
    return spans


def _entries(spans: list[TensorSpan]) -> dict:
    return {s.key: {"data_offsets": [s.begin, s.end], "dtype": s.dtype, "shape": list(s.shape)} for s in spans}


def spans_json(spans: list[TensorSpan]) -> bytes:
    """The header's canonical JSON, before padding (the spans come from a validated manifest)."""
    return encode(_entries(spans), checked=True)


def header_bytes(spans: list[TensorSpan]) -> bytes:
    """The 8-byte length and the padded JSON header; the data follows."""
    header = spans_json(spans)
    header += b" " * (-(8 + len(header)) % ALIGN)
    return struct.pack("<Q", len(header)) + header


def _fail(message: str, key: str | None = None) -> None:
    raise BundleFormatError(f"{WEIGHTS}: {key + ': ' if key else ''}{message}", path=WEIGHTS, field=key)


def _entry(key: str, value: object, data_len: int) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(value, dict) or set(value) != _ENTRY_KEYS:
        _fail(f"entry must hold exactly {sorted(_ENTRY_KEYS)}", key)
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:  # a list or dict would not even hash
        _fail(f"unknown dtype {dtype!r}", key)
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        _fail(f"shape {shape!r} is not a list of sizes", key)
    limits.ensure(len(shape), limits.MAX_NDIM, "MAX_NDIM", f"{key}: dimension count", path=WEIGHTS, field=key)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        _fail(f"data_offsets {offsets!r} is not [begin, end]", key)
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        _fail(f"data_offsets [{begin}, {end}] out of bounds: the data section holds {data_len} bytes", key)
    if end - begin != prod(shape) * ITEMSIZE[dtype]:
        _fail(f"data_offsets span {end - begin} bytes, {dtype} {shape} needs {prod(shape) * ITEMSIZE[dtype]}", key)
    return dtype, tuple(shape), begin, end


def check_header(header: bytes, data_len: int, manifest: Manifest) -> list[TensorSpan]:
    """Validate the JSON header (without its length prefix) against the manifest; return the spans."""
    spans, header = plan_layout(manifest), header.rstrip(b" ")  # the padding is JSON whitespace
    # Exactly what a writer makes of this manifest? msgspec spells it as `spans_json` does
    # (pattern-checked ASCII keys, integers), in a tenth of the time; were it ever to
    # differ, the header would just take the full check below.
    if msgspec.json.encode(_entries(spans), order="sorted") == header and (spans[-1].end if spans else 0) == data_len:
        return spans
    value = parse(header, path=WEIGHTS)
    if not isinstance(value, dict):
        _fail("header is not a JSON object")
    meta = value.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        _fail("__metadata__ must map strings to strings", "__metadata__")
    limits.ensure(len(value), limits.MAX_TENSORS, "MAX_TENSORS", "tensor count", path=WEIGHTS)
    found = {key: _entry(key, entry, data_len) for key, entry in value.items()}
    end = 0
    for key, (_, _, b, e) in sorted(found.items(), key=lambda kv: (kv[1][2], kv[1][3], kv[0])):
        if b < end:
            _fail(f"data_offsets [{b}, {e}] overlap the previous tensor (which ends at {end})", key)
        if b > end:
            _fail(f"gap of {b - end} bytes before this tensor: safetensors data has no holes", key)
        end = e
    if end != data_len:
        _fail(f"{data_len - end} bytes after the last tensor belong to no tensor")
    for s in spans:
        if s.key not in found:
            _fail("listed in the manifest, missing from the weights file", s.key)
        dtype, shape, b, e = found.pop(s.key)
        if (dtype, shape) != (s.dtype, s.shape):
            _fail(f"stored as {dtype} {list(shape)}, the manifest says {s.dtype} {list(s.shape)}", s.key)
        if (b, e) != (s.begin, s.end):
            _fail(f"at [{b}, {e}], canonical order puts it at [{s.begin}, {s.end}]", s.key)
    if found:
        _fail("not listed in the manifest", min(found))
    return spans


def read_prefix(prefix: bytes, file_size: int) -> int:
    """The header length N from the first 8 bytes, bounded before the header is read."""
    if file_size < 8 or len(prefix) < 8:
        _fail(f"{file_size} bytes: too short for a safetensors file")
    (n,) = struct.unpack("<Q", prefix[:8])
    limits.ensure(n, limits.MAX_HEADER_BYTES, "MAX_HEADER_BYTES", "header size", path=WEIGHTS)
    if 8 + n > file_size:
        _fail(f"header of {n} bytes runs past the end of the {file_size}-byte file")
    return n
