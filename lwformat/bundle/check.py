"""Does a bundle fit a world? A dry run, block by block and slot by slot; nothing is changed.

    block  ok | missing block | digest mismatch        (the world's block digest vs the bound one;
                                                        a `World.cast` block untouched since: the
                                                        digest it was cast from)
    slot   ok | missing block | missing slot | layer mismatch | unknown kind | shape mismatch
           | dtype conversion needed                   (a note, not a problem: the runtime converts)
    root   compared always, a problem only in strict mode

Shapes are those the adapter kind derives for the world's layer with the slot's settings,
so a bundle whose blocks match by digest but whose layers differ still cannot slip through.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from ..errors import IncompatibleError
from .manifest import Manifest
from .read import Bundle

if TYPE_CHECKING:
    from ..world.tree import World

ROOT = "root"


class Outcome(StrEnum):
    OK = "ok"
    MISSING_BLOCK = "missing block"
    DIGEST_MISMATCH = "digest mismatch"
    ROOT_MISMATCH = "root mismatch"
    MISSING_SLOT = "missing slot"
    LAYER_MISMATCH = "layer mismatch"
    UNKNOWN_KIND = "unknown kind"
    SHAPE_MISMATCH = "shape mismatch"
    DTYPE_CONVERSION = "dtype conversion needed"
    NOT_COMPARED = "not compared"

    @property
    def is_problem(self) -> bool:
        return self not in (Outcome.OK, Outcome.DTYPE_CONVERSION, Outcome.NOT_COMPARED)


class Finding(NamedTuple):
    """One block's, one slot's or the root's outcome; `path` names it."""

    path: str
    outcome: Outcome
    detail: str = ""
    expected: str | None = None
    found: str | None = None

    def __str__(self) -> str:
        return f"{self.outcome.value:<24} {self.path}" + (f"  ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class CompatReport:
    bundle: str  # "name@version"
    strict: bool
    root: Finding
    blocks: tuple[Finding, ...]
    slots: tuple[Finding, ...]

    @property
    def problems(self) -> list[Finding]:
        found = [f for f in (*self.blocks, *self.slots) if f.outcome.is_problem]
        return found + ([self.root] if self.strict and self.root.outcome.is_problem else [])

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        if self.problems:
            first = self.problems[0]
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            raise IncompatibleError(
                f"{self.bundle} does not fit: {first.path}: {first.outcome.value}"
                + (f": {first.detail}" if first.detail else "") + more,
                path=first.path, outcome=first.outcome.value, expected=first.expected, found=first.found,
            )  # fmt: skip

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"{self.bundle}: " + ("fits" if not n else f"{n} problem{'s' * (n != 1)}")
        root = str(self.root) + ("" if self.strict else "  [not strict: root not required]")
        return "\n".join([head, "blocks", *(f"  {b}" for b in self.blocks), "slots",
                          *(f"  {s}" for s in self.slots), "root", f"  {root}"])  # fmt: skip


def check(bundle: Bundle | Manifest, world: World, *, strict: bool = False, root: bool | None = None,
          scans: dict | None = None) -> CompatReport:  # fmt: skip
    """Compare the bundle's (or a manifest's) base binding and slots with `world`.

    Only the bound blocks are hashed (or read from the digest cache); a block that is an
    untouched cast of the bound one (`World.cast`) fits without being hashed. The root is compared
    when ``root`` is true, by default only in strict mode, where it counts. ``scans`` may
    carry a dict that keeps each block's slot scan for the caller to reuse.
    """
    from .fit import check_slot  # here: it needs torch, which opening a bundle does not

    m = bundle.manifest if isinstance(bundle, Bundle) else bundle
    paths = world.block_paths()  # any path -> the canonical path of the block there
    blocks = []
    for path, expected in m.base.blocks.items():
        if path not in paths:
            blocks.append(Finding(path, Outcome.MISSING_BLOCK, "the world has no block here", expected=expected))
            continue
        blocks.append(_block_finding(world, path, paths[path], expected))
    if root if root is not None else strict:
        root_finding = _root_finding(world, m.base.root)
    else:
        root_finding = Finding(ROOT, Outcome.NOT_COMPARED, "not strict", expected=m.base.root)
    seen = scans if scans is not None else {}
    slots = tuple(check_slot(world, paths, s, seen) for s in m.slots)
    return CompatReport(f"{m.name}@{m.version}", strict, root_finding, tuple(blocks), slots)


def _block_finding(world: World, path: str, canonical: str, expected: str) -> Finding:
    """An untouched cast of the bound block is OK without hashing it (a walk); else its own digest counts."""
    from ..world.cast import cast_source

    if cast_source(world, canonical) == expected:
        return Finding(path, Outcome.OK, f"a {world.cast_record.dtype_name} cast of the bound block", expected=expected)
    found = world.digest(canonical)
    if found == expected:
        return Finding(path, Outcome.OK, expected=expected, found=found)
    detail = f"expected {expected}, found {found}" + _cast_hint(world, canonical)
    return Finding(path, Outcome.DIGEST_MISMATCH, detail, expected=expected, found=found)


def _root_finding(world: World, expected: str) -> Finding:
    """The root before the cast while every block is an untouched cast; else the world's own."""
    from ..world.cast import cast_root

    if cast_root(world) == expected:
        return Finding(ROOT, Outcome.OK, f"a {world.cast_record.dtype_name} cast of the bound world", expected=expected)
    found = world.root_digest()
    if found == expected:
        return Finding(ROOT, Outcome.OK, expected=expected, found=found)
    return Finding(ROOT, Outcome.ROOT_MISMATCH, f"expected {expected}, found {found}", expected=expected, found=found)


def _cast_hint(world: World, path: str) -> str:
    """Digests cover dtypes: say how to cast so that bundles bound to the uncast blocks still fit."""
    import torch

    from ..world.cast import cast_source

    record = world.cast_record
    if record is not None and path in record.blocks:
        source = cast_source(world, path)
        if source is not None:  # untouched: the bundle was made for another base
            return f"; the block is a {record.dtype_name} cast of {source}, another block than the bound one"
        return (f"; the block was written, replaced or moved since world.cast({record.dtype_name}) (a write "
                "while fused counts too), so its own digest counts (move a world before casting it, or World.load(dir, dtype=..., "
                "device=...))")  # fmt: skip
    module = world.block(path).module
    cast = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if not cast:
        return ""
    return (f"; the block holds {', '.join(cast)} weights: if the world was cast after loading (.to, .half), cast it "
            "with world.cast(dtype) or load it with World.load(dir, dtype=...) instead, which keep what it was cast from")
