"""The archive form, ``.lwb``: the bundle's files in one ustar tar, compressed with zstd.

    archive = zstd frame (level 3, content size and XXH64 checksum written, no dictionary,
              single-threaded) of:  for each file, names sorted by code point:
              tar.header(name, size) || bytes || NUL padding to 512;  then two NUL blocks

Packing the same bundle always gives the same bytes (with one zstd version), and
``tar --zstd -xf bundle.lwb`` unpacks it. Unpacking checks every header, every name
and every size against the limits before it writes, writes into a temporary sibling
directory, and renames it into place only once the whole archive has been read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import msgspec
import zstandard

from ..errors import BundleExistsError, BundleFormatError, BundleLimitError, BundleNotFoundError, UnsafePathError
from . import limits, tar
from .files import fsync_dir, list_members, open_member, rename_new, sync_entry
from .zstd_frames import check_frames
from .hashing import PIECE
from .manifest import MANIFEST, SIGNATURE, MemberPath

ZSTD_LEVEL = 3
_UNKNOWN = zstandard.CONTENTSIZE_UNKNOWN
_KINDS = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
          b"5": "a directory", b"6": "a FIFO"}  # fmt: skip


def _new_target(target: Path) -> None:
    if target.exists() or target.is_symlink():
        raise BundleExistsError(f"{target}: already exists; nothing is overwritten", path=str(target))
    if not target.parent.is_dir():
        raise BundleNotFoundError(f"{target.parent}: no such directory", path=str(target.parent))


def pack(bundle_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Pack a valid bundle directory into the new archive `out_file`."""
    from .read import Bundle

    root, target = Path(bundle_dir), Path(out_file)
    _new_target(target)
    if target.parent.resolve().is_relative_to(root.resolve()):  # the bundle would then hold a file it does not list
        raise BundleFormatError(f"{target}: inside the bundle directory {root}; write the archive elsewhere",
                                path=str(target))  # fmt: skip
    Bundle.open(root).close()  # only a valid bundle is packed
    sizes = list_members(root)
    names = sorted(sizes)
    total = sum(tar.BLOCK + s + tar.padding(s) for s in sizes.values()) + len(tar.END)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True, threads=0)
            with cctx.stream_writer(out, size=total, closefd=False) as z:
                for name in names:
                    z.write(tar.header(name, sizes[name]))
                    with open_member(root, name) as f:
                        left = sizes[name]
                        while left and (piece := f.read(min(PIECE, left))):
                            z.write(piece)
                            left -= len(piece)
                    if left or (sizes[name] != os.stat(root / name).st_size):
                        raise BundleFormatError(f"{name}: changed while being packed", path=name)
                    z.write(bytes(tar.padding(sizes[name])))
                z.write(tar.END)
            out.flush()
            compressed = os.fstat(out.fileno()).st_size
            if total > (bound := limits.ratio_bound(compressed)):  # readers refuse it (unpack's first check)
                raise BundleLimitError(
                    f"{target}: {total:,} bytes of tar compress to {compressed:,}, past the {bound:,} readers accept "
                    "(MAX_RATIO): the archive would be refused as a possible decompression bomb; ship the bundle "
                    "directory instead", path=str(target), limit="MAX_RATIO", value=total, maximum=bound,
                )  # fmt: skip
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        rename_new(Path(tmp), target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_entry(target)
    return target


class _Bounded:
    """Reads the decompressed tar, refusing to go past `budget` bytes in all."""

    def __init__(self, stream: BinaryIO, budget: int, path: str) -> None:
        self.stream, self.budget, self.path, self.done = stream, budget, path, 0
        self.limit = "MAX_TAR_BYTES" if budget == limits.MAX_TAR_BYTES else "MAX_RATIO"

    def read(self, n: int) -> bytes:
        try:
            data = self.stream.read(min(n, self.budget - self.done + 1))  # never more than one byte past
        except zstandard.ZstdError as exc:
            raise BundleFormatError(f"{self.path}: corrupt zstd data: {exc}", path=self.path) from None
        self.done += len(data)
        limits.ensure(self.done, self.budget, self.limit, "decompressed size", path=self.path)
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        out = bytearray()
        while len(out) < n and (data := self.read(min(PIECE, n - len(out)))):
            out += data
        if len(out) != n:
            raise BundleFormatError(f"{self.path}: archive ends inside {what}", path=self.path)
        return bytes(out)


def _check_member(member: tar.Member, seen: dict[str, int], total: int) -> None:
    name = member.name
    if member.typeflag in _KINDS:
        raise UnsafePathError(f"{name}: {_KINDS[member.typeflag]}; a bundle holds regular files only", path=name)
    if member.typeflag not in (b"0", b"\0"):
        raise BundleFormatError(f"{name}: tar member type {member.typeflag!r} is not a regular file", path=name)
    try:
        msgspec.convert(name, MemberPath)
    except msgspec.ValidationError:
        raise UnsafePathError(f"{name!r}: not a flat file name (letters, digits, '_', '.', '-')", path=name) from None
    if name in seen:
        raise UnsafePathError(f"{name}: appears twice in the archive", path=name)
    limits.ensure(len(seen) + 1, limits.MAX_MEMBERS, "MAX_MEMBERS", "member count", path=name)
    if name == MANIFEST:
        limits.ensure(member.size, limits.MAX_MANIFEST_BYTES, "MAX_MANIFEST_BYTES", "member size", path=name)
    if name == SIGNATURE:
        limits.ensure(member.size, limits.MAX_SIGNATURE_BYTES, "MAX_SIGNATURE_BYTES", "member size", path=name)
    limits.ensure(total + member.size, limits.MAX_BUNDLE_BYTES, "MAX_BUNDLE_BYTES", "unpacked size", path=name)


def _extract(stream: _Bounded, folder: Path, compressed: int, source: str) -> None:
    seen: dict[str, int] = {}
    declared = 0  # tar bytes the headers promise so far
    while (member := tar.parse_header(stream.read_exact(tar.BLOCK, "a header"), path=source,
                                      offset=stream.done - tar.BLOCK)) is not None:  # fmt: skip
        _check_member(member, seen, sum(seen.values()))
        declared += tar.BLOCK + member.size + tar.padding(member.size)
        limits.ensure(declared, limits.ratio_bound(compressed), "MAX_RATIO", "unpacked size", path=member.name)
        seen[member.name] = member.size
        fd = os.open(folder / member.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            left = member.size
            while left:
                piece = stream.read_exact(min(PIECE, left), member.name)
                out.write(piece)
                left -= len(piece)
        stream.read_exact(tar.padding(member.size), member.name)
    while rest := stream.read(PIECE):  # after the end marker: record padding, NULs only
        if rest.count(0) != len(rest):
            raise BundleFormatError(f"{source}: data after the end of the archive", path=source)


def unpack(archive: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Unpack an archive into the new directory `out_dir`, all or nothing."""
    src, target = Path(archive), Path(out_dir)
    if not src.is_file():
        raise BundleNotFoundError(f"{src}: no archive here", path=str(src))
    _new_target(target)
    with open(src, "rb") as f:
        compressed = os.fstat(f.fileno()).st_size
        try:
            declared = zstandard.get_frame_parameters(f.read(18)).content_size
        except zstandard.ZstdError as exc:
            raise BundleFormatError(f"{src.name}: not a zstd archive: {exc}", path=src.name) from None
        if declared != _UNKNOWN:
            limits.ensure(declared, limits.MAX_TAR_BYTES, "MAX_TAR_BYTES", "declared unpacked size", path=src.name)
            bound = limits.ratio_bound(compressed)
            limits.ensure(declared, bound, "MAX_RATIO", "declared unpacked size", path=src.name)
        check_frames(f, compressed, src.name)  # whole frames only: zstd's reader stops quietly inside one
        f.seek(0)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            dctx = zstandard.ZstdDecompressor(max_window_size=limits.MAX_ZSTD_WINDOW)
            with dctx.stream_reader(f, read_across_frames=True, closefd=False) as z:
                _extract(_Bounded(z, limits.ratio_bound(compressed), src.name), tmp, compressed, src.name)
            os.chmod(tmp, 0o755)
            fsync_dir(tmp)
            rename_new(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    sync_entry(target)
    return target
