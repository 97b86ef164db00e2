"""`LightConfig`: which slots of a world get adapters, of which kind and size.

Selection narrows in three steps, each optional (empty means "all"):
``block_types`` (``llm``, ``backbone``...), ``blocks`` (block-path globs, ``author/**``)
and ``slots`` (module-path patterns, ``*.attn.qkv``; a pattern containing ``:`` is a
full slot pattern ``block glob:module pattern``). ``exclude`` removes slots with the
same pattern syntax. A slot pattern without wildcards is *explicit*: it must name a
layer the kind can host wherever the block has that module.

``rank_pattern`` / ``alpha_pattern`` override rank and alpha per slot pattern, as in
PEFT; the first matching key wins. ``alpha`` defaults to ``rank`` (scaling 1).
"""

from __future__ import annotations

import msgspec


class LightConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    kind: str = "lora"
    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    neurons: int | list[int] = 8
    block_types: list[str] = []
    blocks: list[str] = []
    slots: list[str] = []
    exclude: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    name: str = "default"

    def to_json(self) -> bytes:
        return msgspec.json.encode(self, order="sorted")

    @classmethod
    def from_json(cls, data: bytes | str) -> LightConfig:
        return msgspec.json.decode(data, type=cls)


WILDCARDS = frozenset("*?[")


def is_explicit(pattern: str) -> bool:
    return not WILDCARDS & set(pattern)
