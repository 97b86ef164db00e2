"""The registry's HTTP API on a real server: auth, error codes, ranges, pages, tags, yanks, OpenAPI."""

from __future__ import annotations

import hashlib
import inspect
import os
import threading
import time

import httpx
import msgspec
import pytest

from lwhub.errors import ERROR_CODES, AuthError, BadRequestError, ForbiddenError, NotFoundError
from lwhub.protocol import MAX_TTL, SignedVersion, VersionInfo
from lwhub.server import create_account, create_token


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory, make_bundle):
    """alice/noir at 1.0.0, 1.1.0 and 2.0.0-rc.1, and alice/rain and alice/noir-night at 1.0.0."""
    root = tmp_path_factory.mktemp("bundles")
    client = hub.client(root / "cache")
    out = {}
    for name, version, desc in [("alice/noir", "1.0.0", "noir streets"), ("alice/noir", "1.1.0", "noir streets"),
                                ("alice/noir", "2.0.0-rc.1", "noir streets"), ("alice/rain", "1.0.0", "falling rain"),
                                ("alice/noir-night", "1.0.0", "night")]:  # fmt: skip
        folder = make_bundle(root / f"{name.replace('/', '_')}-{version}", name, version, hub.private, features=64, rank=16, description=desc)
        out[(name, version)] = client.push(folder)
    return out


def test_error_answers_carry_a_stable_code_from_the_one_table(hub):
    r = httpx.get(f"{hub.url}/v1/bundles/alice/nothing-here")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "bundle_not_found" and "alice/nothing-here" in error["message"]
    assert ERROR_CODES[error["code"]] is NotFoundError and NotFoundError.status == 404
    assert httpx.get(f"{hub.url}/v1/no/such/route").json()["error"]["code"] == "not_found"


def test_writes_refuse_missing_bad_and_expired_tokens(hub, tmp_path):
    expired = create_token(hub.data, "alice", expires=time.time() - 1)
    for token, code in [(None, "token_missing"), ("lwh_forged", "token_invalid"), (expired, "token_expired")]:
        client = hub.client(tmp_path / "c", token=token)
        with pytest.raises(AuthError) as caught:
            client.register_key("alice", hub.public)
        assert caught.value.code == code and caught.value.status == 401


def test_publishing_outside_ones_namespace_is_forbidden(hub, tmp_path, make_bundle):
    bob = create_account(hub.data, "bob")
    folder = make_bundle(tmp_path / "b", "alice/stolen", "1.0.0", hub.private, features=32, rank=8)
    client = hub.client(tmp_path / "c", token=bob)
    with pytest.raises(ForbiddenError) as caught:
        client.push(folder)
    assert caught.value.code == "namespace_forbidden" and caught.value.detail["namespace"] == "alice/stolen"
    with pytest.raises(ForbiddenError):
        client.register_key("alice", hub.public)
    with pytest.raises(NotFoundError):
        client.info("alice/stolen")


def test_a_narrow_token_reaches_only_its_bundle(hub, published, tmp_path):
    narrow = hub.client(tmp_path / "c").new_token(scopes=["alice/rain"], ttl=60)
    assert narrow.expires is not None and narrow.scopes == ["alice/rain"]
    client = hub.client(tmp_path / "c", token=narrow.token)
    assert client.yank("alice/rain@1.0.0", reason="test").yanked
    assert not client.yank("alice/rain@1.0.0", undo=True).yanked
    with pytest.raises(ForbiddenError):
        client.yank("alice/noir@1.0.0")
    with pytest.raises(ForbiddenError):
        client.new_token(scopes=["alice"])  # no widening


