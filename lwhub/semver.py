"""Semantic versions (semver.org 2.0.0): parsing and precedence as a sortable string.

Precedence: compare MAJOR, MINOR, PATCH numerically; a pre-release sorts before its
release; pre-release identifiers compare left to right, numeric ones numerically and
below alphanumeric ones (ASCII order), and a shorter list sorts first when it is a
prefix of the longer. Build metadata (``+...``) does not count.

`sort_key` encodes that order into a string whose plain byte order is precedence, so
a database can ``ORDER BY`` it:

    key  = N(major) N(minor) N(patch) ("0" ids "\\x00" | "1")     "1" = a release
    ids  = id ("\\x01" id)*,  id = "0" N(numeric) | "1" alphanumeric
    N(x) = x as 20 decimal digits: a version with a longer number is not valid
"""

from __future__ import annotations

import re

# SemVer 2.0.0 exactly (no leading zeros, pre-release numbers included; no empty identifiers),
# with numbers of at most 20 digits: `sort_key` pads to 20, a longer one would sort out of
# order. The regex says it all, so the published OpenAPI pattern is what the server takes.
_NUM = r"(?:0|[1-9][0-9]{0,19})"
_ID = rf"(?:{_NUM}|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
PATTERN = re.compile(rf"^({_NUM})\.({_NUM})\.({_NUM})(?:-({_ID}(?:\.{_ID})*))?(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?\Z")


def is_valid(version: str) -> bool:
    return PATTERN.match(version) is not None


def is_prerelease(version: str) -> bool:
    m = PATTERN.match(version)
    return bool(m and m.group(4))


def sort_key(version: str) -> str:
    m = PATTERN.match(version)
    if not m:
        raise ValueError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH[-pre][+build])")
    head = "".join(f"{int(m.group(i)):020d}" for i in (1, 2, 3))
    if not m.group(4):
        return head + "1"
    ids = (f"0{int(p):020d}" if p.isdigit() else f"1{p}" for p in m.group(4).split("."))
    return head + "0" + "\x01".join(ids) + "\x00"


def newer(a: str, b: str) -> bool:
    """Whether `a` has higher precedence than `b`."""
    return sort_key(a) > sort_key(b)
