"""Open a bundle, directory or archive, checking its structure before loading any tensor.

`Bundle.open` reads and validates the manifest, lists the directory (regular files
only: exactly manifest.json, the listed files and optionally bundle.sig), checks
every listed file's size, and checks the weights header against the manifest. Only
then are tensors read, lazily, from one copy-on-write map of the weights file.

An archive (a file) is first unpacked, safely, into a private temporary directory:
memory-mapping needs a plain file, and zstd streams cannot be seeked. The copy is
removed by `close()` (or when the `Bundle` is collected). Hashes are not checked
here; `verify.verify_files` does that.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import re
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Self

from ..errors import (
    BundleFormatError,
    BundleNotFoundError,
    IntegrityError,
    SlotNotFoundError,
)
from . import limits
from .canonical import loads, manifest_id
from .files import list_members, open_member, read_member
from .layout import TensorSpan, check_header, read_prefix
from .manifest import MANIFEST, SIGNATURE, WEIGHTS, Manifest, SlotEntry, slot_layout

# Opening and checking a bundle needs no torch (the hub client, the `lwhub` command):
# only the methods that make tensors import it.
if TYPE_CHECKING:
    import torch

_SAFE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")
LIGHT_CHECKPOINTS = ("lwadapters/1", "lwadapters/2")  # `adapters.checkpoint`'s formats, named here without importing torch


def _not_a_bundle(source: Path) -> str:
    """What to do with a safetensors file given as a bundle: ours (`save_adapters`) or kohya's."""
    if _safetensors_format(source) in LIGHT_CHECKPOINTS:
        return (f"{source}: a light checkpoint (World.save_adapters), not a bundle (a directory or .lwb archive); "
                "load it into a world of its base with world.load_adapters(path), then write a bundle with "
                "lwformat.write_bundle(world, dir, name=..., version=...)")  # fmt: skip
    return (f"{source}: a safetensors file, not a bundle (a directory or .lwb archive); "
            "lwformat.interop.import_kohya reads kohya LoRA files")  # fmt: skip


