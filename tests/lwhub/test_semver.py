"""Semver precedence, checked against the ordering example of semver.org 2.0.0 (item 11)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwhub.semver import is_prerelease, is_valid, newer, sort_key

HUGE = "1" * 5000  # past Python's 4300-digit limit on parsing a number
SPEC_ORDER = [
    "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
    "1.0.0-rc.1", "1.0.0", "1.9.0", "1.10.0", "1.11.0", "2.0.0", "10.0.0",
]  # fmt: skip


def test_sort_key_orders_as_the_spec_does():
    shuffled = SPEC_ORDER[:]
    random.Random(0).shuffle(shuffled)
    assert sorted(shuffled, key=sort_key) == SPEC_ORDER


def test_build_metadata_does_not_count_and_newer_is_strict():
    assert sort_key("1.0.0+build.1") == sort_key("1.0.0+zzz") == sort_key("1.0.0")
    assert newer("1.0.1", "1.0.0") and not newer("1.0.0", "1.0.0") and not newer("1.0.0-rc.1", "1.0.0")


@pytest.mark.parametrize("bad", ["1.0", "01.0.0", "1.0.0-01", "1.0.0-", "v1.0.0", "1.0.0-alpha..1", "latest"])
def test_invalid_versions_are_refused(bad):
    assert not is_valid(bad)
    with pytest.raises(ValueError, match="not a semantic version"):
        sort_key(bad)


@pytest.mark.parametrize("bad", [f"{HUGE}.0.0", f"0.0.{HUGE}", "1" * 21 + ".0.0", "1.0.0-" + "1" * 21, f"1.0.0-rc.{HUGE}"],
                         ids=["huge major", "huge patch", "21-digit major", "21-digit pre-release", "huge pre-release"])  # fmt: skip
def test_a_number_past_twenty_digits_is_refused_not_parsed(bad):
    assert not is_valid(bad)
    with pytest.raises(ValueError, match="not a semantic version"):
        sort_key(bad)


def test_twenty_digit_numbers_keep_their_order():
    widest, narrower = "1.0.0-" + "9" * 20, "1.0.0-" + "9" * 19
    assert is_valid(widest) and newer(widest, narrower) and newer("9" * 20 + ".0.0", "9" * 19 + ".0.0")


def test_prerelease():
    assert is_prerelease("2.0.0-rc.1") and not is_prerelease("2.0.0+build")


def _manifest_accepts(version: str) -> bool:
    import msgspec

    from lwformat.bundle.manifest import SemVer

    try:
        msgspec.convert(version, SemVer)
    except msgspec.ValidationError:
        return False
    return True


@pytest.mark.parametrize("version", ["1.0.0-01", "1.0.0-a..b", "1.0.0-.a", "1.0.0+", "1.0.0+a..b", "100000000000000000000.0.0",
                                     "1.0.0-0a", "1.0.0-rc.1+b.005", "99999999999999999999.0.0", "1.0.0-x-y.0",
                                     pytest.param(HUGE + ".0.0", id="huge major"), "1.0.0-" + "9" * 20,
                                     "1.0.0-" + "9" * 21, "1.0.0-rc." + "1" * 21])  # fmt: skip
def test_a_bundle_may_carry_exactly_the_versions_the_hub_takes(version):
    """A writer looser than the hub made bundles that signed fine and could never be pushed."""
    assert _manifest_accepts(version) == is_valid(version)


@settings(deadline=None)  # microseconds each; a stalled machine must not fail it
@given(st.from_regex(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(-[0-9A-Za-z.\-]{0,6})?(\+[0-9A-Za-z.\-]{0,4})?", fullmatch=True))
def test_the_manifest_and_the_hub_agree_on_every_version(version):
    assert _manifest_accepts(version) == is_valid(version)
