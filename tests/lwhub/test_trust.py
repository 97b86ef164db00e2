"""The trust store: keys pinned per owner, by key id, and the versions seen (rollback protection)."""

from __future__ import annotations

import pytest

from lwformat.bundle.keys import key_id, load_public_key
from lwhub.errors import RefError
from lwhub.trust import TrustStore


def test_pin_list_unpin(tmp_path, keys, other_keys):
    store = TrustStore(tmp_path)
    assert store.keys("alice") == []
    kid = store.pin("alice", keys[1])
    assert kid == key_id(load_public_key(keys[1])) and store.key_ids("alice") == [kid]
    assert store.pin("alice", keys[1].read_bytes()) == kid  # the same key twice is one pin
    assert store.keys("bob") == []  # per owner
    store.pin("alice", load_public_key(other_keys[1]))
    assert len(store.keys("alice")) == 2
    assert store.unpin("alice", kid) and not store.unpin("alice", kid)
    store.pin("alice", keys[1])
    assert not store.unpin("alice", "") and store.unpin("alice", kid[:16])  # a prefix, as `lwhub info` prints ids
    assert kid not in store.key_ids("alice")


def test_owners_are_those_with_a_key_pinned(tmp_path, keys):
    store = TrustStore(tmp_path)
    assert store.owners() == []
    kid = store.pin("bob", keys[1])
    store.pin("alice", keys[1])
    store.mark_seen("carol/x", "1.0.0")  # seen markers alone are not a pin
    assert store.owners() == ["alice", "bob"]
    store.unpin("bob", kid)  # the folder stays, holding nothing pinned
    assert store.owners() == ["alice"]


def test_owner_names_cannot_escape_the_store(tmp_path, keys):
    for bad in ("../etc", "Author", ""):
        with pytest.raises(RefError):
            TrustStore(tmp_path).pin(bad, keys[1])
    assert list(tmp_path.iterdir()) == []


def test_seen_versions_only_grow_and_compare_by_precedence(tmp_path, keys):
    store = TrustStore(tmp_path)
    assert store.highest_seen("alice/x") is None
    for v in ["1.2.0", "1.10.0", "1.10.0-rc.1", "1.9.0"]:
        store.mark_seen("alice/x", v)
    store.mark_seen("alice/x-y", "9.0.0")  # another name of the same owner
    store.pin("alice", keys[1])
    assert store.highest_seen("alice/x") == "1.10.0" and store.highest_seen("alice/x-y") == "9.0.0"
    assert len(store.key_ids("alice")) == 1  # markers are not keys
    for bad in ("alice", "alice/../x", "../alice/x"):
        with pytest.raises(ValueError):
            store.highest_seen(bad)
    with pytest.raises(ValueError):
        store.mark_seen("alice/x", "latest")
