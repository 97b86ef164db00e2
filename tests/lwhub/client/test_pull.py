"""Pulls from a real registry: verification, trust, tampering, resume, cache repair, offline, rollback."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3

import httpx
import pytest

from lwformat.bundle.keys import load_private_key
from lwformat.bundle.manifest import MANIFEST, SIGNATURE, WEIGHTS
from lwformat.bundle.read import Bundle
from lwformat.bundle.signing import sign_bundle
from lwformat.bundle.verify import verify
from lwhub.client import Client
from lwhub.client.pull import _materials, _small
from lwhub.errors import (
    HubUnavailableError,
    IntegrityError,
    NotCachedError,
    NotFoundError,
    RollbackError,
    TooLargeError,
    TrustError,
)
from lwhub.trust import TrustStore

CHUNK = 1 << 16


class Counted(httpx.SyncByteStream):
    def __init__(self, inner, entry: list, cut: CutNetwork | None = None) -> None:
        self.inner, self.entry, self.cut = inner, entry, cut

    def __iter__(self):
        for piece in self.inner:
            if self.cut is not None and self.entry[2] + len(piece) >= self.cut.budget:
                piece = piece[: self.cut.budget - self.entry[2]]
                self.entry[2] += len(piece)
                yield piece
                self.cut.down = True
                raise httpx.ReadError("connection reset by peer")
            self.entry[2] += len(piece)
            yield piece

    def close(self) -> None:
        self.inner.close()


class Recording(httpx.HTTPTransport):
    """A real transport that logs [path, Range header, body bytes received] per request."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[list] = []

    def blob_bytes(self, hexdigest: str) -> int:
        return sum(n for path, _, n in self.log if path.endswith(hexdigest))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        entry = [request.url.path, request.headers.get("range"), 0]
        self.log.append(entry)
        stream = Counted(response.stream, entry, self.cut_for(request))
        return httpx.Response(response.status_code, headers=response.headers, stream=stream, extensions=response.extensions)

    def cut_for(self, request):
        return None


class CutNetwork(Recording):
    """The network breaks after `budget` bytes of the blob `hexdigest`, and stays down."""

    def __init__(self, hexdigest: str, budget: int) -> None:
        super().__init__()
        self.hexdigest, self.budget, self.down = hexdigest, budget, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("network is unreachable", request=request)
        return super().handle_request(request)

    def cut_for(self, request):
        return self if request.url.path.endswith(self.hexdigest) else None


@pytest.fixture
def published(request, hub, tmp_path, make_bundle):
    """alice/<test name>@1.0.0, ~1 MiB of weights in 16+ chunks; returns (name, folder, version info)."""
    name = "alice/" + request.node.name.removeprefix("test_").replace("_", "-")[:60]
    folder = make_bundle(tmp_path / "src", name, "1.0.0", hub.private, features=512, rank=256)
    return name, folder, hub.client(tmp_path / "publisher").push(folder)


def weights_hex(folder) -> str:
    return Bundle.open(folder).manifest.files[0].sha256


