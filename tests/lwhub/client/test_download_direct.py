"""The direct (http.client) receive path: breaks off cleanly, resumes, never keeps unverified bytes.

A small real HTTP server on 127.0.0.1 serves one blob and can cut the connection, flip a
byte, or answer 404, so each failure happens for real on the socket.
"""

import hashlib
import os
import re
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from lwhub.cache import Cache
from lwhub.client.download import Fetcher, FileJob
from lwhub.errors import HubUnavailableError, IntegrityError, NotFoundError

CHUNK = 1 << 16
DATA = os.urandom(20 * CHUNK + 123)
HEX = hashlib.sha256(DATA).hexdigest()
JOB = FileJob("adapters.safetensors", HEX, len(DATA), tuple(
    hashlib.sha256(DATA[i : i + CHUNK]).hexdigest() for i in range(0, len(DATA), CHUNK)), CHUNK)  # fmt: skip


class Blob(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    faults: dict = {}
    ranges: list = []

    def log_message(self, *args):
        pass

    def _wait_for_the_client(self):
        self.faults["stalled"].set()
        if select.select([self.connection], [], [], 30)[0] and not self.connection.recv(1):
            self.faults["left"].set()  # it closed the connection before the server gave up on it

    def do_GET(self):
        self.ranges.append(self.headers.get("range"))
        if self.faults.get("mute"):  # no answer at all, until the client leaves (or 30 s pass)
            self.close_connection = True
            self._wait_for_the_client()
            return
        if (slow := self.faults.get("dribble_headers")) is not None:  # the status line, then a header a byte at a time
            self.wfile.write(b"HTTP/1.1 200 OK\r\nx-pad: ")
            try:
                for _ in range(400):
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(slow)
                self.wfile.write(f"\r\ncontent-length: {len(DATA)}\r\n\r\n".encode() + DATA)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                pass
            return
        if self.faults.get("missing"):
            body = b'{"error": {"code": "blob_not_found", "message": "no such blob", "detail": {}}}'
            self.send_response(404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            try:
                for i in range(0, len(body), 1 if "dribble" in self.faults else len(body)):
                    self.wfile.write(body[i : i + 1] if "dribble" in self.faults else body)
                    self.wfile.flush()
                    time.sleep(self.faults.get("dribble", 0))
            except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                pass
            return
        data = self.faults.get("data", DATA)
        a, b = 0, len(data)
        if rng := self.headers.get("range"):
            m = re.match(r"bytes=(\d+)-(\d+)", rng)
            a, b = int(m[1]), int(m[2]) + 1
        body = bytearray(data[a:b])
        if (at := self.faults.get("corrupt")) is not None and a <= at < b:
            body[at - a] ^= 1
        self.send_response(206 if rng else 200)
        framing = self.faults.get("framing", "length")
        if framing == "length":
            self.send_header("content-length", str(len(body)))
        elif framing == "chunked":
            self.send_header("transfer-encoding", "chunked")
        else:  # the body runs until the connection closes
            self.send_header("connection", "close")
        self.end_headers()
        if (slow := self.faults.get("dribble")) is not None:  # a byte at a time, until the client gives up
            try:
                for i in range(min(len(body), self.faults.get("dribble_bytes", 400))):
                    piece = body[i : i + 1]
                    self.wfile.write(b"1\r\n" + piece + b"\r\n" if framing == "chunked" else piece)
                    self.wfile.flush()
                    if i == 10 and "stalled" in self.faults:
                        self.faults["stalled"].set()
                    time.sleep(slow)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                if "left" in self.faults:
                    self.faults["left"].set()
            return
        if self.faults.get("stall"):  # a little, then nothing until the client leaves (or 30 s pass)
            self.wfile.write(body[:1000])
            self.wfile.flush()
            self.close_connection = True
            self._wait_for_the_client()
            return
        if self.faults.get("count"):  # in pieces, counting what the socket took before the client left
            try:
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i : i + (1 << 16)])
                    self.faults["sent"] += len(body[i : i + (1 << 16)])
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        cut = self.faults.get("cut")
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(2)


@pytest.fixture
def server():
    Blob.faults, Blob.ranges = {}, []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Blob)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/blob/"
    srv.shutdown()


