"""Canonical JSON (spec/lwbundle-v1.md, "Canonical JSON"): one value, one byte string.

    value    = object | array | string | integer | float | true | false | null
    object   = "{" members sorted by key, compared by Unicode code point, "," between, "}"
    member   = string ":" value           (no whitespace anywhere outside strings)
    string   = '"' chars '"', UTF-8; escaped: '"' -> \\" , '\\' -> \\\\ , U+0008 \\b, U+0009 \\t,
               U+000A \\n, U+000C \\f, U+000D \\r, other U+0000..U+001F -> \\u00xx (lowercase hex);
               every other code point literal
    integer  = decimal, no leading zeros, "-" for negatives;  |n| <= 2^53 - 1
    float    = finite; the shortest decimal that reads back to the same binary64 value,
               written as Python's repr: digits "." digits when 1e-4 <= |x| < 1e16
               (at least one digit after the point), else d[.ddd]e(+|-)XX (two exponent digits at least)

Readers accept any RFC 8259 JSON that is valid UTF-8 and refuse: duplicate keys, NaN and
Infinity, numbers that overflow binary64, integers past 2^53 - 1, lone surrogates, and
nesting deeper than 32. Writers emit canonical bytes and leave out optional fields that
hold their default. A manifest's identity is the sha256 of the canonical bytes of its
JSON value (unknown fields included), so a reader of an older minor version computes
the same identity as the writer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import msgspec

from ..errors import BundleFormatError, UnsupportedVersionError
from . import limits
from .manifest import MANIFEST, SPEC_MAJOR, Manifest
from .rules import check_manifest

_SPEC = re.compile(r"lwbundle/([0-9]{1,6})\.([0-9]{1,6})")
_AT = re.compile(r" - at `(\$[^`]*)`$")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows binary64")
    return value


def _text_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _valid(value: Any, depth: int = 0) -> bool:
    """The fast walk: True when `value` has a canonical form (no locations built)."""
    kind = type(value)
    if (kind is dict or kind is list) and depth >= limits.MAX_JSON_DEPTH:
        return False  # an array or object at `depth` (the top value at 0) is level depth + 1, empty or not
    if kind is dict:
        return all(type(k) is str and _text_ok(k) and _valid(v, depth + 1) for k, v in value.items())
    if kind is list:
        return all(_valid(v, depth + 1) for v in value)
    if kind is str:
        return _text_ok(value)
    if kind is bool or value is None:
        return True
    if kind is int:
        return abs(value) <= limits.MAX_JSON_INT
    if kind is float:
        return math.isfinite(value)
    return False


def check_value(value: Any, *, path: str | None = None, depth: int = 0, at: str = "$") -> None:
    """Refuse what has no canonical form: see the module docstring."""
    if depth == 0 and _valid(value):
        return  # the common case; the slow walk below only runs to say where the problem is
    if isinstance(value, (dict, list)) and depth >= limits.MAX_JSON_DEPTH:  # as in `_valid`
        raise BundleFormatError(f"{at}: nested deeper than {limits.MAX_JSON_DEPTH}", path=path, field=at)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise BundleFormatError(f"{at}: object key {key!r} is not a string", path=path, field=at)
            check_value(key, path=path, depth=depth, at=at)
            check_value(item, path=path, depth=depth + 1, at=f"{at}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_value(item, path=path, depth=depth + 1, at=f"{at}[{i}]")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BundleFormatError(f"{at}: string holds a lone surrogate", path=path, field=at) from None
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if abs(value) > limits.MAX_JSON_INT:
            raise BundleFormatError(f"{at}: integer {value} is beyond ±(2^53 - 1)", path=path, field=at)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BundleFormatError(f"{at}: {value} is not a finite number", path=path, field=at)
    else:
        raise BundleFormatError(f"{at}: {type(value).__name__} is not a JSON value", path=path, field=at)


def _shape_ok(value: dict | list, depth: int = 0, *, floats: bool = False) -> bool:
    """What a canonical round trip cannot see: integers within ±(2^53 - 1), and no array
    or object, empty or not, nested more than MAX_JSON_DEPTH deep (`value` sits at `depth`;
    the top value is at 0, as `_valid` counts); with `floats`, also every float in msgspec's plain range."""
    stack = [(value, depth)]
    while stack:
        node, depth = stack.pop()
        items = node.values() if type(node) is dict else node
        if depth >= limits.MAX_JSON_DEPTH:
            return False
        for v in items:
            kind = type(v)
            if kind is dict or kind is list:
                stack.append((v, depth + 1))
            elif kind is int and not -limits.MAX_JSON_INT <= v <= limits.MAX_JSON_INT:
                return False
            elif floats and kind is float and not _plain_float(v):
                return False
    return True