def server_blob(hub, hexdigest: str):
    return hub.data / "blobs" / "sha256" / hexdigest[:2] / hexdigest


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def test_a_pull_is_verified_and_a_second_pull_downloads_nothing(hub, published, tmp_path):
    name, folder, info = published
    net = Recording()
    client = hub.client(tmp_path / "cache", token=None, http=httpx.Client(transport=net))
    path = client.pull(name)
    with Bundle.open(path) as bundle:
        assert verify(bundle, [hub.public]) == info.key_id
        assert bundle.manifest.name == name
    assert (path / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    paths = [p for p, _, _ in net.log]
    assert paths[0] == f"/v1/bundles/{name}/resolve/latest/signed"
    assert not any(p.endswith((info.manifest, info.signature)) for p in paths)  # they came with the resolution
    before = len(net.log)
    assert client.pull(f"{name}@1.0.0") == path
    assert [p for p, _, _ in net.log[before:]] == [f"/v1/bundles/{name}/resolve/1.0.0/signed"]  # one request, no blob


def test_a_blob_tampered_on_the_server_is_refused_at_pull(hub, published, tmp_path):
    name, folder, _ = published
    flip(server_blob(hub, weights_hex(folder)), 2 * CHUNK + 100)
    client = hub.client(tmp_path / "cache")
    with pytest.raises(IntegrityError) as caught:
        client.pull(name)
    assert caught.value.path == WEIGHTS and caught.value.chunk == 2
    assert list((tmp_path / "cache" / "bundles").iterdir()) == [] and list((tmp_path / "cache" / "blobs").rglob("*.*")) == []
    assert client.trust.highest_seen(name) is None


def test_without_inline_bytes_the_manifest_and_signature_are_fetched_by_digest(hub, published, tmp_path):
    """What a pull does when the registry's blob store cannot inline them (`SignedVersion` fields None)."""
    name, folder, info = published
    net = Recording()
    client = hub.client(tmp_path / "cache", http=httpx.Client(transport=net))
    mhex, shex = info.manifest.removeprefix("sha256:"), info.signature.removeprefix("sha256:")
    manifest, signature = _materials(client, info, mhex, shex, (None, None))
    assert (manifest, signature) == ((folder / MANIFEST).read_bytes(), (folder / SIGNATURE).read_bytes())
    assert [p for p, _, _ in net.log] == [f"/v1/blobs/{info.manifest}", f"/v1/blobs/{info.signature}"]


class BeforeSignedRoute(httpx.HTTPTransport):
    """A registry from before ``resolve/{ref}/signed``: that route answers a plain 404."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/signed"):
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "Not Found", "detail": {}}})
        return super().handle_request(request)


def test_a_registry_without_the_signed_route_is_pulled_from_in_three_requests(hub, published, tmp_path):
    name, folder, _ = published
    client = hub.client(tmp_path / "cache", http=httpx.Client(transport=BeforeSignedRoute()))
    assert (client.pull(name) / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    with pytest.raises(NotFoundError) as caught:  # a real miss is still a miss, told by the plain resolve
        client.pull(f"{name}@9.9.9")
    assert caught.value.code == "version_not_found"


def test_an_inline_manifest_past_its_limit_is_refused(hub, published, tmp_path):
    _, _, info = published
    client = hub.client(tmp_path / "cache")
    with pytest.raises(TooLargeError):
        _small(client, info.manifest, b"{" * 101, 100, MANIFEST)


def test_a_pull_stands_when_the_trust_store_cannot_record_it(hub, published, tmp_path):
    name, folder, _ = published
    client = hub.client(tmp_path / "cache")
    owner, short = name.split("/")
    marker = client.trust.root / owner / f"{short}@1.0.0.seen"
    marker.symlink_to(tmp_path / "no-such-folder" / "marker")  # writing through it fails, even as root
    with pytest.warns(RuntimeWarning, match="rollback protection could not record"):
        path = client.pull(name)
    assert (path / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()


def test_a_pull_stands_when_the_cache_cannot_record_the_version(hub, published, tmp_path):
    """Everything verified and installed; only the ref for offline pulls could not be written."""
    name, folder, _ = published
    client = hub.client(tmp_path / "cache")
    ref = client.cache.root / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_bytes(b"")  # a file where the refs folder goes: writing under it fails, even as root
    with pytest.warns(RuntimeWarning, match="could not record the version for offline pulls"):
        path = client.pull(name)
    assert (path / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()


def test_a_manifest_or_signature_tampered_on_the_server_is_refused_at_pull(hub, published, tmp_path):
    name, folder, info = published
    for what, digest in [(MANIFEST, info.manifest), (SIGNATURE, info.signature)]:
        blob = server_blob(hub, digest.removeprefix("sha256:"))
        original = blob.read_bytes()
        flip(blob, 30)
        with pytest.raises(IntegrityError) as caught:
            hub.client(tmp_path / "cache").pull(name)
        assert caught.value.path == what
        blob.write_bytes(original)
    assert hub.client(tmp_path / "cache").pull(name).is_dir()


def test_a_signature_by_a_key_not_pinned_is_refused(hub, published, tmp_path, other_keys):
    """A compromised registry swaps in a valid signature by another key over the same files."""
    name, folder, info = published
    sign_bundle(folder, load_private_key(other_keys[0]))
    forged = (folder / SIGNATURE).read_bytes()
    digest = "sha256:" + hashlib.sha256(forged).hexdigest()
    assert httpx.put(f"{hub.url}/v1/blobs/{digest}", content=forged, headers={"authorization": f"Bearer {hub.token}"}).is_success
    with sqlite3.connect(hub.data / "registry.sqlite3") as db:
        db.execute("UPDATE versions SET signature = ? WHERE owner || '/' || name = ?", (digest, name))
    with pytest.raises(TrustError) as caught:
        hub.client(tmp_path / "cache").pull(name)
    assert caught.value.owner == "alice"
    assert list((tmp_path / "cache" / "bundles").iterdir()) == []


def test_keys_are_pinned_per_owner_and_trusted_on_first_use_only_when_asked(hub, published, tmp_path):
    name, _, info = published
    client = hub.client(tmp_path / "cache", pin=False)
    with pytest.raises(TrustError, match="no publisher key is pinned for 'alice'"):
        client.pull(name)
    assert client.pull(name, tofu=True).is_dir()
    assert client.trust.key_ids("alice") == [info.key_id]


def _owner_with_keys(hub, tmp_path, owner: str, count: int):
    """A new account on the live registry with `count` registered key pairs: (client, [(private, public)])."""
    from lwformat.bundle.keys import generate_keypair
    from lwhub.server import create_account

    publisher = Client(hub.url, token=create_account(hub.data, owner), cache_dir=tmp_path / "publisher")
    (tmp_path / "keys").mkdir()
    pairs = [generate_keypair(tmp_path / "keys", name=f"k{i}") for i in range(count)]
    for _, public in pairs:
        publisher.register_key(owner, public)
    return publisher, pairs


def test_trust_on_first_use_pins_the_registrys_keys_once_the_pull_verified(hub, tmp_path, make_bundle):
    """All of the owner's listed keys, as before, so bundles signed by another of them pull too."""
    from lwformat.bundle.keys import key_id, load_public_key

    publisher, pairs = _owner_with_keys(hub, tmp_path, "tofu-one", 3)
    publisher.push(make_bundle(tmp_path / "b", "tofu-one/style", "1.0.0", pairs[1][0], features=32, rank=8))
    publisher.push(make_bundle(tmp_path / "c", "tofu-one/other", "1.0.0", pairs[2][0], features=32, rank=8))
    client = hub.client(tmp_path / "cache", pin=False)
    assert client.pull("tofu-one/style", tofu=True).is_dir()
    assert sorted(client.trust.key_ids("tofu-one")) == sorted(key_id(load_public_key(pub)) for _, pub in pairs)
    assert client.pull("tofu-one/other").is_dir()  # signed by another of the owner's keys: pinned already


def test_trust_on_first_use_pins_nothing_when_the_signature_fails(hub, tmp_path, make_bundle, other_keys):
    publisher, _ = _owner_with_keys(hub, tmp_path, "tofu-two", 2)
    publisher.register_key("tofu-two", other_keys[1])
    publisher.push(make_bundle(tmp_path / "b", "tofu-two/style", "1.0.0", other_keys[0], features=32, rank=8))
    with sqlite3.connect(hub.data / "registry.sqlite3") as db:  # the key that signed drops out of the registry's list
        from lwformat.bundle.keys import key_id, load_public_key

        db.execute("DELETE FROM keys WHERE key_id = ?", (key_id(load_public_key(other_keys[1])),))
    client = hub.client(tmp_path / "cache", pin=False)
    with pytest.raises(TrustError, match="none of the keys the registry lists for 'tofu-two'.*nothing was pinned"):
        client.pull("tofu-two/style", tofu=True)
    assert client.trust.key_ids("tofu-two") == []


def test_trust_on_first_use_refuses_a_registry_listing_too_many_keys(hub, tmp_path, make_bundle):
    from lwhub.client.pull import MAX_TOFU_KEYS

    publisher, pairs = _owner_with_keys(hub, tmp_path, "tofu-many", MAX_TOFU_KEYS + 1)
    publisher.push(make_bundle(tmp_path / "b", "tofu-many/style", "1.0.0", pairs[0][0], features=32, rank=8))
    client = hub.client(tmp_path / "cache", pin=False)
    with pytest.raises(TrustError, match=f"more than {MAX_TOFU_KEYS} keys"):
        client.pull("tofu-many/style", tofu=True)
    assert client.trust.key_ids("tofu-many") == []


def test_a_registry_paging_forever_is_refused(tmp_path):
    """Trust on first use reads the owner's keys page by page: empty pages, or a page named twice, never end."""
    from lwhub.errors import ProtocolError

    asked = []

    def answer(request):
        asked.append(request.url.path)
        return httpx.Response(200, json={"items": [], "next": f"p{len(asked)}"})

    client = Client("http://registry.invalid", cache_dir=tmp_path, http=httpx.Client(transport=httpx.MockTransport(answer)))
    with pytest.raises(ProtocolError, match="empty page"):
        client.keys("alice")
    assert asked == ["/v1/owners/alice/keys"]

    key = {"key_id": "ab" * 32, "pem": "x", "created": 0.0}

    def same_page(request):  # one key, and the same next page, forever
        asked.append(request.url.params.get("page"))
        return httpx.Response(200, json={"items": [key], "next": "again"})

    asked.clear()
    client = Client("http://registry.invalid", cache_dir=tmp_path, http=httpx.Client(transport=httpx.MockTransport(same_page)))
    with pytest.raises(ProtocolError, match="names page 'again' a second time"):
        client.keys("alice")
    assert asked == [None, "again"]


@pytest.mark.parametrize("listing", ["keys", "search"])
def test_a_registry_handing_out_fresh_pages_forever_is_refused(tmp_path, listing):
    """A new token and a new item on every page: the listing stops at its bound, naming itself."""
    from lwhub.client.api import MAX_KEY_PAGES, MAX_PAGES
    from lwhub.errors import ProtocolError

    asked = []

    def fresh_page(request):
        asked.append(request.url.params.get("page"))
        item = {"key_id": f"k{len(asked)}", "pem": "x", "created": 0.0} if listing == "keys" else {"name": f"a/b{len(asked)}"}
        return httpx.Response(200, json={"items": [item], "next": f"p{len(asked)}"})

    client = Client("http://registry.invalid", cache_dir=tmp_path, http=httpx.Client(transport=httpx.MockTransport(fresh_page)))
    path, bound = ("/v1/owners/alice/keys", MAX_KEY_PAGES) if listing == "keys" else ("/v1/bundles", MAX_PAGES)
    with pytest.raises(ProtocolError, match=f"{path}: .* after {bound} pages"):
        list(client.keys("alice") if listing == "keys" else client.search())
    assert len(asked) == bound


def test_an_interrupted_pull_resumes_where_it_stopped(hub, published, tmp_path):
    name, folder, _ = published
    hexdigest, size = weights_hex(folder), (folder / WEIGHTS).stat().st_size
    budget = 5 * CHUNK + 1234  # the connection breaks inside chunk 5
    with pytest.raises(HubUnavailableError, match="pull again to resume"):
        hub.client(tmp_path / "cache", http=httpx.Client(transport=CutNetwork(hexdigest, budget))).pull(name)
    assert not (tmp_path / "cache" / "bundles").exists() or not any((tmp_path / "cache" / "bundles").iterdir())
    net = Recording()  # a later run, a working network
    path = hub.client(tmp_path / "cache", http=httpx.Client(transport=net)).pull(name)
    blob_requests = [(r, n) for p, r, n in net.log if p.endswith(hexdigest)]
    assert blob_requests == [(f"bytes={5 * CHUNK}-{size - 1}", size - 5 * CHUNK)]  # only the rest
    assert (path / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()


def test_a_corrupt_cache_entry_is_detected_and_fetched_again(hub, published, tmp_path):
    name, folder, _ = published
    client = hub.client(tmp_path / "cache")
    path = client.pull(name)
    flip(path / WEIGHTS, 7 * CHUNK)
    net = Recording()
    again = hub.client(tmp_path / "cache", http=httpx.Client(transport=net)).pull(name)
    assert net.blob_bytes(weights_hex(folder)) == (folder / WEIGHTS).stat().st_size
    assert (again / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()


def test_offline_pulls_come_from_the_cache(hub, published, tmp_path):
    name, folder, _ = published
    hub.client(tmp_path / "cache").pull(name)
    offline = Client(cache_dir=tmp_path / "cache", trust=tmp_path / "cache" / "trust", offline=True)  # no URL at all
    for ref in (name, f"{name}@1.0.0"):
        assert (offline.pull(ref) / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    with pytest.raises(NotCachedError):
        offline.pull(f"{name}@2.0.0")
    with pytest.raises(NotCachedError):
        offline.pull("alice/never-pulled")
    flip(offline.pull(name) / WEIGHTS, 100)
    with pytest.raises(IntegrityError, match="cannot be fetched again"):
        offline.pull(name)


def test_a_registry_offering_an_older_latest_is_refused(hub, published, tmp_path, make_bundle):
    name, _, _ = published
    newer = make_bundle(tmp_path / "v2", name, "1.1.0", hub.private, features=32, rank=8)
    publisher = hub.client(tmp_path / "publisher")
    publisher.push(newer)
    client = hub.client(tmp_path / "cache")
    assert client.pull(name).is_dir() and client.trust.highest_seen(name) == "1.1.0"
    publisher.yank(f"{name}@1.1.0")  # "latest" now resolves to 1.0.0
    with pytest.raises(RollbackError) as caught:
        client.pull(name)
    assert (caught.value.version, caught.value.seen) == ("1.0.0", "1.1.0")
    assert client.pull(f"{name}@1.0.0").is_dir()  # asked for by version: allowed
    assert client.pull(name, allow_rollback=True).is_dir()


def test_a_pre_release_pulled_on_purpose_does_not_hold_back_latest(hub, published, tmp_path, make_bundle):
    """`latest` is the highest release: it is compared with the releases seen, a pre-release tag with everything."""
    name, _, _ = published
    publisher = hub.client(tmp_path / "publisher")
    for version in ("1.1.0-rc.1", "1.1.0-rc.2"):
        publisher.push(make_bundle(tmp_path / version, name, version, hub.private, features=32, rank=8))
    client = hub.client(tmp_path / "cache")
    assert client.pull(f"{name}@1.1.0-rc.2").is_dir() and client.trust.highest_seen(name) == "1.1.0-rc.2"
    assert client.pull(name).is_dir()  # latest: 1.0.0, the highest release
    publisher.set_tag(name, "beta", "1.1.0-rc.1")
    with pytest.raises(RollbackError) as caught:
        client.pull(f"{name}@beta")  # a pre-release below the one already verified
    assert (caught.value.version, caught.value.seen) == ("1.1.0-rc.1", "1.1.0-rc.2")


def test_rollback_protection_outlives_the_cache(hub, published, tmp_path, make_bundle):
    name, _, _ = published
    publisher = hub.client(tmp_path / "publisher")
    publisher.push(make_bundle(tmp_path / "v2", name, "1.1.0", hub.private, features=32, rank=8))
    trust = TrustStore(tmp_path / "config" / "trust")  # where settings from the environment keep it
    trust.pin("alice", hub.public)
    assert hub.client(tmp_path / "cache", trust=trust, pin=False).pull(name).is_dir()
    shutil.rmtree(tmp_path / "cache")
    publisher.yank(f"{name}@1.1.0")
    with pytest.raises(RollbackError):
        hub.client(tmp_path / "cache", trust=trust, pin=False).pull(name)


def test_an_endless_answer_from_a_registry_is_refused_not_buffered(tmp_path):
    from lwhub.client.wire import MAX_ANSWER
    from lwhub.errors import ProtocolError

    sent = []

    def endless():  # a hostile registry: a JSON answer that never ends
        while True:
            sent.append(1 << 20)
            yield b" " * (1 << 20)

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=endless()))
    client = Client("http://registry.invalid", cache_dir=tmp_path, http=httpx.Client(transport=transport))
    with pytest.raises(ProtocolError, match="larger than"):
        client.info("alice/noir")
    assert sum(sent) <= MAX_ANSWER + (2 << 20)  # it stopped reading right after the cap


def test_a_version_served_with_another_versions_manifest_is_refused(hub, published, tmp_path, make_bundle):
    """A compromised registry answers 2.0.0 with 1.0.0's genuine manifest and signature (a rollback in disguise)."""
    name, _, first = published
    hub.client(tmp_path / "publisher").push(make_bundle(tmp_path / "v2", name, "2.0.0", hub.private, features=32, rank=8))
    owner, short = name.split("/")
    with sqlite3.connect(hub.data / "registry.sqlite3") as db:
        db.execute("UPDATE versions SET manifest = ?, signature = ? WHERE owner = ? AND name = ? AND version = ?",
                   (first.manifest, first.signature, owner, short, "2.0.0"))  # fmt: skip
    client = hub.client(tmp_path / "cache")
    with pytest.raises(IntegrityError) as caught:
        client.pull(f"{name}@2.0.0")
    assert caught.value.path == MANIFEST
    assert (caught.value.expected, caught.value.found) == (f"{name}@2.0.0", f"{name}@1.0.0")
    assert client.trust.highest_seen(name) is None
    assert client.cache.cached_version(name, "2.0.0") is None
    assert list((tmp_path / "cache" / "bundles").iterdir()) == []


def test_an_explicit_version_must_be_answered_with_that_version(hub, tmp_path, make_bundle):
    """A hostile registry answers ``@1.0.0`` with a genuine, signed 2.0.0: asked for one version, the pull takes no other."""
    import msgspec

    from lwformat.bundle.keys import key_id, load_public_key
    from lwhub.errors import ProtocolError
    from lwhub.protocol import SignedVersion, VersionInfo

    name = "alice/answered-with-another-version"
    folder = make_bundle(tmp_path / "v2", name, "2.0.0", hub.private, features=32, rank=8)
    manifest, signature, weights = ((folder / f).read_bytes() for f in (MANIFEST, SIGNATURE, WEIGHTS))
    info = VersionInfo(name, "2.0.0", "sha256:" + hashlib.sha256(manifest).hexdigest(), "sha256:" + hashlib.sha256(signature).hexdigest(),
                       len(weights), key_id(load_public_key(hub.public)), 0.0)  # fmt: skip
    asked = []

    def registry(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path == f"/v1/bundles/{name}/resolve/1.0.0/signed":
            return httpx.Response(200, content=msgspec.json.encode(SignedVersion(info, manifest, signature)))
        if request.url.path == f"/v1/bundles/{name}/resolve/1.0.0":
            return httpx.Response(200, content=msgspec.json.encode(info))
        if request.url.path == f"/v1/blobs/sha256:{weights_hex(folder)}":
            return httpx.Response(200, content=iter([weights]))  # streamed, as a download reads it
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "Not Found", "detail": {}}})

    client = Client("http://registry.invalid", cache_dir=tmp_path / "cache", http=httpx.Client(transport=httpx.MockTransport(registry)))
    client.trust.pin("alice", hub.public)
    with pytest.raises(ProtocolError, match="asked for"):
        client.pull(f"{name}@1.0.0")
    assert asked == [f"/v1/bundles/{name}/resolve/1.0.0/signed"]  # refused on the answer: nothing fetched
    assert client.trust.highest_seen(name) is None
    assert list((tmp_path / "cache" / "bundles").iterdir()) == [] and client.cache.cached_version(name, "2.0.0") is None


