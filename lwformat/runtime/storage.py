"""Packed adapter storage (decision 9): one flat buffer per dtype and device per applied bundle.

Every adapter tensor of a bundle is a view into its buffer, laid out in the bundle's
canonical order (slots in manifest order, tensors in the kind's declared order). A
swap between bundles of one layout is then a copy per buffer, and nothing is allocated.

Ranks may be reserved above a bundle's own (``reserve_rank``): LoRA factors are then
stored zero-padded, A: (R, ...) with rows r.. zero and B: (out, R) with columns r.. zero,
which leaves B·A, and so the output, exactly unchanged.
"""

from __future__ import annotations

import functools
import math
from math import prod
from typing import NamedTuple

import torch

from ..adapters.kinds import KINDS
from ..adapters.layers import adapter_dtype
from ..errors import WeightError
from ..world.digest import DTYPE_NAMES
from . import finiteness
from .resolve import ResolvedSlot
from .spare import Spare

TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
RANKED = {"lora_A": 0, "lora_B": 1}  # tensor name -> the dimension that holds the rank


class Place(NamedTuple):
    slot: str
    name: str
    shape: tuple[int, ...]  # as stored (rank possibly padded)
    dtype: torch.dtype
    device: torch.device
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def storage_shape(name: str, shape: tuple[int, ...], reserve_rank: int) -> tuple[int, ...]:
    if name in RANKED and reserve_rank > shape[RANKED[name]]:
        shape = list(shape)
        shape[RANKED[name]] = reserve_rank
        return tuple(shape)
    return tuple(shape)


def plan_layout(slots: list[ResolvedSlot], reserve_rank: int = 0) -> list[Place]:
    places, ends = [], {}
    for rs in slots:
        like = rs.layer.weight
        floating = (adapter_dtype(like.dtype), like.device)  # float32 on a half layer, as the host computes
        room = min(reserve_rank, rs.geo.out, prod(rs.geo.in_shape))  # past the layer's full rank no bundle could use it
        for name, t in rs.entry.tensors.items():  # the stored tensors, as `ResolvedSlot.shapes` lists them
            shape = storage_shape(name, tuple(t.shape), room) if room else tuple(t.shape)
            key = (torch.int64, floating[1]) if name == "neuron_index" else floating
            offset = ends.get(key, 0)
            ends[key] = offset + prod(shape)
            places.append(Place(rs.slot, name, shape, key[0], key[1], offset))
    return places


def allocate(places: list[Place], spare: Spare | None = None) -> dict[tuple[torch.dtype, torch.device], torch.Tensor]:
    """One flat buffer per dtype and device; CPU ones from `spare` when it has one that fits."""
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for p in places:
        sizes[(p.dtype, p.device)] = max(sizes.get((p.dtype, p.device), 0), p.offset + p.numel)
    return {
        (dtype, device): spare.take(dtype, n) if spare is not None and device.type == "cpu" else torch.empty(n, dtype=dtype, device=device)
        for (dtype, device), n in sizes.items()
    }  # fmt: skip


def view(buffers: dict, place: Place) -> torch.Tensor:
    flat = buffers[(place.dtype, place.device)]
    return flat[place.offset : place.offset + place.numel].view(place.shape)


def slot_views(buffers: dict, places: list[Place]) -> dict[str, dict[str, torch.Tensor]]:
    """``{slot: {tensor name: view into its buffer}}`` for every place."""
    out: dict[str, dict[str, torch.Tensor]] = {place.slot: {} for place in places}
    strides: dict[tuple[int, ...], tuple[int, ...]] = {}  # a few distinct shapes
    for place in places:
        shape = place.shape
        if (stride := strides.get(shape)) is None:
            stride = strides[shape] = _contiguous_strides(shape)
        flat = buffers[(place.dtype, place.device)]  # its offset counts from the storage's start
        out[place.slot][place.name] = flat.as_strided(shape, stride, flat.storage_offset() + place.offset)  # one call a view
    return out


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _scaling(rs: ResolvedSlot) -> float:
    return rs.settings.scaling if KINDS[rs.settings.kind].uses_rank else 1.0  # unused by kinds without a rank


