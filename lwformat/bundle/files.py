"""The directory form on disk: a flat directory of regular files, read without following links."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ..errors import BundleExistsError, BundleFormatError, BundleNotFoundError, UnsafePathError
from . import limits


def open_member(root: Path, name: str) -> BinaryIO:
    """Open ``root/name`` for reading; a link or a non-regular file is refused."""
    try:
        fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        if (root / name).is_symlink():
            raise UnsafePathError(f"{name}: a link; bundle files are regular files", path=name) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"{name}: not a regular file", path=name)
    return os.fdopen(fd, "rb")


def read_member(root: Path, name: str, maximum: int, limit: str) -> bytes:
    """A small file's bytes, its size bounded before it is read."""
    with open_member(root, name) as f:
        limits.ensure(os.fstat(f.fileno()).st_size, maximum, limit, "file size", path=name)
        data = f.read(maximum + 1)  # the file may grow between fstat and read
    limits.ensure(len(data), maximum, limit, "file size", path=name)
    return data


def list_members(root: Path) -> dict[str, int]:
    """``{name: size}`` of every file in the bundle directory; links, devices, subdirectories, too many or too large files refused."""
    out: dict[str, int] = {}
    with os.scandir(root) as entries:
        for entry in entries:
            limits.ensure(len(out) + 1, limits.MAX_MEMBERS, "MAX_MEMBERS", "file count", path=str(root))
            if entry.is_symlink():
                raise UnsafePathError(f"{entry.name}: a link; bundle files are regular files", path=entry.name)
            if entry.is_dir(follow_symlinks=False):
                raise BundleFormatError(f"{entry.name}: a subdirectory; a bundle is flat", path=entry.name)
            if not entry.is_file(follow_symlinks=False):
                raise UnsafePathError(f"{entry.name}: not a regular file", path=entry.name)
            out[entry.name] = entry.stat(follow_symlinks=False).st_size
    # every file counts, manifest.json and bundle.sig too, as an archive's members do
    limits.ensure(sum(out.values()), limits.MAX_BUNDLE_BYTES, "MAX_BUNDLE_BYTES", "total file size", path=str(root))
    return out


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint), ctypes.c_int
    return fn


_RENAMEAT2, _AT_FDCWD, _RENAME_NOREPLACE = _renameat2(), -100, 1


def rename_new(source: Path, target: Path) -> None:
    """Rename `source` to `target`, which must not exist; BundleExistsError if it does.

    `os.rename` silently replaces a file, or an empty directory, that another process put
    at `target` after our check. Where the kernel has it, the rename itself refuses
    (``renameat2`` with ``RENAME_NOREPLACE``); elsewhere the check comes just before it.
    """
    def exists() -> BundleExistsError:
        return BundleExistsError(f"{target}: already exists; nothing is overwritten", path=str(target))

    if _RENAMEAT2 is not None and b"\0" not in os.fsencode(source) + os.fsencode(target):  # C strings end at NUL
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise exists()
        if err not in (errno.EINVAL, errno.ENOSYS):  # those two: this file system or kernel lacks the flag
            raise OSError(err, os.strerror(err), str(source), None, str(target))
    if target.exists() or target.is_symlink():
        raise exists()
    try:
        os.rename(source, target)
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
        raise exists() from exc
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        raise exists() from exc


@contextmanager
def new_directory(target: Path) -> Iterator[Path]:
    """A private sibling of `target` to fill: renamed to `target` whole on success, removed on failure.

    An existing `target` or a missing parent is refused before anything is created, so a
    reader sees a whole bundle or none, and a bundle is never overwritten. Should syncing
    the parent directory fail once the rename is done, the complete bundle stays and an
    OSError says so.
    """
    if target.exists() or target.is_symlink():
        raise BundleExistsError(f"{target}: already exists; bundles are never overwritten", path=str(target))
    if not target.parent.is_dir():
        raise BundleNotFoundError(f"{target.parent}: no such directory to write the bundle in", path=str(target.parent))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        fsync_dir(tmp)
        rename_new(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sync_entry(target)


def sync_entry(target: Path) -> None:
    """Make the rename that put `target` in place survive a crash (fsync of its directory).

    `target` is whole by then (a retry would meet it), so a failure here says exactly that
    rather than nothing, or that the write failed.
    """
    try:
        fsync_dir(target.parent)
    except OSError as exc:
        raise OSError(exc.errno, f"{target}: written, but syncing its directory entry failed ({exc.strerror}): "
                      "after a crash it may be missing", str(target.parent)) from exc  # fmt: skip


def write_synced(path: Path, data: bytes) -> None:
    """Write a new file and flush it to disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
