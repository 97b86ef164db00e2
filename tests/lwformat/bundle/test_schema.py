"""The committed JSON Schema is the generated one, and an independent validator agrees with it."""

from __future__ import annotations

import json
import re

import pytest

from lwformat.bundle import limits
from lwformat.bundle.schema import SPEC_FILE, schema_bytes

from tests.lwformat.bundle.tiny import ROOT, VECTORS


def test_committed_schema_is_generated_from_the_types():
    assert SPEC_FILE.read_bytes() == schema_bytes(), "run: python -m lwformat.bundle.schema"


@pytest.mark.parametrize(
    "vector, valid",
    [("valid-dir", True), ("minor-version-extra-fields", True), ("bad-name", False), ("bad-semver", False)],
)
def test_an_independent_validator_agrees(vector, valid):
    import jsonschema
    manifest = json.loads((VECTORS / vector / "manifest.json").read_bytes())
    errors = list(jsonschema.Draft202012Validator(json.loads(schema_bytes())).iter_errors(manifest))
    assert (not errors) == valid, errors


def test_every_limit_is_in_the_spec_table():
    spec = (ROOT / "spec" / "lwbundle-v1.md").read_text()
    section = spec[spec.index("## 8. Limits") : spec.index("## 9.")]
    names = {n for n in vars(limits) if re.fullmatch(r"MAX_[A-Z_]+|RATIO_FLOOR", n)}
    assert names and all(f"`{n}`" in section for n in names), sorted(n for n in names if f"`{n}`" not in section)
