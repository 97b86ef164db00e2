"""Pull: resolve, check trust and rollback, fetch verified blobs, install a bundle directory.

    1. resolve the ref (online: the registry, which sends the manifest and signature
       along; offline: the cache's records)
    2. rollback: a tag that resolves below the highest version verified here is refused
       (a release is compared with the releases verified; an explicit ``@version`` is
       what the user asked for, so it passes)
    3. manifest and signature: from the cached bundle directory when their digests
       match, else the bytes sent with the resolution (or fetched by digest), hashed
    4. the signature must verify with a key pinned for the owner (pinned on first use
       only with ``tofu=True``) and list exactly the manifest's digests (or, when it is
       sharded by another size than the manifest's chunks, the manifest's own shards and
       every file's shard names); this happens before any large download, so an
       untrusted bundle, or chunk digests the signer did not sign, cost two small requests
    5. files: a cached bundle directory is re-hashed chunk by chunk in parallel; on any
       mismatch it is dropped, and each file comes from a verified cached blob or is
       downloaded (`download.Fetcher`)
    6. the bundle directory is built in the cache's temp area and renamed into place;
       the version is recorded (for offline use) and marked seen in the trust store (for
       rollback checks; clearing the cache keeps them)

The files are bound to the signer through the chunk digests of the signed manifest,
so they are not hashed a second time as whole files.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from lwformat.bundle.canonical import loads as load_manifest
from lwformat.bundle.keys import loads_public_key
from lwformat.bundle.limits import MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES
from lwformat.bundle.manifest import MANIFEST, SIGNATURE, Manifest
from lwformat.bundle.signing import check_against_manifest, verify_signature
from lwformat.errors import (
    LWFormatError,
    SignatureError,
    SignedFileMismatchError,
    UntrustedSignatureError,
)

from ..errors import (
    IntegrityError,
    NotCachedError,
    NotFoundError,
    ProtocolError,
    RefError,
    RollbackError,
    TooLargeError,
    TrustError,
)
from ..protocol import API, OWNER, TAG, KeyInfo, SignedVersion, VersionInfo, digest_hex
from ..semver import is_prerelease, is_valid, newer
from .download import Fetcher, FileJob, verify_file

if TYPE_CHECKING:
    from ..trust import TrustStore
    from .api import Client


def parse_ref(ref: str) -> tuple[str, str, str]:
    """``owner/name[@version|@tag]`` -> (owner, name, version or tag; "latest" by default)."""
    full, _, want = ref.partition("@")
    owner, _, name = full.partition("/")
    want = want or "latest"
    if not (OWNER.match(owner) and OWNER.match(name) and (is_valid(want) or TAG.match(want))):
        raise RefError(f"{ref!r} is not a bundle reference 'owner/name', 'owner/name@1.2.3' or 'owner/name@tag' "
                       "(lowercase letters, digits, '_', '.', '-')")  # fmt: skip
    return owner, name, want


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_rollback(client: Client, full: str, want: str, version: str, allow: bool) -> None:
    # A tag naming a release is held to the releases seen: pulling 2.0.0-rc.1 on purpose
    # must not make `latest` (the highest release, 1.5.0) look like a rollback.
    seen = client.trust.highest_seen(full, releases_only=not is_prerelease(version))
    if seen and newer(seen, version) and not allow and not is_valid(want):
        raise RollbackError(
            f"{full}@{want} resolves to {version}, older than {seen} which this client already verified "
            f"(yanked upstream, or a rollback attack): pull {full}@{version} explicitly, or pass --allow-rollback "
            f"(allow_rollback=True)",
            name=full, version=version, seen=seen,
        )  # fmt: skip


MAX_TOFU_KEYS = 32  # keys a registry may list for one owner when trusting it on first use


def how_to_pin(trust: TrustStore, owner: str) -> str:
    """How to pin a key in `trust`: `lwhub trust add` pins into the default trust store only."""
    from .settings import trust_dir

    if os.path.realpath(trust.root) == os.path.realpath(trust_dir()):
        return f"`lwhub trust add {owner} KEY.pub`"
    return f"client.trust.pin({owner!r}, 'KEY.pub'): this client's trust store is {trust.root}, not {trust_dir()}"


def _trusted_keys(client: Client, owner: str, tofu: bool) -> tuple[list, bool]:
    """The keys to verify with, and whether they are the registry's, to pin once one verifies."""
    keys = client.trust.keys(owner)
    if keys or not tofu:
        if not keys:
            raise TrustError(
                f"no publisher key is pinned for {owner!r} in {client.trust.root}: pin the owner's public key "
                f"({how_to_pin(client.trust, owner)}), or pull with --tofu (tofu=True) to trust the registry's keys on first use",
                owner=owner,
            )  # fmt: skip
        return keys, False
    if client.offline:
        raise TrustError(f"no publisher key is pinned for {owner!r}, and offline the registry's keys cannot be fetched", owner=owner)
    listed = []
    for key in client.pages(f"{API}/owners/{owner}/keys", KeyInfo):
        if len(listed) == MAX_TOFU_KEYS:
            raise TrustError(f"the registry lists more than {MAX_TOFU_KEYS} keys for {owner!r}: pin the right one yourself "
                             f"({how_to_pin(client.trust, owner)})", owner=owner)  # fmt: skip
        try:
            listed.append(loads_public_key(key.pem.encode()))
        except LWFormatError as exc:
            raise ProtocolError(f"the registry lists a key for {owner!r} that is not a P-256 public key: {exc}") from exc
    return listed, True


