"""Writing a bundle's directory or archive never replaces what another process put at the target meanwhile."""

import errno
import os

import pytest

from lwformat.bundle import files
from lwformat.bundle.files import new_directory, rename_new


@pytest.fixture(params=["renameat2", "no renameat2"])
def kernel(request, monkeypatch):
    """Each test runs with the kernel's no-replace rename and as on a platform without it."""
    if request.param == "no renameat2":
        monkeypatch.setattr(files, "_RENAMEAT2", None)
from lwformat.errors import BundleExistsError


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


@pytest.mark.parametrize("appears", ["empty directory", "file"])
def test_a_target_that_appears_while_the_bundle_is_written_is_kept(tmp_path, appears, kernel):
    target = tmp_path / "noir"
    with pytest.raises(BundleExistsError, match="already exists; nothing is overwritten"), new_directory(target) as tmp:
        (tmp / "manifest.json").write_text("{}")
        if appears == "file":  # after new_directory checked, before it renames
            target.write_text("theirs")
        else:
            target.mkdir()
    assert (target.read_text() == "theirs") if appears == "file" else (target.is_dir() and not os.listdir(target))
    assert leftovers(tmp_path) == []


def test_a_file_renamed_onto_one_that_appeared_is_refused_and_both_stay(tmp_path, kernel):
    source, target = tmp_path / "a.lwb.partial", tmp_path / "a.lwb"
    source.write_bytes(b"ours")
    target.write_bytes(b"")
    with pytest.raises(BundleExistsError):
        rename_new(source, target)
    assert source.read_bytes() == b"ours" and target.read_bytes() == b""


def test_a_free_target_takes_the_new_directory(tmp_path, kernel):
    target = tmp_path / "noir"
    with new_directory(target) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert (target / "manifest.json").read_text() == "{}" and leftovers(tmp_path) == []


def test_a_failed_sync_after_the_rename_keeps_the_bundle_and_says_it_is_written(tmp_path, monkeypatch):
    target, real = tmp_path / "noir", files.fsync_dir

    def parent_fails(path):
        if path == tmp_path:
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(files, "fsync_dir", parent_fails)
    written = "written, but syncing its directory entry failed"
    with pytest.raises(OSError, match=written) as info, new_directory(target) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert info.value.errno == errno.EIO
    assert (target / "manifest.json").read_text() == "{}" and leftovers(tmp_path) == []


def test_a_name_holding_a_nul_byte_is_refused_not_cut_short(tmp_path):
    """A C string ends at NUL: renameat2 would have renamed to the name's first part."""
    source = tmp_path / "a.partial"
    source.write_bytes(b"ours")
    with pytest.raises(ValueError, match="null"):
        rename_new(source, tmp_path / "b\0evil")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.partial"]
