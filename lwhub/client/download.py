"""Blob downloads verified chunk by chunk, concurrent, and resumable across runs.

A file of S bytes in chunks of C: chunk i is bytes [i*C, min((i+1)*C, S)), and the
signed manifest gives its sha256, ``chunks[i]``. A download:

    1. re-hashes the chunks the partial file's record claims (a claim is a hint), keeps those that match;
    2. splits the missing chunks into contiguous runs, and those into at most `streams`
       segments of at least `min_segment` bytes;
    3. fetches every segment on its own thread: a plain GET when it covers the whole
       file (the server can then send the file without copying), else a Range GET;
       bytes fill a chunk buffer, which is hashed as soon as it is full (hashlib drops
       the GIL, so the cores hash in parallel), compared with the manifest, and only
       then written at its offset and recorded;
    4. retries a segment that breaks off from its first unverified chunk;
    5. renames the partial file to the blob once every chunk is verified.

Wrong bytes are never written: a mismatch raises `IntegrityError` naming the file and
the chunk, and the chunks verified so far stay for the next attempt.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..cache import Cache
from ..errors import HubUnavailableError, IntegrityError, ProtocolError
from .wire import raise_for

Progress = Callable[[int], None]  # called with a number of newly verified bytes


@dataclass(frozen=True)
class FileJob:
    path: str  # the file's name in the bundle, for errors
    hexdigest: str
    size: int
    chunks: tuple[str, ...]
    chunk_size: int

    def span(self, i: int) -> tuple[int, int]:
        return i * self.chunk_size, min((i + 1) * self.chunk_size, self.size)

    def check_shape(self) -> None:
        if len(self.chunks) != -(-self.size // self.chunk_size):
            raise ProtocolError(f"{self.path}: {len(self.chunks)} chunk digests for {self.size} bytes in chunks of {self.chunk_size}")


class _Stop(Exception):
    """Another segment failed: stop quietly."""


def bad_chunks(fd: int, job: FileJob, indices: list[int], pool: ThreadPoolExecutor) -> list[int]:
    """Which of `indices` do not hash to the manifest's digest, hashed in parallel.

    The file is memory-mapped, so hashing reads the page cache in place (no copy).
    """
    if not indices:
        return []
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            found = list(pool.map(lambda i: hashlib.sha256(view[slice(*job.span(i))]).hexdigest(), indices))
        finally:
            view.release()
    return [i for i, digest in zip(indices, found) if digest != job.chunks[i]]


def verify_file(path: Path, job: FileJob, pool: ThreadPoolExecutor) -> int | None:
    """The first chunk of `path` that differs from `job` (or -1 for a wrong size), None if all match."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return -1
    try:
        if os.fstat(fd).st_size != job.size:
            return -1
        bad = bad_chunks(fd, job, list(range(len(job.chunks))), pool)
        return bad[0] if bad else None
    finally:
        os.close(fd)


