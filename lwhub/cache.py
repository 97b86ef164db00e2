"""The local cache: content-addressed, written atomically, safe to share without file locks.

    blobs/sha256/<ab>/<hex>        verified files, named by their sha256
    partial/<hex>                  a download in progress: verified chunks at their offsets
    partial/<hex>.done             which chunks are verified: 4-byte little-endian indices, appended
    bundles/<manifest hex>/        a bundle directory: manifest.json, bundle.sig, and hard links
                                   to the blobs (copies where links are not possible)
    refs/<owner>/<name>/<version>  the registry's record of a version (JSON), for offline use
    refs/<owner>/<name>/@<tag>     the version a tag last resolved to
    tmp/                           where every file and directory is built before its rename

Every entry appears by one ``rename`` of something complete, so a reader sees all or
nothing. Processes sharing the cache need no lock: blobs and bundle directories are
named by content, so two writers write the same bytes; a partial file only ever
receives verified chunks, identical whichever process writes them. The ``.done`` record is a hint: chunks it names are re-hashed before
they are trusted, so a crash (or a lost page cache) costs a re-download, never a wrong byte.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec

from .errors import CacheError, LWHubError
from .protocol import VersionInfo
from .semver import is_prerelease, is_valid, sort_key


class Cache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        with self.writing("its directories"):  # a root under a file, read-only, or a sub-directory that is a file
            for sub in ("blobs/sha256", "partial", "bundles", "refs", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- atomic building blocks -----------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """A file-system failure inside is a `CacheError` naming the cache and `what`."""
        try:
            yield
        except OSError as exc:
            if isinstance(exc, LWHubError):
                raise
            reason = f"{exc.strerror} ({exc.filename})" if exc.strerror and exc.filename else exc.strerror or str(exc)
            raise CacheError(f"could not write {what} to the cache at {self.root}: {reason}", path=str(self.root)) from exc

    def write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def scratch(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.tmp))

    # -- blobs and partial downloads ------------------------------------------------------

    def blob(self, hexdigest: str) -> Path:
        return self.root / "blobs" / "sha256" / hexdigest[:2] / hexdigest

    def partial(self, hexdigest: str) -> Path:
        return self.root / "partial" / hexdigest

    def done_chunks(self, hexdigest: str) -> set[int]:
        """The chunk indices the record claims are verified (a torn last record is ignored)."""
        try:
            data = (self.root / "partial" / f"{hexdigest}.done").read_bytes()
        except FileNotFoundError:
            return set()
        whole = len(data) - len(data) % 4
        return set(struct.unpack(f"<{whole // 4}I", data[:whole]))

    def open_partial(self, hexdigest: str, size: int) -> tuple[int, int]:
        """(data fd, record fd) for a download; the data file is created at its full size, sparse."""
        fd = os.open(self.partial(hexdigest), os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        record = os.open(self.root / "partial" / f"{hexdigest}.done", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return fd, record

    @staticmethod
    def mark_done(record_fd: int, index: int) -> None:
        os.write(record_fd, struct.pack("<I", index))  # O_APPEND + 4 bytes: one atomic record

    def finish_partial(self, hexdigest: str) -> Path:
        """Every chunk verified: the partial file becomes the blob."""
        final = self.blob(hexdigest)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.partial(hexdigest), final)
        except FileNotFoundError:
            if not final.exists():  # else another puller finished the same partial first
                raise
        (self.root / "partial" / f"{hexdigest}.done").unlink(missing_ok=True)
        return final

    def forget_partial(self, hexdigest: str) -> None:
        self.partial(hexdigest).unlink(missing_ok=True)
        (self.root / "partial" / f"{hexdigest}.done").unlink(missing_ok=True)

    # -- bundle directories ----------------------------------------------------------------

    def bundle_dir(self, manifest_hex: str) -> Path:
        return self.root / "bundles" / manifest_hex

    def install_bundle(self, manifest_hex: str, files: dict[str, bytes | Path]) -> Path:
        """Build a bundle directory (bytes written, paths hard-linked) and rename it into place."""
        final = self.bundle_dir(manifest_hex)
        stage = self.scratch()
        try:
            for name, content in files.items():
                if isinstance(content, Path):
                    try:
                        os.link(content, stage / name)
                    except OSError:
                        shutil.copyfile(content, stage / name)
                else:
                    (stage / name).write_bytes(content)
            try:
                os.rename(stage, final)
            except OSError:
                if not final.is_dir():  # not "another process was first": a real failure
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return final

    @contextlib.contextmanager
    def holding_bundle_dir(self, manifest_hex: str) -> Iterator[int | None]:
        """A descriptor holding the bundle directory as it is now (None when absent), for `drop_bundle`:
        while it is open, the directory's inode cannot go to another one."""
        try:
            held = os.open(self.bundle_dir(manifest_hex), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError):
            held = None
        try:
            yield held
        finally:
            if held is not None:
                os.close(held)

    def drop_bundle(self, manifest_hex: str, held: int | None = None) -> None:
        """Remove a bundle directory: renamed away first, so no reader sees it half-deleted.

        With `held` (from `holding_bundle_dir`), only that directory: one another process sharing
        the cache installed since is put back.
        """
        final = self.bundle_dir(manifest_hex)
        doomed = self.tmp / f"drop-{manifest_hex}-{os.getpid()}-{threading.get_ident()}"
        try:
            os.rename(final, doomed)
        except FileNotFoundError:
            return
        if held is not None and os.stat(doomed).st_ino != os.fstat(held).st_ino:
            try:
                os.rename(doomed, final)  # a fresh install, not the broken one
                return
            except OSError:  # yet another install took the place: this copy is spare
                pass
        shutil.rmtree(doomed, ignore_errors=True)

    # -- refs ------------------------------------------------------------------------------

    def _ref_dir(self, name: str) -> Path:
        return self.root / "refs" / name

    def record_version(self, info: VersionInfo) -> None:
        self.write_atomic(self._ref_dir(info.name) / info.version, msgspec.json.encode(info))

    def record_tag(self, name: str, tag: str, version: str) -> None:
        self.write_atomic(self._ref_dir(name) / f"@{tag}", version.encode())

    def cached_version(self, name: str, version: str) -> VersionInfo | None:
        try:
            return msgspec.json.decode((self._ref_dir(name) / version).read_bytes(), type=VersionInfo)
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def cached_tag(self, name: str, tag: str) -> str | None:
        try:
            version = (self._ref_dir(name) / f"@{tag}").read_text()
        except FileNotFoundError:
            return None
        return version if is_valid(version) else None

    def cached_versions(self, name: str) -> list[str]:
        folder = self._ref_dir(name)
        found = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        return sorted((v for v in found if is_valid(v)), key=sort_key)

    def cached_latest(self, name: str) -> str | None:
        releases = [v for v in self.cached_versions(name) if not is_prerelease(v)]
        return releases[-1] if releases else None
