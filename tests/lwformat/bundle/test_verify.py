"""Unsigned integrity: no single-byte change goes unnoticed; with keys, the signature hook runs."""

from __future__ import annotations

import pytest
from torch import nn

from lwformat.adapters import LightConfig
from lwformat.bundle import keys, signing
from lwformat.bundle.read import Bundle
from lwformat.bundle.verify import verify, verify_files
from lwformat.bundle.write import write_bundle
from lwformat.errors import BundleError, IntegrityError, SignatureError
from lwformat.world import Block, World

from tests.lwformat.bundle.tiny import make_vectors, write_tiny


def _open_and_verify(folder) -> str:
    """The manifest identity of a bundle that opens and verifies; raises a BundleError otherwise."""
    with Bundle.open(folder) as bundle:
        verify_files(bundle)
        return bundle.manifest_id


def test_every_single_byte_change_of_the_weights_is_refused(tmp_path):
    folder = write_tiny(tmp_path)
    weights = folder / "adapters.safetensors"
    original = weights.read_bytes()
    for i in range(len(original)):
        for bit in (0x01, 0x80):
            changed = bytearray(original)
            changed[i] ^= bit
            weights.write_bytes(bytes(changed))
            with pytest.raises(BundleError):
                _open_and_verify(folder)
    weights.write_bytes(original)
    _open_and_verify(folder)


def test_every_single_byte_change_of_the_manifest_is_refused_or_changes_its_identity(tmp_path):
    folder = write_tiny(tmp_path)
    manifest = folder / "manifest.json"
    original = manifest.read_bytes()
    identity = _open_and_verify(folder)
    refused = 0
    for i in range(len(original)):
        for bit in (0x01, 0x20):
            changed = bytearray(original)
            changed[i] ^= bit
            manifest.write_bytes(bytes(changed))
            try:
                assert _open_and_verify(folder) != identity  # accepted: then it is another manifest
            except BundleError:
                refused += 1
    assert refused > len(original)  # most changes break the JSON, a pattern, or a digest


def test_integrity_error_names_the_first_changed_chunk(tmp_path):
    world = World.from_blocks({"author/narrate/text/llm": Block(nn.Sequential(nn.Linear(256, 256)), "llm")})
    world.customize(LightConfig(rank=64))  # lora_A and lora_B: 64 KiB each, so three chunks of 64 KiB
    write_bundle(world, tmp_path / "b", name="a/b", version="1.0.0", chunk_size=1 << 16)
    weights = tmp_path / "b" / "adapters.safetensors"
    data = bytearray(weights.read_bytes())
    assert len(data) > 2 << 16
    data[(2 << 16) + 5] ^= 0x04  # inside chunk 2
    data[-1] ^= 0x04  # still chunk 2: the first change decides
    weights.write_bytes(bytes(data))
    with Bundle.open(tmp_path / "b") as bundle, pytest.raises(IntegrityError) as info:
        verify_files(bundle)
    assert (info.value.path, info.value.chunk) == ("adapters.safetensors", 2)
    assert info.value.expected == bundle.manifest.files[0].chunks[2]


def test_verify_with_keys_checks_the_signature(tmp_path):
    private, public = keys.generate_keypair(tmp_path / "keys")
    folder = write_tiny(tmp_path)
    signing.sign_bundle(folder, private)
    with Bundle.open(folder) as bundle:
        assert verify(bundle) is None
        assert verify(bundle, public) == keys.key_id(keys.load_public_key(public))
    # Rewrite a weight and the manifest's digests with it: the hashes agree, the signature does not.
    weights = folder / "adapters.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    make_vectors.rehash(folder)
    with Bundle.open(folder) as bundle:
        verify_files(bundle)
        with pytest.raises(SignatureError):
            verify(bundle, public)


def test_a_file_deleted_since_open_is_an_integrity_error(tmp_path):
    folder = write_tiny(tmp_path)
    bundle = Bundle.open(folder)
    (folder / "adapters.safetensors").unlink()
    with pytest.raises(IntegrityError, match="missing") as caught:
        verify_files(bundle)
    assert caught.value.path == "adapters.safetensors"