def segments(missing: list[int], job: FileJob, streams: int, min_segment: int) -> list[tuple[int, int]]:
    """Split sorted chunk indices into at most `streams` contiguous [first, last) index ranges."""
    runs: list[list[int]] = []
    for i in missing:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    total = sum(job.span(b - 1)[1] - job.span(a)[0] for a, b in runs)
    want = max(1, min(streams, total // max(min_segment, 1)))
    per = -(-sum(b - a for a, b in runs) // want)  # chunks per segment
    out = []
    for a, b in runs:
        out.extend((s, min(s + per, b)) for s in range(a, b, per))
    return out


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Fetcher:
    """Downloads blobs by digest into a `Cache` with `http`; `blob_url(hex)` gives the URL.

    `streams` threads receive; the `verify` pool hashes and writes the chunks they hand
    over (at most `in_flight` chunks wait at a time, which bounds memory).
    """

    def __init__(self, http: httpx.Client, cache: Cache, blob_url: Callable[[str], str], verify: ThreadPoolExecutor,
                 *, streams: int = 1, min_segment: int = 64 << 20, retries: int = 2, in_flight: int = 8,
                 progress: Progress | None = None) -> None:  # fmt: skip
        self.http, self.cache, self.blob_url, self.verify = http, cache, blob_url, verify
        self.streams, self.min_segment, self.retries = streams, min_segment, retries
        self.progress = progress or (lambda n: None)
        self._slots = threading.Semaphore(in_flight)
        self._stop = threading.Event()

    def fetch(self, jobs: list[FileJob]) -> None:
        """Make every job's blob present and verified in the cache."""
        jobs = list({job.hexdigest: job for job in jobs}.values())  # two files, same bytes: one download
        work, opened = [], []
        try:
            for job in jobs:
                job.check_shape()
                fds, segs = self._plan(job)
                opened.extend(fds)
                work.extend((job, *fds, a, b) for a, b in segs)
            with ThreadPoolExecutor(max_workers=max(1, min(len(work), self.streams * max(1, len(jobs))))) as receivers:
                futures = [receivers.submit(self._segment, *w) for w in work]
                errors = [e for f in futures if (e := f.exception()) is not None and not isinstance(e, _Stop)]
        finally:
            for fd in opened:
                os.close(fd)
        if errors:
            raise errors[0]
        for job in jobs:
            if not self.cache.blob(job.hexdigest).exists():
                self.cache.finish_partial(job.hexdigest)

    def _plan(self, job: FileJob) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        if job.size == 0:
            self.cache.write_atomic(self.cache.blob(job.hexdigest), b"")
            return (), []
        fd, record = self.cache.open_partial(job.hexdigest, job.size)
        claimed = sorted(i for i in self.cache.done_chunks(job.hexdigest) if i < len(job.chunks))
        done = set(claimed) - set(bad_chunks(fd, job, claimed, self.verify))
        self.progress(sum(job.span(i)[1] - job.span(i)[0] for i in done))
        missing = [i for i in range(len(job.chunks)) if i not in done]
        return (fd, record), segments(missing, job, self.streams, self.min_segment) if missing else []

    def _segment(self, job: FileJob, fd: int, record: int, first: int, last: int) -> None:
        attempt, cursor = 0, [first]  # cursor[0]: the first chunk not yet handed over
        while cursor[0] < last:
            try:
                self._receive(job, fd, record, cursor, last)
            except (httpx.TransportError, _ShortBody) as exc:
                attempt += 1
                if attempt > self.retries or self._stop.is_set():
                    self._stop.set()
                    url = self.blob_url(job.hexdigest)
                    raise HubUnavailableError(f"{job.path}: the download broke off at chunk {cursor[0]} ({exc}); pull again to resume", url=url) from exc
            except BaseException:
                self._stop.set()
                raise

    def _receive(self, job: FileJob, fd: int, record: int, cursor: list[int], last: int) -> None:
        """Fetch chunks [cursor[0], last), moving the cursor past each chunk handed over."""
        first = cursor[0]
        start, end = job.span(first)[0], job.span(last - 1)[1]
        whole = start == 0 and end == job.size
        headers = {} if whole else {"range": f"bytes={start}-{end - 1}"}
        handed: list = []  # (index, future) of chunks given to the verify pool
        stopped = False
        try:
            with self.http.stream("GET", self.blob_url(job.hexdigest), headers=headers) as response:
                if response.status_code != (200 if whole else 206):
                    response.read()
                    raise_for(response)
                    raise ProtocolError(f"{job.path}: status {response.status_code} to a request for bytes {start}-{end - 1}")
                i, fill, pieces = first, 0, []
                want = job.span(i)[1] - job.span(i)[0]
                for piece in response.iter_raw():
                    view = memoryview(piece)
                    while view:
                        if i >= last:
                            raise ProtocolError(f"{job.path}: the registry sent more than the {end - start} bytes asked for")
                        take = min(len(view), want - fill)
                        pieces.append(view[:take])
                        fill, view = fill + take, view[take:]
                        if fill == want:
                            self._slots.acquire()
                            handed.append((i, self.verify.submit(self._store, job, fd, record, i, pieces)))
                            i, fill, pieces = i + 1, 0, []
                            cursor[0] = i
                            want = job.span(i)[1] - job.span(i)[0] if i < last else 0
                    if self._stop.is_set():
                        stopped = True
                        break
        finally:
            for _, future in handed:
                future.exception()  # wait: every handed chunk is stored or failed before we go on
        for _, future in handed:
            if (exc := future.exception()) is not None:
                raise exc
        if stopped:
            raise _Stop()
        if cursor[0] < last:
            raise _ShortBody(f"the answer ended {end - job.span(cursor[0])[0] - fill} bytes early")

    def _store(self, job: FileJob, fd: int, record: int, i: int, pieces: list[memoryview]) -> None:
        try:
            data = b"".join(pieces)  # one buffer: one GIL release each to hash it and to write it
            found = hashlib.sha256(data).hexdigest()
            if found != job.chunks[i]:
                self._stop.set()
                raise IntegrityError(
                    f"{job.path}: chunk {i} (bytes {job.span(i)[0]}..{job.span(i)[1]}) has sha256 {found}, "
                    f"the signed manifest says {job.chunks[i]}; the registry serves corrupt data",
                    path=job.path, chunk=i, expected=job.chunks[i], found=found,
                )  # fmt: skip
            _pwrite_all(fd, data, job.span(i)[0])
            self.cache.mark_done(record, i)
            self.progress(len(data))
        finally:
            self._slots.release()


class _ShortBody(Exception):
    """The response ended before every asked-for byte arrived."""
