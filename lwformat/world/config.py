"""The typed world config: what a world is made of, as JSON or TOML.

A node either builds a block (``block`` names a registered implementation, ``config``
its keyword arguments) or shares one built elsewhere in the same world (``ref`` names
that block's path). Sharing keeps one copy of the weights under the first path that
builds it, its canonical path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

from ..errors import WorldConfigError

FORMAT = "lwworld/1"


class NodeSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    block: str | None = None
    config: dict[str, Any] = {}
    ref: str | None = None
    slots: list[str] | None = None


class GraphSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    nodes: dict[str, NodeSpec]
    flow: str = "sequential"


class PipelineSpec(msgspec.Struct, forbid_unknown_fields=True):
    graphs: dict[str, GraphSpec]


class StageSpec(msgspec.Struct, forbid_unknown_fields=True):
    pipelines: dict[str, PipelineSpec]


class WorldSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    stages: dict[str, StageSpec]
    name: str = "world"
    format: Literal["lwworld/1"] = FORMAT
    cycle: list[str] = []


def decode(data: bytes | str, *, suffix: str = ".json") -> WorldSpec:
    """Parse and type-check a world config; errors say where (``at $.stages...``)."""
    decoder = msgspec.toml.decode if suffix == ".toml" else msgspec.json.decode
    try:
        return decoder(data, type=WorldSpec)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise WorldConfigError(f"invalid world config: {exc}") from exc


def encode(spec: WorldSpec) -> bytes:
    """JSON bytes of a config, no whitespace, its stages, pipelines, graphs and nodes in the
    world's own order: that order is what runs (and a ``ref`` names a node built before it),
    so sorting them would load another world. The same spec always gives the same bytes."""
    return msgspec.json.encode(spec)


def read(path: str | Path) -> WorldSpec:
    path = Path(path)
    return decode(path.read_bytes(), suffix=path.suffix)
