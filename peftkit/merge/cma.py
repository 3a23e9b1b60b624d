"""A small CMA-ES for LoraHub's gradient-free weight search (no extra dependency).

The (μ/μ_w, λ)-CMA-ES with rank-one and rank-μ covariance updates and cumulative step-size adaptation, with the
default strategy parameters of Hansen (2016, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772, Table 1).
Box bounds are handled by repair (a decision; the tutorial's appendix discusses it): a sample outside the box is
clipped onto it, evaluated there, and the clipped point is what the update sees. The budget counts evaluations;
the best point evaluated is returned (LoraHub's nevergrad ``NGOpt`` likewise returns a recommendation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = ["SearchResult", "cma_es"]


class SearchResult(NamedTuple):
    """The best point found, its value, and the value of every evaluation in order."""

    x: np.ndarray
    value: float
    history: list[float]


def cma_es(
    f: Callable[[np.ndarray], float],
    x0: np.ndarray,
    sigma: float,
    *,
    lower: float,
    upper: float,
    budget: int,
    seed: int | None = 0,
) -> SearchResult:
    """Minimise ``f`` over the box ``[lower, upper]^n`` from ``x0`` with initial step ``sigma``, ``budget``
    evaluations, reproducibly for a given ``seed``."""
    rng = np.random.default_rng(seed)
    n = len(x0)
    lam = 4 + int(3 * math.log(n))
    mu = lam // 2
    w = math.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w /= w.sum()
    mueff = 1.0 / float((w**2).sum())
    cs = (mueff + 2) / (n + mueff + 5)
    ds = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    chi = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    mean = np.clip(np.asarray(x0, dtype=float), lower, upper)
    ps, pc, cov = np.zeros(n), np.zeros(n), np.eye(n)
    best_x, best = mean.copy(), math.inf
    history: list[float] = []
    generation = 0
    while len(history) < budget:
        generation += 1
        vals, vecs = np.linalg.eigh(cov)
        d = np.sqrt(np.maximum(vals, 1e-20))
        count = min(lam, budget - len(history))
        xs = np.clip(mean + sigma * (rng.standard_normal((count, n)) * d) @ vecs.T, lower, upper)
        fs = []
        for x in xs:
            value = float(f(x))
            history.append(value)
            fs.append(value)
            if value < best:
                best, best_x = value, x.copy()
        if count < mu:  # the last, partial generation: nothing left to adapt for
            break
        order = np.argsort(fs)[:mu]
        ys = (xs[order] - mean) / sigma
        step = w @ ys
        mean = mean + sigma * step
        inv_sqrt = vecs @ np.diag(1 / d) @ vecs.T
        ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * inv_sqrt @ step
        hs = np.linalg.norm(ps) / math.sqrt(1 - (1 - cs) ** (2 * generation)) < (1.4 + 2 / (n + 1)) * chi
        pc = (1 - cc) * pc + hs * math.sqrt(cc * (2 - cc) * mueff) * step
        rank_mu = (ys.T * w) @ ys
        cov = (1 - c1 - cmu) * cov + c1 * (np.outer(pc, pc) + (1 - hs) * cc * (2 - cc) * cov) + cmu * rank_mu
        cov = (cov + cov.T) / 2
        sigma *= math.exp((cs / ds) * (np.linalg.norm(ps) / chi - 1))
    return SearchResult(best_x, best, history)
