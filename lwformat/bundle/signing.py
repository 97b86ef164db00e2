"""Bundle signatures per OpenSSF Model Signing v1.0 (spec/signature.md).

    statement = in-toto Statement v1, JSON with a 2-space indent:
                {"_type": "https://in-toto.io/Statement/v1",
                 "subject": [{"name": <directory name>, "digest": {"sha256": root}}],
                 "predicateType": "https://model_signing/signature/v1.0",
                 "predicate": {"resources": [{"name", "algorithm", "digest"}, ...],
                               "serialization": {"method": "files" | "shards", "hash_type": "sha256",
                                                 ["shard_size": n,] "allow_symlinks": false,
                                                 "ignore_paths": ["bundle.sig"]}}}
    resources = "files": every file of the directory but bundle.sig, algorithm "sha256";
                "shards": every [start, end) piece of shard_size bytes of every non-empty file,
                named "path:start:end", algorithm "sha256-sharded-<shard_size>";
                sorted by (path components, start); digests are lowercase hex
    root      = sha256(the raw digest of each resource, in listed order)

The statement is the payload of the DSSE envelope in `dsse`. Verification checks the
envelope against the given keys, then that the signed resources are exactly the
directory's: none missing, none extra, every digest equal. Pure functions work on
bytes; `sign_bundle` and `verify_signature` are the I/O shell.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    BundleNotFoundError,
    MalformedSignatureError,
    MissingSignatureError,
    SignedFileMismatchError,
    SigningError,
)
from . import keys as K
from .dsse import expect, open_envelope, sign_envelope
from .files import sync_entry
from .limits import MAX_SIGNATURE_BYTES, ensure
from .manifest import MANIFEST, SIGNATURE, Manifest

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
SHARD_SIZE_LIMIT = 1 << 62  # shard sizes are below it: what `open_signature` reads, `sign_bundle` writes
SHARD_NAME = re.compile(r"^(.+):(0|[1-9][0-9]{0,18}):([1-9][0-9]{0,18})$")  # offsets of at most 19 digits (int() stays cheap)


# -- pure core ------------------------------------------------------------------------------


def _order(name: str) -> tuple:
    shard = SHARD_NAME.match(name)
    path, span = (shard[1], (int(shard[2]), int(shard[3]))) if shard else (name, ())
    return (tuple(path.split("/")), *span)


def _algorithm(shard_size: int | None) -> str:
    return "sha256" if shard_size is None else f"sha256-sharded-{shard_size}"


def root_digest(resources: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for digest in resources.values():
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


def statement_for(files: Mapping[str, str], *, model_name: str = "bundle", shard_size: int | None = None) -> bytes:
    """The statement over ``{name: sha256 hex}``; with `shard_size` the names are "path:start:end" shards."""
    resources = {name: files[name] for name in sorted(files, key=_order)}
    serialization: dict = {"method": "files", "hash_type": "sha256"}
    if shard_size is not None:
        serialization |= {"method": "shards", "shard_size": shard_size}
    serialization |= {"allow_symlinks": False, "ignore_paths": [SIGNATURE]}
    algorithm = _algorithm(shard_size)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root_digest(resources)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "resources": [{"name": n, "algorithm": algorithm, "digest": d} for n, d in resources.items()],
            "serialization": serialization,
        },
    }
    return json.dumps(statement, indent=2, ensure_ascii=False).encode()


def sign_statement(statement: bytes, private_key: K.PrivateKey) -> bytes:
    """The signature file's bytes: `statement` in a DSSE envelope, in a Sigstore bundle."""
    return sign_envelope(statement, private_key)


@dataclass(frozen=True)
class Signed:
    """A statement whose envelope verified: who signed it and what it lists."""

    key_id: str
    model_name: str
    shard_size: int | None  # None: signed by files
    resources: dict[str, str]  # name -> sha256 hex, in listed order


