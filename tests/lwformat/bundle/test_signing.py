"""Our signatures on their own: round trips, tamper fuzzing, file-set and key errors."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lwformat
from lwformat.bundle import keys, signing
from lwformat.bundle.limits import MAX_SIGNATURE_BYTES
from lwformat.errors import (
    BundleLimitError,
    BundleNotFoundError,
    MalformedSignatureError,
    MissingSignatureError,
    SignatureError,
    SignedFileMismatchError,
    SigningError,
    UntrustedSignatureError,
)


def bundle_like(root: Path) -> Path:
    """A directory holding what a bundle holds: a JSON manifest and a real safetensors file."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tensors = {"a:fc.lora_A": torch.randn(2, 8), "a:fc.lora_B": torch.randn(8, 2)}
    save_file(tensors, str(root / "adapters.safetensors"))
    (root / "manifest.json").write_text(json.dumps({"spec": "lwbundle/1.0", "name": "test/fuzz"}, sort_keys=True))
    return root


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return keys.generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def signed(tmp_path, pair) -> Path:
    d = bundle_like(tmp_path / "b")
    signing.sign_bundle(d, pair[0])
    return d


def payload(sig_file: Path) -> dict:
    doc = json.loads(sig_file.read_bytes())
    return json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))


def test_round_trip_returns_the_signers_key_id(signed, pair):
    public = keys.load_public_key(pair[1])
    der = keys.public_der(public)
    assert signing.verify_signature(signed, pair[1]) == hashlib.sha256(der).hexdigest()
    assert signing.verify_signature(signed, [public]) == keys.key_id(public)


def test_statement_lists_every_file_but_the_signature_with_its_sha256(signed):
    statement = payload(signed / "bundle.sig")
    listed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in signed.iterdir() if p.name != "bundle.sig"}
    assert listed == on_disk
    raw = b"".join(bytes.fromhex(listed[n]) for n in sorted(listed))
    assert statement["subject"][0]["digest"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert statement["predicate"]["serialization"]["method"] == "files"


def test_signature_file_is_a_sigstore_bundle_with_the_key_hint(signed, pair):
    doc = json.loads((signed / "bundle.sig").read_bytes())
    assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert doc["verificationMaterial"]["publicKey"]["hint"] == hashlib.sha256(pair[1].read_bytes()).hexdigest()
    assert doc["dsseEnvelope"]["payloadType"] == "application/vnd.in-toto+json"


def flip(path: Path, position: int, rng: random.Random) -> bytes:
    data = path.read_bytes()
    changed = bytearray(data)
    changed[position] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(changed))
    return data


@pytest.mark.parametrize("name", ["manifest.json", "adapters.safetensors", "bundle.sig"])
def test_changing_any_single_byte_of_any_file_fails(signed, pair, name):
    rng = random.Random(name)
    public = keys.load_public_key(pair[1])
    target = signed / name
    size = target.stat().st_size
    for position in range(size):  # every byte: the files are small
        original = flip(target, position, rng)
        with pytest.raises(SignatureError):
            signing.verify_signature(signed, [public])
        target.write_bytes(original)
    assert signing.verify_signature(signed, [public])  # restored: verifies again


def test_a_changed_file_is_named_with_both_digests(signed, pair):
    before = hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest()
    (signed / "manifest.json").write_text("{}")
    with pytest.raises(SignedFileMismatchError) as info:
        signing.verify_signature(signed, pair[1])
    assert info.value.path == "manifest.json"
    assert (info.value.expected, info.value.found) == (before, hashlib.sha256(b"{}").hexdigest())


def test_an_added_file_fails(signed, pair):
    (signed / "README.md").write_text("hi")
    with pytest.raises(SignedFileMismatchError, match="README.md.*not signed") as info:
        signing.verify_signature(signed, pair[1])
    assert info.value.expected is None


def test_an_added_empty_file_or_subdirectory_file_fails(signed, pair):
    (signed / "sub").mkdir()
    (signed / "sub" / "x").write_bytes(b"")
    with pytest.raises(SignedFileMismatchError, match="sub/x"):
        signing.verify_signature(signed, pair[1])


