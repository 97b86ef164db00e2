"""The registry's metadata: accounts, tokens, publisher keys, versions, tags.

`Store` is the interface the server uses; `SQLiteStore` implements it with the
standard library's sqlite3 (WAL, synchronous=FULL, one connection per thread), in
plain SQL that PostgreSQL also speaks, so a `PostgresStore` can replace it.

Versions are immutable: ``PRIMARY KEY (owner, name, version)`` makes exactly one of
several concurrent publishes of a version win; the others get `version_exists` (the
publish answers those of the very same bundle with the winner's record), as does a
version differing from a published one only in build metadata. A
version and the blobs it references are written in one transaction: it is visible
whole or not at all. ``ord`` is the semver precedence key (`lwhub.semver.sort_key`)
followed by the version string, so listings sort and paginate in SQL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from ..errors import ConflictError, NotFoundError, StorageError
from ..protocol import BundleInfo, KeyInfo, VersionInfo
from ..semver import is_prerelease, sort_key

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, account TEXT NOT NULL REFERENCES accounts(name),
    scopes TEXT NOT NULL, expires REAL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    owner TEXT NOT NULL, key_id TEXT NOT NULL, pem TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (owner, key_id));
CREATE TABLE IF NOT EXISTS bundles (
    owner TEXT NOT NULL, name TEXT NOT NULL, full TEXT NOT NULL UNIQUE, description TEXT NOT NULL,
    tags TEXT NOT NULL, top TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (owner, name));
CREATE TABLE IF NOT EXISTS versions (
    owner TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, ord TEXT NOT NULL,
    prerelease INTEGER NOT NULL, manifest TEXT NOT NULL, signature TEXT NOT NULL, size INTEGER NOT NULL,
    key_id TEXT NOT NULL, description TEXT NOT NULL, tags TEXT NOT NULL, created REAL NOT NULL,
    yanked INTEGER NOT NULL DEFAULT 0, yank_reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (owner, name, version));
CREATE INDEX IF NOT EXISTS versions_ord ON versions (owner, name, ord);
CREATE TABLE IF NOT EXISTS version_blobs (
    owner TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (owner, name, version, digest));
CREATE TABLE IF NOT EXISTS tags (
    owner TEXT NOT NULL, name TEXT NOT NULL, tag TEXT NOT NULL, version TEXT NOT NULL,
    PRIMARY KEY (owner, name, tag));
"""
_VERSION_COLUMNS = "owner, name, version, manifest, signature, size, key_id, created, description, tags, yanked, yank_reason"


_STORAGE_CODES = (10, 13)  # SQLITE_IOERR (and its extended codes), SQLITE_FULL


class TokenRow:
    __slots__ = ("account", "expires", "scopes")

    def __init__(self, account: str, scopes: list[str], expires: float | None) -> None:
        self.account, self.scopes, self.expires = account, scopes, expires


class Store(Protocol):
    def add_account(self, name: str) -> None: ...
    def add_token(self, token_hash: str, account: str, scopes: list[str], expires: float | None) -> None: ...
    def token(self, token_hash: str) -> TokenRow | None: ...
    def add_key(self, owner: str, key_id: str, pem: str) -> KeyInfo: ...
    def keys(self, owner: str) -> list[KeyInfo]: ...
    def add_version(self, info: VersionInfo, blobs: list[str]) -> None: ...
    def version(self, owner: str, name: str, version: str) -> VersionInfo | None: ...
    def versions(self, owner: str, name: str, *, after: str | None, limit: int) -> list[tuple[str, VersionInfo]]: ...
    def latest(self, owner: str, name: str) -> VersionInfo | None: ...
    def set_tag(self, owner: str, name: str, tag: str, version: str) -> None: ...
    def tags(self, owner: str, name: str) -> dict[str, str]: ...
    def yank(self, owner: str, name: str, version: str, *, yanked: bool, reason: str) -> VersionInfo: ...
    def bundle(self, owner: str, name: str) -> BundleInfo | None: ...
    def search(self, query: str, *, after: str | None, limit: int) -> list[BundleInfo]: ...
    def referenced_blobs(self) -> set[str]: ...


