"""Every answer is bounded in size (endless bodies, gzip included), and a redirect is said to be one.

Size limits are checked with httpx's MockTransport (what was sent is counted).
"""

from __future__ import annotations

import zlib

import httpx
import pytest

from lwhub.client import Client
from lwhub.client.wire import MAX_ANSWER, MAX_ERROR
from lwhub.errors import ProtocolError, ServerError

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