NOT_CANONICAL = object()


def _parse_canonical(data: bytes) -> Any:
    """The value of `data` when it is already canonical and valid, else `NOT_CANONICAL`.

    Bundles on disk hold canonical bytes, and this path proves it with the C decoder and
    encoder: re-encoding reproduces the bytes only if there were no duplicate keys, no
    whitespace, every key in order and every number and string in canonical form;
    encoding refuses NaN, infinities and lone surrogates. What the round trip cannot
    see, big integers and deep nesting, `_shape_ok` checks. Anything else goes the
    strict way, which says exactly what is wrong.
    """
    try:
        value = msgspec.json.decode(data)  # any correct decoder reads canonical bytes alike
        same = encode(value, checked=True) == data
    except (msgspec.DecodeError, ValueError, RecursionError):  # UnicodeError is a ValueError
        return NOT_CANONICAL
    if not same or (type(value) in (dict, list) and not _shape_ok(value)) or (type(value) is int and not _shape_ok([value])):
        return NOT_CANONICAL
    return value


def parse(data: bytes, *, path: str) -> Any:
    """Strict JSON bytes -> Python value (dict, list, str, int, float, bool, None)."""
    if (value := _parse_canonical(data)) is not NOT_CANONICAL:
        return value
    return parse_strict(data, path=path)


def parse_strict(data: bytes, *, path: str) -> Any:
    """`parse` without the canonical fast path: the reference it must agree with."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleFormatError(f"{path}: not UTF-8 (byte {exc.start})", path=path) from None
    if text.startswith("\ufeff"):
        raise BundleFormatError(f"{path}: starts with a byte order mark", path=path)
    try:
        value = json.loads(
            text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant, parse_float=_finite
        )
    except json.JSONDecodeError as exc:
        raise BundleFormatError(f"{path}: invalid JSON at byte {exc.pos}: {exc.msg}", path=path) from None
    except (ValueError, RecursionError) as exc:
        raise BundleFormatError(f"{path}: invalid JSON: {exc or 'nested too deeply'}", path=path) from None
    check_value(value, path=path)
    return value


def encode(value: Any, *, path: str | None = None, checked: bool = False) -> bytes:
    """The canonical bytes of a JSON value; ``checked`` when it is known to have a canonical form."""
    if not checked:
        check_value(value, path=path)
    # json.dumps with these options is exactly the canonical form: code-point key order,
    # float repr, the short escapes plus \u00xx, every other character literal.
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def canonicalize(data: bytes, *, path: str = MANIFEST) -> bytes:
    """Any valid JSON bytes -> the canonical bytes of the same value."""
    if _parse_canonical(data) is not NOT_CANONICAL:
        return data
    return encode(parse(data, path=path), path=path)


def is_canonical(data: bytes) -> bool:
    return canonicalize(data) == data


def manifest_id(data: bytes) -> str:
    """A manifest's identity: hex sha256 of its canonical bytes."""
    return hashlib.sha256(canonicalize(data)).hexdigest()


