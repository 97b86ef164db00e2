"""The trust store: keys pinned per owner, by key id."""

from __future__ import annotations

import pytest

from lwformat.bundle.keys import key_id, load_public_key
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
    assert kid not in store.key_ids("alice")


def test_owner_names_cannot_escape_the_store(tmp_path, keys):
    with pytest.raises(ValueError):
        TrustStore(tmp_path).pin("../etc", keys[1])
