"""`LightConfig`: which slots of a world get adapters, of which kind and size.

Selection narrows in three steps, each optional (empty means "all"):
``block_types`` (``llm``, ``backbone``...), ``blocks`` (block-path globs, ``author/**``)
and ``slots`` (module-path patterns, ``*.attn.qkv``; a pattern containing ``:`` is a
full slot pattern ``block glob:module pattern``). ``exclude`` removes slots with the
same pattern syntax. A slot pattern without wildcards is *explicit*: it matches the
module path or a dotted suffix of it, as PEFT's ``target_modules`` do (``qkv`` matches
``blocks.0.attn.qkv``; in the full form it names the module path whole), and it must
name layers the kind can host wherever the block has such a module.

``rank_pattern`` / ``alpha_pattern`` override rank and alpha per slot pattern, as in
PEFT; the first matching key wins. ``alpha`` defaults to ``rank`` (scaling 1). A key of
these, or an ``exclude`` pattern, that matches no planned slot is refused: it would
change nothing.
``dropout`` is PEFT's ``lora_dropout``: while training, LoRA and DoRA adapters see their
input through dropout at that rate. It is a training setting only: bundles carry none.
"""

from __future__ import annotations

import math
import re

import msgspec

from ..errors import TargetError


class LightConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Which slots of a world get adapters, of which kind and size; `World.plan` shows the result.

    ``kind``: ``"lora"`` (B·A, rank r), ``"dora"`` (LoRA plus a magnitude per output; not on
    embeddings), ``"ia3"`` (a gain per output), ``"neuron"`` (trained rows for chosen outputs) or
    ``"bias"`` (a shift per output).

    ``rank``: the LoRA/DoRA rank r, 1 up to the layer's smaller side. ``alpha``: the scaling
    numerator, s = alpha / r; None means alpha = the slot's rank (scaling 1). ``rslora``:
    s = alpha / √r instead. ``dropout``: PEFT's ``lora_dropout``, LoRA and DoRA only, while
    training only (bundles carry none). ``neurons`` (kind ``"neuron"``): how many output
    channels, spread evenly, or the list of their indices.

    Selection narrows in steps, each optional (empty means all): ``block_types`` (``"llm"``...),
    ``blocks`` (block-path globs: ``*`` one segment, ``**`` any number: ``"author/**"``),
    ``slots`` (module-path patterns), minus ``exclude`` (the same patterns). A pattern without
    wildcards matches a module path or a dotted suffix of it, as PEFT's ``target_modules``:
    ``"qkv"`` and ``"attn.qkv"`` match ``blocks.0.attn.qkv``; one with ``*``, ``?`` or ``[``
    is an fnmatch glob over the whole module path (``*`` crosses dots: ``"*.attn.qkv"``), not a
    regex; ``"block glob:module pattern"`` limits a pattern to some blocks and names module
    paths whole (``"author/**:head"``). A ``slots`` entry without wildcards that names a
    module path exactly must name a layer the kind can host (else `UnsupportedLayerError`);
    modules it reaches as a suffix are taken where they are slots the kind hosts, and the others
    are listed in the plan's ``skipped`` (a layer of another kind) or left out (no slot). An
    entry of any of these keys that selects nothing is an `UnmatchedPatternError`.

    ``rank_pattern`` / ``alpha_pattern``: ``{pattern: value}`` overriding rank and alpha per
    slot, the first matching key winning (keep the order: a catch-all ``"*"`` goes last).
    An ``exclude``, ``rank_pattern`` or ``alpha_pattern`` key matching no planned slot is an
    `UnmatchedPatternError`, as nothing selected at all is a `NothingTargetedError`.

    ``name``: the adapters' name in each slot's bank (``"default"``), beside applied bundles.
    """

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
    dropout: float = 0.0
    name: str = "default"

    def __post_init__(self) -> None:
        # Decoding JSON checks these types; building a config in Python does not, and a wrong
        # one (rank="4") would fail deep inside `customize`.
        def refuse(field: str, want: str) -> None:
            raise TargetError(f"LightConfig.{field} must be {want}, not {getattr(self, field)!r}", path=field)

        if not isinstance(self.kind, str):
            refuse("kind", "a string")
        if not _is_int(self.rank):
            refuse("rank", "an integer")
        if self.alpha is not None and not _is_finite(self.alpha):
            refuse("alpha", "a finite number or None")
        if not isinstance(self.rslora, bool):
            refuse("rslora", "True or False")
        if not (_is_finite(self.dropout) and 0 <= self.dropout < 1):
            refuse("dropout", "a probability in [0, 1)")
        if self.dropout and self.kind not in DROPOUT_KINDS:
            raise TargetError(f"LightConfig.dropout applies to {' and '.join(DROPOUT_KINDS)} adapters, not {self.kind}",
                              path="dropout")  # fmt: skip
        if not (_is_int(self.neurons) or isinstance(self.neurons, list) and all(map(_is_int, self.neurons))):
            refuse("neurons", "an integer or a list of integers")
        for field in ("block_types", "blocks", "slots", "exclude"):
            if not (isinstance(getattr(self, field), list) and all(isinstance(v, str) for v in getattr(self, field))):
                refuse(field, "a list of strings")
        if not (isinstance(self.name, str) and self.name):
            refuse("name", "a non-empty string")
        for field, check, want in (("rank_pattern", _is_int, "an integer"), ("alpha_pattern", _is_finite, "a finite number")):
            patterns = getattr(self, field)
            if not isinstance(patterns, dict):
                refuse(field, "a dict of slot pattern to value")
            for key, value in patterns.items():
                if not isinstance(key, str) or not check(value):
                    what = "a string" if not isinstance(key, str) else want
                    raise TargetError(f"LightConfig.{field}[{key!r}] must be {what}, not {value!r}", path=field)

    def to_json(self) -> bytes:
        # Not order="sorted": it sorts dict keys too, and the order of rank_pattern and
        # alpha_pattern decides which pattern matches first.
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> LightConfig:
        try:
            return msgspec.json.decode(data, type=cls)
        except msgspec.DecodeError as exc:  # a ValidationError too: wrong types, or what __post_init__ refused
            cause, at = exc.__cause__, _AT_FIELD.search(str(exc))
            path = cause.path if isinstance(cause, TargetError) else at and at[1]
            raise TargetError(f"LightConfig: {exc}", path=path) from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    # NaN or inf would reach the scaling, and every output through it.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_AT_FIELD = re.compile(r"at `\$\.(\w+)")  # where msgspec says the error is: "... - at `$.rank_pattern[...]`"


DROPOUT_KINDS = ("lora", "dora")
WILDCARDS = frozenset("*?[")


def is_explicit(pattern: str) -> bool:
    return not WILDCARDS & set(pattern)
