"""The SQLite metadata store: immutability, precedence order, pagination, latest, search."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from lwhub.errors import ConflictError, NotFoundError
from lwhub.protocol import VersionInfo
from lwhub.server.store import SQLiteStore

DIGEST = "sha256:" + "ab" * 32


def info(name: str, version: str, **kw) -> VersionInfo:
    return VersionInfo(name=name, version=version, manifest=DIGEST, signature=DIGEST, size=1, key_id="k", created=1.0, **kw)


@pytest.fixture
def store(tmp_path):
    return SQLiteStore(tmp_path / "r.sqlite3")


def test_versions_are_immutable(store):
    store.add_version(info("alice/x", "1.0.0"), [DIGEST])
    with pytest.raises(ConflictError) as caught:
        store.add_version(info("alice/x", "1.0.0", description="other"), [DIGEST])
    assert caught.value.code == "version_exists"
    assert store.version("alice", "x", "1.0.0").description == ""


def test_only_build_metadata_makes_a_twin_and_case_tells_versions_apart(store):
    """1.0.0-RC.1 and 1.0.0-rc.1 differ in precedence (ASCII order), so neither is the other's twin."""
    store.add_version(info("alice/x", "1.0.0-rc.1+b1"), [])
    store.add_version(info("alice/x", "1.0.0-RC.1"), [])
    store.add_version(info("alice/x", "1.0.0-rc.10"), [])  # a longer version sharing the prefix: not a twin
    for twin in ("1.0.0-rc.1", "1.0.0-rc.1+b2", "1.0.0-RC.1+b1"):
        with pytest.raises(ConflictError, match="only in build metadata"):
            store.add_version(info("alice/x", twin), [])
    assert {v.version for _, v in store.versions("alice", "x", after=None, limit=10)} == {"1.0.0-rc.1+b1", "1.0.0-RC.1", "1.0.0-rc.10"}

def test_listing_is_newest_first_by_precedence_and_pages_cover_everything_once(store):
    published = ["1.10.0", "1.2.0", "1.0.0-rc.1", "2.0.0-alpha", "1.0.0", "1.9.9"]
    for v in published:
        store.add_version(info("alice/x", v), [])
    seen, after = [], None
    while True:
        page = store.versions("alice", "x", after=after, limit=4)
        seen += [v.version for _, v in page]
        if len(page) < 4:
            break
        after = page[-1][0]
    assert seen == ["2.0.0-alpha", "1.10.0", "1.9.9", "1.2.0", "1.0.0", "1.0.0-rc.1"]


def test_latest_skips_prereleases_and_yanked(store):
    for v in ["1.0.0", "1.1.0", "2.0.0-rc.1"]:
        store.add_version(info("alice/x", v), [])
    assert store.latest("alice", "x").version == "1.1.0"
    store.yank("alice", "x", "1.1.0", yanked=True, reason="broken")
    assert store.latest("alice", "x").version == "1.0.0"
    assert store.version("alice", "x", "1.1.0").yank_reason == "broken"
    with pytest.raises(NotFoundError):
        store.yank("alice", "x", "9.9.9", yanked=True, reason="")


def test_search_matches_name_description_tags_literally(store):
    store.add_version(info("alice/noir-style", "1.0.0", description="rainy streets"), [])
    store.add_version(info("bob/sunny", "1.0.0", tags=["pastel"]), [])
    store.add_version(info("carol/100pct", "1.0.0", description="100% real"), [])
    names = lambda q: [b.name for b in store.search(q, after=None, limit=10)]  # noqa: E731
    assert names("NOIR") == ["alice/noir-style"]
    assert names("rainy") == ["alice/noir-style"]
    assert names("pastel") == ["bob/sunny"]
    assert names("0%") == ["carol/100pct"]  # '%' is a character here, not a wildcard
    assert names("_") == []
    assert [b.name for b in store.search("", after="alice/noir-style", limit=10)] == ["bob/sunny", "carol/100pct"]


def test_bundle_description_follows_the_highest_version(store):
    store.add_version(info("alice/x", "2.0.0", description="two"), [])
    store.add_version(info("alice/x", "1.0.0", description="one"), [])
    assert store.bundle("alice", "x").description == "two"
    assert store.bundle("alice", "x").versions == 2


def test_concurrent_inserts_of_one_version_have_one_winner(tmp_path):
    path = tmp_path / "r.sqlite3"
    SQLiteStore(path)
    outcomes, barrier = [], threading.Barrier(6)

    def publish(n: int) -> None:
        store = SQLiteStore(path)  # as separate workers would
        barrier.wait()
        try:
            store.add_version(info("alice/x", "1.0.0", description=str(n)), [])
            outcomes.append("won")
        except ConflictError:
            outcomes.append("lost")

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 5 + ["won"]
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM versions").fetchone()[0]
    assert rows == 1


FULL_DISK = r"""
import os, resource, signal, sys
from lwhub.errors import StorageError
from lwhub.server.store import SQLiteStore

store = SQLiteStore(sys.argv[1])
store.add_account("alice")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
files = [sys.argv[1], sys.argv[1] + "-wal"]
resource.setrlimit(resource.RLIMIT_FSIZE, (max(os.path.getsize(f) for f in files if os.path.exists(f)) + 256 * 1024, hard))
written = 0
try:
    for i in range(100000):
        store.add_token(f"{i:064x}" + "x" * 400, "alice", ["alice"], None)
        written += 1
except StorageError as exc:
    print("refused", written, exc.status, "nothing was changed" in str(exc))
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
store.add_token("after", "alice", ["alice"], None)  # the database works again once there is room
print("rows", store._one("SELECT count(*) FROM tokens")[0] == written + 1)
"""


def test_a_full_disk_is_a_storage_error_and_changes_nothing(tmp_path):
    """SQLite's own disk-full and I/O errors were answered 500 internal_error; they are 507 storage_error."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "r.sqlite3")], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    refused, written, status, said = done.stdout.splitlines()[0].split()
    assert refused == "refused" and int(written) > 0 and status == "507" and said == "True"
    assert done.stdout.splitlines()[1] == "rows True"
