"""The manifest's JSON Schema, generated from the msgspec types (spec/schema/manifest.schema.json).

    python -m lwformat.bundle.schema [OUT]     writes the file (default: the spec's copy)

The schema states the types, patterns and bounds; the rules it cannot state (a slot's
block is bound, chunk counts, limits...) are in `rules` and in the spec.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from .manifest import SPEC_MAJOR, Manifest

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SPEC_FILE = Path(__file__).resolve().parents[2] / "spec" / "schema" / "manifest.schema.json"


def manifest_schema() -> dict[str, Any]:
    schema = msgspec.json.schema(Manifest)
    return {"$schema": DRAFT, "title": f"lwbundle/{SPEC_MAJOR} manifest", **schema}


def schema_bytes() -> bytes:
    """The file's exact bytes: sorted keys, two-space indent, a final newline."""
    return (json.dumps(manifest_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else SPEC_FILE
    out.write_bytes(schema_bytes())
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