def test_a_corrupt_cached_signature_is_not_trusted_but_fetched_again(hub, published, tmp_path):
    name, folder, info = published
    path = hub.client(tmp_path / "cache").pull(name)
    flip(path / SIGNATURE, 100)
    with pytest.raises(NotCachedError):  # offline, the damaged copy is no copy
        Client(cache_dir=tmp_path / "cache", trust=tmp_path / "cache" / "trust", offline=True).pull(name)
    net = Recording()
    again = hub.client(tmp_path / "cache", http=httpx.Client(transport=net)).pull(name)
    assert again == path
    assert (again / SIGNATURE).read_bytes() == (folder / SIGNATURE).read_bytes()  # replaced, not kept
    with Bundle.open(again) as bundle:
        assert verify(bundle, [hub.public]) == info.key_id
    assert [p for p, _, _ in net.log] == [f"/v1/bundles/{name}/resolve/latest/signed"]  # the signature came with it
    assert net.blob_bytes(weights_hex(folder)) == 0  # the weights' blob was verified in the cache, not fetched


def _signed_by_lying_shards(folder, private, shard: int) -> bytes:
    """A valid signature by shards of `shard` bytes: the manifest's right, one shard of the weights wrong."""
    from lwformat.bundle.signing import (
        list_files,
        shard_digests,
        shard_names,
        sign_statement,
        statement_for,
    )

    digests = shard_digests(folder, shard_names(folder, list_files(folder), shard))
    lie = [n for n in digests if n.startswith(f"{WEIGHTS}:")][2]
    digests[lie] = hashlib.sha256(b"other bytes").hexdigest()
    return sign_statement(statement_for(digests, model_name=folder.name, shard_size=shard), load_private_key(private))