def _safetensors_format(path: Path) -> str | None:
    """The ``format`` in a safetensors file's metadata, or None when the header says none (or is no header)."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= limits.MAX_HEADER_BYTES:  # only a hint is wanted: no huge read for it
                return None
            metadata = json.loads(f.read(size)).get("__metadata__")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object: no format to tell
        return None
    return metadata.get("format") if isinstance(metadata, dict) else None


class Bundle:
    """An open bundle: its manifest, and its tensors read lazily in canonical order.

    ``path`` is the directory holding the files (a private copy for an archive),
    ``source`` what was opened, ``spans`` every tensor in canonical order with its
    offsets into the data section, which starts at byte ``data_offset`` of the weights file.
    """

    def __init__(self, path: Path, source: Path, manifest_bytes: bytes, manifest: Manifest,
                 spans: list[TensorSpan], data_offset: int, tmp: Path | None = None) -> None:  # fmt: skip
        self.path = path
        self.source = source
        self.manifest_bytes = manifest_bytes
        self.manifest = manifest
        self.spans = tuple(spans)
        self.data_offset = data_offset
        self._by_slot: dict[str, list[TensorSpan]] = {}
        for span in self.spans:
            self._by_slot.setdefault(span.slot, []).append(span)
        self._size, self._sha256 = next((f.size, f.sha256) for f in manifest.files if f.path == WEIGHTS)  # as `open` checked
        self._map: mmap.mmap | None = None
        self._watch: int | None = None  # a descriptor of the mapped file, to see later writes
        self._mtime: int | None = None  # the file's mtime when first mapped
        self._closed = False
        self._packed: dict[str, torch.Tensor] | None = None
        self._cleanup = weakref.finalize(self, shutil.rmtree, tmp, True) if tmp is not None else None

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, tmp_dir: str | os.PathLike | None = None) -> Bundle:
        """Open a bundle directory or a ``.lwb`` archive; raises a `BundleError` naming what is wrong."""
        source = Path(path)
        if source.is_dir():
            return cls._open_dir(source, source)
        if not source.is_file():
            raise BundleNotFoundError(f"{source}: no bundle directory or archive here", path=str(source))
        if source.suffix == ".safetensors":  # a weights file alone: the manifest that binds it is missing
            raise BundleFormatError(_not_a_bundle(source), path=str(source))
        from .archive import unpack

        tmp = Path(tempfile.mkdtemp(prefix="lwbundle-", dir=tmp_dir))
        try:
            # named after the archive, so the directory looks like the one that was packed
            stem = source.name.removesuffix(".lwb")
            folder = unpack(source, tmp / (stem if _SAFE_STEM.fullmatch(stem) else "bundle"))
            return cls._open_dir(folder, source, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def _open_dir(cls, root: Path, source: Path, tmp: Path | None = None) -> Bundle:
        present = list_members(root)
        if MANIFEST not in present:
            peft = " (a PEFT adapter directory: lwformat.interop.import_peft reads it)" if "adapter_config.json" in present else ""
            raise BundleFormatError(f"{root}: no {MANIFEST}{peft}", path=MANIFEST)
        data = read_member(root, MANIFEST, limits.MAX_MANIFEST_BYTES, "MAX_MANIFEST_BYTES")
        manifest = loads(data)
        listed = {f.path: f for f in manifest.files}
        for name in sorted(present):
            if name not in listed and name not in (MANIFEST, SIGNATURE):
                raise BundleFormatError(f"{name}: a file the manifest does not list", path=name)
        if SIGNATURE in present:
            sig = present[SIGNATURE]
            limits.ensure(sig, limits.MAX_SIGNATURE_BYTES, "MAX_SIGNATURE_BYTES", "file size", path=SIGNATURE)
        for name, entry in sorted(listed.items()):
            if name not in present:
                why = f"{name}: listed in the manifest but missing"
                raise IntegrityError(why, path=name, expected=entry.size, found=None)
            if present[name] != entry.size:
                raise IntegrityError(
                    f"{name}: {present[name]} bytes, the manifest says {entry.size}",
                    path=name, expected=entry.size, found=present[name],
                )  # fmt: skip
        spans, data_offset = _check_weights(root, manifest, listed[WEIGHTS].size)
        return cls(root, source, data, manifest, spans, data_offset, tmp)

    # -- reading -----------------------------------------------------------------------------

    @property
    def manifest_id(self) -> str:
        """Hex sha256 of the canonical manifest bytes: the bundle's identity."""
        return manifest_id(self.manifest_bytes)

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    @property
    def signed(self) -> bool:
        return (self.path / SIGNATURE).is_file()

    @property
    def slots(self) -> dict[str, SlotEntry]:
        """``{"block/path:module.path": entry}`` in manifest order."""
        return {s.slot: s for s in self.manifest.slots}

    def _mapping(self) -> mmap.mmap:
        """The weights file mapped copy-on-write, once; each call first checks that the file
        still has the size `open` checked and has not been written since it was mapped.

        A read from the map past the end of a file cut short since would kill the process
        (SIGBUS); a file rewritten in place would change what the map reads after its values
        were checked (finite, valid channel indices). Both are an `IntegrityError`.
        """
        if self._map is None:
            with self._weights_file() as f:
                st = os.fstat(f.fileno())
                self._unchanged(st)  # since the first map: a closed bundle mapped again is the same bundle
                fd = os.dup(f.fileno())  # kept to see later writes (the map's own descriptor is private)
                try:
                    buf = mmap.mmap(f.fileno(), st.st_size, access=mmap.ACCESS_COPY)
                except BaseException:
                    os.close(fd)
                    raise
            self._map, self._watch, self._mtime = buf, fd, st.st_mtime_ns
            self._unwatch = weakref.finalize(self, os.close, fd)
        else:
            self._unchanged(os.fstat(self._watch))
        return self._map

    def _unchanged(self, st: os.stat_result) -> None:
        self._intact(st.st_size)
        if self._mtime is not None and st.st_mtime_ns != self._mtime:
            raise IntegrityError(f"{WEIGHTS}: written in place since the bundle was read; open it again",
                                 path=WEIGHTS, expected=self._mtime, found=st.st_mtime_ns)  # fmt: skip

    def _weights_file(self):
        try:
            return open_member(self.path, WEIGHTS)
        except FileNotFoundError:
            raise self._gone() from None

    def _gone(self) -> BundleNotFoundError:
        why = "the bundle was closed" if self._closed else "deleted or moved since the bundle was opened"
        return BundleNotFoundError(f"{self.path / WEIGHTS}: not there ({why})", path=WEIGHTS)

    def weights_identity(self) -> tuple:
        """The weights file as it is now (the mapped one, once mapped): its sha256 in the manifest,
        and the file's device, inode, size, mtime and ctime (ns). The same while its bytes are,
        unless written behind the clock."""
        try:
            st = os.fstat(self._watch) if self._watch is not None else os.stat(self.weights_path)
        except FileNotFoundError:
            raise self._gone() from None
        return self._sha256, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _intact(self, size: int) -> int:
        if size != self._size:
            raise IntegrityError(f"{WEIGHTS}: {size} bytes now, {self._size} when the bundle was opened (changed in place since)",
                                 path=WEIGHTS, expected=self._size, found=size)  # fmt: skip
        return size

    def _view(self, buf: mmap.mmap, dtype: torch.dtype, begin: int, end: int) -> torch.Tensor:
        """Bytes ``[begin, end)`` of the data section as a 1-D tensor of `dtype` viewing the map."""
        import torch

        count = (end - begin) // dtype.itemsize
        if not count:  # frombuffer refuses empty views
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=self.data_offset + begin)  # (count,)

    def _views(self, spans) -> list[tuple[TensorSpan, torch.Tensor]]:
        """Each span's tensor, a view of the copy-on-write map."""
        buf, dtypes = self._mapping(), _torch_dtypes()
        return [(s, self._view(buf, dtypes[s.dtype], s.begin, s.end).view(s.shape)) for s in spans]

    def span_tensors(self) -> list[tuple[TensorSpan, torch.Tensor]]:
        """Every tensor with its span (slot, name, dtype...), in canonical order."""
        return self._views(self.spans)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by key (``<slot>.<name>``), in canonical order."""
        return {s.key: t for s, t in self._views(self.spans)}

    def slot_tensors(self, slot: str) -> dict[str, torch.Tensor]:
        """One slot's tensors by name (``lora_A``...)."""
        if slot not in self._by_slot:
            raise SlotNotFoundError(f"{slot}: no such slot in {self.manifest.name}", path=slot)
        return {s.name: t for s, t in self._views(self._by_slot[slot])}

    def packed(self) -> dict[str, torch.Tensor]:
        """``{dtype name: 1-D tensor}``: each dtype's contiguous run of the data section.

        The tensors view the file's copy-on-write map: no copy is made until one is written.
        A span of dtype ``d`` is ``packed()[d][(begin - run_begin) // itemsize :][:numel]``.
        The map is made once and kept while the bundle is open, so repeated swaps from
        one bundle read warm pages; each call checks the file was not cut since.
        """
        buf = self._mapping()
        if self._packed is None:
            self._packed = {dtype: self._view(buf, _torch_dtypes()[dtype], b, e) for dtype, (b, e) in self._runs().items()}
        return self._packed

    @functools.cached_property
    def slot_layout(self) -> bytes:
        """`manifest.slot_layout` of this bundle, computed once (what a same-layout swap compares)."""
        return slot_layout(self.manifest)

    @property
    def mapped(self) -> bool:
        """Whether the weights file is mapped (later copies from it read warm pages)."""
        return self._map is not None

    def read_runs(self, into: dict[str, torch.Tensor]) -> None:
        """Read each dtype's run straight into ``into[dtype name]``, a contiguous CPU tensor of its size.

        One read call per run and no mapping: for a single copy out of a bundle opened
        just now, that is cheaper than faulting in a fresh mapping page by page.
        """
        import torch

        runs = self._runs()
        with self._weights_file() as f:
            for dtype, out in into.items():
                b, e = runs[dtype]
                view = memoryview(out.view(torch.uint8).numpy())  # (nbytes,) the tensor's own memory
                if len(view) != e - b:
                    raise ValueError(f"{dtype}: a buffer of {len(view)} bytes for a run of {e - b}")
                half = (len(view) // 2) & -4096 if len(view) >= _SPLIT_READ else 0
                # A large run is read in two halves at once: the kernel's copy is what costs
                # here, and both cores can do it (the read drops the GIL).
                second = _reader().submit(_read_exactly, f.fileno(), view[half:], self.data_offset + b + half) if half else None
                try:
                    _read_exactly(f.fileno(), view[:half] if half else view, self.data_offset + b)
                finally:  # the file stays open until the other half is read, whatever happened to this one
                    if second is not None:
                        second.result()

    def _runs(self) -> dict[str, tuple[int, int]]:
        """``{dtype name: (begin, end)}`` of each dtype's run in the data section."""
        runs: dict[str, tuple[int, int]] = {}
        for s in self.spans:
            b, e = runs.get(s.dtype, (s.begin, s.end))
            runs[s.dtype] = (min(b, s.begin), max(e, s.end))
        return runs

    def close(self) -> None:
        self._map = self._packed = None  # tensors still viewing the map keep it alive
        if self._watch is not None:
            self._unwatch()
            self._watch = None
        self._closed = True
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bundle({m.name}@{m.version}, {len(m.slots)} slots, {len(self.spans)} tensors, {str(self.source)!r})"


def _check_weights(root: Path, manifest: Manifest, size: int) -> tuple[list[TensorSpan], int]:
    with open_member(root, WEIGHTS) as f:
        n = read_prefix(f.read(8), size)
        header = f.read(n)
    if len(header) != n:
        raise BundleFormatError(f"{WEIGHTS}: header cut short", path=WEIGHTS)
    return check_header(header, size - 8 - n, manifest), 8 + n


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    """``{safetensors name: torch dtype}``."""
    from ..world.digest import DTYPE_NAMES

    return {name: dtype for dtype, name in DTYPE_NAMES.items()}


_SPLIT_READ = 4 << 20  # runs at least this large are read by two threads
_READER: tuple[int, ThreadPoolExecutor] | None = None  # (the pid that made it, the pool)


def _reader() -> ThreadPoolExecutor:
    """One helper thread for this process (a forked child makes its own: the parent's thread is not in it)."""
    global _READER
    if _READER is None or _READER[0] != os.getpid():
        _READER = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="lwbundle-read"))
    return _READER[1]


def _read_exactly(fd: int, view: memoryview, offset: int) -> None:
    end = offset + len(view)
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:  # the file was cut short since it was opened and checked
            raise IntegrityError(f"{WEIGHTS}: ends at byte {offset}, before byte {end} of the data it holds",
                                 path=WEIGHTS, expected=end, found=offset)  # fmt: skip
        view, offset = view[n:], offset + n