def test_blobs_answer_ranges(hub, published):
    info = published[("alice/noir", "1.0.0")]
    url = f"{hub.url}/v1/blobs/{info.manifest}"
    whole = httpx.get(url)
    assert whole.status_code == 200 and "sha256:" + hashlib.sha256(whole.content).hexdigest() == info.manifest
    size = len(whole.content)
    part = httpx.get(url, headers={"range": "bytes=10-109"})
    assert part.status_code == 206 and part.content == whole.content[10:110]
    assert part.headers["content-range"] == f"bytes 10-109/{size}"
    assert httpx.get(url, headers={"range": "bytes=-7"}).content == whole.content[-7:]
    assert httpx.get(url, headers={"range": f"bytes={size - 5}-"}).content == whole.content[-5:]
    refused = httpx.get(url, headers={"range": f"bytes={size}-"})
    assert refused.status_code == 416 and refused.json()["error"]["code"] == "range_not_satisfiable"
    assert refused.headers["content-range"] == f"bytes */{size}"
    assert httpx.head(url).headers["content-length"] == str(size)
    assert httpx.get(f"{hub.url}/v1/blobs/sha256:{'0' * 64}").json()["error"]["code"] == "blob_not_found"
    assert httpx.get(f"{hub.url}/v1/blobs/md5:abc").json()["error"]["code"] == "invalid_digest"


def test_versions_and_search_paginate(hub, published, tmp_path):
    client = hub.client(tmp_path / "c")
    assert [v.version for v in client.versions("alice/noir", page_size=2)] == ["2.0.0-rc.1", "1.1.0", "1.0.0"]
    first = httpx.get(f"{hub.url}/v1/bundles/alice/noir/versions", params={"limit": 2}).json()
    assert len(first["items"]) == 2 and first["next"]
    second = httpx.get(f"{hub.url}/v1/bundles/alice/noir/versions", params={"limit": 2, "page": first["next"]}).json()
    assert [v["version"] for v in second["items"]] == ["1.0.0"] and second["next"] is None
    found = [b.name for b in client.search("noir", page_size=1)]  # the session's hub: other tests publish too
    assert [n for n in found if n.startswith("alice/")] == ["alice/noir", "alice/noir-night"]
    assert [b.name for b in client.search("falling")] == ["alice/rain"]
    bad = httpx.get(f"{hub.url}/v1/bundles", params={"limit": 0})
    assert bad.json()["error"]["code"] == "invalid_request"
    for token in ("!!!", "%FF", ""):  # the url-safe decoder read "" for the first two: "no versions"
        bad = httpx.get(f"{hub.url}/v1/bundles/alice/noir/versions", params={"page": token})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request", token


def test_latest_tags_and_yanks(hub, published, tmp_path):
    client = hub.client(tmp_path / "c")
    assert client.resolve("alice/noir").version == "1.1.0"  # the pre-release is not "latest"
    assert client.info("alice/noir").latest == "1.1.0"
    client.set_tag("alice/noir", "beta", "2.0.0-rc.1")
    assert client.resolve("alice/noir@beta").version == "2.0.0-rc.1"
    with pytest.raises(BadRequestError) as caught:  # computed: a pinned "latest" would outlive yanks and releases
        client.set_tag("alice/noir", "latest", "1.0.0")
    assert caught.value.code == "invalid_name" and client.resolve("alice/noir").version == "1.1.0"
    from lwhub.server.store import SQLiteStore

    SQLiteStore(hub.data / "registry.sqlite3").set_tag("alice", "noir", "latest", "1.0.0")  # as an older registry let one be set
    assert client.resolve("alice/noir").version == "1.1.0" and client.info("alice/noir").latest == "1.1.0"
    assert "latest" not in client.info("alice/noir").named_tags
    client.yank("alice/noir@1.1.0", reason="bad colors")
    try:
        assert client.resolve("alice/noir").version == "1.0.0"
        assert client.resolve("alice/noir@1.1.0").yank_reason == "bad colors"  # still there, by version
    finally:
        client.yank("alice/noir@1.1.0", undo=True)
    with pytest.raises(NotFoundError) as caught:
        client.resolve("alice/noir@nightly")
    assert caught.value.code == "tag_not_found"
    with pytest.raises(NotFoundError) as caught:
        client.resolve("alice/noir@9.0.0")
    assert caught.value.code == "version_not_found"


def test_a_range_over_many_reads_and_its_head(hub):
    data = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB and a bit: several of the server's 1 MiB reads
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    put = httpx.put(f"{hub.url}/v1/blobs/{digest}", content=data, headers={"authorization": f"Bearer {hub.token}"})
    assert put.status_code in (200, 201)
    url = f"{hub.url}/v1/blobs/{digest}"
    for first, last in [(0, len(data) - 1), (1000, (5 << 19) + 3), ((1 << 20) - 1, 1 << 20), (len(data) - 1, len(data) - 1)]:
        part = httpx.get(url, headers={"range": f"bytes={first}-{last}"})
        assert part.status_code == 206 and part.content == data[first : last + 1], (first, last)
    head = httpx.head(url, headers={"range": "bytes=1000-2999999"})
    assert head.status_code == 206 and head.headers["content-length"] == "2999000" and head.content == b""


