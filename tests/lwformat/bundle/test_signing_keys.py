"""Key files: what `generate_keypair` writes, what loading accepts and refuses."""

from __future__ import annotations

import errno
import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from lwformat.bundle import keys
from lwformat.errors import SigningKeyError


def test_keypair_files_are_standard_pem_with_a_private_mode(tmp_path):
    private, public = keys.generate_keypair(tmp_path)
    assert (private.name, public.name) == ("lwhub.pem", "lwhub.pub")
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")  # SubjectPublicKeyInfo
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert keys.public_pem(key.public_key()) == public.read_bytes()


def test_a_prefix_names_both_files(tmp_path):
    private, public = keys.generate_keypair(tmp_path / "alice")
    assert (private.name, public.name) == ("alice.pem", "alice.pub")
    private2, _ = keys.generate_keypair(tmp_path, name="bob")
    assert private2 == tmp_path / "bob.pem"


def test_existing_keys_are_never_overwritten(tmp_path):
    private, _ = keys.generate_keypair(tmp_path)
    before = private.read_bytes()
    with pytest.raises(SigningKeyError, match="already exists"):
        keys.generate_keypair(tmp_path)
    assert private.read_bytes() == before


@pytest.mark.parametrize("failing", [1, 2], ids=["private half", "public half"])
def test_a_failed_write_leaves_no_key_file_so_a_retry_works(tmp_path, monkeypatch, failing):
    real, calls = os.write, []

    def full_disk(fd, data):
        calls.append(fd)
        if len(calls) == failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        keys.generate_keypair(tmp_path, name="k")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(os, "write", real)
    private, public = keys.generate_keypair(tmp_path, name="k")
    assert keys.public_pem(keys.load_private_key(private).public_key()) == public.read_bytes()


def test_short_writes_still_write_whole_keys(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:7])))
    private, public = keys.generate_keypair(tmp_path)
    assert keys.public_pem(keys.load_private_key(private).public_key()) == public.read_bytes()


def test_key_id_is_the_sha256_of_the_der_public_key(tmp_path):
    _, public = keys.generate_keypair(tmp_path)
    der = serialization.load_pem_public_key(public.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert keys.key_id(keys.load_public_key(public)) == hashlib.sha256(der).hexdigest()


def _write(path, key, private: bool):
    if private:
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    else:
        data = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make", [lambda: rsa.generate_private_key(65537, 2048), ed25519.Ed25519PrivateKey.generate])
def test_non_ecdsa_keys_are_refused_by_name(tmp_path, make):
    key = make()
    with pytest.raises(SigningKeyError, match="ECDSA"):
        keys.load_private_key(_write(tmp_path / "k.pem", key, True))
    with pytest.raises(SigningKeyError, match="ECDSA"):
        keys.load_public_key(_write(tmp_path / "k.pub", key.public_key(), False))


def test_unsupported_curve_is_refused(tmp_path):
    key = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(SigningKeyError, match="secp256k1"):
        keys.load_private_key(_write(tmp_path / "k.pem", key, True))


def test_a_private_key_given_as_public_says_so(tmp_path):
    private, _ = keys.generate_keypair(tmp_path)
    with pytest.raises(SigningKeyError, match="looks like a private key") as info:
        keys.load_public_key(private)
    assert info.value.path == str(private)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(SigningKeyError, match="no such key file"):
        keys.load_private_key(tmp_path / "nope.pem")
    (tmp_path / "junk.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningKeyError, match="not a PEM private key"):
        keys.load_private_key(tmp_path / "junk.pem")


def test_encrypted_private_key_needs_its_password(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    (tmp_path / "k.pem").write_bytes(data)
    with pytest.raises(SigningKeyError, match="password"):
        keys.load_private_key(tmp_path / "k.pem")
    loaded = keys.load_private_key(tmp_path / "k.pem", password=b"pw")
    assert keys.key_id(loaded.public_key()) == keys.key_id(key.public_key())