def test_a_signature_by_other_shards_that_lie_about_the_files_is_refused_at_publish_and_at_pull(hub, tmp_path, make_bundle):
    from lwhub.errors import PublishRejectedError

    name, shard = "alice/other-shards-that-lie", 3 * CHUNK + 7  # no multiple of the chunk size
    folder = make_bundle(tmp_path / "src", name, "1.0.0", None, features=512, rank=256)
    lying = _signed_by_lying_shards(folder, hub.private, shard)
    sign_bundle(folder, load_private_key(hub.private), shard_size=shard)
    honest = (folder / SIGNATURE).read_bytes()
    (folder / SIGNATURE).write_bytes(lying)
    publisher = hub.client(tmp_path / "publisher")
    with pytest.raises(PublishRejectedError) as caught:
        publisher.push(folder)
    assert caught.value.code == "signature_invalid"
    with pytest.raises(NotFoundError):
        publisher.resolve(f"{name}@1.0.0")
    # A compromised registry serves it anyway: the honest bundle published, its signature swapped for the lying one.
    (folder / SIGNATURE).write_bytes(honest)
    publisher.push(folder)
    digest = "sha256:" + hashlib.sha256(lying).hexdigest()
    assert httpx.put(f"{hub.url}/v1/blobs/{digest}", content=lying, headers={"authorization": f"Bearer {hub.token}"}).is_success
    with sqlite3.connect(hub.data / "registry.sqlite3") as db:
        db.execute("UPDATE versions SET signature = ? WHERE owner || '/' || name = ?", (digest, name))
    client = hub.client(tmp_path / "cache")
    with pytest.raises(TrustError):
        client.pull(name)
    assert list((tmp_path / "cache" / "bundles").iterdir()) == []
    assert client.trust.highest_seen(name) is None and client.cache.cached_version(name, "1.0.0") is None
