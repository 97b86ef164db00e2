"""Whether an archive holds whole zstd frames, walked by their headers (RFC 8878, section 3.1).

python-zstandard's stream reader stops without a word when its input ends inside a frame,
even inside the frame's checksum, which it then never compares. Walking the frame and
block headers (three bytes for each block of up to 128 KiB) says whether the file ends
where its last frame does, without decompressing anything.
"""

from __future__ import annotations

from typing import BinaryIO

from ..errors import BundleFormatError
from . import limits

ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE = range(0x184D2A50, 0x184D2A60)


def check_frames(f: BinaryIO, size: int, source: str) -> None:
    """Raise `BundleFormatError` unless the file's `size` bytes are whole zstd (or skippable) frames."""
    pos, blocks = 0, 0
    while pos < size:
        magic = int.from_bytes(_read(f, pos, 4, source), "little")
        if magic in SKIPPABLE:
            pos += 8 + int.from_bytes(_read(f, pos + 4, 4, source), "little")
            continue
        if magic != ZSTD_MAGIC:
            raise BundleFormatError(f"{source}: no zstd frame starts at byte {pos}", path=source)
        descriptor = _read(f, pos + 4, 1, source)[0]
        single, checksum = (descriptor >> 5) & 1, (descriptor >> 2) & 1
        content_size = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
        pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + content_size  # magic, header
        last = 0
        while not last:
            header = int.from_bytes(_read(f, pos, 3, source), "little")
            last, kind, length = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise BundleFormatError(f"{source}: a zstd block of the reserved type at byte {pos}", path=source)
            blocks += 1
            limits.ensure(blocks, limits.MAX_ZSTD_BLOCKS, "MAX_ZSTD_BLOCKS", "zstd block count", path=source)
            pos += 3 + (1 if kind == 1 else length)  # an RLE block stores one byte
        pos += 4 * checksum
    if pos != size:
        raise BundleFormatError(f"{source}: the archive ends inside a zstd frame (cut short?)", path=source)


def _read(f: BinaryIO, pos: int, n: int, source: str) -> bytes:
    f.seek(pos)
    data = f.read(n)
    if len(data) != n:
        raise BundleFormatError(f"{source}: the archive ends inside a zstd frame (cut short?)", path=source)
    return data