def test_a_removed_file_fails(signed, pair):
    (signed / "adapters.safetensors").unlink()
    with pytest.raises(SignedFileMismatchError, match="adapters.safetensors: is missing") as info:
        signing.verify_signature(signed, pair[1])
    assert info.value.found is None


def test_a_renamed_file_fails(signed, pair):
    (signed / "manifest.json").rename(signed / "manifest.jsn")
    with pytest.raises(SignedFileMismatchError):
        signing.verify_signature(signed, pair[1])


def test_a_symlink_is_refused(signed, pair):
    (signed / "link").symlink_to(signed / "manifest.json")
    with pytest.raises(SignedFileMismatchError, match="link: not a regular file"):
        signing.verify_signature(signed, pair[1])


def test_the_wrong_key_fails_and_says_so(signed, tmp_path):
    _, other = keys.generate_keypair(tmp_path, name="other")
    with pytest.raises(UntrustedSignatureError, match="none of the 1 given key") as info:
        signing.verify_signature(signed, other)
    assert info.value.key_ids == [keys.key_id(keys.load_public_key(other))]


def test_any_of_several_keys_may_match(signed, pair, tmp_path):
    _, other = keys.generate_keypair(tmp_path, name="other")
    assert signing.verify_signature(signed, [other, pair[1]]) == keys.key_id(keys.load_public_key(pair[1]))


def test_a_hint_naming_another_key_fails_like_the_stock_verifier(signed, pair, tmp_path):
    doc = json.loads((signed / "bundle.sig").read_bytes())
    doc["verificationMaterial"]["publicKey"]["hint"] = "0" * 64
    (signed / "bundle.sig").write_text(json.dumps(doc, separators=(",", ":")))
    with pytest.raises(UntrustedSignatureError):
        signing.verify_signature(signed, pair[1])


def test_a_statement_signed_for_other_files_fails(signed, pair, tmp_path):
    # A valid signature over a statement that lists different content: the digests must be checked.
    key = keys.load_private_key(pair[0])
    statement = signing.statement_for({"adapters.safetensors": "0" * 64, "manifest.json": "1" * 64})
    (signed / "bundle.sig").write_bytes(signing.sign_statement(statement, key))
    with pytest.raises(SignedFileMismatchError, match="adapters.safetensors: differs"):
        signing.verify_signature(signed, pair[1])


def test_an_inconsistent_subject_digest_is_malformed(signed, pair):
    key = keys.load_private_key(pair[0])
    statement = json.loads(signing.statement_for({"manifest.json": "1" * 64}))
    statement["subject"][0]["digest"]["sha256"] = "2" * 64
    (signed / "bundle.sig").write_bytes(signing.sign_statement(json.dumps(statement).encode(), key))
    with pytest.raises(MalformedSignatureError, match="subject digest"):
        signing.verify_signature(signed, pair[1])


def test_unsupported_hash_type_is_malformed(signed, pair):
    key = keys.load_private_key(pair[0])
    statement = json.loads(signing.statement_for({"manifest.json": "1" * 64}))
    statement["predicate"]["serialization"]["hash_type"] = "blake3"
    (signed / "bundle.sig").write_bytes(signing.sign_statement(json.dumps(statement).encode(), key))
    with pytest.raises(MalformedSignatureError, match="blake3"):
        signing.verify_signature(signed, pair[1])


@pytest.mark.parametrize("variant", ["nested", "bom", "utf16", "twice", "bigint"])
def test_signature_files_that_are_not_plain_unambiguous_json_are_malformed(signed, pair, variant):
    """Deep nesting crashed the parser (RecursionError); a BOM or UTF-16 read here but not in model_signing; a key
    named twice means what each reader makes of it."""
    good = (signed / "bundle.sig").read_bytes()
    changed = {
        "nested": b"[" * 100_000 + b"]" * 100_000,
        "bom": b"\xef\xbb\xbf" + good,
        "utf16": good.decode().encode("utf-16"),
        "twice": good.replace(b'{"mediaType"', b'{"mediaType": "x", "mediaType"', 1),
        "bigint": good.replace(b'{"mediaType"', b'{"n": ' + b"9" * 5000 + b', "mediaType"', 1),  # past int()'s digit limit
    }[variant]
    assert changed != good
    (signed / "bundle.sig").write_bytes(changed)
    with pytest.raises(MalformedSignatureError):
        signing.verify_signature(signed, pair[1])


