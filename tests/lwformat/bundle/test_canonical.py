"""Canonical JSON and the manifest's bytes: golden strings written by hand, properties by hypothesis."""

from __future__ import annotations

import hashlib
import json
import math
import re
from decimal import ROUND_FLOOR, Decimal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwformat.bundle.canonical import canonicalize, dumps, encode, is_canonical, loads, manifest_id
from lwformat.bundle.manifest import SPEC, BaseBinding, FileEntry, Manifest, Parent, SlotEntry, TensorEntry
from lwformat.errors import BundleFormatError, BundleLimitError, UnsupportedVersionError

H = "ab" * 32


def small_manifest(**changes) -> Manifest:
    slot = SlotEntry(
        block="author/narrate/text/llm", module="blocks.0.attn", kind="lora", layer="linear", rank=2, alpha=4.0,
        tensors={"lora_A": TensorEntry("author/narrate/text/llm:blocks.0.attn.lora_A", "F32", [2, 8])},
    )  # fmt: skip
    fields = dict(
        spec=SPEC, name="author/noir", version="1.0.0",
        base=BaseBinding(root="sha256:" + H, blocks={"author/narrate/text/llm": "sha256:" + H}),
        slots=[slot], files=[FileEntry("adapters.safetensors", 10, H, [H])], chunk_size=1 << 16,
    )  # fmt: skip
    return Manifest(**{**fields, **changes})


# -- the encoding, byte for byte ---------------------------------------------------------------


def test_golden_encoding():
    value = {"b": 1, "a": [1.0, 1e16, 1e-05, -0.0, 0.0001, 123.25, -7], "é": None, "Z": True, "s": "\u2028\x7f\x01é\"\\/\n\t"}
    want = (
        '{"Z":true,"a":[1.0,1e+16,1e-05,-0.0,0.0001,123.25,-7],"b":1,'
        '"s":"\u2028\x7f\\u0001é\\"\\\\/\\n\\t","é":null}'
    )
    assert encode(value) == want.encode("utf-8")


def test_keys_sort_by_code_point_not_utf16():
    # U+FFFF < U+1F600 by code point; in UTF-16 units the emoji (0xD83D...) would come first
    assert encode({"\U0001f600": 1, "\uffff": 2, "a": 3}) == '{"a":3,"\uffff":2,"\U0001f600":1}'.encode()


def test_golden_manifest_bytes():
    m = small_manifest(description="", tags=[])  # defaults are left out
    want = (
        '{"base":{"blocks":{"author/narrate/text/llm":"sha256:' + H + '"},"root":"sha256:' + H + '"},'
        '"chunk_size":65536,"files":[{"chunks":["' + H + '"],"path":"adapters.safetensors","sha256":"' + H + '","size":10}],'
        '"name":"author/noir","slots":[{"alpha":4.0,"block":"author/narrate/text/llm","kind":"lora","layer":"linear",'
        '"module":"blocks.0.attn","rank":2,"tensors":{"lora_A":{"dtype":"F32",'
        '"key":"author/narrate/text/llm:blocks.0.attn.lora_A","shape":[2,8]}}}],"spec":"lwbundle/1.0","version":"1.0.0"}'
    )
    assert dumps(m) == want.encode()
    assert manifest_id(want.encode()) == hashlib.sha256(want.encode()).hexdigest()


def _shortest(x: float) -> tuple[str, int]:
    """Digits d1..dn and exponent e of the shortest decimal d1.d2..dn x 10^e reading back as x > 0:
    of that length, the nearest to x, and of two equally near, the one ending in an even digit."""
    exact = Decimal(x)
    for n in range(1, 18):
        e = exact.adjusted()
        unit = Decimal(1).scaleb(e - n + 1)  # one unit in the n-th digit
        low = (exact / unit).to_integral_value(ROUND_FLOOR)
        found = [(abs(exact - c * unit), c % 2, c) for c in (low, low + 1) if float(c * unit) == x]
        if found:
            c = min(found)[2]
            digits = str(c)
            if len(digits) > n:  # rounding up carried into a new digit (9.99 -> 10.0)
                digits, e = digits[:n], e + 1
            return digits.rstrip("0") or "0", e
    raise AssertionError(x)