def fetch(url, cache, retries=0, **pace):
    with ThreadPoolExecutor(2) as pool, httpx.Client() as http:
        Fetcher(http, cache, lambda h: url + h, pool, direct=True, retries=retries, min_segment=1, **pace).fetch([JOB])


def test_cut_connection_keeps_verified_chunks_and_resumes_with_the_rest(server, tmp_path):
    cache = Cache(tmp_path)
    Blob.faults["cut"] = 5 * CHUNK + 1234
    with pytest.raises(HubUnavailableError):
        fetch(server, cache)
    assert sorted(cache.done_chunks(HEX)) == [0, 1, 2, 3, 4]
    Blob.faults.clear()
    Blob.ranges.clear()
    fetch(server, cache)
    assert Blob.ranges == [f"bytes={5 * CHUNK}-{len(DATA) - 1}"]  # only the rest
    assert cache.blob(HEX).read_bytes() == DATA


def test_a_corrupt_chunk_is_never_written(server, tmp_path):
    cache = Cache(tmp_path)
    Blob.faults["corrupt"] = 7 * CHUNK + 5
    with pytest.raises(IntegrityError) as err:
        fetch(server, cache)
    assert err.value.chunk == 7 and 7 not in cache.done_chunks(HEX)
    assert set(cache.partial(HEX).read_bytes()[7 * CHUNK : 8 * CHUNK]) <= {0}  # its bytes stay unwritten


def test_error_answers_are_typed(server, tmp_path):
    Blob.faults["missing"] = True
    with pytest.raises(NotFoundError):
        fetch(server, Cache(tmp_path))
    with pytest.raises(HubUnavailableError):
        fetch("http://127.0.0.1:1/blob/", Cache(tmp_path))


def test_chunks_the_resume_record_claims_are_hashed_again_before_they_are_kept(server, tmp_path):
    """The `.done` record is a hint: a claimed chunk whose bytes are wrong is fetched again, never kept."""
    cache = Cache(tmp_path)
    fd, record = cache.open_partial(HEX, len(DATA))  # as the downloader leaves an interrupted download
    try:
        os.pwrite(fd, b"\xff" * CHUNK, 0)  # chunk 0: wrong bytes (a lost page cache, a disk error, a meddler)
        os.pwrite(fd, DATA[CHUNK : 3 * CHUNK], CHUNK)  # chunks 1 and 2: right
        for i in range(3):
            Cache.mark_done(record, i)
    finally:
        os.close(fd)
        os.close(record)
    fetch(server, cache)
    assert cache.blob(HEX).read_bytes() == DATA
    assert Blob.ranges == [f"bytes=0-{CHUNK - 1}", f"bytes={3 * CHUNK}-{len(DATA) - 1}"]  # chunk 0 again, 1 and 2 kept


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("direct", [True, False])
def test_a_registry_that_dribbles_is_left_once_it_stays_under_the_floor(server, tmp_path, direct, framing):
    """A byte every 20 ms never trips the read timeout (30 s); the speed floor ends it after 0.5 s
    of it, whatever the body's framing, and nothing unverified is kept. Without the floor each try
    would run through the server's 400 bytes and then wait out the read timeout."""
    Blob.faults.update(dribble=0.02, framing=framing)
    cache = Cache(tmp_path)
    with ThreadPoolExecutor(2) as pool, httpx.Client(timeout=30) as http:
        fetcher = Fetcher(http, cache, lambda h: server + h, pool, direct=direct, retries=1, min_speed=1000, speed_time=0.5)
        with pytest.raises(HubUnavailableError, match=r"under 1000 bytes/s for \d+ s: \d+ bytes came.*pull again to resume") as caught:
            fetcher.fetch([JOB])
    assert int(re.search(r"(\d+) bytes came", str(caught.value))[1]) < 200  # of the 400 sent: left long before the end
    assert len(Blob.ranges) == 2 and not cache.blob(HEX).exists() and cache.done_chunks(HEX) == set()