def test_a_range_read_slowly_goes_on_from_a_thread(tmp_path, monkeypatch):
    """With every read counted slow, each range's reads after its first run on a worker thread."""
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from lwhub.server.http import BlobResponse

    data = bytes(reversed(range(256))) * (2 * 4096 + 5)  # 2 MiB and a bit: up to three reads
    (tmp_path / "blob").write_bytes(data)
    app = Starlette(routes=[Route("/blob", lambda request: BlobResponse(tmp_path / "blob"))])
    monkeypatch.setattr(BlobResponse, "inline_read_limit", -1.0)
    readers, pread = [], os.pread

    def watched(fd: int, size: int, offset: int) -> bytes:
        readers.append(threading.get_ident())
        return pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", watched)
    with TestClient(app) as client:
        for first, last in [(1, len(data) - 1), (7, (1 << 20) + 9), (len(data) - 3, len(data) - 1)]:
            readers.clear()
            part = client.get("/blob", headers={"range": f"bytes={first}-{last}"})
            assert part.status_code == 206 and part.content == data[first : last + 1], (first, last)
            reads = -(-(last + 1 - first) // BlobResponse.chunk_size)
            assert len(readers) == reads and readers[0] not in readers[1:], (first, last)  # only the first in the loop


def test_starlette_still_hands_single_ranges_to_the_method_blobs_override():
    """`BlobResponse` reads single ranges itself; if Starlette renames the hook, ranges get slower, not wrong."""
    from starlette.responses import FileResponse

    from lwhub.server.http import BlobResponse

    params = list(inspect.signature(FileResponse._handle_single_range).parameters)
    assert params == list(inspect.signature(BlobResponse._handle_single_range).parameters)
    assert params == ["self", "send", "start", "end", "file_size", "send_header_only"]


def test_a_signed_resolution_carries_the_manifest_and_signature(hub, published):
    base = f"{hub.url}/v1/bundles/alice/noir/resolve"
    signed = msgspec.json.decode(httpx.get(f"{base}/1.0.0/signed").content, type=SignedVersion)
    assert signed.info == msgspec.json.decode(httpx.get(f"{base}/1.0.0").content, type=VersionInfo)
    for data, digest in [(signed.manifest, signed.info.manifest), (signed.signature, signed.info.signature)]:
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        assert data == httpx.get(f"{hub.url}/v1/blobs/{digest}").content
    missing = httpx.get(f"{base}/9.0.0/signed")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "version_not_found"


def test_the_openapi_document_lists_every_route(hub):
    from lwhub.server.app import create_app

    doc = httpx.get(f"{hub.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    app = create_app(hub.data)
    for route in app.routes:
        for method in route.methods - {"HEAD"}:
            assert method.lower() in doc["paths"][route.path], f"{method} {route.path} is not documented"
    assert set(doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]) == set(ERROR_CODES)
    publish = doc["paths"]["/v1/bundles/{owner}/{name}/versions/{version}"]["post"]["responses"]
    import re

    patterns = {p["name"]: p["schema"]["pattern"] for p in doc["paths"]["/v1/bundles/{owner}/{name}/resolve/{ref}"]["get"]["parameters"]}
    assert all(re.fullmatch(patterns["ref"], r) for r in ("1.2.3", "1.0.0-rc.1+b2", "latest", "stable"))
    assert not any(re.fullmatch(patterns["ref"], r) for r in ("01.0.0", "Latest", "1.0")) and not re.fullmatch(patterns["owner"], "Alice")
    assert {"200", "201"} <= set(publish) and "201" in doc["paths"]["/v1/tokens"]["post"]["responses"]


def test_names_digests_and_numbers_are_matched_whole(hub, published):
    """A trailing newline or a non-ASCII digit never passes for a name, digest, tag or number."""
    auth = {"authorization": f"Bearer {hub.token}"}
    info = httpx.get(f"{hub.url}/v1/bundles/alice/noir/versions/1.0.0").json()
    body = {"manifest": info["manifest"] + "\n", "signature": info["signature"] + "\n"}
    r = httpx.post(f"{hub.url}/v1/bundles/alice/noir/versions/9.9.9", json=body, headers=auth)
    assert r.status_code == 400, r.text
    assert httpx.get(f"{hub.url}/v1/bundles/alice/noir/versions/9.9.9").status_code == 404  # nothing visible
    assert httpx.put(f"{hub.url}/v1/bundles/alice/noir/tags/stable%0A", json={"version": "1.0.0"}, headers=auth).status_code == 400
    assert httpx.get(f"{hub.url}/v1/bundles", params={"limit": "²"}).status_code == 400
    blob = info["manifest"]
    r = httpx.get(f"{hub.url}/v1/blobs/{blob}", headers={"range": "bytes=" + "9" * 5000 + "-"})
    assert r.status_code < 500


def test_a_version_with_a_number_past_twenty_digits_is_a_typed_refusal(hub, published):
    """Python cannot parse a 5000-digit number: the registry answered 500."""
    huge = "1" * 5000 + ".0.0"
    for path in (f"versions/{huge}", f"resolve/{huge}", f"resolve/{huge}/signed", "resolve/1.0.0-" + "1" * 21):
        r = httpx.get(f"{hub.url}/v1/bundles/alice/noir/{path}")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_version", path[:40]  # not "no such tag"
    info = httpx.get(f"{hub.url}/v1/bundles/alice/noir/versions/1.0.0").json()
    body = {"manifest": info["manifest"], "signature": info["signature"]}
    r = httpx.post(f"{hub.url}/v1/bundles/alice/noir/versions/{huge}", json=body, headers={"authorization": f"Bearer {hub.token}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_version"


def test_a_token_never_outlives_the_one_that_made_it(hub):
    parent = create_token(hub.data, "alice", expires=time.time() + 60)
    auth = {"authorization": f"Bearer {parent}"}
    for body in ({}, {"ttl": 1e300}):
        minted = httpx.post(f"{hub.url}/v1/tokens", json=body, headers=auth)
        assert minted.status_code == 201 and minted.json()["expires"] <= time.time() + 60
    assert httpx.post(f"{hub.url}/v1/tokens", json={"ttl": -5}, headers=auth).status_code == 400
    lasting = {"authorization": f"Bearer {create_token(hub.data, 'alice')}"}  # never expires
    minted = httpx.post(f"{hub.url}/v1/tokens", json={"ttl": 1e308}, headers=lasting)
    assert minted.status_code == 201 and minted.json()["expires"] <= time.time() + MAX_TTL  # a date clocks can print


def test_a_json_body_cut_short_is_a_bad_request(hub):
    """A client that stops sending (or frames chunks badly) gets 400, not an internal error."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(hub.url)
    for head, body in [(b"Content-Length: 100\r\n", b"{"), (b"Transfer-Encoding: chunked\r\n", b"ZZ\r\n")]:
        with socket.create_connection((where.hostname, where.port), timeout=10) as s:
            s.sendall(b"POST /v1/tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + hub.token.encode() + b"\r\n"
                      b"Content-Type: application/json\r\n" + head + b"\r\n" + body)  # fmt: skip
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        status = answer.split(b"\r\n", 1)[0]
        assert b" 400 " in status and b'"invalid_request"' in answer, answer[:300]


def test_a_content_length_with_leading_zeros_is_the_number_it_spells(hub):
    import socket
    from urllib.parse import urlsplit

    data = b"leading zeros"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    where = urlsplit(hub.url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as s:
        s.sendall(f"PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {hub.token}\r\n"
                  f"Connection: close\r\nContent-Length: {len(data):024d}\r\n\r\n".encode() + data)  # fmt: skip
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.split(b"\r\n", 1)[0].split()[1] in (b"200", b"201"), answer[:300]
    assert httpx.get(f"{hub.url}/v1/blobs/{digest}").content == data



@pytest.mark.parametrize("header, status", [("bytes=abc", 400), ("items=0-1", 400), ("bytes=", 400), ("bytes=2-1,0-1", 400),
                                           ("bytes=12345678901234567890-", 400), ("bytes=0-" + "9" * 5000, 400),
                                           ("bytes=0-1,99999999-99999999999", 416), ("bytes=0-1,3-4", 206)])  # fmt: skip
def test_every_range_answer_is_json_or_the_bytes(hub, published, header, status):
    info = published[("alice/noir", "1.0.0")]
    r = httpx.get(f"{hub.url}/v1/blobs/{info.manifest}", headers={"range": header})
    assert r.status_code == status, r.text[:200]
    if status >= 400:
        assert r.json()["error"]["code"] == ("range_not_satisfiable" if status == 416 else "invalid_request")


def test_a_method_a_route_does_not_take_is_405_with_allow(hub):
    for path, methods in [("/v1/tokens", {"POST"}), ("/v1/owners/alice/keys", {"GET", "HEAD", "POST"}),
                          (f"/v1/blobs/sha256:{'0' * 64}", {"GET", "HEAD", "PUT"})]:  # two routes on one path  # fmt: skip
        r = httpx.request("DELETE", f"{hub.url}{path}")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert set(r.headers["allow"].split(", ")) == methods and r.headers["allow"] == r.json()["error"]["detail"]["allow"]


def test_yank_and_tag_of_a_bundle_that_is_not_there_say_so(hub, tmp_path):
    client = hub.client(tmp_path / "c")
    for act in (lambda: client.yank("alice/never@1.0.0"), lambda: client.set_tag("alice/never", "stable", "1.0.0")):
        with pytest.raises(NotFoundError) as caught:
            act()
        assert caught.value.code == "bundle_not_found"


def test_an_upload_that_stalls_is_dropped_with_its_temp_file(tmp_path, keys):
    """A client that declares a large blob and goes quiet holds nothing for longer than upload_idle."""
    import socket
    from urllib.parse import urlsplit

    from tests.lwhub.conftest import start_hub

    hub = start_hub(tmp_path / "data", keys, upload_idle=1.0)
    try:
        where = urlsplit(hub.url)
        digest = "sha256:" + "ab" * 32
        with socket.create_connection((where.hostname, where.port), timeout=20) as s:
            s.sendall(f"PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {hub.token}\r\n"
                      f"Content-Length: {1 << 30}\r\n\r\n".encode() + b"x" * 1000)  # fmt: skip
            deadline = time.monotonic() + 10
            while not os.listdir(hub.data / "tmp") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert os.listdir(hub.data / "tmp")  # the upload is under way (its temp file stays for 1 s idle)
            answer = s.recv(65536)  # then nothing more is sent
        assert b" 400 " in answer.split(b"\r\n", 1)[0] and b"sent nothing for 1 s" in answer, answer[:300]
        assert os.listdir(hub.data / "tmp") == []
    finally:
        hub.server.stop()


def test_a_json_body_that_stalls_is_dropped(tmp_path, keys):
    """A small JSON body (here a publish) that goes quiet mid-way is dropped after upload_idle too."""
    import socket
    from urllib.parse import urlsplit

    from tests.lwhub.conftest import start_hub

    hub = start_hub(tmp_path / "data", keys, upload_idle=1.0)
    try:
        where = urlsplit(hub.url)
        with socket.create_connection((where.hostname, where.port), timeout=20) as s:
            s.sendall(f"POST /v1/bundles/alice/noir/versions/1.0.0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {hub.token}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"manifest\": ".encode())  # fmt: skip
            answer = s.recv(65536)  # the rest never comes
        assert b" 400 " in answer.split(b"\r\n", 1)[0] and b"the request body sent nothing for 1 s" in answer, answer[:300]
        with pytest.raises(NotFoundError):  # nothing was published
            list(hub.client(tmp_path / "c").versions("alice/noir"))
    finally:
        hub.server.stop()


@pytest.mark.parametrize("idle", [0, -1.0, float("nan"), "60"])
def test_an_upload_idle_time_that_is_not_positive_seconds_is_refused(tmp_path, idle):
    from lwhub.errors import UsageError
    from lwhub.server import create_app, serve

    with pytest.raises(UsageError, match="seconds above 0"):
        serve(tmp_path / "data", upload_idle=idle)
    with pytest.raises(UsageError, match="seconds above 0"):
        create_app(tmp_path / "data", upload_idle=idle)
