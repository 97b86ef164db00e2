"""Bundles: the manifest, the directory and archive forms, verification, compatibility, signing."""

from .archive import pack, unpack
from .check import CompatReport, check
from .keys import generate_keypair, key_id, load_private_key, load_public_key
from .manifest import Manifest
from .read import Bundle
from .signing import sign_bundle, verify_signature
from .verify import verify, verify_files
from .write import write_bundle

__all__ = [
    "Bundle",
    "CompatReport",
    "Manifest",
    "check",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "pack",
    "sign_bundle",
    "unpack",
    "verify",
    "verify_files",
    "verify_signature",
    "write_bundle",
]
