"""POSIX ustar headers, the only tar the archive form uses (spec/lwbundle-v1.md, "Archive").

A writer's header for a member of `size` bytes named `name` (ASCII, at most 100 bytes):

    offset size  field     value
         0  100  name      name, NUL-padded
       100    8  mode      "0000644\\0"
       108    8  uid       "0000000\\0"
       116    8  gid       "0000000\\0"
       124   12  size      size in octal, 11 digits, "\\0"
       136   12  mtime     "00000000000\\0"
       148    8  chksum    sum of the 512 header bytes (this field as 8 spaces), 6 octal digits, "\\0 "
       156    1  typeflag  "0"
       157  100  linkname  NUL
       257    6  magic     "ustar\\0"
       263    2  version   "00"
       265   32  uname     NUL
       297   32  gname     NUL
       329    8  devmajor  "0000000\\0"
       337    8  devminor  "0000000\\0"
       345  155  prefix    NUL
       500   12  (pad)     NUL

The member's bytes follow, NUL-padded to a multiple of 512; two NUL blocks end the archive.
Readers also accept GNU tar's "ustar  \\0" magic, and parse every header fully before
acting on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BundleFormatError
from . import limits

BLOCK = 512
END = bytes(2 * BLOCK)
USTAR = b"ustar\x0000"
GNU = b"ustar  \x00"


def padding(size: int) -> int:
    return -size % BLOCK


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def header(name: str, size: int, *, typeflag: bytes = b"0", linkname: str = "") -> bytes:
    """The exact 512 header bytes; other typeflags and names exist only to build test vectors."""
    raw = name.encode("utf-8")
    if len(raw) > limits.MAX_NAME_BYTES or size >= 8**11:
        raise BundleFormatError(f"{name}: cannot be stored in a ustar header", path=name)
    fields = [
        raw.ljust(100, b"\0"), _octal(0o644, 8), _octal(0, 8), _octal(0, 8), _octal(size, 12), _octal(0, 12),
        b" " * 8, typeflag, linkname.encode().ljust(100, b"\0"), USTAR, bytes(64), _octal(0, 8), _octal(0, 8),
    ]  # fmt: skip
    block = b"".join(fields).ljust(BLOCK, b"\0")
    chksum = b"%06o\x00 " % sum(block)
    return block[:148] + chksum + block[156:]


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    typeflag: bytes
    linkname: str


def _field(block: bytes, start: int, width: int) -> bytes:
    return block[start : start + width].split(b"\0", 1)[0]


def _number(block: bytes, start: int, width: int, what: str) -> int:
    raw = block[start : start + width]
    if raw[0] & 0x80:
        raise ValueError(f"base-256 {what} is not ustar")
    digits = raw.replace(b"\0", b" ").strip()
    if digits and not all(48 <= c <= 55 for c in digits):
        raise ValueError(f"{what} {raw!r} is not octal")
    return int(digits, 8) if digits else 0


_IGNORED_NUMBERS = ((100, 8, "mode"), (108, 8, "uid"), (116, 8, "gid"), (136, 12, "mtime"), (329, 8, "devmajor"),
                    (337, 8, "devminor"))  # fmt: skip


def parse_header(block: bytes, *, path: str | None = None, offset: int = 0) -> Member | None:
    """A 512-byte header -> `Member`; None for an all-NUL block (the end of the archive).

    Errors name the archive `path`, the header's `offset` in the tar stream and, once the
    checksum holds, the member.
    """
    member = None

    def fail(why: str) -> BundleFormatError:
        where = f"{path}: " if path else ""
        named = f" (member {member})" if member else ""
        return BundleFormatError(f"{where}tar header at byte {offset:,}{named}: {why}", path=path, field=member)

    if len(block) != BLOCK:
        raise fail("archive ends inside a header")
    if block == bytes(BLOCK):
        return None
    if block[257:265] not in (USTAR, GNU):
        raise fail(f"magic {block[257:265]!r} is not ustar")
    try:
        if _number(block, 148, 8, "checksum") != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise ValueError("checksum mismatch")
        name = _field(block, 0, 100)
        prefix = _field(block, 345, 155) if block[257:265] == USTAR else b""
        member = ((prefix + b"/" + name) if prefix else name).decode("utf-8", "replace")
        for start, width, what in _IGNORED_NUMBERS:  # not used, but the spec wants every number octal
            _number(block, start, width, what)
        size = _number(block, 124, 12, "size")
    except ValueError as exc:
        raise fail(str(exc)) from None
    return Member(
        name=member,
        size=size,
        typeflag=block[156:157],
        linkname=_field(block, 157, 100).decode("utf-8", "replace"),
    )
