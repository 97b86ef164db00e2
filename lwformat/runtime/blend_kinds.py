"""Blending one slot, per adapter kind: the exact weighted sum, and its re-ranks and merges.

Parent i holds the slot with weight w_i (parents without the slot contribute zero).
Every kind below is linear in its parameters, so the exact sum is again of the same kind:

    lora    Δ = Σ_i c_i B_i A_i,  c_i = w_i s_i  (s_i = alpha/r, rsLoRA alpha/√r)
            linear  A = [A_1; …; A_n] (R, *in_shape), B = [c_1 B_1, …, c_n B_n] (out, R),  R = Σ r_i
            svd     the best rank-k factors of that sum, from the factors (`lowrank.rerank`),
                    k = min(rank, out, fan_in, R); rank defaults to the largest r_i (as in PEFT)
            ties/dare  PEFT's factor-wise merge: ranks zero-padded to r = max r_i (exact: the
                    padding adds zero rows to A_i and zero columns to B_i; ties trims each
                    parent among its own r_i rows or columns, not the padding), then
                    A' = merge(A_i; sign(c_i)·√|c_i|),  B' = merge(B_i; √|c_i|)  (`blend_merge`),
                    re-ranked like svd when a rank below r is asked for
            stored with alpha = rank, so scaling 1: the weights live in B
    ia3     g = 1 + merge(g_i − 1; w_i)          (the delta (g − 1) ⊙ y is linear in g − 1)
    bias    c = merge(c_i; w_i)
    neuron  rows D_i aligned on the sorted union of the parents' indices (zero rows elsewhere,
            which ties does not count as the parent's entries), D = merge(D_i; w_i)

For ``linear`` and ``svd`` the non-LoRA kinds are the exact sum. DoRA is not linear in its
parameters (a norm divides the update), so no blend of DoRA adapters is exact or defined.

Errors are ‖Δ_blend − Δ_exact‖_F, computed in float64 from the factors (to about 1e-8 of
‖Δ_exact‖_F), before the final rounding to the storage dtype; for IA3 they are measured on
the gains g − 1, since the base weights that the delta scales are not part of a bundle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.kinds import SlotSettings
from ..errors import BlendError
from .blend_merge import merge, weighted_sum
from .lowrank import lowrank_distance, lowrank_norm, rerank

TENSOR_ORDER = {
    "lora": ("lora_A", "lora_B"),
    "ia3": ("ia3_l",),
    "bias": ("bias_delta",),
    "neuron": ("neuron_delta", "neuron_index"),
}  # the kinds blending defines, each with its tensors in the kind's declared order


@dataclass(frozen=True)
class Part:
    """One parent's share of a slot."""

    weight: float
    entry: Any  # its manifest SlotEntry
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class SlotBlend:
    tensors: dict[str, torch.Tensor]  # in TENSOR_ORDER
    method: str  # what was done here: "linear" for a kind without a rank under svd
    rank: int  # the stored LoRA rank; 0 for other kinds
    error: float  # ‖Δ_blend − Δ_exact‖_F
    norm: float  # ‖Δ_exact‖_F


@dataclass(frozen=True)
class Recipe:
    method: str  # "linear" | "svd" | "ties" | "dare"
    rank: int | None
    density: float
    seed: int
    compute: torch.dtype = torch.float64  # the products and the small decompositions: near exact, cheap


def blend_slots(slots: dict[str, list[Part]], recipe: Recipe) -> dict[str, SlotBlend]:
    """Blend every slot; svd re-ranks of LoRA slots of one shape run as one batch."""
    out, batches = {}, {}
    for slot, parts in slots.items():
        if recipe.method == "svd" and parts[0].entry.kind == "lora":
            key = (*_lora_sides(parts), sum(p.entry.rank for p in parts), recipe.rank or max(p.entry.rank for p in parts))
            batches.setdefault(key, []).append(slot)
        else:
            out[slot] = _blend_one(slot, parts, recipe)
    for (*_, rank), batch in batches.items():
        out.update(_lora_svd(batch, [slots[s] for s in batch], rank, recipe.compute))
    return {slot: out[slot] for slot in slots}


def _blend_one(slot: str, parts: list[Part], recipe: Recipe) -> SlotBlend:
    kind = parts[0].entry.kind
    generator = _generator(recipe.seed, slot)
    if kind == "lora":
        return _lora(parts, recipe, generator)
    if kind == "neuron":
        return _neuron(slot, parts, recipe, generator)
    name = TENSOR_ORDER[kind][0]
    offset = 1.0 if kind == "ia3" else 0.0  # IA3 blends its gains' distance from identity
    T = torch.stack([p.tensors[name].to(recipe.compute) - offset for p in parts])  # (n, out)
    merged, error, norm = _merge(T, parts, recipe, generator)
    return SlotBlend({name: merged + offset}, _flat_method(recipe), 0, error, norm)


def _generator(seed: int, slot: str) -> torch.Generator:
    # per slot, so a slot's random draws do not depend on which other slots the parents hold
    digest = hashlib.sha256(f"{seed}\0{slot}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _flat_method(recipe: Recipe) -> str:
    return "linear" if recipe.method == "svd" else recipe.method


def _merge(
    T: torch.Tensor, parts: list[Part], recipe: Recipe, generator: torch.Generator, real: torch.Tensor | None = None
) -> tuple[torch.Tensor, float, float]:
    """(merged, ‖merged − exact‖_F, ‖exact‖_F) for task tensors T: (n, *shape), `real` marking non-padding."""
    w = torch.tensor([p.weight for p in parts], dtype=recipe.compute)  # (n,)
    exact = weighted_sum(T, w)
    if recipe.method in ("linear", "svd"):
        return exact, 0.0, _norm(exact)
    merged = merge(T, w, recipe.method, recipe.density, generator, real)
    return merged, _norm(merged - exact), _norm(exact)


def _norm(x: torch.Tensor) -> float:
    """‖x‖_F, scaled first: torch squares the entries as they are, and 1e160 squares to inf in float64."""
    top = x.abs().max()
    return float(top * (x / top).norm()) if top > 0 else 0.0


def _neuron(slot: str, parts: list[Part], recipe: Recipe, generator: torch.Generator) -> SlotBlend:
    indices = [p.tensors["neuron_index"].to(torch.int64) for p in parts]
    if any(torch.unique(index).numel() != index.numel() for index in indices):
        raise BlendError(f"{slot}: a parent's neuron_index names a channel twice", path=slot)
    union = torch.unique(torch.cat(indices))  # (k,) sorted
    in_shape = parts[0].tensors["neuron_delta"].shape[1:]
    T = torch.zeros(len(parts), union.numel(), *in_shape, dtype=recipe.compute)  # (n, k, *in_shape)
    held = torch.zeros(len(parts), union.numel(), dtype=torch.bool)  # (n, k): the rows each parent trains
    for i, (p, index) in enumerate(zip(parts, indices)):
        rows = torch.searchsorted(union, index)
        T[i, rows] = p.tensors["neuron_delta"].to(recipe.compute)
        held[i, rows] = True
    real = held.view(*held.shape, *[1] * len(in_shape)).expand(T.shape)  # (n, k, *in_shape)
    merged, error, norm = _merge(T, parts, recipe, generator, real)
    return SlotBlend({"neuron_delta": merged, "neuron_index": union}, _flat_method(recipe), 0, error, norm)


# -- LoRA ------------------------------------------------------------------------------------------


def _lora_sides(parts: list[Part]) -> tuple[int, int]:
    A, B = parts[0].tensors["lora_A"], parts[0].tensors["lora_B"]
    return B.shape[0], A[0].numel()  # out, fan_in


def _concat(parts: list[Part], compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The exact sum as concatenated factors: (B_cat (out, R), A_cat (R, fan_in), c_i)."""
    c = [p.weight * SlotSettings("lora", p.entry.rank, p.entry.alpha, p.entry.rslora).scaling for p in parts]
    A_cat = torch.cat([p.tensors["lora_A"].reshape(p.entry.rank, -1) for p in parts]).to(compute)  # (R, fan_in)
    B_cat = torch.cat([p.tensors["lora_B"] for p in parts], dim=1).to(compute)  # (out, R)
    scale = torch.tensor([c_i for c_i, p in zip(c, parts) for _ in range(p.entry.rank)], dtype=compute)  # (R,)
    B_cat = B_cat * scale  # (out, R)
    if not bool(B_cat.isfinite().all()):  # no decomposition takes inf: refuse here, typed
        slot = parts[0].entry.slot
        raise BlendError(f"{slot}: weight × scaling × lora_B overflows float64 (weights this large make inf)", path=slot)
    return B_cat, A_cat, c


def _lora_result(parts: list[Part], B: torch.Tensor, A: torch.Tensor, method: str, error: float, norm: float) -> SlotBlend:
    in_shape = parts[0].tensors["lora_A"].shape[1:]
    A = A.reshape(A.shape[0], *in_shape)  # (k, *in_shape): conv kernels get their shape back
    return SlotBlend({"lora_A": A, "lora_B": B}, method, A.shape[0], error, norm)


def _lora_svd(slots: list[str], group: list[list[Part]], rank: int, compute: torch.dtype) -> dict[str, SlotBlend]:
    factors = [_concat(parts, compute) for parts in group]
    B_cat = torch.stack([B for B, _, _ in factors])  # (g, out, R)
    A_cat = torch.stack([A for _, A, _ in factors])  # (g, R, fan_in)
    B, A, error, norm = rerank(B_cat, A_cat, rank)  # (g, out, k), (g, k, fan_in), (g,), (g,)
    return {
        slot: _lora_result(parts, B[j], A[j], "svd", float(error[j]), float(norm[j]))
        for j, (slot, parts) in enumerate(zip(slots, group))
    }


def _lora(parts: list[Part], recipe: Recipe, generator: torch.Generator) -> SlotBlend:
    """linear, or PEFT's factor-wise ties/dare (ranks zero-padded); svd is `_lora_svd`."""
    B_cat, A_cat, c = _concat(parts, recipe.compute)
    if recipe.method == "linear":
        return _lora_result(parts, B_cat, A_cat, "linear", 0.0, float(lowrank_norm(B_cat, A_cat)))
    r = max(p.entry.rank for p in parts)
    pad = torch.nn.functional.pad
    A_pad = torch.stack([pad(p.tensors["lora_A"].reshape(p.entry.rank, -1), (0, 0, 0, r - p.entry.rank)) for p in parts])
    B_pad = torch.stack([pad(p.tensors["lora_B"], (0, r - p.entry.rank)) for p in parts])  # (n, out, r); A_pad (n, r, fan_in)
    own = torch.arange(r) < torch.tensor([p.entry.rank for p in parts])[:, None]  # (n, r): each parent's real ranks
    real_A, real_B = own[:, :, None].expand(A_pad.shape), own[:, None, :].expand(B_pad.shape)  # as A_pad, B_pad
    root = torch.tensor([abs(c_i) ** 0.5 for c_i in c], dtype=recipe.compute)  # (n,)
    sign = torch.tensor([1.0 if c_i >= 0 else -1.0 for c_i in c], dtype=recipe.compute)  # (n,)
    A = merge(A_pad.to(recipe.compute), sign * root, recipe.method, recipe.density, generator, real_A)  # (r, fan_in)
    B = merge(B_pad.to(recipe.compute), root, recipe.method, recipe.density, generator, real_B)  # (out, r)
    if recipe.rank is not None and recipe.rank < r:
        B, A, _, _ = rerank(B, A, recipe.rank)
    error, norm = float(lowrank_distance(B, A, B_cat, A_cat)), float(lowrank_norm(B_cat, A_cat))
    return _lora_result(parts, B, A, recipe.method, error, norm)