def check_version(value: Any) -> None:
    """Refuse an unknown major version before looking at anything else."""
    spec = value.get("spec") if isinstance(value, dict) else None
    m = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if m and int(m[1]) != SPEC_MAJOR:
        raise UnsupportedVersionError(
            f"{MANIFEST}: spec {spec!r} has major version {int(m[1])}; this reader implements {SPEC_MAJOR}.x",
            path=MANIFEST, found=spec, supported=SPEC_MAJOR,
        )  # fmt: skip


_PLAIN = {
    "$.name": "a bundle name is 'owner/name': lowercase letters, digits, '.', '_' and '-', each part starting with a letter or digit",
    "$.version": "a version is semver, e.g. 1.2.3 or 1.2.3-rc.1",
}


def typed(value: Any) -> Manifest:
    """A JSON value -> a validated `Manifest` (schema, then the rules the schema cannot say)."""
    try:
        manifest = msgspec.convert(value, Manifest)
    except msgspec.ValidationError as exc:
        m = _AT.search(str(exc))
        field = m[1] if m else "$"
        why = _PLAIN.get(field) if "regex" in str(exc) else None  # the patterns say it, not to a reader
        raise BundleFormatError(f"{MANIFEST}: {why} - at `{field}`" if why else f"{MANIFEST}: {exc}", path=MANIFEST, field=field) from None
    check_manifest(manifest)
    return manifest


def loads(data: bytes) -> Manifest:
    """Manifest bytes (any valid JSON, canonical or not) -> `Manifest`."""
    limits.ensure(len(data), limits.MAX_MANIFEST_BYTES, "MAX_MANIFEST_BYTES", "manifest size", path=MANIFEST)
    if (manifest := _typed_canonical(data)) is not None:
        check_manifest(manifest)
        return manifest
    value = parse(data, path=MANIFEST)
    check_version(value)
    return typed(value)


def _typed_canonical(data: bytes) -> Manifest | None:
    """The manifest of `data` when it is canonical and of this major version, read by one typed C decode.

    What bundles hold, in a third of the time of `parse` then `typed`. msgspec writes a
    manifest back as `encode` does, except escapes and floats outside 1e-4 <= |x| < 1e16
    (a test holds it to that), so bytes it reproduces exactly, holding no backslash and
    no such float, are canonical. Unknown fields (the typed read drops them) and fields
    spelled at their default fail that comparison. None for anything else: the general
    path then reads it, or says what is wrong.
    """
    if b"\\" in data:
        return None
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except (msgspec.DecodeError, ValueError, RecursionError):  # ValidationError is a DecodeError
        return None
    if msgspec.json.encode(manifest, order="sorted") != data or not _plain_numbers(manifest):
        return None
    m = _SPEC.fullmatch(manifest.spec)
    return manifest if m and int(m[1]) == SPEC_MAJOR else None


def _plain_float(x: float) -> bool:
    """Whether msgspec spells `x` as canonical JSON does (both write the shortest digits;
    they differ only in the exponent form used outside this range)."""
    return x == 0 or 1e-4 <= abs(x) < 1e16


def _plain_numbers(m: Manifest) -> bool:
    """Every number spelled alike by both encoders and within bounds, the provenance nested within bounds."""
    return (
        all(f.size <= limits.MAX_JSON_INT for f in m.files)  # the other integer fields have lower bounds
        and all(_plain_float(s.alpha) for s in m.slots)
        and all(_plain_float(p.weight) for p in m.parents)
        and _shape_ok(m.provenance, 1, floats=True)
    )


def dumps(manifest: Manifest) -> bytes:
    """`Manifest` -> its canonical bytes; refuses a manifest that breaks the spec, or that readers refuse as too large."""
    checked = typed(msgspec.to_builtins(manifest))  # also turns ints given for floats into floats
    data = encode(msgspec.to_builtins(checked), path=MANIFEST)
    limits.ensure(len(data), limits.MAX_MANIFEST_BYTES, "MAX_MANIFEST_BYTES", "manifest size", path=MANIFEST)
    return data