def _expected_float(x: float) -> str:
    """The spec's float rule, re-implemented from its text."""
    if x == 0:
        return "-0.0" if math.copysign(1, x) < 0 else "0.0"
    digits, e = _shortest(abs(x))
    sign = "-" if x < 0 else ""
    if -4 <= e <= 15:
        point = e + 1
        if point <= 0:
            return f"{sign}0.{'0' * -point}{digits}"
        whole, frac = digits[:point].ljust(point, "0"), digits[point:]
        return f"{sign}{whole}.{frac or '0'}"
    frac = f".{digits[1:]}" if len(digits) > 1 else ""
    return f"{sign}{digits[0]}{frac}e{'-' if e < 0 else '+'}{abs(e):02d}"


@pytest.mark.parametrize("x", [2.0**-24, 0.1, 1e16, 1e15, 9.999999999999999e22, 5e-324, 1.7976931348623157e308, 0.3])
def test_float_edge_cases(x):
    assert encode([x]).decode()[1:-1] == _expected_float(x)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_follow_the_spec_rule(x):
    out = encode([x]).decode()[1:-1]
    assert out == _expected_float(x)
    assert float(out) == x and math.copysign(1, float(out)) == math.copysign(1, x)


# -- properties over manifests -----------------------------------------------------------------

hexes = st.text("0123456789abcdef", min_size=64, max_size=64)
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
)  # fmt: skip
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=8)
names = st.from_regex(r"\A[a-z0-9][a-z0-9_.\-]{0,6}/[a-z0-9][a-z0-9_.\-]{0,6}\Z")


