"""The bundle manifest (spec/lwbundle-v1.md, "Manifest"): typed, frozen, canonical.

A manifest binds a set of adapters to its base by content and lists every file of the
bundle with its digests. The types carry the constraints, so a validation error says
where (``at $.slots[2].rank``). Versioning: a minor version only adds optional fields
with defaults that older readers ignore; an unknown major version is refused.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import msgspec

SPEC_MAJOR = 1
SPEC_MINOR = 0
SPEC = f"lwbundle/{SPEC_MAJOR}.{SPEC_MINOR}"

MANIFEST = "manifest.json"
WEIGHTS = "adapters.safetensors"
SIGNATURE = "bundle.sig"
DEFAULT_CHUNK = 4 << 20  # 4 MiB: small enough to resume usefully, large enough to hash fast


def _whole(body: str) -> msgspec.Meta:
    # "$" alone would also accept a trailing newline (Python's re); "(?!.*\n)" refuses any
    # newline and means the same in ECMAScript, so the JSON Schema keeps the exact rule.
    return msgspec.Meta(pattern=rf"^(?!.*\n){body}$")


Digest = Annotated[str, _whole(r"sha256:[0-9a-f]{64}")]
Hex = Annotated[str, _whole(r"[0-9a-f]{64}")]
Name = Annotated[str, _whole(r"[a-z0-9][a-z0-9_.\-]{0,63}/[a-z0-9][a-z0-9_.\-]{0,63}")]
# SemVer 2.0.0: no leading zeros in numbers (pre-release ones included), no empty identifiers;
# numbers (pre-release ones included) of at most 20 digits, as the hub stores them (lwhub.semver).
_NUM = r"(0|[1-9][0-9]{0,19})"
_PRE = rf"({_NUM}|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_BUILD = r"[0-9A-Za-z-]+"
SemVer = Annotated[str, _whole(rf"{_NUM}\.{_NUM}\.{_NUM}(-{_PRE}(\.{_PRE})*)?(\+{_BUILD}(\.{_BUILD})*)?")]
BlockPath = Annotated[str, _whole(r"[A-Za-z0-9][A-Za-z0-9_\-]*(/[A-Za-z0-9][A-Za-z0-9_\-]*){3}")]
MemberPath = Annotated[str, _whole(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")]  # flat; fits the ustar name field
ModulePath = Annotated[str, _whole(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*"), msgspec.Meta(max_length=1024)]
TensorName = Annotated[str, _whole(r"[A-Za-z_][A-Za-z0-9_]{0,127}")]
SpecVersion = Annotated[str, _whole(r"lwbundle/(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")]
Dim = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Rank = Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]


class Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=False, omit_defaults=True):
    """Unknown fields are ignored (a newer minor version may add them)."""


class FileEntry(Struct):
    path: MemberPath  # flat: a bundle has no subdirectories
    size: Count
    sha256: Hex
    chunks: list[Hex]  # sha256 of each chunk_size piece, the last one shorter


class TensorEntry(Struct):
    key: str  # the tensor's name in the weights file: "<slot>.<name>"
    dtype: str  # safetensors dtype name
    shape: list[Dim]


class SlotEntry(Struct):
    block: BlockPath
    module: ModulePath
    kind: str
    layer: str
    tensors: dict[TensorName, TensorEntry]  # adapter tensor name -> where it is stored
    rank: Rank = 0
    alpha: float = 0.0
    rslora: bool = False

    @property
    def slot(self) -> str:
        return f"{self.block}:{self.module}"


class BaseBinding(Struct):
    root: Digest  # world root digest; checked only in strict mode
    blocks: dict[BlockPath, Digest]  # every touched block's digest


class Parent(Struct):
    name: Name
    version: SemVer
    weight: float
    manifest_sha256: Hex


class Manifest(Struct):
    spec: SpecVersion  # "lwbundle/<major>.<minor>"
    name: Name
    version: SemVer
    base: BaseBinding
    slots: list[SlotEntry]
    files: list[FileEntry]
    chunk_size: Annotated[int, msgspec.Meta(ge=1 << 16, le=1 << 30)] = DEFAULT_CHUNK
    description: str = ""
    license: str = ""
    tags: list[str] = []
    provenance: dict[str, Any] = {}
    parents: list[Parent] = []


def slot_layout(manifest: Manifest) -> bytes:
    """A digest of everything about a manifest's slots but their numbers.

    Bundles of equal layouts swap with one copy; comparing 32 bytes instead of the
    slots themselves keeps that comparison off a swap's clock.
    """
    layout = tuple(
        (e.block, e.module, e.kind, e.layer, e.rank, e.alpha, e.rslora,
         tuple((n, t.dtype, tuple(t.shape)) for n, t in e.tensors.items()))
        for e in manifest.slots
    )  # fmt: skip
    return hashlib.sha256(repr(layout).encode()).digest()