def _like(query: str) -> str:
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class SQLiteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # idempotent: IF NOT EXISTS

    # -- connections and transactions -----------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a published version survives power loss
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    class _Tx:
        """A write transaction: committed, or rolled back whole. A full disk or an I/O error
        (SQLite's own, from the statements or the commit) is a `StorageError` (507)."""

        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind, exc, tb) -> None:
            if kind is None:
                try:
                    self.db.execute("COMMIT")
                    return
                except sqlite3.OperationalError as error:
                    exc = error
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.OperationalError:  # SQLite ended the transaction itself
                pass
            if isinstance(exc, sqlite3.OperationalError) and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _STORAGE_CODES:
                raise StorageError(f"could not write the registry's database: {exc}; nothing was changed",
                                   detail={"sqlite": getattr(exc, "sqlite_errorname", "")}) from exc  # fmt: skip
            if kind is None:
                raise exc

    def _tx(self) -> _Tx:
        return self._Tx(self._db())

    def _one(self, sql: str, *args: object) -> tuple | None:
        return self._db().execute(sql, args).fetchone()

    # -- accounts, tokens, keys -----------------------------------------------------------

    def add_account(self, name: str) -> None:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO accounts VALUES (?, ?)", (name, time.time()))
        except sqlite3.IntegrityError:
            raise ConflictError(f"account {name!r} exists already", code="account_exists") from None

    def add_token(self, token_hash: str, account: str, scopes: list[str], expires: float | None) -> None:
        if self._one("SELECT 1 FROM accounts WHERE name = ?", account) is None:
            raise NotFoundError(f"no account {account!r}")
        with self._tx() as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)", (token_hash, account, json.dumps(scopes), expires, time.time()))

    def token(self, token_hash: str) -> TokenRow | None:
        row = self._one("SELECT account, scopes, expires FROM tokens WHERE hash = ?", token_hash)
        return TokenRow(row[0], json.loads(row[1]), row[2]) if row else None

    def add_key(self, owner: str, key_id: str, pem: str) -> KeyInfo:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO keys VALUES (?, ?, ?, ?)", (owner, key_id, pem, time.time()))
        row = self._one("SELECT key_id, pem, created FROM keys WHERE owner = ? AND key_id = ?", owner, key_id)
        return KeyInfo(*row)

    def keys(self, owner: str) -> list[KeyInfo]:
        rows = self._db().execute("SELECT key_id, pem, created FROM keys WHERE owner = ? ORDER BY created", (owner,))
        return [KeyInfo(*r) for r in rows]

    # -- versions ---------------------------------------------------------------------------

    def add_version(self, info: VersionInfo, blobs: list[str]) -> None:
        owner, _, name = info.name.partition("/")
        ord_ = sort_key(info.version) + "\x02" + info.version
        tags = json.dumps(info.tags)
        core = info.version.partition("+")[0]
        try:
            with self._tx() as db:  # BEGIN IMMEDIATE: the look for a twin and the insert are one step
                twin = db.execute(
                    # Compared byte for byte: LIKE ignores ASCII case, and 1.0.0-RC.1 is not 1.0.0-rc.1.
                    "SELECT version FROM versions WHERE owner = ? AND name = ? AND version != ? "
                    "AND (version = ? OR substr(version, 1, ?) = ?)",
                    (owner, name, info.version, core, len(core) + 1, core + "+"),
                ).fetchone()  # fmt: skip
                if twin is not None:
                    raise ConflictError(
                        f"{info.name}@{twin[0]} exists, and {info.version} differs from it only in build metadata, which "
                        "version order ignores: publish a new version", code="version_exists",
                        detail={"name": info.name, "version": info.version},
                    )  # fmt: skip
                db.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, '')",
                    (owner, name, info.version, ord_, is_prerelease(info.version), info.manifest, info.signature,
                     info.size, info.key_id, info.description, tags, info.created),
                )  # fmt: skip
                db.executemany("INSERT OR IGNORE INTO version_blobs VALUES (?, ?, ?, ?)", [(owner, name, info.version, d) for d in blobs])
                db.execute(
                    "INSERT INTO bundles VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, name) DO UPDATE SET "
                    "description = CASE WHEN excluded.top > top THEN excluded.description ELSE description END, "
                    "tags = CASE WHEN excluded.top > top THEN excluded.tags ELSE tags END, "
                    "top = MAX(top, excluded.top), updated = excluded.updated",
                    (owner, name, info.name, info.description, tags, ord_, info.created),
                )
        except sqlite3.IntegrityError:
            raise ConflictError(
                f"{info.name}@{info.version} exists already; versions are immutable, publish a new version",
                code="version_exists", detail={"name": info.name, "version": info.version},
            ) from None  # fmt: skip

    @staticmethod
    def _version(row: tuple) -> VersionInfo:
        owner, name, version, manifest, signature, size, key_id, created, desc, tags, yanked, reason = row
        return VersionInfo(f"{owner}/{name}", version, manifest, signature, size, key_id, created, desc, json.loads(tags), bool(yanked), reason)

    def version(self, owner: str, name: str, version: str) -> VersionInfo | None:
        row = self._one(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE owner = ? AND name = ? AND version = ?", owner, name, version)
        return self._version(row) if row else None

    def versions(self, owner: str, name: str, *, after: str | None, limit: int) -> list[tuple[str, VersionInfo]]:
        """Newest first; `after` is the ``ord`` of the last item of the previous page."""
        rows = self._db().execute(
            f"SELECT ord, {_VERSION_COLUMNS} FROM versions WHERE owner = ? AND name = ? AND ord < ? ORDER BY ord DESC LIMIT ?",
            (owner, name, "\x7f" if after is None else after, limit),
        )
        return [(r[0], self._version(r[1:])) for r in rows]

    def latest(self, owner: str, name: str) -> VersionInfo | None:
        """The highest non-yanked release: what "latest" means unless the tag is set."""
        row = self._one(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE owner = ? AND name = ? AND yanked = 0 AND prerelease = 0 "
            "ORDER BY ord DESC LIMIT 1", owner, name,
        )  # fmt: skip
        return self._version(row) if row else None

    def set_tag(self, owner: str, name: str, tag: str, version: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO tags VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET version = excluded.version", (owner, name, tag, version))

    def tags(self, owner: str, name: str) -> dict[str, str]:
        rows = self._db().execute("SELECT tag, version FROM tags WHERE owner = ? AND name = ? ORDER BY tag", (owner, name))
        return dict(rows.fetchall())

    def yank(self, owner: str, name: str, version: str, *, yanked: bool, reason: str) -> VersionInfo:
        with self._tx() as db:
            db.execute("UPDATE versions SET yanked = ?, yank_reason = ? WHERE owner = ? AND name = ? AND version = ?",
                       (yanked, reason if yanked else "", owner, name, version))  # fmt: skip
        found = self.version(owner, name, version)
        if found is None:
            if self.bundle(owner, name) is None:
                raise NotFoundError(f"no bundle {owner}/{name}", code="bundle_not_found")
            raise NotFoundError(f"{owner}/{name} has no version {version}", code="version_not_found")
        return found

    # -- bundles --------------------------------------------------------------------------

    def _bundle(self, row: tuple) -> BundleInfo:
        owner, name, full, description, tags, updated = row
        latest, named = self.latest(owner, name), self.tags(owner, name)
        named.pop("latest", None)  # computed; a tag of that name could be set before it was reserved
        count = self._one("SELECT COUNT(*) FROM versions WHERE owner = ? AND name = ?", owner, name)[0]
        return BundleInfo(full, description, json.loads(tags), latest.version if latest else None, named, count, updated)

    def bundle(self, owner: str, name: str) -> BundleInfo | None:
        row = self._one("SELECT owner, name, full, description, tags, updated FROM bundles WHERE owner = ? AND name = ?", owner, name)
        return self._bundle(row) if row else None

    def search(self, query: str, *, after: str | None, limit: int) -> list[BundleInfo]:
        """Bundles whose name, description or tags contain `query` (case-insensitive), by name."""
        like = _like(query)
        rows = self._db().execute(
            "SELECT owner, name, full, description, tags, updated FROM bundles WHERE full > :after AND (full LIKE :q "
            "ESCAPE '\\' OR description LIKE :q ESCAPE '\\' OR tags LIKE :q ESCAPE '\\') ORDER BY full LIMIT :limit",
            {"after": after or "", "q": like, "limit": limit},
        )
        return [self._bundle(r) for r in rows.fetchall()]

    def referenced_blobs(self) -> set[str]:
        rows = self._db().execute("SELECT digest FROM version_blobs UNION SELECT manifest FROM versions UNION SELECT signature FROM versions")
        return {r[0] for r in rows}


def open_store(data_dir: str | Path) -> SQLiteStore:
    """The metadata store of a registry data directory (``registry.sqlite3``)."""
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    return SQLiteStore(data / "registry.sqlite3")
