"""Blob downloads verified chunk by chunk, concurrent, and resumable across runs.

A file of S bytes in chunks of C: chunk i is bytes [i*C, min((i+1)*C, S)), and the
signed manifest gives its sha256, ``chunks[i]``. A download:

    1. re-hashes the chunks the partial file's record claims (a claim is a hint), keeps those that match;
    2. splits the missing chunks into contiguous runs, and those into at most `streams`
       segments of at least `min_segment` bytes;
    3. fetches every segment on its own thread: a plain GET when it covers the whole
       file (the server can then send the file without copying), else a Range GET;
       the socket reads fill a chunk buffer from a small reused pool; a full buffer goes
       to the verify pool, which hashes it (hashlib drops the GIL, so one core receives
       chunk k+1 while another hashes chunk k), compares it with the manifest, and only
       then writes it at its offset (`os.pwrite` of the buffer: no copy) and records it;
    4. retries a segment that breaks off, or that receives less than `min_speed` bytes a
       second over `speed_time` seconds (its headers too, once they began), from its first
       chunk not yet handed over;
    5. renames the partial file to the blob once every chunk is verified.

Wrong bytes are never written: a mismatch raises `IntegrityError` naming the file and
the chunk, and the chunks verified so far stay for the next attempt.
"""

from __future__ import annotations

import functools
import hashlib
import io
import mmap
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPResponse
from pathlib import Path

import httpx

from ..cache import Cache
from ..errors import HubUnavailableError, IntegrityError, ProtocolError
from .wire import (
    MAX_ERROR,
    MIN_SPEED,
    SPEED_TIME,
    Pace,
    PacedReads,
    raise_for,
    read_capped,
)

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


def _chunk_digest(fd: int, begin: int, end: int) -> str:
    """sha256 of bytes [begin, end) of `fd`, read through a map of its own (the page cache in
    place, no copy). Each hash owns its map, so an interrupted caller closes nothing a hash
    still reads."""
    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, end - start, offset=start, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
        return hashlib.sha256(view[begin - start :]).hexdigest()


def bad_chunks(fd: int, job: FileJob, indices: list[int], pool: ThreadPoolExecutor) -> list[int]:
    """Which of `indices` do not hash to the manifest's digest, hashed in parallel."""
    futures: list = []
    try:
        for i in indices:
            futures.append(pool.submit(_chunk_digest, fd, *job.span(i)))
        found = [f.result() for f in futures]
    except BaseException:  # a Ctrl-C: the hashes not started are dropped, the running ones end on their own
        for f in futures:
            f.cancel()
        raise
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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class _BrokeOff(Exception):
    """The answer ended, or the connection failed, before every asked-for byte arrived."""


class _HttpxBody:
    """An httpx answer: its pieces (at most 64 KiB each) are copied into the caller's buffer."""

    def __init__(self, response: httpx.Response) -> None:
        self.response, self.status = response, response.status_code
        self._pieces, self._rest = response.iter_raw(), memoryview(b"")

    def readinto(self, view: memoryview) -> int:
        try:
            while not self._rest:
                if (piece := next(self._pieces, None)) is None:
                    return 0
                self._rest = memoryview(piece)
        except httpx.TransportError as exc:
            raise _BrokeOff(str(exc) or type(exc).__name__) from exc
        n = min(len(view), len(self._rest))
        view[:n], self._rest = self._rest[:n], self._rest[n:]
        return n

    def answer(self) -> httpx.Response:
        try:
            return read_capped(self.response, MAX_ERROR, truncate=True)  # an error answer: JSON, small
        except httpx.TransportError as exc:
            raise _BrokeOff(str(exc) or type(exc).__name__) from exc


