"""Verify a bundle: every file's size, sha256 and chunk digests, then (given keys) its signature.

Unsigned, the hashes prove the files are the ones the manifest lists; only the
signature, which covers the manifest too, proves who made them.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import IntegrityError
from .files import open_member
from .hashing import hash_stream
from .read import Bundle


def verify_files(bundle: Bundle, *, whole: bool = True) -> None:
    """Recompute every listed file's digests; raise `IntegrityError` naming the file and chunk.

    ``whole=False`` skips the whole-file sha256, for files already known to hash to it
    (a content-addressed store checks that on the way in): half the hashing.
    """
    m = bundle.manifest
    for want in m.files:
        if not (bundle.path / want.path).exists() and not (bundle.path / want.path).is_symlink():
            raise IntegrityError(f"{want.path}: missing (deleted since the bundle was opened?)", path=want.path,
                                 expected=want.size, found=None)  # fmt: skip
        with open_member(bundle.path, want.path) as f:
            size = os.fstat(f.fileno()).st_size
            if size != want.size:
                raise IntegrityError(
                    f"{want.path}: {size} bytes, the manifest says {want.size}",
                    path=want.path, expected=want.size, found=size,
                )  # fmt: skip
            got = hash_stream(f, want.path, m.chunk_size, whole=whole)
        for i, (a, b) in enumerate(zip(want.chunks, got.chunks, strict=False)):
            if a != b:
                raise IntegrityError(
                    f"{want.path}: chunk {i} (bytes {i * m.chunk_size}..) has sha256 {b}, the manifest says {a}",
                    path=want.path, chunk=i, expected=a, found=b,
                )  # fmt: skip
        if got.size != want.size or (whole and got.sha256 != want.sha256) or len(got.chunks) != len(want.chunks):
            raise IntegrityError(
                f"{want.path}: sha256 {got.sha256}, the manifest says {want.sha256}",
                path=want.path, expected=want.sha256, found=got.sha256,
            )  # fmt: skip


def verify(bundle: Bundle, public_keys: Any = None) -> str | None:
    """`verify_files`, then, when keys (keys or PEM paths) are given, the signature (spec/signature.md).

    Returns what the signature check returns (the signer's key id), or None unsigned.
    """
    verify_files(bundle)
    if public_keys is None:
        return None
    from .signing import verify_signature  # written alongside; imported only when a signature is checked

    return verify_signature(bundle.path, public_keys)
