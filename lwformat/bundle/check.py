"""Does a bundle fit a world? A dry run, block by block and slot by slot; nothing is changed.

    block  ok | missing block | digest mismatch        (the world's block digest vs the bound one)
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

from ..adapters.kinds import KINDS, SlotSettings
from ..adapters.slots import eligible_slots
from ..errors import IncompatibleError, TargetError
from ..world.digest import dtype_name
from .manifest import Manifest, SlotEntry
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


def slot_settings(entry: SlotEntry) -> SlotSettings:
    index = entry.tensors.get("neuron_index")  # a neuron adapter's size is its index's length
    neurons = tuple(range(index.shape[0])) if index is not None and index.shape else ()
    return SlotSettings(entry.kind, entry.rank, entry.alpha, entry.rslora, neurons)


def _check_slot(world: World, paths: dict[str, str], entry: SlotEntry, seen: dict) -> Finding:
    slot = entry.slot
    if entry.block not in paths:
        return Finding(slot, Outcome.MISSING_BLOCK, f"the world has no block {entry.block}")
    try:
        block = paths[entry.block]  # canonical: a shared block is scanned once, under one key
        if block not in seen:  # one scan per block, not per slot
            seen[block] = eligible_slots(world.block(block), where=block)
        eligible = seen[block]
    except TargetError as exc:
        return Finding(slot, Outcome.MISSING_SLOT, str(exc))
    if entry.module not in eligible:
        return Finding(slot, Outcome.MISSING_SLOT, f"block {entry.block} has no adaptable layer {entry.module}")
    layer, geo = eligible[entry.module]
    if geo.layer != entry.layer:
        return Finding(slot, Outcome.LAYER_MISMATCH, f"stored for a {entry.layer}, the world has a {geo.layer}",
                       expected=entry.layer, found=geo.layer)  # fmt: skip
    kind = KINDS.get(entry.kind)
    if kind is None:
        return Finding(slot, Outcome.UNKNOWN_KIND, f"adapter kind {entry.kind!r} (known: {', '.join(sorted(KINDS))})")
    want = kind.shapes(geo, slot_settings(entry))
    for name, shape in want.items():
        stored = entry.tensors.get(name)
        if stored is None or tuple(stored.shape) != tuple(shape):
            has = "absent" if stored is None else f"stored {stored.shape}"
            return Finding(slot, Outcome.SHAPE_MISMATCH, f"{name}: {has}, this layer needs {list(shape)}",
                           expected=str(list(shape)), found=None if stored is None else str(stored.shape))  # fmt: skip
    base = dtype_name(layer.weight.dtype)
    stored_dtypes = sorted({entry.tensors[name].dtype for name in want} - {base})
    if stored_dtypes:
        return Finding(slot, Outcome.DTYPE_CONVERSION, f"stored {', '.join(stored_dtypes)}, the layer is {base}",
                       expected=base, found=stored_dtypes[0])  # fmt: skip
    return Finding(slot, Outcome.OK)


def check(bundle: Bundle | Manifest, world: World, *, strict: bool = False, root: bool | None = None,
          scans: dict | None = None) -> CompatReport:  # fmt: skip
    """Compare the bundle's (or a manifest's) base binding and slots with `world`.

    Only the bound blocks are hashed (or read from the digest cache). The root is compared
    when ``root`` is true, by default only in strict mode, where it counts. ``scans`` may
    carry a dict that keeps each block's slot scan for the caller to reuse.
    """
    m = bundle.manifest if isinstance(bundle, Bundle) else bundle
    paths = world.block_paths()  # any path -> the canonical path of the block there
    blocks = []
    for path, expected in m.base.blocks.items():
        if path not in paths:
            blocks.append(Finding(path, Outcome.MISSING_BLOCK, "the world has no block here", expected=expected))
            continue
        found = world.digest(paths[path])
        outcome = Outcome.OK if found == expected else Outcome.DIGEST_MISMATCH
        detail = "" if found == expected else f"expected {expected}, found {found}"
        blocks.append(Finding(path, outcome, detail, expected=expected, found=found))
    if root if root is not None else strict:
        found_root = world.root_digest()
        same = found_root == m.base.root
        detail = "" if same else f"expected {m.base.root}, found {found_root}"
        outcome = Outcome.OK if same else Outcome.ROOT_MISMATCH
        root_finding = Finding(ROOT, outcome, detail, expected=m.base.root, found=found_root)
    else:
        root_finding = Finding(ROOT, Outcome.NOT_COMPARED, "not strict", expected=m.base.root)
    seen = scans if scans is not None else {}
    slots = tuple(_check_slot(world, paths, s, seen) for s in m.slots)
    return CompatReport(f"{m.name}@{m.version}", strict, root_finding, tuple(blocks), slots)
