"""Paths name every part of a world.

A block path is ``stage/pipeline/graph/node`` (``author/narrate/text/llm``); a slot is
``block path:module path`` (``creator/render/t2i/backbone:blocks.3.attn.qkv``).
Globs select block paths segment by segment: ``*`` matches within one segment, ``**``
matches any number of whole segments. Slot patterns are fnmatch patterns over the
dotted module path, where ``*`` crosses dots.
"""

from __future__ import annotations

import fnmatch
import functools
import re

from ..errors import WorldConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*\Z")
DEPTH = 4  # stage / pipeline / graph / node


def check_name(name: str, where: str) -> str:
    """Return `name` if it can be one path segment, else raise naming `where`."""
    if not isinstance(name, str) or not NAME.match(name):
        raise WorldConfigError(
            f"{where}: {name!r} is not a valid name (letters, digits, '_' and '-', "
            "not starting with '_' or '-')",
            path=where,
        )
    return name


def split_block_path(path: str) -> tuple[str, str, str, str]:
    parts = path.split("/")
    if len(parts) != DEPTH or not all(NAME.match(p) for p in parts):
        raise WorldConfigError(
            f"{path!r} is not a block path (expected stage/pipeline/graph/node)", path=path
        )
    return parts[0], parts[1], parts[2], parts[3]


def slot_name(block_path: str, module_path: str) -> str:
    return f"{block_path}:{module_path}"


def split_slot(slot: str) -> tuple[str, str]:
    block_path, sep, module_path = slot.partition(":")
    if not sep or not module_path:
        raise WorldConfigError(f"{slot!r} is not a slot (expected block/path:module.path)", path=slot)
    return block_path, module_path


def _segment_regex(segment: str) -> str:
    return "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in segment)


@functools.lru_cache(maxsize=256)
def _glob_regex(glob: str) -> re.Pattern[str]:
    segments = glob.split("/")
    regex = ""
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            regex += "(?:[^/]+(?:/[^/]+)*)?" if last else "(?:[^/]+/)*"
        else:
            regex += _segment_regex(segment) + ("" if last else "/")
    return re.compile(rf"^{regex}$")


def match_block(path: str, glob: str) -> bool:
    """True when block path `path` matches `glob` (``*`` one segment, ``**`` any)."""
    return bool(_glob_regex(glob).match(path))


def match_module(module_path: str, pattern: str) -> bool:
    """True when dotted `module_path` matches fnmatch `pattern` (``*`` crosses dots)."""
    return fnmatch.fnmatchcase(module_path, pattern)
