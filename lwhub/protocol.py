"""The registry's JSON shapes, shared by the server and the client (API version 1).

Digests are written ``sha256:<64 hex>``. A bundle version points at three kinds of
blobs by digest: its manifest, its signature, and the files the manifest lists.
Listings are pages ``{"items": [...], "next": <token> | null}``; pass ``next`` back as
``?page=<token>`` for the following page.
"""

from __future__ import annotations

import re
from typing import Generic, TypeVar

import msgspec

API = "/v1"
DIGEST = re.compile(r"^sha256:([0-9a-f]{64})\Z")
OWNER = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}\Z")  # either half of a manifest Name "owner/name"
MAX_TTL = 100 * 365 * 86400  # seconds: a token's lifetime, at most (an expiry every clock can print)
TAG = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}\Z")  # starts with a letter: never a version
TOKEN = re.compile(r"^lwh_[A-Za-z0-9_\-]+\Z")  # "lwh_" + secrets.token_urlsafe, as `lwhub.server.auth` issues them
MAX_PAGE = 200
T = TypeVar("T")


class Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """Unknown fields are ignored: the server may add some."""


class VersionInfo(Struct):
    name: str  # "owner/name"
    version: str
    manifest: str  # digest of manifest.json
    signature: str  # digest of bundle.sig
    size: int  # bytes of every file the manifest lists
    key_id: str  # the publisher key that signed it
    created: float  # unix seconds
    description: str = ""
    tags: list[str] = []
    yanked: bool = False
    yank_reason: str = ""


class SignedVersion(Struct):
    """A version record with its manifest and signature (base64 in JSON): what a pull needs
    before any large download, in one round trip. The bytes are checked against the
    record's digests; None where the registry cannot inline them (then fetch by digest)."""

    info: VersionInfo
    manifest: bytes | None = None
    signature: bytes | None = None


class BundleInfo(Struct):
    name: str
    description: str = ""
    tags: list[str] = []
    latest: str | None = None  # what the tag "latest" resolves to now
    named_tags: dict[str, str] = {}  # explicitly set tags -> version
    versions: int = 0
    updated: float = 0.0


class Page(Struct, Generic[T]):
    items: list[T]
    next: str | None = None


class KeyInfo(Struct):
    key_id: str
    pem: str
    created: float


class Whoami(Struct):
    account: str
    scopes: list[str]
    expires: float | None = None


class NewToken(Struct):
    token: str
    account: str
    scopes: list[str]
    expires: float | None = None


class PublishRequest(Struct):
    manifest: str
    signature: str


class YankRequest(Struct):
    yanked: bool = True
    reason: str = ""


class TagRequest(Struct):
    version: str


class TokenRequest(Struct):
    scopes: list[str] | None = None  # None: the caller's own scopes
    ttl: float | None = None  # seconds (cut to MAX_TTL, and to the maker's expiry); None: does not expire


class BlobInfo(Struct):
    digest: str
    size: int
    created: bool  # False when the registry already had it


def digest_hex(digest: str) -> str | None:
    m = DIGEST.match(digest)
    return m.group(1) if m else None


def split_name(full: str) -> tuple[str, str]:
    owner, _, name = full.partition("/")
    return owner, name
