"""Every answer is bounded: in size (endless bodies, gzip included), in time (a registry that
dribbles its headers or body), and a redirect is said to be one.

Size limits are checked with httpx's MockTransport (what was sent is counted); time limits
with a small real HTTP server on 127.0.0.1 that dribbles for real on the socket.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from lwhub.client import Client
from lwhub.client.wire import MAX_ANSWER, MAX_ERROR, paced
from lwhub.errors import HubUnavailableError, ProtocolError, ServerError

DIGEST = "sha256:" + "ab" * 32
MIB = 1 << 20


def endless(sent: list[int], piece: bytes = b" " * MIB, upto: int = 64 * MIB):
    """A body far larger than any cap (finite, so that a client that buffers it all still ends)."""
    while sum(sent) < upto:
        sent.append(len(piece))
        yield piece


def client_for(tmp_path, answer) -> Client:
    return Client("http://registry.invalid", cache_dir=tmp_path, http=httpx.Client(transport=httpx.MockTransport(answer)))


def test_an_endless_error_answer_to_a_blob_get_is_read_only_to_its_start(tmp_path):
    sent: list[int] = []
    client = client_for(tmp_path, lambda request: httpx.Response(500, content=endless(sent, b"x" * MIB)))
    with pytest.raises(ServerError, match="HTTP 500: x"):
        client.blob_bytes(DIGEST, 1 << 16)
    assert sum(sent) <= MAX_ERROR + 2 * MIB  # it stopped reading right after the cap


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_an_endless_answer_to_a_blob_put_is_refused_not_buffered(tmp_path, encoding):
    """The cap counts decoded bytes: 1 KiB of gzip may stand for 1 MiB of answer."""
    sent: list[int] = []  # decoded bytes
    headers = {"content-type": "application/json"}

    def gzipped():
        packer = zlib.compressobj(wbits=31)  # gzip framing
        for piece in endless(sent):
            yield packer.compress(piece) + packer.flush(zlib.Z_SYNC_FLUSH)

    if encoding == "gzip":
        headers["content-encoding"] = "gzip"
    body = gzipped() if encoding == "gzip" else endless(sent)
    client = client_for(tmp_path, lambda request: httpx.Response(201, headers=headers, content=body))
    with pytest.raises(ProtocolError, match=f"PUT .*/v1/blobs/{DIGEST}: the answer is larger than {MAX_ANSWER} bytes"):
        client.put_blob(DIGEST.removeprefix("sha256:"), b"data", 4)
    assert sum(sent) <= MAX_ANSWER + 2 * MIB


def test_a_redirect_is_a_protocol_error_naming_where_to(tmp_path):
    client = client_for(tmp_path, lambda request: httpx.Response(301, headers={"location": "https://hub.example/v1/bundles/alice/x"}))
    with pytest.raises(ProtocolError, match=r"redirected \(HTTP 301\) to https://hub.example/v1/bundles/alice/x; .*new URL"):
        client.info("alice/x")
    with pytest.raises(ProtocolError, match=r"redirected \(HTTP 301\)"):
        client.blob_bytes(DIGEST, 1 << 16)


# -- a registry that dribbles ------------------------------------------------------------

INFO = json.dumps({"name": "alice/x"}).encode().ljust(400)  # a valid answer, once it has all come


class Dribbler(BaseHTTPRequestHandler):
    """Answers every GET with a valid BundleInfo, dribbling `what` (headers or body) a byte per `pause`."""

    protocol_version = "HTTP/1.1"
    what, pause = "body", 0.02

    def log_message(self, *args):
        pass

    def do_GET(self):
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(INFO)}\r\n".encode()
        slow, fast = (b"x-pad: " + b"a" * 400, b"\r\n\r\n" + INFO) if self.what == "headers" else (b"\r\n" + INFO, b"")
        try:
            self.wfile.write(head)
            for i in range(len(slow)):
                self.wfile.write(slow[i : i + 1])
                self.wfile.flush()
                time.sleep(self.pause)
            self.wfile.write(fast)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass


@pytest.fixture
def dribbler():
    Dribbler.what, Dribbler.pause = "body", 0.02
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Dribbler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("what", ["headers", "body"])
def test_a_registry_dribbling_an_answer_is_left_once_it_stays_under_the_floor(dribbler, tmp_path, what):
    """A byte every 20 ms never trips the read timeout (30 s); the client's floor ends it after
    0.5 s of it. Without the floor the answer would take its 8 s, and from a hostile registry,
    for ever."""
    Dribbler.what = what
    client = Client(dribbler, cache_dir=tmp_path, timeout=30, min_speed=1000, speed_time=0.5)
    with client, pytest.raises(HubUnavailableError, match=r"answered too slowly \(under 1000 bytes/s for \d+ s: \d+ bytes came\)"):
        client.info("alice/x")


def test_a_registry_answering_slowly_but_above_the_floor_is_not_left(dribbler, tmp_path):
    Dribbler.pause = 0.005  # at most 200 bytes/s, fifty times the floor: a loaded machine's stalls stay above it
    with Client(dribbler, cache_dir=tmp_path, timeout=30, min_speed=4, speed_time=0.5) as client:
        assert client.info("alice/x").name == "alice/x"


def test_an_httpx_whose_transport_has_no_pool_where_expected_is_refused_not_left_unpaced():
    http = httpx.Client()
    pool, http._transport._pool = http._transport._pool, None  # as a future httpx might hold it
    try:
        with pytest.raises(RuntimeError, match="speed floor"):
            paced(http)
    finally:
        http._transport._pool = pool
        http.close()


def test_an_httpx_client_laid_out_otherwise_is_refused_too():
    http = httpx.Client()
    transport = http.__dict__.pop("_transport")  # as a future httpx might name it
    try:
        with pytest.raises(RuntimeError, match="speed floor cannot be set"):
            paced(http)
    finally:
        http._transport = transport
        http.close()
