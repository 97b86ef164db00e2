"""The content-addressed blob store: every blob lives at ``blobs/sha256/<ab>/<abcdef...>``.

A blob's name is the sha256 of its bytes, so a stored blob is immutable and two
uploads of the same bytes are one blob. A write streams into ``tmp/`` while hashing,
then fsyncs and renames into place only if the bytes hash to the announced digest:
a reader never sees a partial blob, and a crash leaves only a temp file that
`clean_temp` removes at the next start. Any OSError on the way (ENOSPC, EIO, EFBIG)
becomes a `StorageError` after the temp file is gone.

`BlobStore` is the interface the server uses; `DirBlobStore` implements it on a local
directory. An S3-compatible store implements the same methods: writes go to a
multipart upload completed only after the digest checks, `materialize` downloads into
the staging directory, and `local_path` returns None, where the app would answer a
GET with a redirect to a presigned URL (the embedded store always has a path).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from lwformat.bundle.files import fsync_dir

from ..errors import BadRequestError, NotFoundError, StorageError, TooLargeError

MAX_BLOB = 1 << 40


class BlobWriter(Protocol):
    def write(self, data: bytes) -> None: ...
    def commit(self) -> bool: ...  # True when this write created the blob
    def abort(self) -> None: ...


class BlobStore(Protocol):
    def size(self, hexdigest: str) -> int | None: ...
    def writer(self, hexdigest: str, *, limit: int = MAX_BLOB) -> BlobWriter: ...
    def read(self, hexdigest: str, *, limit: int) -> bytes: ...
    def local_path(self, hexdigest: str) -> Path | None: ...
    def materialize(self, hexdigest: str, dest: Path) -> None: ...  # make `dest` hold the blob's bytes
    def delete(self, hexdigest: str) -> None: ...
    def remove_if_stale(self, hexdigest: str, cutoff: float) -> bool: ...  # see `sweep`
    def digests(self) -> Iterator[tuple[str, float]]: ...  # (hex, mtime)
    def scratch(self) -> Path: ...  # a new private directory under the temp area
    def clean_temp(self, older_than: float = 0.0) -> int: ...


def _storage_error(exc: OSError, what: str) -> StorageError:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    reason = "the disk is full" if full else (exc.strerror or str(exc))
    return StorageError(f"could not store {what}: {reason}; nothing was kept", detail={"errno": exc.errno})


class _DirWriter:
    def __init__(self, store: DirBlobStore, hexdigest: str, limit: int) -> None:
        self._store, self._hex, self._limit = store, hexdigest, limit
        self._hash = hashlib.sha256()
        self.size = 0
        try:
            self._fd, self._tmp = tempfile.mkstemp(dir=store.tmp, prefix="upload-")
        except OSError as exc:
            raise _storage_error(exc, f"blob sha256:{hexdigest}") from exc

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self._limit:
            self.abort()
            raise TooLargeError(f"blob sha256:{self._hex} is larger than the {self._limit} bytes allowed")
        self._hash.update(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, f"blob sha256:{self._hex}") from exc
        self.size += len(data)

    def commit(self) -> bool:
        found = self._hash.hexdigest()
        if found != self._hex:
            self.abort()
            raise BadRequestError(
                f"the uploaded bytes hash to sha256:{found}, not the sha256:{self._hex} named in the URL",
                code="digest_mismatch", detail={"expected": f"sha256:{self._hex}", "found": f"sha256:{found}"},
            )  # fmt: skip
        final = self._store.path(self._hex)
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            new_dir = not final.parent.is_dir()
            final.parent.mkdir(parents=True, exist_ok=True)
            created = not final.exists()
            os.replace(self._tmp, final)  # the commit point: all or nothing
            fsync_dir(final.parent)
            if new_dir:  # the new ab/ entry itself must survive a power loss too
                fsync_dir(final.parent.parent)
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, f"blob sha256:{self._hex}") from exc
        return created

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        Path(self._tmp).unlink(missing_ok=True)


class DirBlobStore:
    """Blobs in a local directory: ``<root>/blobs/sha256/..`` and ``<root>/tmp``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.base = self.root / "blobs" / "sha256"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.base.mkdir(parents=True, exist_ok=True)

    def path(self, hexdigest: str) -> Path:
        return self.base / hexdigest[:2] / hexdigest

    def size(self, hexdigest: str) -> int | None:
        try:
            return self.path(hexdigest).stat().st_size
        except FileNotFoundError:
            return None

    def writer(self, hexdigest: str, *, limit: int = MAX_BLOB) -> _DirWriter:
        return _DirWriter(self, hexdigest, limit)

    def read(self, hexdigest: str, *, limit: int) -> bytes:
        try:
            with open(self.path(hexdigest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise NotFoundError(f"no blob sha256:{hexdigest}", code="blob_not_found") from None
        if len(data) > limit:
            raise TooLargeError(f"blob sha256:{hexdigest} is larger than the {limit} bytes allowed here")
        return data

    def local_path(self, hexdigest: str) -> Path | None:
        path = self.path(hexdigest)
        return path if path.is_file() else None

    def materialize(self, hexdigest: str, dest: Path) -> None:
        try:
            os.link(self.path(hexdigest), dest)  # same filesystem: no copy
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                raise  # never copy *through* an existing link: that would overwrite a stored blob
            with open(self.path(hexdigest), "rb") as src, open(dest, "xb") as out:
                shutil.copyfileobj(src, out, 1 << 20)

    def delete(self, hexdigest: str) -> None:
        self.path(hexdigest).unlink(missing_ok=True)

    def remove_if_stale(self, hexdigest: str, cutoff: float) -> bool:
        """Delete the blob if its inode has not changed since `cutoff` (unix seconds) and nothing else links it.

        Renamed into the temp area first, so no new link can be made; put back if one was made meanwhile.
        """
        path = self.path(hexdigest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if max(st.st_mtime, st.st_ctime) > cutoff or st.st_nlink > 1:
            return False
        doomed = self.tmp / f"sweep-{hexdigest}-{secrets.token_hex(4)}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:  # another sweeper was first
            return False
        if os.stat(doomed).st_nlink > 1:  # a publish staged it between the check and the rename
            os.rename(doomed, path)  # (a re-upload meanwhile holds the same bytes)
            return False
        os.unlink(doomed)
        return True

    def digests(self) -> Iterator[tuple[str, float]]:
        for sub in self.base.iterdir():
            for blob in sub.iterdir():
                try:
                    yield blob.name, blob.stat().st_mtime
                except FileNotFoundError:  # swept meanwhile
                    continue

    def scratch(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.tmp, prefix="stage-"))

    def clean_temp(self, older_than: float = 0.0) -> int:
        """Remove temp files and staging dirs unchanged for `older_than` seconds (all: a crash's leftovers); returns how many.

        The ctime counts too: a blob a sweeper has just renamed here keeps its old mtime.
        """
        cutoff, removed = time.time() - older_than, 0
        for entry in self.tmp.iterdir():
            try:
                st = entry.lstat()
            except FileNotFoundError:  # removed meanwhile (an upload aborted, a sweep finished)
                continue
            if max(st.st_mtime, st.st_ctime) <= cutoff:
                try:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                except FileNotFoundError:
                    continue
                removed += 1
        return removed
