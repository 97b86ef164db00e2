"""Blend bundles into a new one that records its parents: ``blend([(noir, 0.7), (rain, 0.3)])``.

    Δ_exact = Σ_i w_i Δ_i          per slot, Δ_i parent i's delta at weight 1 (zero without the slot)

Methods (the maths per kind is in `blend_kinds`, the factor maths in `lowrank`):

    linear  the exact sum; LoRA factors concatenated (rank Σ r_i), error 0
    svd     the exact sum re-ranked to ``rank`` from the factors: each stacked factor is
            factored as Q·S (orthonormal Q, S R×R, from its Gram matrix), then the small core
            S_B S_Aᵀ is decomposed by SVD; the dense delta is never formed, and the error is
            the discarded singular values
    ties    PEFT's TIES on the LoRA factors (trim to ``density``, elect sign, disjoint mean);
            beyond PEFT, which refuses ties over different ranks and merges a lone adapter
            linearly, ranks are zero-padded (each parent trimmed among its own entries) and
            a lone parent is trimmed too
    dare    PEFT's DARE on the LoRA factors (drop with probability 1 − density, rescale by
            1/density, seeded by ``seed`` and the slot); both re-ranked like svd given ``rank``

LoRA results are stored with alpha = rank and rslora off, so scaling exactly 1: each parent's
weight and scaling w_i·s_i is folded into B.

The result holds its tensors in memory and quacks like a bundle (``.manifest``,
``.slot_tensors(slot)``), so ``world.apply(blend(...))`` works directly. Its manifest binds
the union of the parents' blocks (parents must agree on every shared block digest), lists
the parents with their weights and manifest identities, and has no files until written.

``.report`` gives, per slot and in total, ‖Δ_blend − Δ_exact‖_F / ‖Δ_exact‖_F.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from ..bundle.canonical import encode, manifest_id
from ..bundle.manifest import (
    SPEC,
    BaseBinding,
    Manifest,
    Name,
    Parent,
    SemVer,
    SlotEntry,
    TensorEntry,
)
from ..errors import BlendError, SlotNotFoundError
from ..world.digest import DTYPE_NAMES
from . import finiteness
from .blend_kinds import TENSOR_ORDER, Part, Recipe, SlotBlend, blend_slots
from .stack import _opened
from .storage import finite

METHODS = ("linear", "svd", "ties", "dare")


@dataclass(frozen=True)
class SlotReport:
    slot: str
    kind: str
    method: str  # what was done at this slot ("linear" for kinds without a rank under svd)
    rank: int  # the stored LoRA rank; 0 for other kinds
    error: float  # ‖Δ_blend − Δ_exact‖_F
    norm: float  # ‖Δ_exact‖_F

    @property
    def relative_error(self) -> float:
        return _ratio(self.error, self.norm)


@dataclass(frozen=True)
class BlendReport:
    method: str
    slots: dict[str, SlotReport]  # in manifest order

    @property
    def relative_error(self) -> float:
        """Over all slots: (Σ error²)^½ / (Σ norm²)^½."""
        return _ratio(math.hypot(*(s.error for s in self.slots.values())), math.hypot(*(s.norm for s in self.slots.values())))


def _ratio(error: float, norm: float) -> float:
    return error / norm if norm > 0 else (0.0 if error == 0 else math.inf)


class Blend:
    """A blended bundle in memory: ``manifest`` (``files`` empty), tensors and the error report."""

    def __init__(self, manifest: Manifest, tensors: dict[str, dict[str, torch.Tensor]], report: BlendReport) -> None:
        self.manifest = manifest
        self.report = report
        self._tensors = tensors

    def slot_tensors(self, slot: str) -> dict[str, torch.Tensor]:
        """One slot's tensors by name, in the kind's declared order."""
        if slot not in self._tensors:
            raise SlotNotFoundError(f"{slot}: no such slot in {self.manifest.name}", path=slot)
        return dict(self._tensors[slot])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by key (``<slot>.<name>``): slots in manifest order, tensors in declared order."""
        return {f"{slot}.{name}": t for slot, ts in self._tensors.items() for name, t in ts.items()}

    def save(self, out_dir, *, version: str | None = None, description: str | None = None):
        """Write the blend as a bundle directory (a new one; all or nothing); returns its manifest."""
        from ..bundle.write import write_tensors

        changes = {k: v for k, v in (("version", version), ("description", description)) if v is not None}
        return write_tensors(msgspec.structs.replace(self.manifest, **changes), self.tensors(), out_dir)

    def __repr__(self) -> str:
        m = self.manifest
        return f"Blend({m.name}@{m.version}, {self.report.method}, {len(m.slots)} slots, error {self.report.relative_error:.3g})"


