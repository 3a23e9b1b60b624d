"""Transformed LoRA (2025, "Transformed Low-rank Adaptation via Tensor Decomposition and Its Applications to
Text-to-image Models"). *Inferred* throughout: no code was found; the spec's decisions are followed, and the
paper's exact tensor formats for the transform and the residual are not verified.

``W' = T W + R = W + (T − I) W + R`` with a full-rank learnable transform ``T = I + TT_T`` (``d_out × d_out``)
and a compact residual ``R = TT_R`` (``d_out × d_in``), both tensor-train (MPO) matrices over
``d_out = Π o_k``, ``d_in = Π n_k`` (``K`` balanced factors, default 3):

``M[(i_1..i_K), (j_1..j_K)] = G_1[:, i_1, j_1, :] ··· G_K[:, i_K, j_K, :]``  (row-major multi-indices),

cores ``G_k [ρ_{k−1}, o_k, n_k, ρ_k]``, ``ρ_0 = ρ_K = 1``, TT-rank ``rank_transform`` (``T``, square cores) and
``rank_residual`` (``R``). Forward (the transform acts on the base output, never materialising ``T W``):

``y = x Wᵀ + (x Wᵀ) TT_Tᵀ + x TT_Rᵀ + b``,

each TT product contracted core by core (``O(tokens · Σ_k ρ_{k−1}·ρ_k·d·o_k)``-ish, no dense matrix) for at most
as many tokens as the product's input width; for more tokens (decision, same result) the dense TT-matrix is
built once per forward (contracting the cores, no tokens involved) and applied as one linear, whose saved
activations are ``ρ`` times smaller than the core-by-core intermediates. Merge
exact: ``W ← W + TT_T W + TT_R`` (the bias is not transformed). Init (decision): last core of each train zero
(identity at init), the others ``N(0, 1 / (o_k·n_k·ρ))`` with ``ρ`` the train's TT-rank, drawn from the config
seed. Count ``Σ_k ρ_{k−1} o_k o_k ρ_k + Σ_k ρ_{k−1} o_k n_k ρ_k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, PositiveInt, register, seeded_generator


def balanced_factors(d: int, k: int) -> list[int]:
    """``k`` factors of ``d`` as equal as possible (primes, largest first, into the smallest bucket); sorted."""
    primes, n, p = [], d, 2
    while p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if n > 1:
        primes.append(n)
    buckets = [1] * k
    for q in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= q
    return sorted(buckets)


def tt_shapes(outs: list[int], ins: list[int], rank: int) -> list[tuple[int, int, int, int]]:
    ranks = [1] + [rank] * (len(outs) - 1) + [1]
    return [(ranks[i], o, n, ranks[i + 1]) for i, (o, n) in enumerate(zip(outs, ins))]


def tt_apply(cores: list[Tensor] | nn.ParameterList, x: Tensor) -> Tensor:
    """``x Mᵀ`` for the TT-matrix ``M`` of ``cores``; ``x [..., Π n_k]`` → ``[..., Π o_k]``."""
    lead = x.shape[:-1]
    t = x.reshape(-1, 1, x.shape[-1], 1)  # [batch, O_done, N_left, ρ]
    for g in cores:
        _, o, n, r = g.shape
        b, p, rest, rho = t.shape
        t = t.reshape(b, p, n, rest // n, rho)
        t = torch.einsum("bpnqr,rons->bpoqs", t, g).reshape(b, p * o, rest // n, r)
    return t.reshape(*lead, -1)


def tt_dense(cores: list[Tensor] | nn.ParameterList) -> Tensor:
    """The dense ``[Π o_k, Π n_k]`` TT-matrix, by contracting the cores left to right (row-major multi-indices:
    the first core's indices are the most significant); the largest intermediate is the last but one partial
    product, ``ρ_{K−1}`` times the matrix over all cores but the last."""
    m = cores[0][0]  # [o_1, n_1, ρ_1] (ρ_0 = 1)
    for g in cores[1:]:
        m = torch.einsum("ONr,rons->OoNns", m, g)
        m = m.reshape(m.shape[0] * m.shape[1], m.shape[2] * m.shape[3], m.shape[4])
    return m[..., 0]


def tt_matmul(cores: list[Tensor] | nn.ParameterList, x: Tensor) -> Tensor:
    """``x Mᵀ``: core by core for at most ``d_in`` tokens, else through the dense ``M`` (one linear, which saves
    only ``x`` and ``M`` for backward instead of every core's intermediate over all tokens)."""
    d_in = x.shape[-1]
    if x.numel() // d_in <= d_in:
        return tt_apply(cores, x)
    return F.linear(x, tt_dense(cores))


@dataclass(kw_only=True)
class TLoRAConfig(AdapterConfig):
    """Settings of Transformed LoRA (spec decisions).

    Attributes:
        num_cores: number of TT cores ``K`` (balanced factors of ``d_out`` and ``d_in``; default 3).
        rank_transform: TT-rank ``ρ_T`` of the transform ``T − I`` (default 4).
        rank_residual: TT-rank ``ρ_R`` of the residual ``R`` (default 8).
    """

    num_cores: PositiveInt = 3
    rank_transform: PositiveInt = 4
    rank_residual: PositiveInt = 8

    tiny_fields: ClassVar[dict] = {"rank_transform": 2, "rank_residual": 2}
    variant_fields: ClassVar[list[dict]] = [{"num_cores": 2, "rank_transform": 3, "rank_residual": 1, "seed": 4}]


def _shapes(base: BaseView, config: TLoRAConfig) -> tuple[list, list]:
    outs = balanced_factors(base.out_features, config.num_cores)
    ins = balanced_factors(base.in_features, config.num_cores)
    return tt_shapes(outs, outs, config.rank_transform), tt_shapes(outs, ins, config.rank_residual)


@register("tlora", TLoRAConfig)
class TLoRA(Adapter[TLoRAConfig]):
    """``y = x Wᵀ + (x Wᵀ) TT_Tᵀ + x TT_Rᵀ + b``; see the module docstring."""

    def __init__(self, base: BaseView, config: TLoRAConfig) -> None:
        super().__init__(base, config)
        trains = [
            nn.ParameterList(nn.Parameter(torch.empty(shape, device=base.device)) for shape in shapes)
            for shapes in _shapes(base, config)
        ]
        self.transform, self.residual = trains

    def reset_parameters(self, base: BaseView) -> None:
        config = self.config
        g = seeded_generator(config.seed)
        for cores, rank in zip((self.transform, self.residual), (config.rank_transform, config.rank_residual)):
            for i, core in enumerate(cores):
                if i == len(cores) - 1:
                    core.zero_()
                else:
                    core.copy_(torch.randn(core.shape, generator=g) / math.sqrt(core.shape[1] * core.shape[2] * rank))

    def delta_weight(self, base: BaseView) -> Tensor:
        t = tt_dense(self.transform)
        return t @ base.weight.to(t.dtype) + tt_dense(self.residual)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        linear = base_out if base.bias is None else base_out - base.bias
        dtype = self.transform[0].dtype
        y = tt_matmul(self.transform, linear.to(dtype)) + tt_matmul(self.residual, x.to(dtype))
        return base_out + y.to(base_out.dtype)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: TLoRAConfig) -> int:
        return sum(math.prod(s) for shapes in _shapes(base, config) for s in shapes)
