"""Accounts and bearer tokens scoped to namespaces.

A token is ``lwh_`` + 43 url-safe characters (256 random bits), shown once; the
registry stores only ``sha256(token)`` hex, so a leaked database leaks no token.
A token belongs to an account and carries scopes: ``owner`` covers every bundle
``owner/*`` and the owner's publisher keys, ``owner/name`` covers that one bundle.
An expired token is refused with ``token_expired``, an unknown one with
``token_invalid``. Reads need no token.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import AuthError, BadRequestError, ForbiddenError
from ..protocol import OWNER
from .store import Store, open_store

PREFIX = "lwh_"
SCOPE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}(/[a-z0-9][a-z0-9_.\-]{0,63})?\Z")


@dataclass(frozen=True)
class Principal:
    account: str
    scopes: tuple[str, ...]
    expires: float | None

    def may_write(self, owner: str, name: str | None = None) -> bool:
        return owner in self.scopes or (name is not None and f"{owner}/{name}" in self.scopes)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(store: Store, authorization: str | None, *, now: float | None = None) -> Principal:
    """The principal behind an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        raise AuthError("this request needs a token: send 'Authorization: Bearer <token>' (see `lwhub login`)", code="token_missing")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.startswith(PREFIX):
        raise AuthError("the Authorization header must be 'Bearer lwh_...'", code="token_invalid")
    row = store.token(token_hash(token.strip()))
    if row is None:
        raise AuthError("unknown token: it was never issued here or was revoked", code="token_invalid")
    if row.expires is not None and (now or time.time()) >= row.expires:
        raise AuthError("the token has expired: ask for a new one and `lwhub login` again", code="token_expired")
    return Principal(row.account, tuple(row.scopes), row.expires)


def authorize(principal: Principal, owner: str, name: str | None = None) -> None:
    if not principal.may_write(owner, name):
        target = f"{owner}/{name}" if name else owner
        raise ForbiddenError(
            f"the token of {principal.account!r} may not write {target!r} (its scopes: {', '.join(principal.scopes) or 'none'})",
            code="namespace_forbidden", detail={"namespace": target, "scopes": list(principal.scopes)},
        )  # fmt: skip


def check_scopes(scopes: list[str]) -> None:
    for scope in scopes:
        if not SCOPE.match(scope):
            raise BadRequestError(f"scope {scope!r} is neither 'owner' nor 'owner/name'", code="invalid_request")


def issue_token(store: Store, account: str, scopes: list[str], *, expires: float | None = None) -> str:
    check_scopes(scopes)
    token = PREFIX + secrets.token_urlsafe(32)
    store.add_token(token_hash(token), account, scopes, expires)
    return token


def create_account(data_dir: str | Path, owner: str, *, expires: float | None = None) -> str:
    """Offline bootstrap: make account `owner` owning namespace `owner`; returns its first token."""
    if not OWNER.match(owner):
        raise BadRequestError(f"{owner!r} is not a valid owner name (lowercase letters, digits, '_', '.', '-')", code="invalid_name")
    store = open_store(data_dir)
    store.add_account(owner)
    return issue_token(store, owner, [owner], expires=expires)


def create_token(data_dir: str | Path, account: str, scopes: list[str] | None = None, *, expires: float | None = None) -> str:
    """Offline: another token for an existing account (default scope: the account's own namespace)."""
    return issue_token(open_store(data_dir), account, scopes if scopes is not None else [account], expires=expires)