class _Identity(msgspec.Struct):
    name: Name
    version: SemVer


def blend(parts: Sequence[tuple[Any, float]], *, method: str = "linear", rank: int | None = None, name: str | None = None,
          version: str = "0.1.0", density: float = 0.5, seed: int = 0) -> Blend:  # fmt: skip
    """Blend ``[(bundle, weight), ...]`` into a new bundle; every check runs before any tensor is read.

    A bundle is anything with ``.manifest`` and ``.slot_tensors(slot)`` (a `Bundle`, a `Blend`), or,
    as `apply` takes it, the path of a bundle directory or ``.lwb`` archive (opened here).
    ``rank`` re-ranks LoRA slots (svd, ties, dare; svd defaults to the largest parent rank);
    ``density`` and ``seed`` drive ties and dare; ``name`` defaults to a digest of the recipe
    under the first parent's owner. Raises `BlendError` naming the slot or block at fault, and
    `BundleFormatError` for a parent holding NaN or inf (``.path`` names ``slot:tensor``).
    """
    parts = [(bundle, _weight(bundle, w)) for bundle, w in _pairs(parts)]
    _check_request(parts, method, rank, density, seed)
    parent_ids = [_identity(bundle) for bundle, _ in parts]
    recipe: dict[str, Any] = {"method": method}
    if rank is not None:
        recipe["rank"] = rank
    if method in ("ties", "dare"):
        recipe |= {"density": float(density), "seed": seed}
    name = name or _default_name(parts, parent_ids, recipe)
    try:
        msgspec.convert({"name": name, "version": version}, _Identity)
    except msgspec.ValidationError as exc:
        raise BlendError(f"blend {name}@{version}: {exc}", path=name) from None
    base = _base(parts)
    holders = _slots(parts)
    loaded = {slot: [Part(w, e, bundle.slot_tensors(slot)) for bundle, e, w in held] for slot, held in holders.items()}
    for slot, held in holders.items():  # NaN or inf would poison the blend (or stop svd's decompositions untyped)
        for (bundle, _, _), part in zip(held, loaded[slot]):
            finiteness.refuse(bundle, finiteness.nonfinite((f"{slot}:{n}", t) for n, t in part.tensors.items()),
                              "nothing was blended")
    results = blend_slots(loaded, Recipe(method, rank, density, seed))
    tensors, reports, entries = {}, {}, []
    for slot, result in results.items():
        first = holders[slot][0][1]
        tensors[slot] = _stored(result, [entry for _, entry, _ in holders[slot]])
        if any(t.is_floating_point() and not bool(t.isfinite().all()) for t in tensors[slot].values()):
            raise BlendError(f"{slot}: the blend overflows the stored dtype (weights this large make inf)", path=slot,
                             parents=tuple(b.manifest.name for b, _ in parts))  # fmt: skip
        if not (math.isfinite(result.error) and math.isfinite(result.norm)):  # a report never reads inf or nan
            raise BlendError(f"{slot}: the blend's Frobenius norm overflows float64 (weights this large make inf)", path=slot,
                             parents=tuple(b.manifest.name for b, _ in parts))  # fmt: skip
        reports[slot] = SlotReport(slot, first.kind, result.method, result.rank, result.error, result.norm)
        entries.append(_entry(first, tensors[slot], result.rank))
    manifest = Manifest(
        spec=SPEC, name=name, version=version, base=base, slots=entries, files=[], provenance={"blend": recipe},
        parents=[Parent(b.manifest.name, b.manifest.version, w, pid) for (b, w), pid in zip(parts, parent_ids)],
    )  # fmt: skip
    return Blend(manifest, tensors, BlendReport(method, reports))


