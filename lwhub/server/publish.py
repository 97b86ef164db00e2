"""The publish transaction: verify everything, then make the version visible in one commit.

Protocol (the client has uploaded every blob by digest first):

    POST /v1/bundles/{owner}/{name}/versions/{version}
         {"manifest": "sha256:...", "signature": "sha256:..."}

Steps, each refusing with a stable code and leaving nothing visible:

    1. the token's scopes cover owner/name                    namespace_forbidden
    2. the version is new                                     version_exists
       (the same signed bundle again, a push retried after its
       answer was lost, answers 200 with the existing record)
    3. the owner has registered publisher keys                no_publisher_key
    4. the manifest blob parses as a manifest                 manifest_invalid
       naming this owner/name and version                     manifest_mismatch
    5. every listed file is a stored blob of the right size   blob_missing, blob_mismatch
    6. staged as a bundle directory (hard links to the blobs):
       it opens under the spec's rules                        bundle_invalid, too_large
       every size and chunk digest matches (each blob's
       sha256 was checked as it was uploaded)                 blob_mismatch
       the signature verifies with one of the owner's keys
       and covers exactly these files                         signature_invalid
    7. one transaction: no published version may differ from this one only in build
       metadata (1.0.0, 1.0.0+b1), then the INSERT of the version and its blob
       references; the PRIMARY KEY makes exactly one of racing publishes win
                                                              version_exists

Blobs are immutable and content-addressed, so nothing can change between the checks
and the commit. A crash anywhere before step 7 leaves at most a staging directory in
the temp area, removed at the next start.
"""

from __future__ import annotations

import shutil
import time

from lwformat.bundle.canonical import loads as load_manifest
from lwformat.bundle.keys import loads_public_key
from lwformat.bundle.limits import MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES
from lwformat.bundle.manifest import MANIFEST, SIGNATURE, Manifest
from lwformat.bundle.read import Bundle
from lwformat.bundle.signing import check_against_manifest, verify_signature
from lwformat.bundle.verify import verify_files
from lwformat.errors import (
    BundleLimitError,
    IntegrityError,
    LWFormatError,
    SignatureError,
)

from ..errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    PublishRejectedError,
    TooLargeError,
)
from ..protocol import PublishRequest, VersionInfo, digest_hex
from ..semver import is_valid
from .auth import Principal, authorize
from .blobs import BlobStore
from .store import Store


def _reject(code: str, message: str, **detail: object) -> PublishRejectedError:
    return PublishRejectedError(message, code=code, detail=detail)


def _hex(digest: str, what: str) -> str:
    hexdigest = digest_hex(digest)
    if hexdigest is None:
        raise BadRequestError(f"{what} {digest!r} is not a digest 'sha256:<64 hex>'", code="invalid_digest")
    return hexdigest


def _read(blobs: BlobStore, hexdigest: str, limit: int, what: str) -> bytes:
    try:
        return blobs.read(hexdigest, limit=limit)
    except NotFoundError:
        raise _reject("blob_missing", f"the {what} blob sha256:{hexdigest} was not uploaded", digest=f"sha256:{hexdigest}") from None


def _parse(data: bytes) -> Manifest:
    try:
        return load_manifest(data)
    except LWFormatError as exc:
        raise _reject("manifest_invalid", f"{MANIFEST}: {exc}", field=getattr(exc, "field", None)) from exc


def _check_blobs(blobs: BlobStore, manifest: Manifest) -> None:
    for entry in manifest.files:
        size = blobs.size(entry.sha256)
        if size is None:
            raise _reject("blob_missing", f"{entry.path}: blob sha256:{entry.sha256} was not uploaded", path=entry.path)
        if size != entry.size:
            raise _reject("blob_mismatch", f"{entry.path}: the manifest says {entry.size} bytes, the blob has {size}", path=entry.path)


