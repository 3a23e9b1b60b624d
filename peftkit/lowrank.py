"""Exact and truncated low-rank forms of weight updates, in float64: the one home of the SVD that turns an
update into LoRA factors (``ΔW = up · down``, scale 1), used by merging (:mod:`peftkit.merge`) and by the
conversion of any mergeable adapter to LoRA (:mod:`peftkit.interop.svd`). Two ways in:

* :func:`factored_svd`: the thin SVD of a product ``up · down`` given by its factors (``[out, R]``, ``[R, in]``),
  from two QR decompositions and the SVD of the small ``R × R`` core: ``up = Q_u R_u``, ``downᵀ = Q_d R_d``,
  ``R_u R_dᵀ = P S Qᵀ`` give ``up · down = (Q_u P) S (Q_d Q)ᵀ`` in ``O((out + in) R²)``, never forming ``ΔW``.
* :func:`dense_svd`: the thin SVD of a dense ``ΔW`` (any other method, or a sparsified merge).

:func:`truncate` keeps the leading ``k`` singular triplets, ``k`` the numerical rank (singular values above
``RANK_TOL · σ_max``; KnOTS keeps ``σ > 1e-5`` the same way) or ``min(rank, numerical rank)``, and splits ``√S`` over
both factors. By Eckart & Young (1936, "The approximation of one matrix by another
of lower rank") that is the best rank-``k`` approximation in the Frobenius norm, with relative error
``√(Σ_{i>k} σ_i² / Σ_i σ_i²)``, which is what it reports. The SVDs run in float64 so that an exact form is exact to
float32 precision (a float32 SVD leaves ~1e-6 relative error, too loose for the exactness merging promises).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "RANK_TOL",
    "SVD",
    "Factors",
    "dense_svd",
    "factored_svd",
    "from_dense",
    "from_factors",
    "numerical_rank",
    "truncate",
]

RANK_TOL = 1e-6
"""Singular values at or below ``RANK_TOL · σ_max`` count as zero (below float32's resolution of the update)."""


class SVD(NamedTuple):
    """``matrix = u · diag(s) · vh`` (float64, ``s`` descending)."""

    u: Tensor  # [out, m]
    s: Tensor  # [m]
    vh: Tensor  # [m, in]


class Factors(NamedTuple):
    """``up · down ≈ ΔW`` (float32), the relative Frobenius error of the approximation and ``‖ΔW‖_F``."""

    down: Tensor  # [k, in]
    up: Tensor  # [out, k]
    error: float
    norm: float


def dense_svd(matrix: Tensor) -> SVD:
    """Thin SVD of ``matrix`` (``[out, in]``; more dims flattened into ``in``), in float64."""
    u, s, vh = torch.linalg.svd(matrix.detach().reshape(matrix.shape[0], -1).double(), full_matrices=False)
    return SVD(u, s, vh)


def factored_svd(up: Tensor, down: Tensor) -> SVD:
    """Thin SVD of ``up · down`` (``[out, R]`` · ``[R, in]``) without forming the product (see the module
    docstring); ``min(out, in, R)`` triplets, in float64."""
    qu, ru = torch.linalg.qr(up.detach().double())
    qd, rd = torch.linalg.qr(down.detach().reshape(down.shape[0], -1).double().T)
    p, s, qh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return SVD(qu @ p, s, qh @ qd.T)


def numerical_rank(s: Tensor) -> int:
    """The number of singular values ``s`` (descending) above ``RANK_TOL · s[0]``; at least 1."""
    return max(1, int((s > RANK_TOL * s[0]).sum())) if s.numel() and s[0] > 0 else 1


def truncate(svd: SVD, rank: int | None = None, *, cut_at_numerical_rank: bool = True) -> Factors:
    """The leading ``k`` triplets of ``svd`` as factors: ``k`` = the numerical rank, or ``min(rank, numerical
    rank)`` (``min(rank, all triplets)`` with ``cut_at_numerical_rank=False``: a fixed rank asked for, zero
    singular values included); at least 1 (a zero update gives zero factors of rank 1). ``error`` is relative
    to ``‖ΔW‖_F``."""
    s = svd.s
    available = numerical_rank(s) if cut_at_numerical_rank or rank is None else max(1, s.numel())
    k = available if rank is None else min(rank, available)
    total = float(s.square().sum())
    error = float(s[k:].square().sum() / total) ** 0.5 if total > 0 else 0.0
    root = s[:k].sqrt()
    return Factors((root[:, None] * svd.vh[:k]).float(), (svd.u[:, :k] * root).float(), error, total**0.5)


def from_dense(matrix: Tensor, rank: int | None = None) -> Factors:
    """:func:`truncate` of :func:`dense_svd` of ``matrix``."""
    return truncate(dense_svd(matrix), rank)


def from_factors(up: Tensor, down: Tensor, rank: int | None = None) -> Factors:
    """``up · down`` as factors: the given ones, exactly (error 0), when ``rank`` is ``None`` and their inner size
    fits a LoRA on the layer (at most ``min(out, in)``); otherwise :func:`truncate` of :func:`factored_svd`."""
    down = down.reshape(down.shape[0], -1)
    if rank is None and up.shape[1] <= min(up.shape[0], down.shape[1]):
        up64, down64 = up.detach().double(), down.detach().double()
        norm = float(((up64.T @ up64) * (down64 @ down64.T)).sum().clamp(min=0)) ** 0.5  # ‖up·down‖_F
        return Factors(down.detach().float(), up.detach().float(), 0.0, norm)
    return truncate(factored_svd(up, down), rank)