# -- checks: the request, the parents' bases, and every slot, before any tensor is read ----------


def _pairs(parts: Any) -> list[tuple[Any, Any]]:
    """``[(bundle, weight), ...]``, each bundle given as `apply` takes it: a path is opened."""
    if isinstance(parts, (str, bytes, os.PathLike)) or not isinstance(parts, Iterable):
        raise BlendError(f"{_PAIRS}, not {_described(parts)}")
    pairs = []
    for i, part in enumerate(parts):
        if isinstance(part, (str, bytes, os.PathLike)) or not isinstance(part, Iterable) or len(pair := tuple(part)) != 2:
            raise BlendError(f"{_PAIRS}; part {i} is {_described(part)}, not a pair")
        bundle, weight = pair
        if isinstance(bundle, (str, os.PathLike)):
            bundle = _opened(bundle)
        elif not hasattr(bundle, "manifest"):
            raise BlendError(f"{_PAIRS}; part {i} holds {_described(bundle)}, not a Bundle, a Blend or a bundle's path")
        pairs.append((bundle, weight))
    return pairs


_PAIRS = "parts is a list of (bundle, weight) pairs, e.g. [(noir, 0.7), ('rain/', 0.3)]"


def _described(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _weight(bundle: Any, weight: Any) -> float:
    w = finite(weight)  # as `apply` takes weights
    if w is None:
        name = bundle.manifest.name
        raise BlendError(f"{name}: weight {weight!r} is not a finite number", parents=(name,))
    return w


def _check_request(parts: list[tuple[Any, float]], method: str, rank: int | None, density: float, seed: int) -> None:
    if not parts:
        raise BlendError("nothing to blend: give at least one (bundle, weight)")
    if method not in METHODS:
        raise BlendError(f"unknown blend method {method!r}; one of {', '.join(METHODS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise BlendError(f"rank {rank!r} must be a positive integer")
    if rank is not None and method == "linear":
        raise BlendError("a linear blend is exact and keeps every rank; ask for method='svd' to re-rank")
    if method in ("ties", "dare") and not (isinstance(density, (int, float)) and not isinstance(density, bool) and 0 < density <= 1):
        raise BlendError(f"density {density!r} must be a number in (0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, int) or abs(seed) > 2**53 - 1:  # the manifest's integers
        raise BlendError(f"seed {seed!r} must be an integer within ±(2**53 - 1)")


def _identity(bundle: Any) -> str:
    data = getattr(bundle, "manifest_bytes", None)  # a Bundle read from disk; a Blend has no bytes yet
    if data is None:
        data = encode(msgspec.to_builtins(bundle.manifest))
    return manifest_id(data)


def _default_name(parts: list[tuple[Any, float]], ids: list[str], recipe: dict[str, Any]) -> str:
    """``<first parent's owner>/blend-<12 hex>``: a digest of the recipe and the weighted parents."""
    digest = hashlib.sha256(encode([recipe, [[pid, w] for pid, (_, w) in zip(ids, parts)]])).hexdigest()
    return f"{parts[0][0].manifest.name.partition('/')[0]}/blend-{digest[:12]}"


def _base(parts: list[tuple[Any, float]]) -> BaseBinding:
    """The union of the parents' bound blocks; the root is the first parent's (strict mode checks it)."""
    blocks: dict[str, tuple[str, str]] = {}  # block -> (digest, the parent that bound it first)
    for bundle, _ in parts:
        m = bundle.manifest
        for block, digest in m.base.blocks.items():
            seen, by = blocks.setdefault(block, (digest, m.name))
            if seen != digest:
                raise BlendError(
                    f"{block}: {by} was made for block digest {seen}, {m.name} for {digest}; they have different bases",
                    path=block, parents=(by, m.name),
                )  # fmt: skip
    return BaseBinding(root=parts[0][0].manifest.base.root, blocks={b: d for b, (d, _) in blocks.items()})


def _signature(entry: Any) -> dict[str, Any]:
    """What parents must share at a slot: layer, shapes (LoRA ranks and neuron counts aside). Their
    dtypes may differ (an F32 bundle and an older BF16 one for a bfloat16 layer): see `_stored`."""
    shapes = {n: tuple(t.shape) for n, t in entry.tensors.items()}
    if entry.kind == "lora":
        shapes = {"lora_A": shapes["lora_A"][1:], "lora_B": shapes["lora_B"][:1]}  # (*in_shape), (out,)
    elif entry.kind == "neuron":
        shapes = {"neuron_delta": shapes["neuron_delta"][1:]}  # (*in_shape)
    return {"layer": entry.layer, "shapes": shapes}


def _check_entry(entry: Any, owner: str) -> None:
    slot, kind = entry.slot, entry.kind

    def refuse(why: str) -> BlendError:
        return BlendError(f"{slot}: {owner} holds a {kind} adapter here; {why}", path=slot, parents=(owner,))

    if kind == "dora":
        raise refuse("DoRA divides its update by a norm, so no weighted sum of DoRA adapters is a DoRA adapter")
    if kind not in TENSOR_ORDER:
        raise refuse(f"blending is defined for {', '.join(TENSOR_ORDER)} only")
    if set(entry.tensors) != set(TENSOR_ORDER[kind]):
        raise refuse(f"its tensors are {sorted(entry.tensors)}, not {list(TENSOR_ORDER[kind])}")
    if kind == "lora":
        A, B = entry.tensors["lora_A"].shape, entry.tensors["lora_B"].shape
        if not (len(A) >= 2 and len(B) == 2 and A[0] == B[1] == entry.rank >= 1):
            raise refuse(f"lora_A {A} and lora_B {B} do not have rank {entry.rank}")


def _slots(parts: list[tuple[Any, float]]) -> dict[str, list[tuple[Any, Any, float]]]:
    """``{slot: [(bundle, entry, weight), ...]}`` in first-seen order, every parent's slot checked."""
    held: dict[str, list[tuple[Any, Any, float]]] = {}
    for bundle, w in parts:
        owner = bundle.manifest.name
        for entry in bundle.manifest.slots:
            _check_entry(entry, owner)
            others = held.setdefault(entry.slot, [])
            if others:
                first, seen = others[0][0].manifest.name, others[0][1]
                if seen.kind != entry.kind:
                    raise BlendError(
                        f"{entry.slot}: {first} holds a {seen.kind} adapter here, {owner} a {entry.kind} one; "
                        "blending different kinds at one slot is not defined",
                        path=entry.slot, parents=(first, owner),
                    )  # fmt: skip
                mine, theirs = _signature(entry), _signature(seen)
                for field in mine:
                    if mine[field] != theirs[field]:
                        raise BlendError(
                            f"{entry.slot}: {first} and {owner} disagree on the {field}: {theirs[field]} vs {mine[field]}",
                            path=entry.slot, parents=(first, owner),
                        )  # fmt: skip
            others.append((bundle, entry, w))
    return held


# -- results ---------------------------------------------------------------------------------------

_TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def _stored(result: SlotBlend, entries: list[Any]) -> dict[str, torch.Tensor]:
    """The result in the widest of the parents' dtypes, in the kind's order; neuron indices stay int64."""
    dtypes = [_TORCH_DTYPES[t.dtype] for e in entries for n, t in e.tensors.items() if n != "neuron_index"]
    dtype = functools.reduce(torch.promote_types, dtypes)
    out = {}
    for name in TENSOR_ORDER[entries[0].kind]:
        t = result.tensors[name]
        out[name] = (t if name == "neuron_index" else t.to(dtype)).contiguous()
    return out


def _entry(first: Any, tensors: dict[str, torch.Tensor], rank: int) -> SlotEntry:
    slot = first.slot
    described = {n: TensorEntry(key=f"{slot}.{n}", dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape)) for n, t in tensors.items()}
    where = {"block": first.block, "module": first.module, "kind": first.kind, "layer": first.layer, "tensors": described}
    if first.kind == "lora":  # alpha = rank: scaling 1, the weights live in B
        return SlotEntry(**where, rank=rank, alpha=float(rank))
    return SlotEntry(**where)
