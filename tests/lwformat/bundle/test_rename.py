"""Re-naming a bundle: new canonical manifest bytes, the same files, a copy that needs a new signature."""

from __future__ import annotations

import json

import pytest

from lwformat.bundle.canonical import is_canonical
from lwformat.bundle.keys import generate_keypair
from lwformat.bundle.read import Bundle
from lwformat.bundle.rename import renamed, write_renamed
from lwformat.bundle.signing import sign_bundle, verify_signature
from lwformat.bundle.verify import verify_files
from lwformat.errors import BundleExistsError, BundleFormatError

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