def test_a_registry_that_dribbles_its_headers_is_left_once_it_stays_under_the_floor(server, tmp_path):
    """http.client reads headers with only the per-read timeout: a header a byte every 20 ms (for 8 s
    here, for ever from a hostile registry) must trip the floor like a dribbled body."""
    Blob.faults.update(dribble_headers=0.02)
    with ThreadPoolExecutor(2) as pool, httpx.Client(timeout=30) as http:
        fetcher = Fetcher(http, Cache(tmp_path), lambda h: server + h, pool, direct=True, retries=1, min_speed=1000, speed_time=0.5)
        with pytest.raises(HubUnavailableError, match=r"under 1000 bytes/s for \d+ s: \d+ bytes came.*pull again to resume"):
            fetcher.fetch([JOB])
    assert len(Blob.ranges) == 2  # tried again once, then gave up


@pytest.mark.parametrize("direct", [True, False])
def test_a_registry_that_dribbles_an_error_answer_is_left_too(server, tmp_path, direct):
    """An error answer is read to its end (at most `MAX_ERROR` bytes) to say what went wrong: it
    keeps the floor too, on the direct path and on a client `paced` as `Client` makes its own."""
    from lwhub.client.wire import paced

    Blob.faults.update(missing=True, dribble=0.02)
    with ThreadPoolExecutor(2) as pool, paced(httpx.Client(timeout=30), 1000, 0.5) as http:
        fetcher = Fetcher(http, Cache(tmp_path), lambda h: server + h, pool, direct=direct, retries=0, min_speed=1000, speed_time=0.5)
        with pytest.raises(HubUnavailableError, match=r"under 1000 bytes/s for \d+ s: \d+ bytes came"):
            fetcher.fetch([JOB])


def test_a_fast_registry_never_trips_the_speed_floor(server, tmp_path):
    cache = Cache(tmp_path)
    # Every read is weighed; loopback is far above 1 MB/s. A read that waited 1 ms for the GIL or
    # a loaded core trips so short a window now and then: a retry resumes, while a floor that is
    # wrong trips on every try.
    fetch(server, cache, retries=2, min_speed=1e6, speed_time=0.001)
    assert cache.blob(HEX).read_bytes() == DATA


def job_for(data: bytes) -> FileJob:
    return FileJob("adapters.safetensors", hashlib.sha256(data).hexdigest(), len(data), tuple(
        hashlib.sha256(data[i : i + CHUNK]).hexdigest() for i in range(0, len(data), CHUNK)), CHUNK)  # fmt: skip


def test_a_cache_that_cannot_be_written_stops_the_download_with_a_typed_error(server, tmp_path):
    """A full disk fails every later chunk too: the pull stops at the first failed write instead of
    receiving the whole file first, says which cache, and keeps what it verified for the next pull."""
    import resource
    import signal

    from lwhub.errors import CacheError

    data = os.urandom(512 * CHUNK)  # 32 MiB: far more than the sockets' buffers hold
    job = job_for(data)
    Blob.faults.update(data=data, count=True, sent=0)
    cache = Cache(tmp_path / "cache")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk

    def limit_once_planned(n):  # the partial file exists at its full size (sparse); writes past 2 chunks fail now
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * CHUNK, hard))

    try:
        with ThreadPoolExecutor(2) as pool, httpx.Client() as http, pytest.raises(CacheError) as caught:
            Fetcher(http, cache, lambda h: server + h, pool, direct=True, retries=0, progress=limit_once_planned).fetch([job])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, xfsz)
    assert caught.value.path == str(cache.root) and "File too large" in str(caught.value)
    assert Blob.faults["sent"] < len(data) // 2, Blob.faults["sent"]
    assert cache.done_chunks(job.hexdigest) == {0, 1}
    Blob.faults.update(sent=0)
    with ThreadPoolExecutor(2) as pool, httpx.Client() as http:
        Fetcher(http, cache, lambda h: server + h, pool, direct=True, retries=0).fetch([job])
    assert cache.blob(job.hexdigest).read_bytes() == data and Blob.ranges[-1] == f"bytes={2 * CHUNK}-{len(data) - 1}"


def abort_once_stalled(fetcher: Fetcher, bound: float) -> list[Exception]:
    """Run `fetcher` on JOB in a thread, abort it once the server stalls; what the fetch raised."""
    outcome: list[Exception] = []

    def run():
        try:
            fetcher.fetch([JOB])
        except Exception as exc:  # noqa: BLE001 - the caller checks it
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert Blob.faults["stalled"].wait(30)
    fetcher.abort()
    worker.join(bound)
    return outcome


