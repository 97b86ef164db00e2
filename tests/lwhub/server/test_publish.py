"""The publish transaction on a real server: what it refuses, and that refusals leave nothing visible.

Tampered bundles are sent with plain HTTP (the client would refuse them before uploading).
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

import httpx
import msgspec
import pytest

from lwformat.bundle.canonical import dumps, loads
from lwformat.bundle.keys import load_private_key
from lwformat.bundle.manifest import MANIFEST, SIGNATURE, WEIGHTS
from lwformat.bundle.signing import sign_bundle
from lwhub.errors import ConflictError
from lwhub.server import create_account


def put_blob(hub, data: bytes, token: str | None = None) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = httpx.put(f"{hub.url}/v1/blobs/{digest}", content=data, headers={"authorization": f"Bearer {token or hub.token}"})
    assert r.status_code in (200, 201), r.text
    return digest


def publish_raw(hub, folder: Path, name: str, version: str, token: str | None = None) -> httpx.Response:
    """Upload every file of `folder` as it is, then ask to publish it as name@version."""
    for f in folder.iterdir():
        put_blob(hub, f.read_bytes(), token)
    body = {"manifest": put_blob(hub, (folder / MANIFEST).read_bytes(), token),
            "signature": put_blob(hub, (folder / SIGNATURE).read_bytes(), token)}  # fmt: skip
    return httpx.post(f"{hub.url}/v1/bundles/{name}/versions/{version}", json=body,
                      headers={"authorization": f"Bearer {token or hub.token}"})  # fmt: skip


def code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def nothing_visible(hub, name: str, version: str) -> bool:
    return httpx.get(f"{hub.url}/v1/bundles/{name}/versions/{version}").status_code == 404


def edit_manifest(folder: Path, **changes) -> None:
    m = loads((folder / MANIFEST).read_bytes())
    (folder / MANIFEST).write_bytes(dumps(msgspec.structs.replace(m, **changes)))


@pytest.fixture
def bundle(request, tmp_path, hub, make_bundle):
    """A signed bundle alice/<test name>@1.0.0 (each test publishes under its own name)."""
    name = "alice/" + request.node.name.removeprefix("test_").replace("_", "-")[:60]
    return make_bundle(tmp_path / "b", name, "1.0.0", hub.private, features=128, rank=128), name  # 3 chunks


def test_an_untouched_bundle_publishes_and_a_retry_of_it_is_answered_by_its_record(hub, bundle, tmp_path, make_bundle):
    bundle, name = bundle
    r = publish_raw(hub, bundle, name, "1.0.0")
    assert r.status_code == 201 and r.json()["version"] == "1.0.0"
    again = publish_raw(hub, bundle, name, "1.0.0")  # the same signed bundle: a push whose answer was lost
    assert again.status_code == 200 and again.json() == r.json()
    other = make_bundle(tmp_path / "other", name, "1.0.0", hub.private, features=128, rank=128, seed=9)
    clash = publish_raw(hub, other, name, "1.0.0")
    assert clash.status_code == 409 and code(clash) == "version_exists"
    twin = make_bundle(tmp_path / "twin", name, "1.0.0+b1", hub.private, features=128, rank=128)
    clash = publish_raw(hub, twin, name, "1.0.0+b1")  # equal to 1.0.0 in version order
    assert clash.status_code == 409 and code(clash) == "version_exists" and "build metadata" in clash.text


def test_bytes_that_do_not_match_their_digest_are_refused_on_upload(hub, bundle):
    bundle, name = bundle
    data = (bundle / WEIGHTS).read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = httpx.put(f"{hub.url}/v1/blobs/{digest}", content=data[:-1] + bytes([data[-1] ^ 1]), headers={"authorization": f"Bearer {hub.token}"})
    assert r.status_code == 400 and code(r) == "digest_mismatch"
    assert httpx.head(f"{hub.url}/v1/blobs/{digest}").status_code == 404


def test_a_tampered_weights_file_is_refused(hub, bundle):
    bundle, name = bundle
    data = bytearray((bundle / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / WEIGHTS).write_bytes(bytes(data))  # uploaded under its own digest: not the one the manifest lists
    r = publish_raw(hub, bundle, name, "1.0.0")
    assert r.status_code == 422 and code(r) == "blob_missing" and r.json()["error"]["detail"]["path"] == WEIGHTS
    assert nothing_visible(hub, name, "1.0.0")


def test_a_manifest_changed_after_signing_is_refused(hub, bundle):
    bundle, name = bundle
    edit_manifest(bundle, description="now with malware")
    r = publish_raw(hub, bundle, name, "1.0.0")
    assert r.status_code == 422 and code(r) == "signature_invalid"
    assert nothing_visible(hub, name, "1.0.0")


def test_a_signed_manifest_whose_chunks_lie_is_refused(hub, bundle):
    bundle, name = bundle
    m = loads((bundle / MANIFEST).read_bytes())
    lying = [msgspec.structs.replace(m.files[0], chunks=[m.files[0].chunks[1], *m.files[0].chunks[1:]])]
    edit_manifest(bundle, version="1.0.2", files=lying)
    sign_bundle(bundle, load_private_key(hub.private))  # the publisher's own key: only the chunk check can catch it
    r = publish_raw(hub, bundle, name, "1.0.2")
    assert r.status_code == 422 and code(r) == "blob_mismatch" and r.json()["error"]["detail"]["chunk"] == 0
    assert nothing_visible(hub, name, "1.0.2")


def _publish_sharded(hub, bundle, name: str, size: int) -> None:
    m = loads((bundle / MANIFEST).read_bytes())
    key = load_private_key(hub.private)
    sign_bundle(bundle, key, shard_size=size)
    r = publish_raw(hub, bundle, name, "1.0.0")
    assert r.status_code == 201, r.text
    lying = [msgspec.structs.replace(m.files[0], chunks=[m.files[0].chunks[1], *m.files[0].chunks[1:]])]
    edit_manifest(bundle, version="1.0.1", files=lying)
    sign_bundle(bundle, key, shard_size=size)  # signed over the true file bytes, next to a manifest that lies
    r = publish_raw(hub, bundle, name, "1.0.1")
    assert r.status_code == 422 and code(r) in ("blob_mismatch", "signature_invalid")
    assert nothing_visible(hub, name, "1.0.1")


def test_a_signature_by_shards_of_the_chunk_size_is_checked_against_the_manifest(hub, bundle):
    bundle, name = bundle
    _publish_sharded(hub, bundle, name, loads((bundle / MANIFEST).read_bytes()).chunk_size)


def test_a_signature_by_other_shards_is_checked_against_the_files(hub, bundle):
    bundle, name = bundle
    _publish_sharded(hub, bundle, name, loads((bundle / MANIFEST).read_bytes()).chunk_size // 3 + 5)


def test_a_tampered_or_foreign_signature_is_refused(hub, bundle, other_keys):
    bundle, name = bundle
    sig = bytearray((bundle / SIGNATURE).read_bytes())
    at = sig.index(b'"sig":"') + 20
    sig[at] = ord("A") if sig[at] != ord("A") else ord("B")
    (bundle / SIGNATURE).write_bytes(bytes(sig))
    r = publish_raw(hub, bundle, name, "1.0.0")
    assert r.status_code == 422 and code(r) == "signature_invalid"
    sign_bundle(bundle, load_private_key(other_keys[0]))  # a valid signature, by a key alice never registered
    r = publish_raw(hub, bundle, name, "1.0.0")
    assert r.status_code == 422 and code(r) == "signature_invalid"
    assert nothing_visible(hub, name, "1.0.0")


def test_a_manifest_published_under_another_name_is_refused(hub, bundle):
    bundle, name = bundle
    r = publish_raw(hub, bundle, name + "-elsewhere", "1.0.0")
    assert r.status_code == 422 and code(r) == "manifest_mismatch"
    r = publish_raw(hub, bundle, name, "1.0.3")
    assert r.status_code == 422 and code(r) == "manifest_mismatch"


def test_an_owner_without_a_publisher_key_cannot_publish(hub, tmp_path, make_bundle):
    carol = create_account(hub.data, "carol")
    folder = make_bundle(tmp_path / "c", "carol/first", "1.0.0", hub.private, features=32, rank=8)
    r = publish_raw(hub, folder, "carol/first", "1.0.0", token=carol)
    assert r.status_code == 422 and code(r) == "no_publisher_key"


def test_racing_publishes_of_one_version_have_exactly_one_winner(hub, tmp_path, make_bundle):
    """Eight clients publish alice/race@1.0.0 at once, four from each of two bundles: one bundle wins."""
    folders = [make_bundle(tmp_path / f"b{k}", "alice/race", "1.0.0", hub.private, features=64, rank=32) for k in range(2)]
    manifests = {"sha256:" + hashlib.sha256((f / MANIFEST).read_bytes()).hexdigest() for f in folders}
    barrier, outcomes = threading.Barrier(8), []

    def publish(k: int) -> None:
        client = hub.client(tmp_path / f"cache{k}")
        barrier.wait()
        try:
            outcomes.append(client.push(folders[k % 2]).manifest)
        except ConflictError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=publish, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    published = [o for o in outcomes if o != "version_exists"]  # the winner, and the pushes of its very bundle
    assert len(outcomes) == 8 and len(published) == 4 and len(set(published)) == 1 and published[0] in manifests
    assert httpx.get(f"{hub.url}/v1/bundles/alice/race/versions/1.0.0").json()["manifest"] == published[0]
    shutil.rmtree(tmp_path)


def test_a_blob_swept_after_the_check_is_blob_missing_not_an_internal_error(tmp_path, bundle, keys):
    """The sweep may remove an orphan past its grace between the publish's check and its staging."""
    from lwformat.bundle.keys import load_public_key
    from lwhub.errors import PublishRejectedError
    from lwhub.server.blobs import DirBlobStore
    from lwhub.server.publish import _verify_staged

    folder, _ = bundle
    blobs = DirBlobStore(tmp_path / "blobs")
    digests = {}
    for name in (MANIFEST, SIGNATURE, WEIGHTS):
        data = (folder / name).read_bytes()
        digests[name] = hashlib.sha256(data).hexdigest()
        writer = blobs.writer(digests[name])
        writer.write(data)
        writer.commit()
    blobs.delete(digests[WEIGHTS])  # what the sweep does, a moment after the check found it
    manifest_bytes, signature = (folder / MANIFEST).read_bytes(), (folder / SIGNATURE).read_bytes()
    with pytest.raises(PublishRejectedError) as caught:
        _verify_staged(blobs, digests[MANIFEST], digests[SIGNATURE], loads(manifest_bytes), [load_public_key(keys[1])],
                       (manifest_bytes, signature))  # fmt: skip
    assert caught.value.code == "blob_missing" and caught.value.detail["path"] == WEIGHTS