def finite(value: object) -> float | None:
    """`value` as a float when it is a finite real number (not a string, bool or None); else None."""
    if value is None or isinstance(value, (str, bytes, bool)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # a tensor of several values; an int beyond any float
        return None
    return number if math.isfinite(number) else None


@functools.cache
def _largest(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def check_scalar(value: float, dtype: torch.dtype, slot: str, what: str) -> None:
    """Refuse a weight or scaling that `dtype` cannot hold (torch.tensor and fill_ would store inf or fail midway)."""
    if not abs(value) <= _largest(dtype):
        raise WeightError(f"{slot}: the {what} {value!r} overflows the adapters' {dtype}", path=slot)


def check_scalars(slots: list[ResolvedSlot], weights: list[float]) -> None:
    """Every slot's weight and scaling fit its adapters' dtype (`adapter_dtype` of the base layer's, as `plan_layout` stores them)."""
    for rs, weight in zip(slots, weights):
        dtype = adapter_dtype(rs.layer.weight.dtype)
        if dtype.is_floating_point:
            check_scalar(weight, dtype, rs.slot, "weight")
            check_scalar(_scaling(rs), dtype, rs.slot, "scaling (alpha / rank)")


def scalars(slots: list[ResolvedSlot], weights: list[float], places: list[Place]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each slot's (weight, LoRA scaling) as 0-d views of one small tensor per dtype and device.

    One allocation for all slots instead of two per slot; set_weight and swap write into
    them. A slot's scalars take the dtype and device of its (floating) stored tensors.
    """
    where = {}
    for p in places:
        if p.dtype.is_floating_point:
            where.setdefault(p.slot, (p.dtype, p.device))
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, rs in enumerate(slots):
        groups.setdefault(where[rs.slot], []).append(i)
    out: list = [None] * len(slots)
    for (dtype, device), members in groups.items():
        values = [weights[i] for i in members] + [_scaling(slots[i]) for i in members]
        views = torch.tensor(values, dtype=dtype, device=device).unbind()  # 2n 0-d views of one (2n,) tensor
        for j, i in enumerate(members):
            out[i] = (views[j], views[len(members) + j])
    return out


def fill(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    """Copy `source` into `target`, zero-padding the rank dimension when `target` is larger."""
    if target.shape == source.shape:
        target.copy_(source)
        return
    target.zero_()
    dim = RANKED[name]
    target.narrow(dim, 0, source.shape[dim]).copy_(source)


def fits(place: Place, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of `shape` can be stored at `place` (same shape, or a smaller rank)."""
    if tuple(shape) == place.shape:
        return True
    if place.name not in RANKED or len(shape) != len(place.shape):
        return False
    dim = RANKED[place.name]
    return all(a == b for i, (a, b) in enumerate(zip(shape, place.shape)) if i != dim) and shape[dim] <= place.shape[dim]


def copy_packed(places: list[Place], buffers: dict, bundle, *, read: bool = True) -> bool:
    """One copy per buffer from the bundle's memory-mapped dtype runs, when the layouts agree.

    They agree when nothing is padded and, for every buffer, the bundle's run of that
    dtype (`_run_names`: or the one floating run, converted, on a base cast since) lists the
    same tensors in the same order (the spec's canonical order). Returns False, having
    copied nothing, otherwise. `read` as in `copy_runs`.
    """
    spans = getattr(bundle, "spans", None)
    if spans is None or len({p.device for p in places}) != 1:
        return False
    names = _run_names(buffers, {s.dtype for s in spans})
    if names is None:
        return False
    by_name = {(s.slot, s.name): s for s in spans}
    runs: dict[str, list[tuple[str, str]]] = {}
    for p in places:
        span = by_name.get((p.slot, p.name))
        if span is None or tuple(span.shape) != p.shape or span.dtype != names[(p.dtype, p.device)]:
            return False
        runs.setdefault(span.dtype, []).append((p.slot, p.name))
    stored = {}
    for s in spans:
        stored.setdefault(s.dtype, []).append((s.slot, s.name))
    if stored != runs:
        return False
    copy_runs(buffers, bundle, read=read)
    return True


def _run_names(buffers, names) -> dict | None:
    """Each buffer's dtype run in the bundle: the run of its dtype or, where they differ (a base cast since
    the bundle was written: float64 adapters into float32 storage; an older bfloat16 bundle into
    a half base's float32 storage), the one floating run no buffer has the dtype of, converted
    as it is copied. None when a buffer has no such run."""
    out = {key: DTYPE_NAMES[key[0]] for key in buffers if DTYPE_NAMES[key[0]] in names}
    left = [key for key in buffers if key not in out]
    if not left:
        return out
    spare = [n for n in names if n not in out.values() and TORCH_DTYPES[n].is_floating_point]
    if len(left) != 1 or len(spare) != 1 or not left[0][0].is_floating_point:
        return None
    return {**out, left[0]: spare[0]}


def copy_runs(buffers: dict, bundle, *, read: bool = False) -> None:
    """Copy each of the bundle's dtype runs into its buffer (layouts known to agree), converting
    where the buffer's dtype is not the run's.

    With `read`, a bundle not mapped yet is read straight into CPU buffers of the runs' own
    dtypes (a one-off copy, as on apply); otherwise the copy comes from the bundle's mapping,
    which stays warm for the next swap from the same bundle.
    """
    if read and not bundle.mapped and all(device.type == "cpu" for _, device in buffers) and _same_dtypes(buffers, bundle):
        bundle.read_runs({DTYPE_NAMES[dtype]: buffer for (dtype, _), buffer in buffers.items()})
        # The read wrote behind autograd's back: storage reused from a removed bundle may still
        # be saved for a backward pass, which must then fail as it does after `copy_`, not
        # compute gradients from the new values.
        torch.autograd.graph.increment_version(list(buffers.values()))
        return
    runs = bundle.packed()
    names = _run_names(buffers, runs.keys())  # a few dtypes: a swap's clock hardly sees it
    narrowed = {name for (dtype, _), name in names.items() if not finiteness.widens(TORCH_DTYPES[name], dtype)}
    if narrowed:  # before the first write: a float64 value past float32's range would be stored as inf
        targets = {name: dtype for (dtype, _), name in names.items()}
        # Once per file and target dtypes, as the NaN/inf check is: each swap back to it skips the pass.
        scope = tuple(sorted((n, str(targets[n])) for n in narrowed))  # a whole run goes to one dtype
        finiteness.check_fits_once(bundle, lambda: ((f"{s.slot}:{s.name}", t, targets[s.dtype]) for s, t in bundle.span_tensors()
                                                    if s.dtype in narrowed), scope)  # fmt: skip
    for key, buffer in buffers.items():
        buffer.copy_(runs[names[key]])  # (n,) from (n,), converted when the dtypes differ


def _same_dtypes(buffers: dict, bundle) -> bool:
    return all(name == DTYPE_NAMES[dtype] for (dtype, _), name in _run_names(buffers, {s.dtype for s in bundle.spans}).items())