def test_missing_signature_and_missing_directory(tmp_path, pair):
    d = bundle_like(tmp_path / "b")
    with pytest.raises(MissingSignatureError, match="not signed") as info:
        signing.verify_signature(d, pair[1])
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(BundleNotFoundError):
        signing.verify_signature(tmp_path / "nope", pair[1])


def test_an_oversized_signature_is_refused_before_reading(signed, pair):
    with open(signed / "bundle.sig", "r+b") as f:
        f.truncate(MAX_SIGNATURE_BYTES + 1)
    with pytest.raises(BundleLimitError, match="MAX_SIGNATURE_BYTES"):
        signing.verify_signature(signed, pair[1])


def test_a_signature_past_the_readers_limit_is_refused_and_the_old_one_kept(signed, pair):
    (signed / "pad.bin").write_bytes(bytes(5000))  # by shards of 1 byte: 5000 resources, over 1 MiB signed
    old = (signed / "bundle.sig").read_bytes()
    with pytest.raises(SigningError, match="above the limit of 1,048,576 .MAX_SIGNATURE_BYTES.; sign with a larger shard size"):
        signing.sign_bundle(signed, pair[0], shard_size=1)
    assert (signed / "bundle.sig").read_bytes() == old
    assert sorted(p.name for p in signed.iterdir()) == ["adapters.safetensors", "bundle.sig", "manifest.json", "pad.bin"]
    signing.sign_bundle(signed, pair[0], shard_size=4096)
    assert signing.verify_signature(signed, pair[1])


def test_resigning_replaces_the_signature_and_leaves_no_temporary_file(signed, pair):
    (signed / "manifest.json").write_text('{"changed": true}')
    signing.sign_bundle(signed, pair[0])
    assert signing.verify_signature(signed, pair[1])
    assert sorted(p.name for p in signed.iterdir()) == ["adapters.safetensors", "bundle.sig", "manifest.json"]
    assert oct((signed / "bundle.sig").stat().st_mode & 0o777) == "0o644"


