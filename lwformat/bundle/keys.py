"""Signing keys: standard PEM files, the kind openssl and `model_signing` read and write.

    private key   PKCS#8 PEM ("BEGIN PRIVATE KEY"), unencrypted, file mode 0600
                  (traditional "BEGIN EC PRIVATE KEY" files load too)
    public key    SubjectPublicKeyInfo PEM ("BEGIN PUBLIC KEY")
    key id        hex sha256 of the DER SubjectPublicKeyInfo

Keys are ECDSA on P-256 by default; P-384 and P-521 are accepted, as `model_signing`
accepts them. Any other key is refused with a `SigningKeyError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import SigningKeyError

PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = ec.EllipticCurvePublicKey

# curve name -> the digest ECDSA uses with it (the pairing Sigstore's specs fix)
CURVES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
DEFAULT_NAME = "lwhub"


def hash_for(key: PublicKey) -> hashes.HashAlgorithm:
    return CURVES[key.curve.name]()


def key_id(key: PublicKey) -> str:
    """Hex sha256 of the DER SubjectPublicKeyInfo: stable across PEM line wrapping."""
    return hashlib.sha256(public_der(key)).hexdigest()


def public_der(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _checked(key: object, path: str, want: type) -> object:
    if not isinstance(key, want):
        raise SigningKeyError(
            f"{path}: not an ECDSA key ({type(key).__name__.lstrip('_')}); bundle signatures use ECDSA "
            f"(P-256 by default; make a pair with `lwhub keygen`)",
            path=path,
        )
    if key.curve.name not in CURVES:  # type: ignore[attr-defined]
        raise SigningKeyError(
            f"{path}: curve {key.curve.name} is not supported (use P-256, P-384 or P-521)",  # type: ignore[attr-defined]
            path=path,
        )
    return key


def _read(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"{path}: no such key file", path=str(path)) from None
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read the key: {exc.strerror}", path=str(path)) from exc


def loads_private_key(data: bytes, *, path: str = "<bytes>", password: bytes | None = None) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError as exc:  # encrypted without a password, or a password for a clear key
        raise SigningKeyError(f"{path}: {str(exc)[0].lower()}{str(exc)[1:]}", path=path) from exc
    except ValueError as exc:
        raise SigningKeyError(
            f"{path}: not a PEM private key (expected 'BEGIN PRIVATE KEY' or 'BEGIN EC PRIVATE KEY')", path=path
        ) from exc
    return _checked(key, path, PrivateKey)  # type: ignore[return-value]


def loads_public_key(data: bytes, *, path: str = "<bytes>") -> PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        hint = " (this looks like a private key; pass the .pub file)" if b"PRIVATE KEY" in data else ""
        raise SigningKeyError(f"{path}: not a PEM public key{hint}", path=path) from exc
    return _checked(key, path, PublicKey)  # type: ignore[return-value]


def load_private_key(path: str | os.PathLike, *, password: bytes | None = None) -> PrivateKey:
    return loads_private_key(_read(path), path=str(path), password=password)


def load_public_key(path: str | os.PathLike) -> PublicKey:
    return loads_public_key(_read(path), path=str(path))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite a key; the mode is set at creation, so the secret is never world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)  # we created it: a partial key would refuse every retry as "already exists"
        raise


def generate_keypair(where: str | os.PathLike = ".", *, name: str = DEFAULT_NAME) -> tuple[Path, Path]:
    """Write a new P-256 pair; returns (private path, public path).

    `where` is a directory (files ``<name>.pem`` and ``<name>.pub``) or, when it does
    not name an existing directory, a path prefix (``<prefix>.pem``, ``<prefix>.pub``).
    Existing files are never overwritten.
    """
    where = Path(where)
    prefix = where / name if where.is_dir() else where
    private_path, public_path = prefix.with_name(prefix.name + ".pem"), prefix.with_name(prefix.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise SigningKeyError(f"{p}: already exists; refusing to overwrite a key (write the new pair under another name)", path=str(p))
    if not prefix.parent.is_dir():
        raise SigningKeyError(f"{prefix.parent}: no such directory", path=str(prefix.parent))
    key = ec.generate_private_key(ec.SECP256R1())
    _write_new(private_path, private_pem(key), 0o600)
    try:
        _write_new(public_path, public_pem(key.public_key()), 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path