def check_signature(signature: bytes, manifest_bytes: bytes, manifest: Manifest, keys: list, owner: str,
                    trust: TrustStore, listed: bool = False) -> bool:  # fmt: skip
    """Verify the envelope and what it lists against the manifest, before any large download.

    True when that settles the files too; False when the signature's shards are not the
    manifest's chunks, and the files' shards are checked once downloaded
    (`lwformat.bundle.signing.check_against_manifest`). `trust` is the store `keys` came
    from: a refusal says how to pin a new key there.
    """
    full = f"{manifest.name}@{manifest.version}"
    try:
        _, settled = check_against_manifest(signature, manifest_bytes, manifest, keys)
    except UntrustedSignatureError as exc:
        if listed:  # trust on first use: nothing is pinned yet
            raise TrustError(f"{full}: signed by none of the keys the registry lists for {owner!r} ({exc}); nothing was "
                             f"pinned", owner=owner) from exc  # fmt: skip
        raise TrustError(f"{full}: signed by none of the keys pinned for {owner!r} ({exc}); if {owner} has a new key, "
                         f"check it with them, then pin it ({how_to_pin(trust, owner)})", owner=owner) from exc
    except SignedFileMismatchError as exc:
        raise IntegrityError(f"{full}: the signature does not match the manifest: {exc}", path=exc.path,
                             expected=str(exc.expected), found=str(exc.found)) from exc  # fmt: skip
    except SignatureError as exc:
        raise TrustError(f"{full}: {exc}", owner=owner) from exc
    return settled


def _jobs(manifest: Manifest) -> list[FileJob]:
    return [FileJob(f.path, f.sha256, f.size, tuple(f.chunks), manifest.chunk_size) for f in manifest.files]


def _resolve(client: Client, ref: str, owner: str, name: str, want: str) -> tuple[VersionInfo, tuple[bytes | None, bytes | None]]:
    """The version record of `ref` (parsed: `owner`, `name`, `want`) and, online, the
    manifest and signature bytes the registry sent with it."""
    if client.offline:
        return client.resolve(ref), (None, None)
    try:
        signed = client.get(f"{API}/bundles/{owner}/{name}/resolve/{want}/signed", SignedVersion)
    except NotFoundError as exc:
        if exc.code != "not_found":  # no such bundle, version or tag
            raise
        return client.resolve(ref), (None, None)  # a registry from before the route
    return signed.info, (signed.manifest, signed.signature)


def _materials(client: Client, info: VersionInfo, mhex: str, shex: str, sent: tuple[bytes | None, bytes | None]) -> tuple[bytes, bytes]:
    """The manifest and signature bytes: from the cached bundle directory when their digests
    match, else as the registry sent them with the resolution, else fetched by digest."""
    folder = client.cache.bundle_dir(mhex)
    with client.cache.holding_bundle_dir(mhex) as held:  # the directory read from (installs are atomic)
        if held is not None:
            try:
                m, s = (folder / MANIFEST).read_bytes(), (folder / SIGNATURE).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                pass  # damaged
            else:
                if _sha(m) == mhex and _sha(s) == shex:
                    return m, s
        if client.offline:
            raise NotCachedError(f"{info.name}@{info.version} is not in the cache at {client.cache.root} (offline)", path=str(client.cache.root))
        if held is not None:  # that directory, damaged: not one another process may have installed since
            client.cache.drop_bundle(mhex, held=held)
    # URLs from the checked hex digests, never from the registry's strings as sent.
    return (_small(client, f"sha256:{mhex}", sent[0], MAX_MANIFEST_BYTES, MANIFEST),
            _small(client, f"sha256:{shex}", sent[1], MAX_SIGNATURE_BYTES, SIGNATURE))  # fmt: skip


def _small(client: Client, digest: str, sent: bytes | None, limit: int, what: str) -> bytes:
    """A manifest or signature: the bytes sent, else fetched by digest; they must hash to `digest`."""
    data = client.blob_bytes(digest, limit) if sent is None else sent
    if len(data) > limit:
        raise TooLargeError(f"{what} {digest} is larger than the {limit} bytes allowed", code="too_large")
    if "sha256:" + _sha(data) != digest:
        raise IntegrityError(f"{what}: the registry sent bytes that do not hash to {digest}", path=what, expected=digest, found="sha256:" + _sha(data))
    return data


