"""Every signature vector in spec/vectors/signed/ gives its expected outcome, and regenerates the same."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import lwformat.errors
from lwformat.bundle import signing
from lwformat.bundle.read import Bundle
from lwformat.bundle.verify import verify, verify_files

SIGNED = Path(__file__).resolve().parents[3] / "spec" / "vectors" / "signed"
INDEX = json.loads((SIGNED / "index.json").read_text())
VECTORS = {v["name"]: v for v in INDEX["vectors"]}


def der_key_id(public_pem: Path) -> str:
    key = serialization.load_pem_public_key(public_pem.read_bytes())
    return hashlib.sha256(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


@pytest.mark.parametrize("name", list(VECTORS))
def test_vector(name):
    vector = VECTORS[name]
    path, key = SIGNED / vector["path"], SIGNED / vector["key"]
    expect = vector["expect"]
    if expect.get("outcome") == "ok":
        assert signing.verify_signature(path, key) == der_key_id(key)
        return
    with pytest.raises(getattr(lwformat.errors, expect["error"])) as info:
        signing.verify_signature(path, key)
    if "path" in expect:
        assert info.value.path == expect["path"]


def test_the_index_covers_every_vector_directory():
    dirs = {p.name for p in SIGNED.iterdir() if p.is_dir() and p.name != "test-keys"}
    assert dirs == {v["path"] for v in VECTORS.values()}
    assert "TEST KEYS" in INDEX["about"]


def test_only_the_signature_catches_a_rehashed_weight():
    with Bundle.open(SIGNED / "tampered-weight-rehashed") as bundle:
        verify_files(bundle)  # the manifest agrees with the changed weights
        with pytest.raises(lwformat.errors.SignedFileMismatchError, match="adapters.safetensors"):
            verify(bundle, SIGNED / "test-keys/test-signer.pub")


def test_the_stock_tool_agrees_on_the_vectors():
    def stock(name: str) -> int:
        d = SIGNED / name
        cmd = [sys.executable, "-m", "model_signing", "verify", "key", str(d), "--signature", str(d / "bundle.sig"),
               "--public_key", str(SIGNED / "test-keys/test-signer.pub")]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode

    import model_signing  # noqa: F401  (a test dependency: fail loudly if missing)
    assert stock("signed-files") == 0
    assert stock("tampered-weight-rehashed") != 0


def test_regenerating_gives_the_same_bytes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_signed", SIGNED / "make_signed.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    for kept in ("test-keys", make.STOCK):  # random once: the keys, and the stock tool's signature
        shutil.copytree(SIGNED / kept, tmp_path / kept)
    make.main(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    stored = sorted(p.relative_to(SIGNED) for p in SIGNED.rglob("*") if p.is_file() and p.name != "make_signed.py")
    assert made == [p for p in stored if "__pycache__" not in str(p)]
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (SIGNED / rel).read_bytes(), f"{rel}: run spec/vectors/signed/make_signed.py"
