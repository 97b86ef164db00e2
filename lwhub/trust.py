"""The client's trust store: publisher keys pinned per owner, and the versions verified here.

    <root>/<owner>/<key id>.pub           a SubjectPublicKeyInfo PEM; key id = hex sha256 of its DER
    <root>/<owner>/<name>@<version>.seen  an empty marker per version verified (rollback protection)

A bundle of ``owner/name`` is accepted only when its signature verifies with a key
pinned for ``owner``. With ``tofu=True`` (trust on first use, only when asked for), an
owner with no pinned key gets the keys the registry lists for it (at most 32) pinned,
once the first pull has verified with one of them; once an owner has a pinned key, a signature by any other key is refused until
that key is pinned by hand (key rotation is a decision, not an accident).

The seen markers live here, not in the cache, so that clearing the cache does not reset
rollback protection: a tag that resolves below the highest version seen is refused (a
release is held to the releases seen, so a pre-release pulled on purpose does not block
``latest``).
Markers are only ever added.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lwformat.bundle.keys import PublicKey, key_id, loads_public_key, public_pem

from .errors import RefError
from .protocol import OWNER
from .semver import is_prerelease, is_valid, sort_key


class TrustStore:
    def __init__(self, root: str | os.PathLike, *, tofu: bool = False) -> None:
        self.root = Path(root)
        self.tofu = tofu

    def _owner_dir(self, owner: str) -> Path:
        if not OWNER.match(owner):
            raise RefError(f"{owner!r} is not an owner name (lowercase letters, digits, '.', '_' and '-', starting with a letter or digit)", path=owner)
        return self.root / owner

    def keys(self, owner: str) -> list[PublicKey]:
        folder = self._owner_dir(owner)
        paths = sorted(folder.glob("*.pub")) if folder.is_dir() else []
        return [loads_public_key(p.read_bytes(), path=str(p)) for p in paths]

    def key_ids(self, owner: str) -> list[str]:
        return [key_id(k) for k in self.keys(owner)]

    def owners(self) -> list[str]:
        """The owners with at least one key pinned, sorted (seen markers alone do not count)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if OWNER.match(p.name) and any(p.glob("*.pub")))

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
        """Unpin the key `kid` (its id, or a prefix naming one pinned key, as `lwhub info` prints it)."""
        folder = self._owner_dir(owner)  # by file name: a damaged key file can still be removed
        matches = [p.name[: -len(".pub")] for p in folder.glob("*.pub") if p.name.startswith(kid)] if kid and folder.is_dir() else []
        if len(matches) > 1 and kid not in matches:
            raise RefError(f"{kid!r} begins {len(matches)} of {owner}'s pinned key ids; give more of it", path=kid)
        if not matches:
            return False
        path = self._owner_dir(owner) / f"{kid if kid in matches else matches[0]}.pub"
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def mark_seen(self, name: str, version: str) -> None:
        """Record that `version` of ``owner/name`` was verified here."""
        folder, short = self._name(name)
        if not is_valid(version):
            raise RefError(f"{version!r} is not a version", path=version)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{short}@{version}.seen").touch()

    def highest_seen(self, name: str, *, releases_only: bool = False) -> str | None:
        """The highest version of ``owner/name`` verified here (semver precedence), if any;
        with `releases_only`, the highest that is not a pre-release."""
        folder, short = self._name(name)
        found = [p.name[len(short) + 1 : -len(".seen")] for p in folder.glob(f"{short}@*.seen")] if folder.is_dir() else []
        versions = [v for v in found if is_valid(v) and not (releases_only and is_prerelease(v))]
        return max(versions, key=sort_key) if versions else None

    def _name(self, name: str) -> tuple[Path, str]:
        owner, _, short = name.partition("/")
        if not OWNER.match(short):
            raise RefError(f"{name!r} is not a bundle name 'owner/name'", path=name)
        return self._owner_dir(owner), short
