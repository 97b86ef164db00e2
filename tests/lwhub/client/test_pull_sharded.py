"""Pulls of bundles signed by shards of another size than the manifest's chunks.

The chunk digests the download is checked against come from the manifest, so the
manifest must be authenticated by the signature before any large download, even when
the signature's shards cannot be compared with the chunks.
"""

from __future__ import annotations

import hashlib
import sqlite3

import httpx
import pytest

from lwformat.bundle.keys import load_private_key
from lwformat.bundle.manifest import MANIFEST, WEIGHTS
from lwformat.bundle.read import Bundle
from lwformat.bundle.signing import sign_bundle
from lwhub.errors import IntegrityError

from .test_pull import CHUNK, Recording

SHARD = 3 * CHUNK + 7  # no multiple of the chunk size


@pytest.fixture
def sharded(request, hub, tmp_path, make_bundle):
    """alice/<test name>@1.0.0 signed by shards of SHARD bytes, published: (name, folder)."""
    name = "alice/" + request.node.name.removeprefix("test_").replace("_", "-")[:60]
    folder = make_bundle(tmp_path / "src", name, "1.0.0", None, features=512, rank=256)
    sign_bundle(folder, load_private_key(hub.private), shard_size=SHARD)
    hub.client(tmp_path / "publisher").push(folder)
    return name, folder


def test_a_bundle_signed_by_other_shards_pulls_verified(hub, sharded, tmp_path):
    name, folder = sharded
    path = hub.client(tmp_path / "cache").pull(name)
    assert (path / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()


def test_a_swapped_manifest_is_refused_before_any_download(hub, sharded, tmp_path, make_bundle):
    """A compromised registry serves another manifest (other chunk digests) with the genuine signature."""
    name, _ = sharded
    forged = make_bundle(tmp_path / "forged", name, "1.0.0", None, features=512, rank=256)
    upload = {"authorization": f"Bearer {hub.token}"}
    for path in (forged / MANIFEST, forged / WEIGHTS):
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        assert httpx.put(f"{hub.url}/v1/blobs/{digest}", content=path.read_bytes(), headers=upload).is_success
    manifest = "sha256:" + hashlib.sha256((forged / MANIFEST).read_bytes()).hexdigest()
    with sqlite3.connect(hub.data / "registry.sqlite3") as db:
        db.execute("UPDATE versions SET manifest = ? WHERE owner || '/' || name = ?", (manifest, name))
    net = Recording()
    client = hub.client(tmp_path / "cache", http=httpx.Client(transport=net))
    with pytest.raises(IntegrityError, match="does not match the manifest") as caught:
        client.pull(name)
    assert caught.value.path == MANIFEST
    weights = Bundle.open(forged).manifest.files[0].sha256
    assert net.blob_bytes(weights) == 0  # refused on two small requests: no weights were fetched
    assert not any((tmp_path / "cache" / "partial").iterdir()) and not any((tmp_path / "cache" / "bundles").iterdir())