def _verify_staged(blobs: BlobStore, manifest_hex: str, signature_hex: str, manifest: Manifest, keys: list,
                   materials: tuple[bytes, bytes]) -> str:  # fmt: skip
    """Stage the bundle as a directory of hard links and verify it with lwformat; return the key id.

    Each blob hashed to its name as it was uploaded (`BlobWriter.commit`), and blobs are
    found by the manifest's sha256: so the files' whole digests hold already, and only
    their chunks are hashed here; the signature is compared with the manifest's digests.
    """
    stage = blobs.scratch() / "bundle"
    try:
        stage.mkdir()
        for hexdigest, name in [(manifest_hex, MANIFEST), (signature_hex, SIGNATURE), *((f.sha256, f.path) for f in manifest.files)]:
            try:
                blobs.materialize(hexdigest, stage / name)
            except FileNotFoundError:  # swept (an orphan past its grace) since it was checked
                raise _reject("blob_missing", f"{name}: blob sha256:{hexdigest} is gone; upload it again",
                              path=name, digest=f"sha256:{hexdigest}") from None  # fmt: skip
        try:
            with Bundle.open(stage) as bundle:
                verify_files(bundle, whole=False)
            manifest_bytes, signature = materials
            signed, settled = check_against_manifest(signature, manifest_bytes, manifest, keys)
            return signed.key_id if settled else verify_signature(stage, keys)  # other shards: hashed from the files
        except IntegrityError as exc:
            raise _reject("blob_mismatch", str(exc), path=exc.path, chunk=exc.chunk) from exc
        except SignatureError as exc:
            raise _reject("signature_invalid", f"{SIGNATURE}: {exc}", path=exc.path) from exc
        except BundleLimitError as exc:
            raise TooLargeError(str(exc), detail={"limit": exc.limit}) from exc
        except LWFormatError as exc:
            raise _reject("bundle_invalid", str(exc), path=exc.path) from exc
    finally:
        shutil.rmtree(stage.parent, ignore_errors=True)


def publish(store: Store, blobs: BlobStore, principal: Principal, owner: str, name: str, version: str,
            request: PublishRequest) -> tuple[VersionInfo, bool]:  # fmt: skip
    """The version record, and whether this call made it (False: the same signed bundle was there)."""
    full = f"{owner}/{name}"
    authorize(principal, owner, name)
    if not is_valid(version):
        raise BadRequestError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH)", code="invalid_version")
    manifest_hex, signature_hex = _hex(request.manifest, "manifest"), _hex(request.signature, "signature")
    signed = (f"sha256:{manifest_hex}", f"sha256:{signature_hex}")  # what this call publishes
    if (existing := store.version(owner, name, version)) is not None:
        if (existing.manifest, existing.signature) == signed:
            return existing, False  # a push retried after its answer was lost: it is published
        raise ConflictError(f"{full}@{version} exists already; versions are immutable, publish a new version", code="version_exists")
    keys = [loads_public_key(k.pem.encode()) for k in store.keys(owner)]
    if not keys:
        raise _reject("no_publisher_key", f"owner {owner!r} has no publisher key: register one first (`lwhub keygen`)", owner=owner)
    manifest_bytes = _read(blobs, manifest_hex, MAX_MANIFEST_BYTES, MANIFEST)
    signature = _read(blobs, signature_hex, MAX_SIGNATURE_BYTES, SIGNATURE)  # present and bounded
    manifest = _parse(manifest_bytes)
    if (manifest.name, manifest.version) != (full, version):
        raise _reject(
            "manifest_mismatch", f"the manifest is {manifest.name}@{manifest.version}, published as {full}@{version}",
            manifest_name=manifest.name, manifest_version=manifest.version,
        )  # fmt: skip
    _check_blobs(blobs, manifest)
    key_id = _verify_staged(blobs, manifest_hex, signature_hex, manifest, keys, (manifest_bytes, signature))
    info = VersionInfo(
        name=full, version=version, manifest=f"sha256:{manifest_hex}", signature=f"sha256:{signature_hex}",
        size=sum(f.size for f in manifest.files), key_id=key_id, created=time.time(),
        description=manifest.description, tags=list(manifest.tags),
    )  # fmt: skip
    try:
        store.add_version(info, [f"sha256:{f.sha256}" for f in manifest.files])
    except ConflictError:  # a racing publish won: if it was this same bundle, so is this call
        won = store.version(owner, name, version)
        if won is None or (won.manifest, won.signature) != signed:
            raise
        return won, False
    return info, True

