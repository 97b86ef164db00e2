"""Re-naming a bundle: new canonical manifest bytes, the same files, a copy that needs a new signature."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from lwformat.bundle.canonical import is_canonical
from lwformat.bundle.keys import generate_keypair
from lwformat.bundle.read import Bundle
from lwformat.bundle.rename import renamed, write_renamed
from lwformat.bundle.signing import sign_bundle, verify_signature
from lwformat.bundle.verify import verify_files
from lwformat.errors import BundleExistsError, BundleFormatError, UnsafePathError

from .tiny import tree_bytes, write_tiny


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("rename")
    folder = write_tiny(root)
    sign_bundle(folder, generate_keypair(root, name="k")[0])
    return folder


def test_renamed_changes_only_name_and_version(source):
    data = (source / "manifest.json").read_bytes()
    out = renamed(data, name="someone/else", version="2.0.0-rc.1")
    assert is_canonical(out) and out != data
    assert json.loads(out) == json.loads(data) | {"name": "someone/else", "version": "2.0.0-rc.1"}
    assert renamed(data) == data  # nothing asked, nothing changed: the writer's bytes were canonical
    assert json.loads(renamed(data, version="3.0.0"))["name"] == json.loads(data)["name"]


@pytest.mark.parametrize("change", [{"name": "no-owner"}, {"name": "Upper/case"}, {"version": "1.0"}])
def test_renamed_refuses_what_the_manifest_refuses(source, change):
    with pytest.raises(BundleFormatError):
        renamed((source / "manifest.json").read_bytes(), **change)


def test_write_renamed_makes_an_unsigned_copy_that_signs_and_reads(source, tmp_path):
    before = tree_bytes(source)
    manifest = write_renamed(source, tmp_path / "copy", name="someone/else", version="2.0.0")
    assert (manifest.name, manifest.version) == ("someone/else", "2.0.0")
    assert tree_bytes(source) == before  # the source is untouched
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["adapters.safetensors", "manifest.json"]
    with Bundle.open(tmp_path / "copy") as bundle:
        verify_files(bundle)
        assert not bundle.signed and bundle.manifest == manifest
    private, public = generate_keypair(tmp_path, name="new")
    sign_bundle(tmp_path / "copy", private)
    assert len(verify_signature(tmp_path / "copy", [public])) == 64


def test_write_renamed_never_overwrites_and_leaves_nothing_on_failure(source, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(BundleExistsError):
        write_renamed(source, tmp_path / "taken", version="9.0.0")
    with pytest.raises(BundleFormatError):
        write_renamed(source, tmp_path / "bad", name="not a name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_renamed_keeps_fields_this_reader_does_not_know(source):
    value = json.loads((source / "manifest.json").read_bytes()) | {"x_future": {"b": [1, 2.5], "a": "kept"}}
    out = json.loads(renamed(json.dumps(value).encode(), version="1.0.1"))
    assert out == value | {"version": "1.0.1"}


@pytest.mark.parametrize("when", ["before", "after listing"])
def test_write_renamed_refuses_a_linked_source_file_and_writes_nothing(source, tmp_path, monkeypatch, when):
    folder = shutil.copytree(source, tmp_path / "src")
    (tmp_path / "outside").write_bytes((folder / "adapters.safetensors").read_bytes())

    def link(*_):
        os.unlink(folder / "adapters.safetensors")
        os.symlink(tmp_path / "outside", folder / "adapters.safetensors")

    if when == "before":
        link()
    else:  # the link appears once the directory was listed: opening the file must refuse it too
        monkeypatch.setattr("lwformat.bundle.rename.list_members", link, raising=False)
    with pytest.raises(UnsafePathError, match="a link") as info:
        write_renamed(folder, tmp_path / "copy", version="2.0.0")
    assert info.value.path == "adapters.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "src"]


def test_write_renamed_copies_where_it_cannot_link(source, tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    write_renamed(source, tmp_path / "copy", version="2.0.0")
    copy = tmp_path / "copy" / "adapters.safetensors"
    assert copy.read_bytes() == (source / "adapters.safetensors").read_bytes()
    assert copy.stat().st_ino != (source / "adapters.safetensors").stat().st_ino
    with Bundle.open(tmp_path / "copy") as bundle:
        verify_files(bundle)
