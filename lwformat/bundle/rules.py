"""The manifest rules a JSON Schema cannot state (spec/lwbundle-v1.md, "Manifest").

    slots       unique ``block:module``; each tensor's key is ``<block>:<module>.<name>``;
                dtype one of DTYPES; at most MAX_NDIM dimensions; MAX_TENSORS tensors in all
    base        binds every block a slot touches
    files       unique paths; never manifest.json or bundle.sig; adapters.safetensors listed;
                ceil(size / chunk_size) chunk digests; MAX_BUNDLE_BYTES and MAX_MEMBERS in all
"""

from __future__ import annotations

from ..errors import BundleFormatError
from . import limits
from .manifest import MANIFEST, SIGNATURE, WEIGHTS, Manifest, TensorEntry

ITEMSIZE = {
    "F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
DTYPES = frozenset(ITEMSIZE)


def _fail(message: str, field: str) -> None:
    raise BundleFormatError(f"{MANIFEST}: {field}: {message}", path=MANIFEST, field=field)


def check_manifest(m: Manifest) -> None:
    _check_slots(m)
    _check_files(m)


def _check_slots(m: Manifest) -> None:
    # Locations are spelled out only on failure: this runs on every open.
    seen: set[str] = set()
    count = 0
    for i, slot in enumerate(m.slots):
        key = slot.slot
        if key in seen:
            _fail(f"slot {key} is listed twice", f"$.slots[{i}]")
        seen.add(key)
        if slot.block not in m.base.blocks:
            _fail(f"block {slot.block} is not bound in $.base.blocks", f"$.slots[{i}].block")
        if not slot.tensors:
            _fail("a slot holds at least one tensor", f"$.slots[{i}].tensors")
        for name, t in slot.tensors.items():
            if t.key != f"{key}.{name}" or t.dtype not in DTYPES or len(t.shape) > limits.MAX_NDIM:
                _check_tensor(key, name, t, f"$.slots[{i}].tensors.{name}")
        count += len(slot.tensors)
        if count > limits.MAX_TENSORS:
            limits.ensure(count, limits.MAX_TENSORS, "MAX_TENSORS", "tensor count", path=MANIFEST, field=f"$.slots[{i}]")


def _check_tensor(slot: str, name: str, t: TensorEntry, where: str) -> None:
    if t.key != f"{slot}.{name}":
        _fail(f"key {t.key!r} must be '{slot}.{name}'", f"{where}.key")
    if t.dtype not in DTYPES:
        _fail(f"dtype {t.dtype!r} is not one of {', '.join(sorted(DTYPES))}", f"{where}.dtype")
    # a limit of section 8, refused as the weights header refuses it
    limits.ensure(len(t.shape), limits.MAX_NDIM, "MAX_NDIM", f"{where}.shape: dimension count", path=MANIFEST,
                  field=f"{where}.shape")  # fmt: skip


def _check_files(m: Manifest) -> None:
    paths: set[str] = set()
    total = 0
    for i, f in enumerate(m.files):
        at = f"$.files[{i}]"
        if f.path in paths:
            _fail(f"{f.path} is listed twice", f"{at}.path")
        if f.path in (MANIFEST, SIGNATURE):
            _fail(f"{f.path} is never listed in the manifest", f"{at}.path")
        paths.add(f.path)
        want = -(-f.size // m.chunk_size)  # ceil: the last chunk may be short; an empty file has none
        if len(f.chunks) != want:
            got = len(f.chunks)
            _fail(f"{got} chunk digests for {f.size} bytes in chunks of {m.chunk_size}; want {want}", f"{at}.chunks")
        total += f.size
    if WEIGHTS not in paths:
        _fail(f"{WEIGHTS} is not listed", "$.files")
    limits.ensure(len(paths) + 2, limits.MAX_MEMBERS, "MAX_MEMBERS", "file count", path=MANIFEST, field="$.files")
    limits.ensure(total, limits.MAX_BUNDLE_BYTES, "MAX_BUNDLE_BYTES", "total file size", path=MANIFEST, field="$.files")
