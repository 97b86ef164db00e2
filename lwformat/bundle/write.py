"""Write a customized world's adapters as a bundle directory, all or nothing.

The manifest is built and validated first, with the weights file's size and chunk
count known from the layout, so a bad name or version fails before a byte is written.
The files are written into a temporary sibling directory, flushed to disk, and the
directory is renamed into place: a reader sees a whole bundle or none.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from ..errors import BundleFormatError, FusedError, TargetError
from ..world.digest import DTYPE_NAMES, tensor_bytes
from .canonical import dumps
from .files import new_directory, write_synced
from .hashing import FileHasher
from .layout import header_bytes, plan_layout
from .manifest import (
    DEFAULT_CHUNK,
    MANIFEST,
    SPEC,
    WEIGHTS,
    BaseBinding,
    FileEntry,
    Manifest,
    Parent,
    SlotEntry,
    TensorEntry,
)

if TYPE_CHECKING:
    from ..adapters.plan import SlotPlan
    from ..world.tree import World


def _slot_entry(plan: SlotPlan, live: Mapping[str, torch.Tensor]) -> SlotEntry:
    prefix = plan.slot + "."
    tensors = {}
    for key, t in live.items():
        if key.startswith(prefix) and "." not in key[len(prefix):]:
            if t.dtype not in DTYPE_NAMES:
                raise BundleFormatError(f"{key}: dtype {t.dtype} has no safetensors name", path=WEIGHTS, field=key)
            tensors[key[len(prefix):]] = TensorEntry(key=key, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape))
    return SlotEntry(
        block=plan.block_path, module=plan.module_path, kind=plan.kind, layer=plan.layer, tensors=tensors,
        rank=plan.rank, alpha=float(plan.alpha), rslora=plan.rslora,
    )  # fmt: skip


def build_manifest(world: World, *, name: str, version: str, chunk_size: int = DEFAULT_CHUNK,
                   description: str = "", license: str = "", tags: Iterable[str] = (),
                   provenance: Mapping[str, Any] | None = None, parents: Iterable[Parent] = ()) -> Manifest:  # fmt: skip
    """The manifest of `world`'s adapters, its file list still empty."""
    from ..adapters.checkpoint import adapter_tensors

    if world.customization is None:
        raise TargetError("the world carries no adapters to write; call customize() first")
    if world.fused_state is not None:  # the base weights hold the deltas: the digests would bind another base
        raise FusedError("cannot write a bundle from a fused world; call unfuse() first")
    _, plan = world.customization
    live = adapter_tensors(world)
    digests = world.digests()
    return Manifest(
        spec=SPEC, name=name, version=version,
        base=BaseBinding(root=world.root_digest(), blocks={b: digests[b] for b in plan.blocks()}),
        slots=[_slot_entry(s, live) for s in plan.slots], files=[], chunk_size=chunk_size,
        description=description, license=license, tags=list(tags), provenance=dict(provenance or {}),
        parents=list(parents),
    )  # fmt: skip


def write_bundle(world: World, out_dir: str | os.PathLike, *, name: str, version: str, description: str = "",
                 license: str = "", tags: Iterable[str] = (), provenance: Mapping[str, Any] | None = None,
                 parents: Iterable[Parent] = (), chunk_size: int = DEFAULT_CHUNK) -> Manifest:  # fmt: skip
    """Write `world`'s adapters (its customization) to the new directory `out_dir`; return the manifest."""
    from ..adapters.checkpoint import adapter_tensors

    draft = build_manifest(world, name=name, version=version, chunk_size=chunk_size, description=description,
                           license=license, tags=tags, provenance=provenance, parents=parents)  # fmt: skip
    return write_tensors(draft, adapter_tensors(world), out_dir)


def write_tensors(draft: Manifest, tensors: Mapping[str, torch.Tensor], out_dir: str | os.PathLike) -> Manifest:
    """Write a bundle from a manifest draft (its ``files`` ignored) and ``{key: tensor}``; all or nothing."""
    if Path(out_dir).suffix == ".lwb":  # an archive name: a directory named so would not open as one
        raise BundleFormatError(f"{out_dir}: a bundle is written as a directory; `pack` (lwformat.bundle.archive) "
                                "makes the .lwb archive from it", path=str(out_dir))  # fmt: skip
    chunk_size = draft.chunk_size
    spans = plan_layout(draft)
    missing = [s.key for s in spans if s.key not in tensors]
    if missing:
        raise BundleFormatError(f"{missing[0]}: the manifest lists a tensor that was not given", path=WEIGHTS, field=missing[0])
    for s in spans:
        t = tensors[s.key]
        found = (DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
        if found != (s.dtype, s.shape):  # its bytes would be read under the manifest's dtype and shape
            raise BundleFormatError(f"{s.key}: given as {found[0]} {list(found[1])}, the manifest says {s.dtype} {list(s.shape)}",
                                    path=WEIGHTS, field=s.key)  # fmt: skip
        if t.is_meta:
            raise BundleFormatError(f"{s.key}: on the meta device, it holds no data to write (load or initialise it first)",
                                    path=WEIGHTS, field=s.key)  # fmt: skip
        # A diverged run: every output it touches would be NaN (float8 has no isfinite: seen as float32).
        if t.is_floating_point() and not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()):
            raise BundleFormatError(f"{s.key}: holds NaN or infinite values (did training diverge?)", path=WEIGHTS, field=s.key)
    header = header_bytes(spans)
    size = len(header) + sum(s.nbytes for s in spans)
    placeholder = FileEntry(path=WEIGHTS, size=size, sha256="0" * 64, chunks=["0" * 64] * -(-size // chunk_size))
    dumps(msgspec.structs.replace(draft, files=[placeholder]))  # validates everything before writing
    with new_directory(Path(out_dir)) as tmp:
        hasher = FileHasher(chunk_size)
        with open(tmp / WEIGHTS, "xb") as f:
            for piece in (header, *(tensor_bytes(tensors[s.key]) for s in spans)):
                f.write(piece)
                hasher.update(piece)
            f.flush()
            os.fsync(f.fileno())
        if hasher.size != size:
            raise BundleFormatError(f"{WEIGHTS}: wrote {hasher.size} bytes, the layout needs {size}", path=WEIGHTS)
        manifest = msgspec.structs.replace(draft, files=[hasher.entry(WEIGHTS)])
        write_synced(tmp / MANIFEST, dumps(manifest))
    return manifest
