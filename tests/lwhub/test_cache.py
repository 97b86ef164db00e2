"""The local cache: torn records, atomic installs."""

from __future__ import annotations

import os

import pytest

from lwhub.cache import Cache
from lwhub.client import Client
from lwhub.errors import CacheError


def test_a_torn_done_record_is_ignored(tmp_path):
    cache = Cache(tmp_path)
    fd, record = cache.open_partial("ab" * 32, 1000)
    for i in (0, 3, 7):
        cache.mark_done(record, i)
    os.write(record, b"\x09\x00")  # a crash in the middle of a record
    os.close(fd)
    os.close(record)
    assert cache.done_chunks("ab" * 32) == {0, 3, 7}
    assert os.path.getsize(cache.partial("ab" * 32)) == 1000


def test_installing_a_bundle_that_another_process_installed_first(tmp_path):
    cache = Cache(tmp_path)
    blob = tmp_path / "blob"
    blob.write_bytes(b"weights")
    first = cache.install_bundle("cd" * 32, {"manifest.json": b"{}", "adapters.safetensors": blob})
    again = cache.install_bundle("cd" * 32, {"manifest.json": b"{}", "adapters.safetensors": blob})
    assert first == again and sorted(p.name for p in first.iterdir()) == ["adapters.safetensors", "manifest.json"]
    assert list(cache.tmp.iterdir()) == []
    cache.drop_bundle("cd" * 32)
    assert not first.exists() and list(cache.tmp.iterdir()) == []


def test_a_drop_takes_only_the_directory_found_broken(tmp_path):
    """Another process sharing the cache may drop and install the bundle again between a look and a drop."""
    cache = Cache(tmp_path)
    folder = cache.install_bundle("ab" * 32, {"manifest.json": b"first"})
    with cache.holding_bundle_dir("ab" * 32) as held:  # found broken, say
        cache.drop_bundle("ab" * 32)  # another process dropped it...
        cache.install_bundle("ab" * 32, {"manifest.json": b"again"})  # ...and installed it again
        cache.drop_bundle("ab" * 32, held=held)  # the late drop leaves the new one
    assert (folder / "manifest.json").read_bytes() == b"again"
    with cache.holding_bundle_dir("ab" * 32) as held:
        cache.drop_bundle("ab" * 32, held=held)
    with cache.holding_bundle_dir("ab" * 32) as absent:
        assert not folder.exists() and not list(cache.tmp.iterdir()) and absent is None


@pytest.mark.parametrize("where", ["root under a file", "partial is a file"])
def test_a_cache_that_cannot_be_made_is_a_cache_error_naming_it(tmp_path, where):
    """Ways root cannot bypass either: a path through a regular file, a sub-directory that is a file."""
    if where == "root under a file":
        (tmp_path / "afile").write_text("x")
        root = tmp_path / "afile" / "cache"
    else:
        root = tmp_path / "cache"
        (root / "partial").parent.mkdir()
        (root / "partial").write_text("not a directory")
    with pytest.raises(CacheError, match=f"cache at {root}") as caught:
        Client(cache_dir=root, offline=True)
    assert caught.value.path == str(root)
