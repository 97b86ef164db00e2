"""Stale uploads are swept while the registry runs; referenced, young and staged blobs are kept."""

from __future__ import annotations

import hashlib
import os

from starlette.testclient import TestClient

from lwhub.protocol import VersionInfo
from lwhub.server import create_account
from lwhub.server.app import create_app
from lwhub.server.blobs import DirBlobStore
from lwhub.server.store import SQLiteStore
from lwhub.server.sweep import sweep


def put(blobs: DirBlobStore, data: bytes) -> str:
    hexdigest = hashlib.sha256(data).hexdigest()
    writer = blobs.writer(hexdigest)
    writer.write(data)
    writer.commit()
    return hexdigest


def test_only_stale_unreferenced_blobs_and_temp_entries_are_swept(tmp_path):
    blobs, store = DirBlobStore(tmp_path), SQLiteStore(tmp_path / "registry.sqlite3")
    kept, orphan, staged = put(blobs, b"published"), put(blobs, b"never published"), put(blobs, b"being published")
    store.add_version(VersionInfo("alice/x", "1.0.0", f"sha256:{kept}", f"sha256:{kept}", 9, "k", 1.0), [f"sha256:{kept}"])
    stage = blobs.scratch()
    os.link(blobs.path(staged), stage / "weights")  # what a publish in flight holds
    leftover = blobs.tmp / "upload-crashed"
    leftover.write_bytes(b"half")

    assert sweep(store, blobs) == {"temp": 0, "orphans": 0}  # all of it is younger than the grace
    assert sweep(store, blobs, grace=-1, temp_grace=3600) == {"temp": 0, "orphans": 1}  # -1: every blob counts as old
    assert blobs.size(orphan) is None
    assert blobs.size(kept) == len(b"published") and blobs.size(staged) == len(b"being published")
    assert sorted(p.name for p in blobs.tmp.iterdir()) == sorted([stage.name, leftover.name])  # no sweep-* left behind
    assert sweep(store, blobs, temp_grace=-1) == {"temp": 2, "orphans": 0}  # the blob staged a moment ago is young
    assert list(blobs.tmp.iterdir()) == [] and blobs.size(staged) == len(b"being published")


def test_an_upload_triggers_a_background_sweep_when_one_is_due(tmp_path):
    data = tmp_path / "data"
    auth = {"authorization": f"Bearer {create_account(data, 'alice')}"}
    for every, due in [(3600.0, False), (0.0, True)]:
        app = create_app(data, orphan_grace=-1, sweep_every=every)  # grace -1: every unreferenced blob is stale
        abandoned = f"pushed with sweeps every {every} s, never published".encode()
        hexdigest = hashlib.sha256(abandoned).hexdigest()
        with TestClient(app) as http:
            assert http.put(f"/v1/blobs/sha256:{hexdigest}", content=abandoned, headers=auth).status_code == 201
        sweeper = app.state.sweeper
        assert (sweeper.thread is not None) is due
        if due:
            sweeper.thread.join(10)
            assert sweeper.last == {"temp": 0, "orphans": 2}  # this upload and the one before
        assert (DirBlobStore(data).size(hexdigest) is None) is due