class _Cut:
    """A socket that `Fetcher.abort` may shut down from another thread: a read waiting on it
    returns at once. Kept from the connect on (`http.client` drops its own reference to the
    socket once an answer that closes the connection has arrived)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def abort(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # closed already
            pass


class _DirectBody:
    """A plain-HTTP answer read by `http.client` straight into the caller's buffer, the
    socket reads (which release the GIL) landing in place.

    Each call does one socket read, so the speed floor sees every arrival
    (`HTTPResponse.readinto` would wait until the whole view is full, however slowly the
    bytes came): `readinto1` of the response's buffered reader for a body of known length,
    else (chunked, or until the connection closes) `read1` and a copy.
    """

    def __init__(self, response: HTTPResponse, request: httpx.Request) -> None:
        self.response, self.request, self.status = response, request, response.status
        self._left = None if response.chunked else response.length  # bytes of the body not read yet

    def readinto(self, view: memoryview) -> int:
        try:
            if self._left is None:
                piece = self.response.read1(len(view))
                view[: len(piece)] = piece
                return len(piece)
            n = self.response.fp.readinto1(view[: self._left]) if self._left else 0
            self._left -= n
            return n
        except (OSError, HTTPException) as exc:
            raise _BrokeOff(str(exc) or type(exc).__name__) from exc

    def answer(self) -> httpx.Response:
        try:
            content = self.response.read(MAX_ERROR)  # an error answer: JSON, small
        except (OSError, HTTPException) as exc:
            raise _BrokeOff(str(exc) or type(exc).__name__) from exc
        return httpx.Response(self.status, headers=self.response.getheaders(), content=content, request=self.request)


@contextmanager
def _httpx_answer(http: httpx.Client, url: str, headers: dict) -> Iterator[_HttpxBody]:
    try:
        with http.stream("GET", url, headers=headers) as response:
            yield _HttpxBody(response)
    except httpx.TransportError as exc:
        raise _BrokeOff(str(exc) or type(exc).__name__) from exc


class _PacedRaw(io.RawIOBase):
    """A socket's reads, each weighed by `reads` (`wire.PacedReads`)."""

    def __init__(self, raw: io.RawIOBase, reads: PacedReads) -> None:
        self.raw, self.reads = raw, reads

    def readable(self) -> bool:
        return True

    def readinto(self, view) -> int | None:
        return self.reads.read(self.raw.readinto, view)

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


class _PacedResponse(HTTPResponse):
    """An answer whose status line and headers must keep the speed floor once they began:
    `http.client` reads them with only the per-read timeout, so a registry sending a byte
    a second would hold the receiver (and, its thread not being a daemon, the process) for
    ever. A failure is a `TimeoutError`, an OSError like any other broken connection."""

    def __init__(self, sock: socket.socket, *args, reads: PacedReads, **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_PacedRaw(self.fp.detach(), reads))


@contextmanager
def _direct_answer(url: httpx.URL, headers: dict, timeout: float | None, watch, min_speed: float,
                   speed_time: float) -> Iterator[_DirectBody]:  # fmt: skip
    """`watch(_Cut(socket))` registers the connection with its Fetcher before anything is sent."""
    connection, response = HTTPConnection(url.host, url.port, timeout=timeout), None
    reads = PacedReads(min_speed, speed_time, TimeoutError)
    connection.response_class = functools.partial(_PacedResponse, reads=reads)
    try:
        try:
            connection.connect()
        except OSError as exc:
            raise _BrokeOff(str(exc) or type(exc).__name__) from exc
        with watch(_Cut(connection.sock)):
            try:
                connection.request("GET", url.raw_path.decode("ascii"), headers=headers)
                response = connection.getresponse()
            except (OSError, HTTPException) as exc:
                raise _BrokeOff(str(exc) or type(exc).__name__) from exc
            if response.status in (200, 206):  # a body `_fill` weighs (leaving out the waits for a free buffer); an error stays watched
                reads.stop()
            yield _DirectBody(response, httpx.Request("GET", url, headers=headers))
    finally:
        if response is not None:  # an answer that closes the connection holds the socket, not the connection
            response.close()
        connection.close()


