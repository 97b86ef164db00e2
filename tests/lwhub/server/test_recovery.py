"""Crashes and full disks during a publish leave no partial version, and a restart cleans up."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import threading
import time

import httpx
import pytest

from lwhub.client import Client
from lwhub.errors import NotFoundError, StorageError
from lwhub.protocol import VersionInfo
from lwhub.server import create_account, recover, serve
from lwhub.server.blobs import DirBlobStore
from lwhub.server.store import SQLiteStore


def no_version(url: str, name: str) -> bool:
    return httpx.get(f"{url}/v1/bundles/{name}/versions").status_code == 404


def test_a_server_killed_mid_upload_restarts_clean(tmp_path, keys):
    data = tmp_path / "data"
    token = create_account(data, "alice")
    blob = os.urandom(600_000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    server = serve(data)
    gate = threading.Event()

    def body():
        yield blob[:300_000]
        gate.wait(20)
        yield blob[300_000:]

    def upload():
        try:
            httpx.put(f"{server.url}/v1/blobs/{digest}", content=body(),
                      headers={"authorization": f"Bearer {token}", "content-length": str(len(blob))}, timeout=30)  # fmt: skip
        except httpx.HTTPError:
            pass  # the server died under it

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        deadline = time.monotonic() + 20
        while not any(p.stat().st_size >= 300_000 for p in (data / "tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()  # SIGKILL: no handler runs, as in a crash
    finally:
        gate.set()
        uploader.join()
    assert [p.name[:7] for p in (data / "tmp").iterdir()] == ["upload-"]  # the crash left its temp file
    server = serve(data)
    try:
        assert list((data / "tmp").iterdir()) == []
        assert httpx.head(f"{server.url}/v1/blobs/{digest}").status_code == 404
        r = httpx.put(f"{server.url}/v1/blobs/{digest}", content=blob, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 201  # and the registry works as before
    finally:
        server.stop()


def _small_files():
    # The OS refuses writes past 256 KiB with EFBIG: a disk that fills up under the server.
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))


def test_a_full_disk_during_publish_leaves_no_version_and_no_temp_file(tmp_path, keys, make_bundle):
    data = tmp_path / "data"
    token = create_account(data, "alice")
    folder = make_bundle(tmp_path / "b", "alice/big", "1.0.0", keys[0], features=512, rank=256)  # 1 MiB of weights
    server = serve(data, preexec_fn=_small_files)
    try:
        with Client(server.url, token=token, cache_dir=tmp_path / "cache") as client:
            client.register_key("alice", keys[1])
            with pytest.raises(StorageError) as caught:
                client.push(folder)
            assert caught.value.code == "storage_error" and caught.value.status == 507
            assert no_version(server.url, "alice/big")
            with pytest.raises(NotFoundError):
                client.resolve("alice/big")
        assert list((data / "tmp").iterdir()) == []
        assert all(p.stat().st_size < 256 << 10 for p in (data / "blobs").rglob("*") if p.is_file())
    finally:
        server.stop()


def test_a_failing_rename_in_the_blob_store_fails_the_push_cleanly(tmp_path, keys, make_bundle, monkeypatch):
    """In-process (ASGI transport): the OS reports ENOSPC when the blob is renamed into place."""
    from starlette.testclient import TestClient

    from lwhub.server import create_app

    data = tmp_path / "data"
    token = create_account(data, "alice")
    folder = make_bundle(tmp_path / "b", "alice/x", "1.0.0", keys[0], features=64, rank=16)
    with TestClient(create_app(data)) as http, Client("http://testserver", token=token, cache_dir=tmp_path / "c", http=http) as client:
        client.register_key("alice", keys[1])

        def full(*args, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "replace", full)
        with pytest.raises(StorageError, match="disk is full"):
            client.push(folder)
        monkeypatch.undo()
        assert list((data / "tmp").iterdir()) == []
        with pytest.raises(NotFoundError):
            client.resolve("alice/x")
        assert client.push(folder).version == "1.0.0"  # space is back: the same push goes through


def test_recover_removes_old_orphan_blobs_and_keeps_referenced_ones(tmp_path):
    blobs, store = DirBlobStore(tmp_path), SQLiteStore(tmp_path / "registry.sqlite3")
    kept, orphan = b"referenced", b"never published"
    for data in (kept, orphan):
        writer = blobs.writer(hashlib.sha256(data).hexdigest())
        writer.write(data)
        writer.commit()
    kept_digest = "sha256:" + hashlib.sha256(kept).hexdigest()
    store.add_version(VersionInfo("alice/x", "1.0.0", kept_digest, kept_digest, 1, "k", 1.0), [kept_digest])
    assert recover(tmp_path) == {"temp": 0, "orphans": 0}  # young orphans may belong to a publish in flight
    assert recover(tmp_path, orphan_grace=-1) == {"temp": 0, "orphans": 1}
    assert blobs.size(hashlib.sha256(kept).hexdigest()) == len(kept)
    assert blobs.size(hashlib.sha256(orphan).hexdigest()) is None


def test_a_second_registry_on_a_port_in_use_is_refused(hub, tmp_path):
    """Granian binds with SO_REUSEPORT: without the check, both registries would answer, by turns."""
    import subprocess
    import sys
    from urllib.parse import urlsplit

    from lwhub.errors import UsageError

    port = urlsplit(hub.url).port
    with pytest.raises(UsageError, match=f"127.0.0.1:{port} is in use"):
        serve(tmp_path / "other", port=port)
    child = subprocess.run([sys.executable, "-m", "lwhub.server", str(tmp_path / "other"), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert child.returncode == 1 and "is in use" in child.stderr and "Traceback" not in child.stderr
    assert not (tmp_path / "other").exists()  # nothing made for a server that never started
    assert httpx.get(f"{hub.url}/v1/health").status_code == 200


def test_a_second_registry_on_a_served_data_directory_is_refused_and_removes_nothing(tmp_path, keys):
    """Its start-up recovery would delete the first registry's uploads in flight (their temp files)."""
    import subprocess
    import sys

    from lwhub.server.run import free_port

    data = tmp_path / "data"
    create_account(data, "alice")
    with serve(data) as first:
        in_flight = data / "tmp" / "upload-in-flight"
        in_flight.parent.mkdir(exist_ok=True)
        in_flight.write_bytes(b"half an upload")
        child = subprocess.run([sys.executable, "-m", "lwhub.server", str(data), "--port", str(free_port("127.0.0.1"))],
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert child.returncode == 1 and "another registry serves this data directory" in child.stderr, child.stderr[-500:]
        assert in_flight.read_bytes() == b"half an upload"
        assert httpx.get(f"{first.url}/v1/health").status_code == 200
    with serve(data) as again:  # the lock goes with the process that held it
        assert httpx.get(f"{again.url}/v1/health").status_code == 200


def test_the_data_directory_lock_is_let_go_when_serving_ends(tmp_path):
    """run_server releases it in a finally: the same process may serve the directory again."""
    from lwhub.errors import UsageError
    from lwhub.server.run import hold_data_dir, release_data_dir

    hold_data_dir(tmp_path / "data")
    try:
        with pytest.raises(UsageError, match="another registry serves"):  # flock: a second descriptor is refused
            hold_data_dir(tmp_path / "data")
    finally:
        release_data_dir()
    hold_data_dir(tmp_path / "data")
    release_data_dir()
