"""Low-rank factor maths: norms, distances and the best rank-k re-rank, never forming B·A.

A low-rank matrix is a pair (B, A) standing for M = B A, with B: (m, R) and A: (R, n);
every function also takes a batch of them, (..., m, R) and (..., R, n). All the work on
the big sides is matrix products; the decompositions are of R×R matrices only.

Square roots of the Gram matrices stand in for the R factors of QR (BᵀB = S_BᵀS_B):

    BᵀB = V_B Λ_B V_Bᵀ,  S_B = Λ_B^½ V_Bᵀ          so B = Q_B S_B with Q_B = B V_B Λ_B^-½
    A Aᵀ = V_A Λ_A V_Aᵀ,  S_A = Λ_A^½ V_Aᵀ          so Aᵀ = Q_A S_A with Q_A = Aᵀ V_A Λ_A^-½
    M = Q_B (S_B S_Aᵀ) Q_Aᵀ,    S_B S_Aᵀ = U Σ Wᵀ   (R×R): the only SVD computed

Q_B and Q_A have orthonormal columns, so M and the core share singular values:

    ‖M‖_F² = Σ_j σ_j² = tr(BᵀB · A Aᵀ)
    best rank k (Eckart–Young):  B' = B · V_B Λ_B^-½ U_k Σ_k^½,   A' = Σ_k^½ W_kᵀ Λ_A^-½ V_Aᵀ · A
    ‖M − B'A'‖_F = (Σ_{k<j≤p} σ_j²)^½,   p = min(m, n, R): M has no more singular values

Each factor is first divided by a power of two near its largest entry (exact, and undone
on the results), so that its Gram matrix neither overflows (entries of 1e160 square to inf
in float64) nor underflows; the sizes come back in the results' exponents. Before the
re-rank, each rank-one term is balanced between its two factors by a power of two too.

Eigenvalues below R·ε·λ_max are rounding noise (ε of float64): their Λ^-½ is taken as 0
(a pseudo-inverse), which drops directions along which B or A is numerically zero.
Singular values are then accurate to about √ε·σ_max (1e-8 relative) in float64.

A distance between two low-rank matrices is the norm of one more low-rank matrix:

    B₁A₁ − B₂A₂ = [B₁, −B₂] [A₁; A₂]

Cost: O((m + n)·R·(R + k)) in matrix products plus O(R³), against O(m·n·min(m, n)) for
the SVD of the dense m×n product.
"""

from __future__ import annotations

import torch


def _root(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, V, Λ^-½) of a Gram matrix G = V Λ Vᵀ, with S = Λ^½ Vᵀ and noise eigenvalues inverted to 0."""
    lam, V = torch.linalg.eigh(G)  # (..., R), (..., R, R)
    noise = lam.amax(-1, keepdim=True).clamp(min=0) * (G.shape[-1] * torch.finfo(G.dtype).eps)  # (..., 1)
    kept = lam > noise
    lam = torch.where(kept, lam, 0.0)
    inv_root = torch.where(kept, lam.clamp(min=torch.finfo(G.dtype).tiny).rsqrt(), 0.0)  # (..., R)
    return lam.sqrt()[..., :, None] * V.mT, V, inv_root  # S: (..., R, R)


def _exponent(X: torch.Tensor) -> torch.Tensor:
    """e with max|X| in [2^(e−1), 2^e) per batch entry (0 for zeros), within ±1000 so that 2^±e is finite."""
    return torch.frexp(X.abs().amax((-2, -1), keepdim=True)).exponent.clamp(-1000, 1000).to(X.dtype)  # (..., 1, 1)


def _scaled_back(x: torch.Tensor, eB: torch.Tensor, eA: torch.Tensor) -> torch.Tensor:
    """x · 2^eB · 2^eA per batch entry, one power at a time: inf only where the result is beyond float64."""
    return x * torch.exp2(eB[..., 0, 0]) * torch.exp2(eA[..., 0, 0])  # (...,)


def _balanced(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with each rank-one term b_j a_j carried evenly: b_j·2^c, a_j·2^-c (exact).

    A term held mostly by one factor (B/1e8, A·1e8: the same delta) would sit 1e16 below the
    other terms in that factor's Gram matrix, under the noise floor, and be dropped.
    """
    nB, nA = B.norm(dim=-2), A.norm(dim=-1)  # (..., R) each
    c = torch.where((nB > 0) & (nA > 0), torch.round(0.5 * (nA.log2() - nB.log2())), 0.0)  # (..., R)
    return B * torch.exp2(c)[..., None, :], A * torch.exp2(-c)[..., :, None]  # (..., m, R), (..., R, n)


def lowrank_norm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """‖B A‖_F from the factors, per batch entry."""
    eB, eA = _exponent(B), _exponent(A)  # (..., 1, 1)
    B, A = B * torch.exp2(-eB), A * torch.exp2(-eA)  # exact; entries below 1, so the Grams cannot overflow
    norm = ((B.mT @ B) * (A @ A.mT)).sum((-2, -1)).clamp(min=0).sqrt()  # tr(BᵀB · AAᵀ), both symmetric
    return _scaled_back(norm, eB, eA)


def lowrank_distance(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """‖B₁A₁ − B₂A₂‖_F from the factors, per batch entry."""
    return lowrank_norm(torch.cat([B1, -B2], dim=-1), torch.cat([A1, A2], dim=-2))  # (m, R₁+R₂), (R₁+R₂, n)


def rerank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-k factors of B A, k = min(rank, m, n, R): (B', A', ‖BA − B'A'‖_F, ‖BA‖_F).

    The singular values are split evenly, √σ into each factor, so neither factor dwarfs the other.
    """
    (m, R), n = B.shape[-2:], A.shape[-1]
    p = min(m, n, R)
    k = min(rank, p)
    eB, eA = _exponent(B), _exponent(A)  # (..., 1, 1)
    B, A = B * torch.exp2(-eB), A * torch.exp2(-eA)  # exact; entries below 1, so the Grams cannot overflow
    B, A = _balanced(B, A)
    S_B, V_B, inv_B = _root(B.mT @ B)  # (..., R, R), (..., R, R), (..., R)
    S_A, V_A, inv_A = _root(A @ A.mT)
    U, sigma, Wh = torch.linalg.svd(S_B @ S_A.mT)  # (..., R, R), (..., R), (..., R, R)
    root = sigma[..., :k].sqrt()  # (..., k)
    X = V_B @ (inv_B[..., :, None] * U[..., :, :k] * root[..., None, :])  # (..., R, k)
    Y = (root[..., :, None] * Wh[..., :k, :]) @ (inv_A[..., :, None] * V_A.mT)  # (..., k, R)
    discarded = sigma[..., k:p].square().sum(-1).sqrt()
    total = sigma[..., :p].square().sum(-1).sqrt()
    half = torch.floor((eB + eA) / 2)  # (..., 1, 1): the scale goes back split evenly, as σ is
    B_k, A_k = B @ X * torch.exp2(half), Y @ A * torch.exp2(eB + eA - half)  # (..., m, k), (..., k, n)
    return B_k, A_k, _scaled_back(discarded, eB, eA), _scaled_back(total, eB, eA)
