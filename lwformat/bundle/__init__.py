"""Bundles: the manifest, the directory and archive forms, verification, compatibility, signing."""

import importlib
from typing import TYPE_CHECKING, Any

from .archive import pack, unpack
from .check import CompatReport, check
from .keys import generate_keypair, key_id, load_private_key, load_public_key
from .manifest import Manifest
from .read import Bundle
from .signing import sign_bundle, verify_signature
from .verify import verify, verify_files

if TYPE_CHECKING:
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


# Writing reads tensors, so `write_bundle` is imported on first use (PEP 562): everything
# else here opens, checks and signs bundles without importing torch. (`write` too: this
# package used to import it, so `lwformat.bundle.write` worked without importing it first.)
def __getattr__(name: str) -> Any:
    if name not in ("write", "write_bundle"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    write = importlib.import_module(".write", __name__)
    globals()["write_bundle"] = write.write_bundle
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
