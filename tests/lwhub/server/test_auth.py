"""Accounts and tokens: stored hashed, scoped to namespaces, expiring."""

from __future__ import annotations

import sqlite3
import time

import pytest

from lwhub.errors import AuthError, BadRequestError, ConflictError, ForbiddenError
from lwhub.server.auth import authenticate, authorize, create_account, create_token
from lwhub.server.store import open_store


def test_the_database_holds_only_token_hashes(tmp_path):
    token = create_account(tmp_path, "alice")
    assert token.startswith("lwh_") and len(token) > 40
    dump = "\n".join(sqlite3.connect(tmp_path / "registry.sqlite3").iterdump())
    assert token not in dump and token[4:] not in dump
    assert authenticate(open_store(tmp_path), f"Bearer {token}").account == "alice"


def test_unknown_malformed_missing_and_expired_tokens(tmp_path):
    create_account(tmp_path, "alice")
    store = open_store(tmp_path)
    expired = create_token(tmp_path, "alice", expires=time.time() - 1)
    cases = {None: "token_missing", "Bearer lwh_nope": "token_invalid", "Basic abc": "token_invalid", f"Bearer {expired}": "token_expired"}
    for header, code in cases.items():
        with pytest.raises(AuthError) as caught:
            authenticate(store, header)
        assert caught.value.code == code


def test_scopes_cover_an_owner_or_one_bundle(tmp_path):
    create_account(tmp_path, "alice")
    store = open_store(tmp_path)
    narrow = authenticate(store, "Bearer " + create_token(tmp_path, "alice", ["alice/noir"]))
    authorize(narrow, "alice", "noir")
    for owner, name in [("alice", "rain"), ("alice", None), ("bob", "noir")]:
        with pytest.raises(ForbiddenError) as caught:
            authorize(narrow, owner, name)
        assert caught.value.code == "namespace_forbidden"


def test_account_names_and_duplicates(tmp_path):
    create_account(tmp_path, "alice")
    with pytest.raises(ConflictError):
        create_account(tmp_path, "alice")
    with pytest.raises(BadRequestError):
        create_account(tmp_path, "Alice/../x")