def test_a_signer_killed_before_the_rename_leaves_the_bundle_as_it_was(signed, pair):
    before = {p.name: p.read_bytes() for p in signed.iterdir()}
    child = f"""
import os, signal
from lwformat.bundle import signing
os.chmod = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # dies with the new signature written, not renamed
signing.sign_bundle({str(signed)!r}, {str(pair[0])!r}, shard_size=64)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(lwformat.__file__).parents[1])}
    assert subprocess.run([sys.executable, "-c", child], env=env, check=False).returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in signed.iterdir()} == before  # no stray file: the bundle still opens
    assert signing.verify_signature(signed, pair[1])


@pytest.mark.parametrize("parent", ["not writable", "another file system"])
def test_a_parent_that_takes_no_temporary_file_still_lets_the_bundle_be_signed(signed, pair, monkeypatch, parent):
    real_mkstemp, real_replace = tempfile.mkstemp, os.replace

    def mkstemp(*args, dir, **kwargs):
        if parent == "not writable" and Path(dir) == signed.resolve().parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def replace(source, target):
        if parent == "another file system" and Path(source).parent != Path(target).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(source, target)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "replace", replace)
    signing.sign_bundle(signed, pair[0], shard_size=64)
    assert sorted(p.name for p in signed.iterdir()) == ["adapters.safetensors", "bundle.sig", "manifest.json"]
    assert sorted(p.name for p in signed.parent.iterdir()) == ["b"]
    assert signing.verify_signature(signed, pair[1])


def test_signing_by_shards_lists_every_shard(tmp_path, pair):
    d = bundle_like(tmp_path / "b")
    signing.sign_bundle(d, pair[0], shard_size=100)
    statement = payload(d / "bundle.sig")
    assert statement["predicate"]["serialization"]["shard_size"] == 100
    data = (d / "adapters.safetensors").read_bytes()
    names = [r["name"] for r in statement["predicate"]["resources"] if r["name"].startswith("adapters")]
    assert names == [f"adapters.safetensors:{s}:{min(s + 100, len(data))}" for s in range(0, len(data), 100)]
    for r in statement["predicate"]["resources"]:
        file, start, end = r["name"].rsplit(":", 2)
        assert r["digest"] == hashlib.sha256((d / file).read_bytes()[int(start) : int(end)]).hexdigest()
    assert signing.verify_signature(d, pair[1])
    flip(d / "adapters.safetensors", len(data) - 1, random.Random(0))
    with pytest.raises(SignedFileMismatchError, match=r"shard adapters.safetensors:\d+:%d" % len(data)):
        signing.verify_signature(d, pair[1])


def test_signing_an_unreadable_key_leaves_nothing(tmp_path):
    d = bundle_like(tmp_path / "b")
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(SignatureError):
        signing.sign_bundle(d, tmp_path / "bad.pem")
    assert sorted(os.listdir(d)) == ["adapters.safetensors", "manifest.json"]


def test_a_file_grown_after_signing_by_shards_fails_before_hashing(tmp_path, pair):
    d = bundle_like(tmp_path / "b")
    signing.sign_bundle(d, pair[0], shard_size=100)
    size = (d / "manifest.json").stat().st_size
    with open(d / "manifest.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(SignedFileMismatchError, match=f"manifest.json: {size + 1} bytes, signed as {size} bytes"):
        signing.verify_signature(d, pair[1])


def test_an_empty_file_cannot_be_signed_by_shards(tmp_path, pair):
    d = bundle_like(tmp_path / "b")
    (d / "empty").write_bytes(b"")
    with pytest.raises(SigningError, match="empty file has no shard") as info:
        signing.sign_bundle(d, pair[0], shard_size=100)
    assert info.value.path == "empty" and not (d / "bundle.sig").exists()
    with pytest.raises(SigningError, match="at least 1"):
        signing.sign_bundle(d, pair[0], shard_size=0)
    signing.sign_bundle(d, pair[0])  # by files it is listed, with the digest of no bytes
    assert signing.verify_signature(d, pair[1])


def test_a_shard_size_no_verifier_takes_is_refused_before_anything_is_written(tmp_path, pair):
    d = bundle_like(tmp_path / "b")
    with pytest.raises(SigningError, match="below 2\\*\\*62"):
        signing.sign_bundle(d, pair[0], shard_size=1 << 62)
    assert not (d / "bundle.sig").exists() and not list(d.glob(".bundle.sig.*"))
    signing.sign_bundle(d, pair[0], shard_size=(1 << 62) - 1)  # the largest: one shard per file
    assert signing.verify_signature(d, pair[1])


def test_signing_is_deterministic(signed, pair):
    first = (signed / "bundle.sig").read_bytes()
    signing.sign_bundle(signed, pair[0])
    assert (signed / "bundle.sig").read_bytes() == first  # RFC 6979: same key and files, same bytes


def test_by_shards_an_added_empty_file_and_a_removed_file_fail(tmp_path, pair):
    d = bundle_like(tmp_path / "b")
    signing.sign_bundle(d, pair[0], shard_size=100)
    (d / "empty").write_bytes(b"")  # has no shard, so no signature could list it
    with pytest.raises(SignedFileMismatchError, match="empty: is not signed") as info:
        signing.verify_signature(d, pair[1])
    assert info.value.expected is None
    (d / "empty").unlink()
    (d / "manifest.json").unlink()
    with pytest.raises(SignedFileMismatchError, match="manifest.json: is missing"):
        signing.verify_signature(d, pair[1])


@pytest.mark.parametrize("shard", ["9" * 5000, "1" * 20], ids=["5000 digits", "20 digits"])
def test_a_signed_statement_with_huge_numbers_is_malformed(signed, pair, shard):
    """An integer past Python's digit limit in the statement, or a shard offset of thousands of digits."""
    key = keys.load_private_key(pair[0])
    statement = json.loads(signing.statement_for({"manifest.json": "1" * 64}))
    text = json.dumps(statement).replace('"manifest.json"', f'"manifest.json:0:{shard}"', 1)
    if len(shard) > 4300:
        text = text.replace('{"_type"', '{"n": ' + shard + ', "_type"', 1)
    (signed / "bundle.sig").write_bytes(signing.sign_statement(text.encode(), key))
    with pytest.raises(SignatureError):
        signing.verify_signature(signed, pair[1])