@pytest.mark.parametrize("how", ["stall", "stall-close", "mute"])
def test_an_aborted_download_leaves_its_stalled_connection_at_once(server, tmp_path, how):
    """abort() (what Ctrl-C does) cuts the connection a receiver waits on, even with no read timeout:
    mid-body, mid-body of an answer that closes the connection (http.client then drops its socket),
    and before any answer at all."""
    Blob.faults.update(stalled=threading.Event(), left=threading.Event())
    Blob.faults.update(mute=True) if how == "mute" else Blob.faults.update(stall=True)
    if how == "stall-close":
        Blob.faults["framing"] = "close"
    with ThreadPoolExecutor(2) as pool, httpx.Client(timeout=None) as http:
        fetcher = Fetcher(http, Cache(tmp_path), lambda h: server + h, pool, direct=True, retries=0)
        outcome = abort_once_stalled(fetcher, 60)  # a bound for the old behaviour only: it waited for the server's 30 s
    assert outcome and isinstance(outcome[0], HubUnavailableError) and "pull again" in str(outcome[0]), outcome
    assert Blob.faults["left"].wait(30)  # the client left before the server gave up on it (the server sees it a moment later)


def test_an_interrupt_while_downloading_stops_the_receivers(server, tmp_path):
    """Ctrl-C arrives in the main thread while it waits for the receivers: they must not hold it."""
    import signal

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    Blob.faults.update(stall=True, stalled=threading.Event(), left=threading.Event())
    alarm = signal.signal(signal.SIGALRM, interrupt)
    try:
        with ThreadPoolExecutor(2) as pool, httpx.Client(timeout=None) as http, pytest.raises(Interrupted):
            threading.Thread(target=lambda: Blob.faults["stalled"].wait(30) and signal.setitimer(signal.ITIMER_REAL, 0.05)).start()
            Fetcher(http, Cache(tmp_path), lambda h: server + h, pool, direct=True, retries=0).fetch([JOB])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
    assert Blob.faults["left"].wait(30)  # the client left before the server gave up on it (the server sees it a moment later)


def test_a_download_aborted_before_it_began_installs_nothing(server, tmp_path):
    """Every receiver stops before receiving: the empty partial file must not become the blob."""
    cache = Cache(tmp_path)
    with ThreadPoolExecutor(2) as pool, httpx.Client() as http:
        fetcher = Fetcher(http, cache, lambda h: server + h, pool, direct=True)
        fetcher.abort()
        with pytest.raises(HubUnavailableError, match="stopped before its end"):
            fetcher.fetch([JOB])
    assert not cache.blob(HEX).exists()


def test_an_aborted_download_over_httpx_stops_at_its_next_piece(server, tmp_path):
    """httpx's socket is out of reach; a receiver still stops between two pieces, not after a whole chunk."""
    Blob.faults.update(dribble=0.02, dribble_bytes=100000, stalled=threading.Event(), left=threading.Event())
    with ThreadPoolExecutor(2) as pool, httpx.Client(timeout=30) as http:
        fetcher = Fetcher(http, Cache(tmp_path), lambda h: server + h, pool, direct=False, retries=0, min_speed=0)
        outcome = abort_once_stalled(fetcher, 120)  # a bound for the old behaviour only: a 64 KiB chunk at 50 bytes/s
    assert outcome and isinstance(outcome[0], HubUnavailableError) and "stopped before its end" in str(outcome[0])
    assert Blob.faults["left"].wait(30)  # the server's next writes found the connection closed


def test_a_blob_another_puller_finished_first_leaves_no_partial_behind(server, tmp_path):
    """Pullers share a cache without a lock: one may open a new partial just after another
    installed the blob. Its download then ends on a blob already there: the partial must go."""
    cache = Cache(tmp_path)
    cache.write_atomic(cache.blob(HEX), DATA)  # installed by the other puller, after this one looked
    fetch(server, cache)
    assert cache.blob(HEX).read_bytes() == DATA
    assert list((tmp_path / "partial").iterdir()) == []
