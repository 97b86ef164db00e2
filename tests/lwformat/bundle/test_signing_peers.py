"""Interop with real peers: the stock `model_signing` tool (both directions) and openssl keys."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lwformat.bundle import keys, signing
from lwformat.errors import SignedFileMismatchError, UntrustedSignatureError

import model_signing  # noqa: F401  (a test dependency: fail loudly if missing)
MODEL_SIGNING = [sys.executable, "-m", "model_signing"]
OPENSSL = shutil.which("openssl")


def bundle_like(root: Path) -> Path:
    root.mkdir(parents=True)
    save_file({"a:fc.lora_A": torch.randn(4, 64), "a:fc.lora_B": torch.randn(64, 4)}, str(root / "adapters.safetensors"))
    (root / "manifest.json").write_text('{"name":"test/peers","spec":"lwbundle/1.0"}')
    return root


def stock(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MODEL_SIGNING, *map(str, args)], capture_output=True, text=True, timeout=60)


def stock_verify(d: Path, public: Path, *extra: str, signature: Path | None = None) -> subprocess.CompletedProcess:
    return stock("verify", "key", d, "--signature", signature or d / "bundle.sig", "--public_key", public, *extra)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return keys.generate_keypair(tmp_path_factory.mktemp("keys"))


def test_stock_cli_verifies_our_signature(tmp_path, pair):
    d = bundle_like(tmp_path / "b")
    signing.sign_bundle(d, pair[0])
    # The documented command (spec/signature.md), strict about git files too.
    done = stock_verify(d, pair[1], "--no-ignore-git-paths")
    assert done.returncode == 0, done.stderr
    assert "Verification succeeded" in done.stdout
    # With the signature moved out of the directory: the statement's ignore_paths still excludes bundle.sig.
    outside = tmp_path / "copy.sig"
    shutil.copy(d / "bundle.sig", outside)
    assert stock_verify(d, pair[1], signature=outside).returncode == 0


def test_stock_cli_rejects_our_signature_after_tampering(tmp_path, pair):
    d = bundle_like(tmp_path / "b")
    signing.sign_bundle(d, pair[0])
    data = bytearray((d / "adapters.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "adapters.safetensors").write_bytes(bytes(data))
    done = stock_verify(d, pair[1])
    assert done.returncode != 0 and "adapters.safetensors" in done.stderr


def test_stock_cli_rejects_our_signature_under_another_key(tmp_path, pair):
    d = bundle_like(tmp_path / "b")
    signing.sign_bundle(d, pair[0])
    _, other = keys.generate_keypair(tmp_path, name="other")
    assert stock_verify(d, other).returncode != 0


def test_we_verify_a_stock_signature(tmp_path, pair):
    d = bundle_like(tmp_path / "b")
    done = stock("sign", "key", d, "--signature", d / "bundle.sig", "--private_key", pair[0])
    assert done.returncode == 0, done.stderr
    assert signing.verify_signature(d, pair[1]) == keys.key_id(keys.load_public_key(pair[1]))
    (d / "manifest.json").write_text("{}")
    with pytest.raises(SignedFileMismatchError, match="manifest.json"):
        signing.verify_signature(d, pair[1])


def test_shards_both_ways_with_the_stock_library(tmp_path, pair):
    from model_signing import hashing, signing as ms_signing, verifying

    ours = bundle_like(tmp_path / "ours")
    signing.sign_bundle(ours, pair[0], shard_size=256)
    # The stock CLI always re-hashes by files, so a shards signature is checked through its library.
    verifying.Config().use_elliptic_key_verifier(public_key=pair[1]).verify(ours, ours / "bundle.sig")

    theirs = bundle_like(tmp_path / "theirs")
    config = hashing.Config().use_shard_serialization(shard_size=256).set_ignored_paths(paths=["bundle.sig"])
    ms_signing.Config().use_elliptic_key_signer(private_key=pair[0]).set_hashing_config(config).sign(
        theirs, theirs / "bundle.sig"
    )
    assert signing.verify_signature(theirs, pair[1])
    data = bytearray((theirs / "adapters.safetensors").read_bytes())
    data[300] ^= 1  # inside the second shard
    (theirs / "adapters.safetensors").write_bytes(bytes(data))
    with pytest.raises(SignedFileMismatchError, match="shard adapters.safetensors:256:512"):
        signing.verify_signature(theirs, pair[1])


@pytest.mark.skipif(OPENSSL is None, reason="no openssl binary")
@pytest.mark.parametrize("flavour", ["traditional", "pkcs8"])
def test_openssl_keys_sign_and_verify_both_ways(tmp_path, flavour):
    private, public = tmp_path / "ec.pem", tmp_path / "ec.pub"
    subprocess.run([OPENSSL, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", private], check=True)
    if flavour == "pkcs8":
        pk8 = tmp_path / "pk8.pem"
        subprocess.run([OPENSSL, "pkcs8", "-topk8", "-nocrypt", "-in", private, "-out", pk8], check=True)
        private = pk8
    subprocess.run([OPENSSL, "ec", "-in", private, "-pubout", "-out", public], check=True, capture_output=True)
    header = private.read_text().splitlines()[0]
    assert header == ("-----BEGIN EC PRIVATE KEY-----" if flavour == "traditional" else "-----BEGIN PRIVATE KEY-----")
    d = bundle_like(tmp_path / "b")
    signing.sign_bundle(d, private)
    assert signing.verify_signature(d, public)
    assert stock_verify(d, public).returncode == 0


@pytest.mark.skipif(OPENSSL is None, reason="no openssl binary")
def test_openssl_reads_our_keys(tmp_path):
    private, public = keys.generate_keypair(tmp_path)
    derived = subprocess.run([OPENSSL, "pkey", "-in", private, "-pubout"], check=True, capture_output=True).stdout
    assert derived == public.read_bytes()
    text = subprocess.run([OPENSSL, "pkey", "-pubin", "-in", public, "-text", "-noout"], check=True, capture_output=True)
    assert b"prime256v1" in text.stdout or b"P-256" in text.stdout


def test_traditional_pem_from_cryptography_works(tmp_path):
    # The fallback when openssl is absent: the other PEM flavour, written by another code path.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    )
    (tmp_path / "k.pub").write_bytes(keys.public_pem(key.public_key()))
    d = bundle_like(tmp_path / "b")
    signing.sign_bundle(d, tmp_path / "k.pem")
    assert signing.verify_signature(d, tmp_path / "k.pub")
    assert stock_verify(d, tmp_path / "k.pub").returncode == 0
    _, p256 = keys.generate_keypair(tmp_path)
    with pytest.raises(UntrustedSignatureError):
        signing.verify_signature(d, p256)