@st.composite
def manifests(draw) -> Manifest:
    size = draw(st.integers(0, 1 << 20))
    chunk = draw(st.sampled_from([1 << 16, 1 << 20]))
    return small_manifest(
        name=draw(names),
        version=f"{draw(st.integers(0, 99))}.{draw(st.integers(0, 99))}.{draw(st.integers(0, 99))}",
        files=[FileEntry("adapters.safetensors", size, draw(hexes), [draw(hexes)] * -(-size // chunk))],
        chunk_size=chunk,
        description=draw(st.text(max_size=20)),
        tags=draw(st.lists(st.text(max_size=5), max_size=3)),
        provenance=draw(st.dictionaries(st.text(max_size=5), json_value, max_size=3)),
        parents=draw(st.lists(st.builds(Parent, names, st.just("1.0.0"), st.floats(-2, 2), hexes), max_size=2)),
    )  # fmt: skip


@settings(max_examples=120, deadline=None)
@given(manifests())
def test_dumps_is_a_fixed_point_and_canonical(m):
    data = dumps(m)
    assert dumps(loads(data)) == data
    assert is_canonical(data)
    pairs: list[list[str]] = []
    json.loads(data, object_pairs_hook=lambda kv: pairs.append([k for k, _ in kv]) or dict(kv))
    assert all(keys == sorted(keys) for keys in pairs)


@settings(max_examples=60, deadline=None)
@given(manifests())
def test_any_valid_spelling_reads_to_the_same_manifest_and_identity(m):
    data = dumps(m)
    pretty = json.dumps(json.loads(data), indent=3, ensure_ascii=True).encode()  # other order of bytes, escapes
    assert loads(pretty) == loads(data)
    assert canonicalize(pretty) == data and manifest_id(pretty) == manifest_id(data)


# -- what readers refuse -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.replace(b'"name":"author/noir"', b'"name":"author/noir","name":"a/b"'), None),
        (lambda d: d.replace(b'"alpha":4.0', b'"alpha":NaN'), None),
        (lambda d: d.replace(b'"alpha":4.0', b'"alpha":Infinity'), None),
        (lambda d: d.replace(b'"alpha":4.0', b'"alpha":1e400'), None),
        (lambda d: d.replace(b'"chunk_size":65536', b'"chunk_size":9007199254740992'), "$.chunk_size"),
        (lambda d: b"\xef\xbb\xbf" + d, None),
        (lambda d: d.replace(b"noir", b"no\xffr"), None),
        (lambda d: d.replace(b'"version":"1.0.0"', b'"version":"1.0.0","x":"\\ud800"'), "$.x"),
        (lambda d: d.replace(b'"version":"1.0.0"', b'"version":"1.0.0","x":' + b"[" * 40 + b"]" * 40), None),
        (lambda d: d.replace(b'"name":"author/noir"', b'"name":"author/noir\\n"'), "$.name"),
        (lambda d: d.replace(b'"version":"1.0.0"', b'"version":"\\u0661.0.0"'), "$.version"),
        (lambda d: d.replace(b'"rank":2', b'"rank":-1'), "$.slots[0].rank"),
        (lambda d: d.replace(b'"spec":"lwbundle/1.0"', b'"spec":"lwbundle/01.0"'), "$.spec"),
        (lambda d: d.replace(b'"size":10', b'"size":70000'), "$.files[0].chunks"),
        (lambda d: d.replace(b'"path":"adapters.safetensors"', b'"path":"../adapters.safetensors"'), "$.files[0].path"),
        (lambda d: b"[" + d + b"]", "$"),
    ],
)
def test_loads_refuses(change, field):
    data = change(dumps(small_manifest()))
    with pytest.raises(BundleFormatError) as info:
        loads(data)
    assert info.value.path == "manifest.json"
    if field is not None:
        assert info.value.field is not None and info.value.field.startswith(field)


def test_too_many_dimensions_are_the_same_limit_error_in_the_manifest_and_the_weights_header():
    from lwformat.bundle.layout import check_header, plan_layout

    data = dumps(small_manifest())
    with pytest.raises(BundleLimitError) as info:
        loads(data.replace(b'"shape":[2,8]', b'"shape":[2,8,1,1,1,1,1,1,1]'))
    assert (info.value.limit, info.value.value, info.value.path) == ("MAX_NDIM", 9, "manifest.json")
    assert info.value.field == "$.slots[0].tensors.lora_A.shape"
    key = plan_layout(loads(data))[0].key
    header = json.dumps({key: {"data_offsets": [0, 4], "dtype": "F32", "shape": [1] * 9}}).encode()
    with pytest.raises(BundleLimitError) as info:
        check_header(header, 4, loads(data))
    assert (info.value.limit, info.value.value, info.value.path, info.value.field) == ("MAX_NDIM", 9, "adapters.safetensors", key)


def test_unknown_major_is_refused_before_anything_else():
    with pytest.raises(UnsupportedVersionError) as info:
        loads(b'{"spec":"lwbundle/2.0","name":"NOT VALID"}')
    assert (info.value.found, info.value.supported, info.value.field) == ("lwbundle/2.0", 1, "$.spec")


def test_manifest_size_is_bounded_before_parsing():
    with pytest.raises(BundleLimitError) as info:
        loads(b" " * ((4 << 20) + 1))
    assert info.value.limit == "MAX_MANIFEST_BYTES"


def test_newer_minor_is_read_and_its_unknown_fields_count_for_identity():
    base = json.loads(dumps(small_manifest()))
    newer = {**base, "spec": "lwbundle/1.7", "future": {"x": 1}}
    newer_bytes = encode(newer)
    m = loads(newer_bytes)
    assert m.spec == "lwbundle/1.7" and m.name == "author/noir"
    assert manifest_id(newer_bytes) == hashlib.sha256(newer_bytes).hexdigest()
    assert manifest_id(newer_bytes) != manifest_id(encode({**newer, "future": {"x": 2}}))


def test_integers_for_float_fields_are_read_and_written_as_floats():
    data = dumps(small_manifest()).replace(b'"alpha":4.0', b'"alpha":4')
    m = loads(data)
    assert m.slots[0].alpha == 4.0 and b'"alpha":4.0' in dumps(m)
    assert b'"alpha":4.0' in dumps(msgspec.structs.replace(m, slots=[msgspec.structs.replace(m.slots[0], alpha=4)]))


def test_dumps_refuses_an_invalid_manifest():
    with pytest.raises(BundleFormatError) as info:
        dumps(small_manifest(name="Author/Noir"))
    assert info.value.field == "$.name"
    with pytest.raises(BundleFormatError) as info:
        dumps(small_manifest(provenance={"loss": float("nan")}))
    assert info.value.field == "$.provenance.loss"


# -- the fast path for canonical bytes agrees with the strict parser -------------------------

_json_scalars = (
    st.none() | st.booleans() | st.text(max_size=6)
    | st.integers(min_value=-(2**60), max_value=2**60) | st.floats(allow_nan=True, allow_infinity=True)
)  # fmt: skip
_json_values = st.recursive(
    _json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=40,
)  # fmt: skip


def _deep(depth: int):
    value: object = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _spellings(value) -> list[bytes]:
    """The canonical-looking spelling of `value` (even where invalid), and a spaced-out one."""
    tight = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return [tight.encode("utf-8", "surrogatepass"), json.dumps(value, indent=1).encode()]


def _agree(data: bytes) -> None:
    from lwformat.bundle.canonical import NOT_CANONICAL, _parse_canonical, parse_strict

    fast = _parse_canonical(data)
    try:
        strict = parse_strict(data, path="x.json")
    except BundleFormatError:
        assert fast is NOT_CANONICAL, data
        return
    if fast is not NOT_CANONICAL:
        assert encode(strict) == data and json.dumps(fast, sort_keys=True) == json.dumps(strict, sort_keys=True)
    else:  # valid bytes go the slow way only when not canonical, or holding a run of 16 digits
        assert encode(strict) != data or re.search(rb"[0-9]{16}", data), data


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_fast_path_agrees_with_the_strict_parser(value):
    for data in _spellings(value):
        _agree(data)


@pytest.mark.parametrize("depth", [31, 32, 33, 40])
def test_fast_path_nesting_limit_matches(depth):
    for data in _spellings(_deep(depth)) + _spellings([_deep(depth - 1), []]):
        _agree(data)


def _nested(levels: int, innermost: list | dict) -> list | dict:
    """`levels` arrays and objects, one in the other, the innermost being `innermost`."""
    value = innermost
    for i in range(levels - 1):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize("innermost", [[], {}, [1]], ids=["empty array", "empty object", "array"])
def test_an_empty_array_or_object_counts_toward_the_nesting_limit_like_any_other(innermost):
    # the manifest and provenance objects are levels 1 and 2: 32 levels in all, then 33
    ok, deep = (small_manifest(provenance={"d": _nested(n, innermost)}) for n in (30, 31))
    assert loads(dumps(ok)) == ok
    with pytest.raises(BundleFormatError, match="nested deeper than 32"):
        dumps(deep)
    data = dumps(ok).replace(encode(ok.provenance), encode(deep.provenance))
    for spelling in (data, json.dumps(json.loads(data), indent=1).encode()):
        with pytest.raises(BundleFormatError, match="nested deeper than 32"):
            loads(spelling)
    for levels in (32, 33):
        for spelling in _spellings(_nested(levels, innermost)):
            _agree(spelling)


@pytest.mark.parametrize(
    "data",
    [b'{"a":1,"a":1}', b'{"a":NaN}', b'[1e999]', b'["\\ud800"]', b"[9007199254740992]", b"[9007199254740991]",
     b"\xef\xbb\xbf[1]", b'{"b":1,"a":2}', b"[1.0e+16]", b'["\\u00e9"]', b'["\\u001F"]', b"[]", b'"x"'],
)  # fmt: skip
def test_fast_path_on_hand_picked_bytes(data):
    _agree(data)


def test_fast_path_takes_canonical_manifests():
    from lwformat.bundle.canonical import NOT_CANONICAL, _parse_canonical

    data = dumps(small_manifest())
    assert _parse_canonical(data) == json.loads(data)
    assert _parse_canonical(json.dumps(json.loads(data), indent=1).encode()) is NOT_CANONICAL
    assert _parse_canonical(encode(_deep(32))) == _deep(32) and _parse_canonical(_spellings(_deep(33))[0]) is NOT_CANONICAL
    assert _parse_canonical(b"[9007199254740991]") == [2**53 - 1] and _parse_canonical(b"[-9007199254740992]") is NOT_CANONICAL


# -- the typed fast path for canonical manifests agrees with the general one ------------------


@settings(deadline=None)  # microseconds each; a stalled machine must not fail it
@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x == 0 or 1e-4 <= abs(x) < 1e16))
def test_msgspec_spells_plain_floats_as_canonical_json(x):
    assert msgspec.json.encode(x) == encode(x)