def _manifest(data: bytes, info: VersionInfo) -> Manifest:
    try:
        manifest = load_manifest(data)
    except LWFormatError as exc:
        raise IntegrityError(f"{info.name}@{info.version}: {exc}", path=MANIFEST, expected=info.manifest, found="invalid") from exc
    if (manifest.name, manifest.version) != (info.name, info.version):
        raise IntegrityError(f"{info.name}@{info.version}: the manifest is {manifest.name}@{manifest.version}", path=MANIFEST,
                             expected=f"{info.name}@{info.version}", found=f"{manifest.name}@{manifest.version}")  # fmt: skip
    return manifest


def _install(client: Client, info: VersionInfo, mhex: str, materials: tuple[bytes, bytes], jobs: list[FileJob], progress) -> Path:
    """The verified bundle directory: the cached one if every file checks, else rebuilt from verified blobs."""
    cache, folder = client.cache, client.cache.bundle_dir(mhex)
    with ThreadPoolExecutor(max_workers=client.hashers) as pool:
        with cache.holding_bundle_dir(mhex) as held:
            broken = [job for job in jobs if verify_file(folder / job.path, job, pool) is not None] if held is not None else jobs
            if not broken:
                return folder
            if client.offline:
                raise IntegrityError(f"{info.name}@{info.version}: the cached copy is corrupt ({broken[0].path}) and offline it "
                                     "cannot be fetched again", path=broken[0].path, expected=broken[0].hexdigest, found="corrupt")  # fmt: skip
            if held is not None:  # that directory, found broken: not one another process may have installed since
                cache.drop_bundle(mhex, held=held)
        for job in jobs:  # a blob behind a broken file may be broken too (they are hard links)
            if cache.blob(job.hexdigest).exists() and verify_file(cache.blob(job.hexdigest), job, pool) is not None:
                cache.blob(job.hexdigest).unlink(missing_ok=True)
        missing = [job for job in jobs if not cache.blob(job.hexdigest).exists()]
        direct = client._own_http  # a caller's own httpx client (a custom transport, say) is used as given
        Fetcher(client.http, cache, client.blob_url, pool, streams=client.streams, direct=direct, progress=progress,
                min_speed=client.min_speed, speed_time=client.speed_time).fetch(missing)  # fmt: skip
    files = {MANIFEST: materials[0], SIGNATURE: materials[1]} | {j.path: cache.blob(j.hexdigest) for j in jobs}
    with cache.writing(f"{info.name}@{info.version}"):
        return cache.install_bundle(mhex, files)


def pull(client: Client, ref: str, *, tofu: bool = False, allow_rollback: bool = False, progress=None) -> Path:
    owner, name, want = parse_ref(ref)
    full = f"{owner}/{name}"
    info, sent = _resolve(client, ref, owner, name, want)
    if info.name != full or not is_valid(info.version) or (is_valid(want) and info.version != want):
        raise ProtocolError(f"asked for {ref}, the registry answered {info.name!r}@{info.version!r}")
    mhex, shex = digest_hex(info.manifest), digest_hex(info.signature)
    if mhex is None or shex is None:
        raise ProtocolError(f"{full}@{info.version}: malformed digests in the registry's answer")
    check_rollback(client, full, want, info.version, allow_rollback)
    materials = _materials(client, info, mhex, shex, sent)
    manifest = _manifest(materials[0], info)
    keys, on_first_use = _trusted_keys(client, owner, tofu)
    settled = check_signature(materials[1], materials[0], manifest, keys, owner, client.trust, on_first_use)  # before any large download
    folder = _install(client, info, mhex, materials, _jobs(manifest), progress)
    if not settled:
        try:
            verify_signature(folder, keys)
        except SignatureError as exc:
            client.cache.drop_bundle(mhex)
            raise TrustError(f"{full}@{info.version}: {exc}", owner=owner) from exc
    if on_first_use:  # the registry's keys for the owner, as first used, once one of them verified everything
        for key in keys:
            client.trust.pin(owner, key)
    if not client.offline:
        try:
            client.cache.record_version(info)
            if not is_valid(want):
                client.cache.record_tag(full, want, info.version)
        except OSError as exc:  # a cache provisioned read-only: the bundle is there, only offline lookups miss it
            warnings.warn(f"{full}@{info.version} was verified, but the cache at {client.cache.root} could not record "
                          f"the version for offline pulls: {exc}", RuntimeWarning, stacklevel=2)  # fmt: skip
    try:
        client.trust.mark_seen(full, info.version)
    except OSError as exc:  # a trust store provisioned read-only: the pull stands, unrecorded
        warnings.warn(f"{full}@{info.version} was verified, but rollback protection could not record it in "
                      f"{client.trust.root}: {exc}", RuntimeWarning, stacklevel=2)  # fmt: skip
    return folder