def _proxied(url: httpx.URL) -> bool:
    """Whether httpx (which honours the proxy environment variables) would go through a proxy."""
    proxies = urllib.request.getproxies_environment()
    return bool(proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass_environment(url.host, proxies)


def _fill(body: _HttpxBody | _DirectBody, view: memoryview, pace: Pace, stop: threading.Event) -> None:
    got = 0
    while got < len(view):
        if stop.is_set():  # aborted, or another receiver failed: no need to finish the chunk
            raise _Stop()
        began = time.monotonic()
        n = body.readinto(view[got:])
        if n == 0:
            raise _BrokeOff(f"the answer ended {len(view) - got} bytes early")
        got += n
        pace.add(n, time.monotonic() - began)


BUFFER_BUDGET = 64 << 20  # bytes of chunk buffers one pull may hold at once (at least one chunk)


class Fetcher:
    """Downloads blobs by digest into a `Cache` with `http`; `blob_url(hex)` gives the URL.

    `streams` threads receive, each into chunk buffers from a pool of `in_flight` (which
    bounds memory and is reused, so no page is faulted in twice); the `verify` pool hashes
    and writes the full buffers they hand over, so one core receives while the others hash.
    With ``direct=True`` plain-HTTP answers are read with `http.client` straight into the
    buffers (httpx reads 64 KiB pieces through several layers of Python); only set it
    when `http` is an ordinary client (no custom transport): proxies from the environment
    are honoured, everything else about `http` except its read timeout is not.
    A stream that receives under `min_speed` bytes a second over `speed_time` seconds
    breaks off like a cut connection (0 turns that off); so does, on the direct path, one
    whose headers come that slowly (httpx's own connections are held to the floor by
    `wire.paced` where the `Client` made them).
    """

    def __init__(self, http: httpx.Client, cache: Cache, blob_url: Callable[[str], str], verify: ThreadPoolExecutor,
                 *, streams: int = 1, min_segment: int = 32 << 20, retries: int = 2, in_flight: int = 4,
                 direct: bool = False, progress: Progress | None = None, min_speed: float = MIN_SPEED,
                 speed_time: float = SPEED_TIME) -> None:  # fmt: skip
        self.http, self.cache, self.blob_url, self.verify = http, cache, blob_url, verify
        self.min_speed, self.speed_time = min_speed, speed_time
        self.streams, self.min_segment, self.retries, self.direct = streams, min_segment, retries, direct
        self.progress = progress or (lambda n: None)
        self.in_flight = in_flight
        self._slots = threading.Semaphore(in_flight)
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._live: set[_Cut] = set()  # the connections receiving now, for `abort`

    def fetch(self, jobs: list[FileJob]) -> None:
        """Make every job's blob present and verified in the cache."""
        jobs = list({job.hexdigest: job for job in jobs}.values())  # two files, same bytes: one download
        largest = max((job.chunk_size for job in jobs), default=1)
        # Chunks may be up to 1 GiB: bound the buffers held at once by memory, not only by count.
        self._slots = threading.Semaphore(max(1, min(self.in_flight, BUFFER_BUDGET // largest)))
        work, opened = [], []
        try:
            for job in jobs:
                job.check_shape()
                fds, segs = self._plan(job)
                opened.extend(fds)
                work.extend((job, *fds, a, b) for a, b in segs)
            with ThreadPoolExecutor(max_workers=max(1, min(len(work), self.streams * max(1, len(jobs))))) as receivers:
                futures = [receivers.submit(self._segment, *w) for w in work]
                try:
                    errors = [e for f in futures if (e := f.exception()) is not None and not isinstance(e, _Stop)]
                except BaseException:  # the caller gave up (Ctrl-C): the receivers stop, the verified chunks stay
                    self.abort()
                    receivers.shutdown(cancel_futures=True)
                    raise
        finally:
            for fd in opened:
                os.close(fd)
        if errors:
            raise errors[0]
        if self._stop.is_set():  # aborted: chunks are missing, so no partial file may become a blob
            raise HubUnavailableError("the download was stopped before its end; pull again to resume",
                                      url=self.blob_url(jobs[0].hexdigest) if jobs else "")  # fmt: skip
        for job in jobs:
            with self.cache.writing(job.path):
                if self.cache.blob(job.hexdigest).exists():  # another puller sharing the cache finished it first
                    self.cache.forget_partial(job.hexdigest)  # this download's partial, made after: a spare
                else:
                    self.cache.finish_partial(job.hexdigest)

    def abort(self) -> None:
        """Stop the download from another thread (or a signal handler): receivers stop at once
        where they read with `http.client` (their connections are cut), else at their next piece.
        `fetch` then raises `HubUnavailableError`; the chunks verified so far stay for the next pull.
        An aborted Fetcher stays stopped."""
        self._stop.set()
        with self._lock:
            live = list(self._live)
        for cut in live:
            cut.abort()

    def _plan(self, job: FileJob) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        if job.size == 0:
            with self.cache.writing(job.path):
                self.cache.write_atomic(self.cache.blob(job.hexdigest), b"")
            return (), []
        with self.cache.writing(job.path):
            fd, record = self.cache.open_partial(job.hexdigest, job.size)
        try:
            claimed = sorted(i for i in self.cache.done_chunks(job.hexdigest) if i < len(job.chunks))
            done = set(claimed) - set(bad_chunks(fd, job, claimed, self.verify))
            self.progress(sum(job.span(i)[1] - job.span(i)[0] for i in done))
        except BaseException:  # not yet the caller's to close
            os.close(fd)
            os.close(record)
            raise
        missing = [i for i in range(len(job.chunks)) if i not in done]
        return (fd, record), segments(missing, job, self.streams, self.min_segment) if missing else []

    def _segment(self, job: FileJob, fd: int, record: int, first: int, last: int) -> None:
        attempt, cursor = 0, [first]  # cursor[0]: the first chunk not yet handed over
        if self._stop.is_set():  # another segment failed, or the download was aborted, before this one began
            raise _Stop()
        while cursor[0] < last:
            try:
                self._receive(job, fd, record, cursor, last)
            except _BrokeOff as exc:
                attempt += 1
                if attempt > self.retries or self._stop.is_set():
                    self._stop.set()
                    url = self.blob_url(job.hexdigest)
                    raise HubUnavailableError(f"{job.path}: the download broke off at chunk {cursor[0]} ({exc}); pull again to resume", url=url) from exc
            except BaseException:
                self._stop.set()
                raise

    @contextmanager
    def _answer(self, hexdigest: str, headers: dict) -> Iterator[_HttpxBody | _DirectBody]:
        url = self.blob_url(hexdigest)
        parsed = httpx.URL(url)
        if self.direct and parsed.scheme == "http" and not _proxied(parsed):
            with _direct_answer(parsed, headers, self.http.timeout.read, self._watching, self.min_speed, self.speed_time) as body:
                yield body
        else:  # httpx's socket is out of reach: the receiver looks at the stop event before each read
            with _httpx_answer(self.http, url, headers) as body, self._watching(None):
                yield body

    def _receive(self, job: FileJob, fd: int, record: int, cursor: list[int], last: int) -> None:
        """Fetch chunks [cursor[0], last), moving the cursor past each chunk handed over."""
        first = cursor[0]
        start, end = job.span(first)[0], job.span(last - 1)[1]
        whole = start == 0 and end == job.size
        handed: list = []  # futures of the chunks given to the verify pool
        try:
            with self._answer(job.hexdigest, {} if whole else {"range": f"bytes={start}-{end - 1}"}) as body:
                if body.status != (200 if whole else 206):
                    raise_for(body.answer())
                    raise ProtocolError(f"{job.path}: status {body.status} to a request for bytes {start}-{end - 1}")
                pace = Pace(self.min_speed, self.speed_time, _BrokeOff)
                for i in range(first, last):
                    buffer = self._take(job.chunk_size)
                    view = memoryview(buffer)[: job.span(i)[1] - job.span(i)[0]]
                    try:
                        _fill(body, view, pace, self._stop)
                    except BaseException:
                        self._give(buffer)
                        raise
                    handed.append(self.verify.submit(self._store, job, fd, record, i, buffer, view))
                    cursor[0] = i + 1
                    if self._stop.is_set():
                        raise _Stop()
                if body.readinto(memoryview(bytearray(1))):
                    raise ProtocolError(f"{job.path}: the registry sent more than the {end - start} bytes asked for")
        finally:  # every handed chunk is stored or failed before we go on; its failure comes first
            failed = [exc for future in handed if (exc := future.exception()) is not None]
            if failed:
                raise failed[0]

    @contextmanager
    def _watching(self, cut: _Cut | None) -> Iterator[None]:
        """`cut` is one of the connections `abort` shuts down while inside (None: nothing to cut)."""
        with self._lock:
            if cut is not None:
                self._live.add(cut)
        try:
            if self._stop.is_set():  # aborted before this connection was registered
                raise _Stop()
            yield
        finally:
            with self._lock:
                self._live.discard(cut)

    def _take(self, size: int) -> bytearray:
        self._slots.acquire()
        with self._lock:
            self._free = [b for b in self._free if len(b) == size]
            if self._free:
                return self._free.pop()
        return bytearray(size)

    def _give(self, buffer: bytearray) -> None:
        with self._lock:
            self._free.append(buffer)
        self._slots.release()

    def _store(self, job: FileJob, fd: int, record: int, i: int, buffer: bytearray, view: memoryview) -> None:
        try:
            found = hashlib.sha256(view).hexdigest()  # releases the GIL: the receiver goes on meanwhile
            if found != job.chunks[i]:
                raise IntegrityError(
                    f"{job.path}: chunk {i} (bytes {job.span(i)[0]}..{job.span(i)[1]}) has sha256 {found}, "
                    f"the signed manifest says {job.chunks[i]}; the registry serves corrupt data",
                    path=job.path, chunk=i, expected=job.chunks[i], found=found,
                )  # fmt: skip
            with self.cache.writing(f"{job.path} (chunk {i})"):
                _pwrite_all(fd, view, job.span(i)[0])
                self.cache.mark_done(record, i)
            self.progress(len(view))
        except BaseException:  # the other receivers stop too: a full disk fails every later chunk as well
            self._stop.set()
            raise
        finally:
            self._give(buffer)
