"""The client's trust store: publisher public keys pinned per owner.

    <root>/<owner>/<key id>.pub     a SubjectPublicKeyInfo PEM; key id = hex sha256 of its DER

A bundle of ``owner/name`` is accepted only when its signature verifies with a key
pinned for ``owner``. With ``tofu=True`` (trust on first use, only when asked for), an
owner with no pinned key gets the keys the registry lists for it pinned on first
pull; once an owner has a pinned key, a signature by any other key is refused until
that key is pinned by hand (key rotation is a decision, not an accident).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lwformat.bundle.keys import PublicKey, key_id, loads_public_key, public_pem

from .protocol import OWNER


class TrustStore:
    def __init__(self, root: str | os.PathLike, *, tofu: bool = False) -> None:
        self.root = Path(root)
        self.tofu = tofu

    def _owner_dir(self, owner: str) -> Path:
        if not OWNER.match(owner):
            raise ValueError(f"{owner!r} is not an owner name")
        return self.root / owner

    def keys(self, owner: str) -> list[PublicKey]:
        folder = self._owner_dir(owner)
        paths = sorted(folder.glob("*.pub")) if folder.is_dir() else []
        return [loads_public_key(p.read_bytes(), path=str(p)) for p in paths]

    def key_ids(self, owner: str) -> list[str]:
        return [key_id(k) for k in self.keys(owner)]

    def pin(self, owner: str, key: PublicKey | bytes | str | os.PathLike) -> str:
        """Pin a key (a key object, PEM bytes or a PEM file path) for `owner`; returns its key id."""
        if isinstance(key, bytes):
            key = loads_public_key(key)
        elif not isinstance(key, PublicKey):
            key = loads_public_key(Path(key).read_bytes(), path=str(key))
        folder = self._owner_dir(owner)
        folder.mkdir(parents=True, exist_ok=True)
        kid = key_id(key)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(public_pem(key))
            os.replace(tmp, folder / f"{kid}.pub")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return kid

    def unpin(self, owner: str, kid: str) -> bool:
        path = self._owner_dir(owner) / f"{kid}.pub"
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed
