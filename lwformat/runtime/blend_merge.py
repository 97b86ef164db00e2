"""Merging aligned task tensors: the weighted sum, TIES and DARE, as PEFT defines them.

n task tensors of one shape are stacked as T: (n, *shape), with weights w: (n,):

    linear  Σ_i w_i T_i
    ties    trim:   T̃_i keeps the ⌊density · n_i⌋ entries of T_i largest in magnitude, zero elsewhere,
                    n_i its real entries: padding (the zero rows of a lower LoRA rank, the channels
                    a neuron parent does not train) is neither kept nor counted
            elect:  s = sign(Σ_i T̃_i)   (+1 where the sum is 0): the unweighted values vote
            merge:  Σ_i w_i T̃_i [sign T̃_i = s]  /  max(1, #{i : sign T̃_i = s})   (disjoint mean)
    dare    T̃_i = T_i ⊙ m_i / density,  m_i ~ Bernoulli(density) per entry (seeded),  then Σ_i w_i T̃_i

(Yadav et al., 2023, TIES-Merging; Yu et al., 2023, DARE.) As in PEFT's ``ties``
(``majority_sign_method="total"``), weights scale what is merged, not the vote: a negative
weight does not flip its task's vote, and a task at weight 0 that agrees still counts in the
mean. A zero entry (padding, a trimmed or dropped entry) never votes and is never counted in
the mean. ``density`` = 1 trims and drops nothing.
"""

from __future__ import annotations

import torch


def weighted_sum(T: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tensordot(w, T, dims=1)  # (n,) · (n, *shape) -> shape


def _per_task(w: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    return w.view(-1, *([1] * (T.ndim - 1)))  # (n, 1, ...) broadcasts against T


def trim(T: torch.Tensor, density: float, real: torch.Tensor | None = None) -> torch.Tensor:
    """Keep each task's ⌊density · n_i⌋ largest-magnitude entries of its n_i real ones (`real`: (n, *shape), default all)."""
    if density >= 1:
        return T
    flat = T.reshape(T.shape[0], -1)  # (n, numel)
    real = torch.ones_like(flat, dtype=torch.bool) if real is None else real.reshape(flat.shape)  # (n, numel)
    keep = torch.zeros_like(flat, dtype=torch.bool)  # (n, numel)
    for i, (task, mine) in enumerate(zip(flat, real)):
        k = int(density * int(mine.sum()))
        keep[i, task.abs().masked_fill(~mine, -1).topk(k).indices] = True  # padding ranks below every real entry
    return (flat * keep).view(T.shape)


def ties(T: torch.Tensor, w: torch.Tensor, density: float, real: torch.Tensor | None = None) -> torch.Tensor:
    trimmed = trim(T, density, real)  # (n, *shape)
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(T.dtype)  # shape
    agree = trimmed.sign() == elected  # (n, *shape); zeros never agree
    count = agree.sum(0).clamp(min=1)  # shape
    return (_per_task(w, T) * trimmed * agree).sum(0) / count


def dare(T: torch.Tensor, w: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return weighted_sum(T, w)
    keep = torch.rand(T.shape, generator=generator, dtype=T.dtype, device=T.device) < density  # (n, *shape)
    return weighted_sum(T * keep / density, w)


def merge(
    T: torch.Tensor, w: torch.Tensor, method: str, density: float, generator: torch.Generator, real: torch.Tensor | None = None
) -> torch.Tensor:
    """Merge stacked task tensors T: (n, *shape) with weights w: (n,) by `method`; `real` (n, *shape) marks
    the entries that are not padding (default all), which ties trims among."""
    if method == "ties":
        return ties(T, w, density, real)
    if method == "dare":
        return dare(T, w, density, generator)
    return weighted_sum(T, w)