def _agree_typed(data: bytes) -> None:
    from lwformat.bundle.canonical import _typed_canonical, check_version, parse_strict, typed

    fast = _typed_canonical(data)
    try:
        value = parse_strict(data, path="manifest.json")
        check_version(value)
        strict = typed(value)
    except BundleFormatError:
        assert fast is None, data
        return
    if fast is not None:
        assert encode(value) == data and fast == strict, data


def _leaves(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


@settings(max_examples=150, deadline=None)
@given(manifests())
def test_typed_fast_path_agrees_with_the_general_one(m):
    from lwformat.bundle.canonical import _typed_canonical

    data = dumps(m)
    for spelling in (data, msgspec.json.encode(msgspec.to_builtins(m), order="sorted"), json.dumps(json.loads(data), indent=1).encode()):
        _agree_typed(spelling)
    # canonical bytes go the fast way unless they hold an escape or a float spelled with an exponent
    positional = all("e" not in repr(x) for x in _leaves(json.loads(data)) if type(x) is float)
    assert (_typed_canonical(data) is not None) == (b"\\" not in data and positional), data


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d,
        lambda d: d.replace(b'"alpha":4.0', b'"alpha":1e16'),  # msgspec's exponent spelling, not canonical
        lambda d: d.replace(b'"alpha":4.0', b'"alpha":1e+16'),  # canonical, but a float the fast path leaves alone
        lambda d: d.replace(b'"alpha":4.0', b'"alpha":0.00009'),
        lambda d: d.replace(b'"alpha":4.0', b'"alpha":4'),
        lambda d: d.replace(b'"size":10', b'"size":9007199254740992'),
        lambda d: d.replace(b'"chunk_size":65536', b'"chunk_size":65536,"description":""'),  # a default spelled out
        lambda d: d.replace(b'"chunk_size":65536', b'"chunk_size":65536,"future":1'),  # an unknown field
        lambda d: d.replace(b'"name":"author/noir"', b'"name":"author/noir","name":"author/noir"'),
        lambda d: d.replace(b'"spec":"lwbundle/1.0"', b'"spec":"lwbundle/2.0"'),
        lambda d: d.replace(b'"version":"1.0.0"', b'"provenance":{"d":' + json.dumps(_deep(30)).replace(" ", "").encode() + b'},"version":"1.0.0"'),
        lambda d: d.replace(b'"version":"1.0.0"', b'"provenance":{"d":' + json.dumps(_deep(31)).replace(" ", "").encode() + b'},"version":"1.0.0"'),
        lambda d: d.replace(b'"version":"1.0.0"', b'"provenance":{"n":9007199254740992},"version":"1.0.0"'),
        lambda d: d.replace(b'"version":"1.0.0"', b'"provenance":{"x":1e-7},"version":"1.0.0"'),
        lambda d: d.replace(b'"version":"1.0.0"', b'"provenance":{"x":1e-07},"version":"1.0.0"'),
        lambda d: d.replace(b'"description"', b'"description"').replace(b'"files"', b'"description":"\\u00e9","files"'),
        lambda d: d.replace(b'"files"', b'"description":"\xc3\xa9 \\"q\\"","files"'),
        lambda d: d.replace(b"noir", b"no\xffr"),
    ],
)
def test_typed_fast_path_on_hand_picked_manifests(change):
    _agree_typed(change(dumps(small_manifest())))


def test_typed_fast_path_takes_what_dumps_writes():
    from lwformat.bundle.canonical import _typed_canonical

    m = small_manifest(provenance={"loss": 5.5, "steps": [1, 2]}, parents=[Parent("a/b", "1.0.0", 0.7, H)], tags=["noir"])
    assert _typed_canonical(dumps(m)) == m
    assert _typed_canonical(dumps(small_manifest(provenance={"tiny": 1e-7}))) is None  # exponent floats: the general path
