"""The bounds every bundle reader enforces before it allocates (spec/lwbundle-v1.md, "Limits").

Each size or count read from a file is compared with its bound first; only then is
memory allocated, a file created or a tensor loaded. A value past a bound raises
`BundleLimitError` naming the constant. Writers never produce a bundle past them.
"""

from __future__ import annotations

from ..errors import BundleLimitError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

MAX_MANIFEST_BYTES = 4 * MiB  # manifest.json
MAX_JSON_DEPTH = 32  # nesting of arrays and objects in the manifest
MAX_JSON_INT = (1 << 53) - 1  # |integer| in the manifest: exact in every JSON implementation
MAX_HEADER_BYTES = 16 * MiB  # the safetensors JSON header
MAX_TENSORS = 65536  # tensors in the weights file (and in the manifest)
MAX_NDIM = 8  # dimensions of one tensor
MAX_SIGNATURE_BYTES = 1 * MiB  # bundle.sig
MAX_BUNDLE_BYTES = 4 * GiB  # all files of a bundle together, = an archive's unpacked tar members
MAX_MEMBERS = 64  # files in a bundle directory or members in an archive
MAX_NAME_BYTES = 100  # a member name (the ustar name field)
MAX_TAR_BYTES = MAX_BUNDLE_BYTES + (MAX_MEMBERS + 2) * 512 + 10240  # members, headers, end, padding
MAX_RATIO = 1024  # decompressed bytes per compressed byte of an archive, ...
RATIO_FLOOR = 16 * MiB  # ... enforced once the decompressed size passes this floor
MAX_ZSTD_WINDOW = 128 * MiB  # the decoder's window (memory) for one zstd frame
MAX_ZSTD_BLOCKS = MAX_TAR_BYTES // 1024 + 1024  # zstd blocks in an archive: 1 KiB each at the largest size


def ensure(
    value: int, maximum: int, limit: str, what: str, *, path: str | None = None, field: str | None = None
) -> None:
    """Raise `BundleLimitError` unless ``value <= maximum``."""
    if value > maximum:
        where = f"{path}: " if path else ""
        raise BundleLimitError(
            f"{where}{what} is {value:,}, above the limit of {maximum:,} ({limit})",
            path=path, field=field, limit=limit, value=value, maximum=maximum,
        )  # fmt: skip


def ratio_bound(compressed: int) -> int:
    """The most an archive of `compressed` bytes may expand to."""
    return min(MAX_TAR_BYTES, max(RATIO_FLOOR, MAX_RATIO * compressed))