def parse_statement(payload: bytes) -> tuple[str, int | None, dict[str, str]]:
    """(model name, shard size or None, resources) of a signed statement, checked for consistency."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer past Python's digit limit; too deep
        raise MalformedSignatureError(f"{SIGNATURE}: the signed statement is not JSON", path=SIGNATURE) from exc
    expect(isinstance(doc, dict) and doc.get("_type") == STATEMENT_TYPE, f"statement type must be {STATEMENT_TYPE}")
    expect(doc.get("predicateType") == PREDICATE_TYPE, f"predicate type must be {PREDICATE_TYPE}")
    subjects, predicate = doc.get("subject"), doc.get("predicate")
    expect(isinstance(subjects, list) and len(subjects) == 1 and isinstance(subjects[0], dict), "one subject expected")
    expect(isinstance(predicate, dict) and isinstance(predicate.get("resources"), list), "no resource list")
    ser = predicate.get("serialization")
    expect(isinstance(ser, dict) and ser.get("method") in ("files", "shards"), "serialization must be files or shards")
    expect(ser.get("hash_type") == "sha256", f"hash type {ser.get('hash_type')!r} is not supported (sha256 only)")
    shard_size = None
    if ser["method"] == "shards":  # the stock signer writes it through a protobuf Struct, as a float: 256.0
        shard_size = ser.get("shard_size")
        expect(type(shard_size) in (int, float) and 0 < shard_size < SHARD_SIZE_LIMIT and shard_size % 1 == 0, "bad shard_size")
        shard_size = int(shard_size)
    algorithm = _algorithm(shard_size)
    resources: dict[str, str] = {}
    for r in predicate["resources"]:
        expect(isinstance(r, dict) and r.get("algorithm") == algorithm, f"every resource must be a {algorithm} digest")
        name, digest = r.get("name"), r.get("digest")
        expect(isinstance(name, str) and name not in resources, f"resource name {name!r} is missing or repeated")
        expect(shard_size is None or SHARD_NAME.match(name) is not None, f"shard name {name!r} is not path:start:end")
        expect(isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest) is not None, f"{name}: bad digest")
        resources[name] = digest
    digest = subjects[0].get("digest")
    expect(isinstance(digest, dict) and digest.get("sha256") == root_digest(resources), "subject digest mismatch")
    return str(subjects[0].get("name", "")), shard_size, resources


def open_signature(signature: bytes, public_keys: Iterable[K.PublicKey]) -> Signed:
    """Verify the envelope against any of the keys, then read the statement it signs."""
    key_id, payload = open_envelope(signature, public_keys)
    return Signed(key_id, *parse_statement(payload))


def compare(expected: Mapping[str, str], found: Mapping[str, str | None], *, sharded: bool = False) -> None:
    """Raise `SignedFileMismatchError` at the first resource (sorted) that is missing, extra or different.

    A found digest of None compares names only: is every signed resource there, and nothing else?
    """
    for name in sorted(set(expected) | set(found), key=_order):
        want, got = expected.get(name), found.get(name)
        if want == got or (want is not None and name in found and got is None):
            continue
        file = SHARD_NAME.match(name)[1] if sharded else name  # type: ignore[index]
        why = "is missing" if name not in found else "differs from the signed sha256"
        why = "is not signed (extra file)" if want is None else why
        where = f" (shard {name})" if sharded else ""
        raise SignedFileMismatchError(f"{file}: {why}{where}", path=file, expected=want, found=got)


def _shard_names(path: str, size: int, shard: int) -> list[str]:
    return [f"{path}:{start}:{min(start + shard, size)}" for start in range(0, size, shard)]  # an empty file has none


def check_against_manifest(signature: bytes, manifest_bytes: bytes, manifest: Manifest,
                           public_keys: Iterable[K.PublicKey]) -> tuple[Signed, bool]:  # fmt: skip
    """Verify the envelope, then compare what it lists with the manifest's digests, reading no file.

    The manifest is always authenticated (its sha256, or its shards hashed from
    `manifest_bytes`), and with it every digest it lists. The second value says whether
    that settles the files too: True when the signature lists whole files, or shards of
    the manifest's chunk size (the manifest's digests then stand for the files'); False
    for another shard size, where only the files' shard names are compared here and
    their digests need the files (`verify_signature`).
    """
    signed = open_signature(signature, public_keys)
    size = signed.shard_size
    if size is None:
        expected: dict[str, str | None] = {MANIFEST: hashlib.sha256(manifest_bytes).hexdigest()}
        expected |= {f.path: f.sha256 for f in manifest.files}
    else:
        # Count first: a tiny shard size must not make us list millions of names the signature cannot hold.
        count = -(-len(manifest_bytes) // size) + sum(-(-f.size // size) for f in manifest.files)
        if count > len(signed.resources):
            raise SignedFileMismatchError(f"{MANIFEST}: the signature lists {len(signed.resources)} shards of {size} bytes, "
                                          f"the manifest's files make {count}", path=MANIFEST,
                                          expected=str(len(signed.resources)), found=str(count))  # fmt: skip
        names = _shard_names(MANIFEST, len(manifest_bytes), size)
        expected = {name: hashlib.sha256(manifest_bytes[i * size : (i + 1) * size]).hexdigest() for i, name in enumerate(names)}
        for f in manifest.files:
            digests = f.chunks if size == manifest.chunk_size else [None] * -(-f.size // size)  # None: the name only
            expected |= dict(zip(_shard_names(f.path, f.size, size), digests))
    compare(signed.resources, expected, sharded=size is not None)
    return signed, size is None or size == manifest.chunk_size


# -- I/O shell ------------------------------------------------------------------------------


def list_files(bundle_dir: Path) -> list[str]:
    """Every regular file under `bundle_dir` but the signature, as sorted POSIX relative names."""
    out = []
    for root, dirs, files in os.walk(bundle_dir):
        for name in dirs + files:
            path = Path(root, name)
            rel = path.relative_to(bundle_dir).as_posix()
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                why = f"{rel}: not a regular file (never signed)"
                raise SignedFileMismatchError(why, path=rel, expected=None, found=None)
            if path.is_file() and rel != SIGNATURE:
                out.append(rel)
    return sorted(out, key=_order)


def file_digests(bundle_dir: Path, names: Iterable[str]) -> dict[str, str]:
    out = {}
    for name in names:
        with open(bundle_dir / name, "rb") as f:
            out[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def shard_names(bundle_dir: Path, names: Iterable[str], shard_size: int) -> list[str]:
    return [shard for name in names for shard in _shard_names(name, (bundle_dir / name).stat().st_size, shard_size)]


def shard_digests(bundle_dir: Path, shards: Iterable[str]) -> dict[str, str]:
    out = {}
    for shard in shards:
        name, start, end = shard.rsplit(":", 2)
        with open(bundle_dir / name, "rb") as f:
            f.seek(int(start))
            h, left = hashlib.sha256(), int(end) - int(start)
            while left and (block := f.read(min(left, 1 << 20))):
                h.update(block)
                left -= len(block)
        out[shard] = h.hexdigest()
    return out


def _disk_shards(bundle_dir: Path, names: list[str], signed: Signed) -> list[str]:
    """The directory's shard names, once each file's size agrees with its signed shards (so the list is bounded)."""
    ends: dict[str, list[int]] = {}
    for shard in signed.resources:
        m = SHARD_NAME.match(shard)
        ends.setdefault(m[1], []).append(int(m[3]))  # type: ignore[index]
    if differ := sorted(set(ends) ^ set(names), key=_order):  # an empty file has no shard, so it is extra
        name = differ[0]
        why = "is missing" if name in ends else "is not signed (extra file)"
        raise SignedFileMismatchError(f"{name}: {why}", path=name, expected=None, found=None)
    for name in names:
        size, signed_ends = (bundle_dir / name).stat().st_size, ends[name]
        if size != max(signed_ends) or len(signed_ends) != -(-size // signed.shard_size):  # type: ignore[operator]
            raise SignedFileMismatchError(
                f"{name}: {size} bytes, signed as {max(signed_ends)} bytes in {len(signed_ends)} shards",
                path=name, expected=None, found=None,
            )  # fmt: skip
    return shard_names(bundle_dir, names, signed.shard_size)  # type: ignore[arg-type]


def _public_keys(keys: object) -> list[K.PublicKey]:
    if isinstance(keys, (str, os.PathLike, K.PublicKey)):
        keys = [keys]
    return [k if isinstance(k, K.PublicKey) else K.load_public_key(k) for k in keys]  # type: ignore[union-attr]


def _bundle_dir(bundle_dir: str | os.PathLike) -> Path:
    path = Path(bundle_dir)
    if not path.is_dir():
        raise BundleNotFoundError(f"{path}: no bundle directory here", path=str(path))
    return path


def sign_bundle(
    bundle_dir: str | os.PathLike, private_key: K.PrivateKey | str | os.PathLike, *, shard_size: int | None = None
) -> Path:
    """Sign every file of `bundle_dir`; writes ``bundle.sig`` atomically and returns its path."""
    path = _bundle_dir(bundle_dir)
    key = private_key if isinstance(private_key, K.PrivateKey) else K.load_private_key(private_key)
    if shard_size is not None and not 1 <= shard_size < SHARD_SIZE_LIMIT:  # a larger one would write a signature no reader takes
        raise SigningError(f"shard_size must be at least 1 and below 2**62, not {shard_size}", path=str(path))
    names = list_files(path)
    if shard_size is None:
        digests = file_digests(path, names)
    else:
        if empty := [n for n in names if (path / n).stat().st_size == 0]:
            why = f"{path / empty[0]}: an empty file has no shard to sign; sign by files instead"
            raise SigningError(why, path=empty[0])
        digests = shard_digests(path, shard_names(path, names, shard_size))
    signature = sign_statement(statement_for(digests, model_name=path.resolve().name, shard_size=shard_size), key)
    if len(signature) > MAX_SIGNATURE_BYTES:  # readers refuse it: keep the signature there is
        hint = "; sign with a larger shard size" if shard_size is not None else ""
        raise SigningError(f"{path / SIGNATURE}: the signature would be {len(signature):,} bytes, above the limit of "
                           f"{MAX_SIGNATURE_BYTES:,} (MAX_SIGNATURE_BYTES){hint}", path=SIGNATURE)  # fmt: skip
    _replace_signature(path, signature)
    return path / SIGNATURE


def _replace_signature(bundle_dir: Path, signature: bytes) -> None:
    """Write `signature` to a temporary file beside the bundle directory, then rename it over ``bundle.sig``.

    Beside, not inside: a signer killed before the rename would leave, inside, a file the
    manifest does not list, and the bundle would no longer open. Where the parent takes no
    new file (not writable) or is another file system (the bundle is a mount point), the
    temporary file is made inside after all.
    """
    bundle = bundle_dir.resolve()
    for where in (bundle.parent, bundle):
        last = where == bundle
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{bundle.name}.{SIGNATURE}.", suffix=".partial", dir=where)
        except OSError as exc:
            if last or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(signature)
                f.flush()
                os.fsync(f.fileno())  # the bytes before the name: a crash leaves the old signature or the new one
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            os.replace(tmp, bundle / SIGNATURE)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if last or not (isinstance(exc, OSError) and exc.errno == errno.EXDEV):
                raise
        else:
            sync_entry(bundle / SIGNATURE)
            return


def read_signature(bundle_dir: Path) -> bytes:
    sig = bundle_dir / SIGNATURE
    if not sig.is_file():
        raise MissingSignatureError(f"{sig}: the bundle is not signed (sign it with `lwhub sign`)", path=str(sig))
    ensure(sig.stat().st_size, MAX_SIGNATURE_BYTES, "MAX_SIGNATURE_BYTES", "the signature size", path=SIGNATURE)
    return sig.read_bytes()


def verify_signature(bundle_dir: str | os.PathLike, public_keys: object) -> str:
    """Verify ``bundle.sig`` against any of `public_keys` (keys or PEM paths); return the signer's key id."""
    path = _bundle_dir(bundle_dir)
    signed = open_signature(read_signature(path), _public_keys(public_keys))
    names = list_files(path)
    if signed.shard_size is None:
        compare(signed.resources, dict.fromkeys(names))  # names first: no hashing when the file set is wrong
        compare(signed.resources, file_digests(path, names))
    else:
        shards = _disk_shards(path, names, signed)
        compare(signed.resources, dict.fromkeys(shards), sharded=True)
        compare(signed.resources, shard_digests(path, shards), sharded=True)
    return signed.key_id
