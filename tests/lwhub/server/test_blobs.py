"""The blob store: content addressing, atomic writes, and I/O failures that leave nothing behind."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from lwhub.errors import BadRequestError, StorageError, TooLargeError
from lwhub.server.blobs import DirBlobStore

DATA = os.urandom(300_000)
HEX = hashlib.sha256(DATA).hexdigest()


def upload(store: DirBlobStore, data: bytes, hexdigest: str) -> bool:
    writer = store.writer(hexdigest)
    for k in range(0, len(data), 65536):
        writer.write(data[k : k + 65536])
    return writer.commit()


def test_a_blob_lands_at_its_digest(tmp_path):
    store = DirBlobStore(tmp_path)
    assert upload(store, DATA, HEX) is True
    assert (tmp_path / "blobs" / "sha256" / HEX[:2] / HEX).read_bytes() == DATA
    assert upload(store, DATA, HEX) is False  # the same bytes again: one blob
    assert list(store.tmp.iterdir()) == []


def test_bytes_that_do_not_hash_to_the_digest_are_discarded(tmp_path):
    store = DirBlobStore(tmp_path)
    with pytest.raises(BadRequestError) as caught:
        upload(store, DATA[:-1] + bytes([DATA[-1] ^ 1]), HEX)  # not + b"!": the last random byte may be one
    assert caught.value.code == "digest_mismatch"
    assert store.size(HEX) is None and list(store.tmp.iterdir()) == []


def test_a_size_limit_stops_the_write(tmp_path):
    store = DirBlobStore(tmp_path)
    writer = store.writer(HEX, limit=100_000)
    with pytest.raises(TooLargeError):
        for k in range(0, len(DATA), 65536):
            writer.write(DATA[k : k + 65536])
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("call", ["write", "fsync", "replace"])
def test_a_full_disk_leaves_no_blob_and_no_temp_file(tmp_path, monkeypatch, call):
    store = DirBlobStore(tmp_path)

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, call, full)  # the operating system says: disk full
    with pytest.raises(StorageError, match="disk is full") as caught:
        upload(store, DATA, HEX)
    monkeypatch.undo()
    assert caught.value.code == "storage_error"
    assert store.size(HEX) is None and list(store.tmp.iterdir()) == []


def test_clean_temp_removes_leftovers(tmp_path):
    store = DirBlobStore(tmp_path)
    (store.tmp / "upload-dead").write_bytes(b"half")
    (store.scratch() / "bundle").mkdir()
    assert store.clean_temp() == 2 and list(store.tmp.iterdir()) == []
