"""SoKA (2025, "SoKA: Singular Value Decomposition on Kronecker Adaptation for Large Language Model").
*Inferred* throughout: no code was found; the spec's decisions are followed.

``ΔW = Σ_{t≤k} A_t ⊗ B_t`` with ``A_t [m1, n1]``, ``B_t [m2, n2]``, ``m1·m2 = d_out``, ``n1·n2 = d_in`` (LoKr's
near-square :func:`~peftkit.methods.lokr.factorization`, ``m1 ≤ m2``). Count ``k · (m1·n1 + m2·n2)``.

KPSVD (Van Loan–Pitsianis): ``R(M) = M.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1·n1, m2·n2)``,
``R(M) = Σ σ_t u_t v_tᵀ`` ⇒ ``M = Σ σ_t unvec(u_t) ⊗ unvec(v_t)``. Init (decision, PiSSA-style): KPSVD of the
pretrained ``W`` (float64), ``A_t = √σ_t · u_t.reshape(m1, n1)``, ``B_t = √σ_t · v_t.reshape(m2, n2)``; the
initial factors are kept (non-persistent buffers ``A0``, ``B0``, rebuilt from ``W`` on loading) so the frozen
residual is ``W_res = W − Σ A0_t ⊗ B0_t`` and

``y = x (W_res + Σ A_t ⊗ B_t)ᵀ + b = base(x) + x (Σ A_t ⊗ B_t − Σ A0_t ⊗ B0_t)ᵀ``

is identity at init without storing ``W_res``. Forward: the spec's factored form ``X = x.reshape(..., n1, n2)``,
``Σ_t A_t X B_tᵀ`` over the ``2k`` stacked terms, while its intermediate ``[2k, tokens, m1, n2]`` is smaller than
``ΔW``; for more tokens (decision, same result) ``ΔW`` itself is built (``d_out·d_in`` values) and applied as one
linear, which keeps training memory near LoRA's instead of ``2k`` copies of the activations. Merge exact.

Rank selection (decision, once at init): ``e_t = σ_t² / Σ σ²``; ``k_E`` = smallest ``k`` with cumulative energy
``≥ tau``; ``k_elbow`` = Kneedle elbow (both axes normalised to [0, 1], the point farthest from the chord
joining ``(1, σ_1)`` and ``(T, σ_T)``); ``k = clamp(min(k_E, k_elbow), 1, k_max)``. ``k`` fixes it instead.
Not implemented: ``init_source="grad"`` and dynamic re-selection during training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, PositiveFraction, PositiveInt, register
from peftkit.methods.lokr import factorization


@dataclass(kw_only=True)
class SoKAConfig(AdapterConfig):
    """Settings of SoKA (spec decisions).

    Attributes:
        tau: cumulative-energy threshold of the rank selection (0.9).
        k_max: largest number of Kronecker terms (8).
        k: a fixed number of terms (``None``: energy/elbow selection); clamped to the KPSVD rank.
    """

    tau: PositiveFraction = 0.9
    k_max: PositiveInt = 8
    k: PositiveInt | None = None

    tiny_fields: ClassVar[dict] = {"k_max": 3}
    variant_fields: ClassVar[list[dict]] = [{"k_max": 8, "k": 2}]


def kron_dims(d_out: int, d_in: int) -> tuple[int, int, int, int]:
    """``(m1, m2, n1, n2)``: near-square factor pairs of ``d_out`` and ``d_in``."""
    m1, m2 = factorization(d_out)
    n1, n2 = factorization(d_in)
    return m1, m2, n1, n2


def rearrange(w: Tensor, m1: int, m2: int, n1: int, n2: int) -> Tensor:
    """Van Loan–Pitsianis ``R(W)`` ``[m1·n1, m2·n2]``."""
    return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kpsvd(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(σ [T], A [T, m1, n1], B [T, m2, n2])`` (unscaled) with ``w = Σ σ_t A_t ⊗ B_t``; float64."""
    m1, m2, n1, n2 = kron_dims(*w.shape)
    u, s, vh = torch.linalg.svd(rearrange(w.double(), m1, m2, n1, n2), full_matrices=False)
    return s, u.T.reshape(-1, m1, n1), vh.reshape(-1, m2, n2)


def select_rank(sigma: Tensor, tau: float, k_max: int) -> int:
    """``clamp(min(k_E, k_elbow), 1, k_max)`` from the KPSVD spectrum (descending)."""
    energy = sigma.double().pow(2)
    total = energy.sum()
    if total <= 0:
        return 1
    cumulative = torch.cumsum(energy / total, 0)
    k_e = int((cumulative < tau - 1e-12).sum()) + 1
    n = sigma.numel()
    if n <= 2:
        k_elbow = n
    else:
        t = torch.linspace(0, 1, n, dtype=torch.float64)
        s = sigma.double()
        span = (s[0] - s[-1]).clamp_min(1e-300)
        y = (s - s[-1]) / span  # normalised: 1 at t=0, 0 at t=1; the chord is y = 1 − t
        k_elbow = int(torch.argmax((1 - t - y).abs())) + 1
    return max(1, min(k_e, k_elbow, k_max, n))


def soka_rank(base: BaseView, config: SoKAConfig) -> int:
    sigma, _, _ = kpsvd(base.weight.detach())
    if config.k is not None:
        return min(config.k, sigma.numel())
    return select_rank(sigma, config.tau, config.k_max)


@register("soka", SoKAConfig)
class SoKA(Adapter[SoKAConfig]):
    """``y = base(x) + x (Σ A_t ⊗ B_t − Σ A0_t ⊗ B0_t)ᵀ``; see the module docstring."""

    def __init__(self, base: BaseView, config: SoKAConfig) -> None:
        super().__init__(base, config)
        self.dims = kron_dims(base.out_features, base.in_features)
        sigma, a, b = kpsvd(base.weight.detach())
        k = soka_rank(base, config)
        root = sigma[:k].sqrt()[:, None, None]
        # the initial factors are derived from the base weight: rebuilt here, never saved
        self.register_buffer("A0", (root * a[:k]).to(base.dtype).to(base.device), persistent=False)
        self.register_buffer("B0", (root * b[:k]).to(base.dtype).to(base.device), persistent=False)
        self.A = nn.Parameter(torch.empty_like(self.A0))
        self.B = nn.Parameter(torch.empty_like(self.B0))

    def reset_parameters(self, base: BaseView) -> None:
        self.A.copy_(self.A0)
        self.B.copy_(self.B0)

    def delta_weight(self, base: BaseView) -> Tensor:
        m1, m2, n1, n2 = self.dims

        def kron_sum(a: Tensor, b: Tensor) -> Tensor:
            return torch.einsum("tij,tkl->ikjl", a, b).reshape(m1 * m2, n1 * n2)

        return kron_sum(self.A, self.B) - kron_sum(self.A0, self.B0)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        m1, m2, n1, n2 = self.dims
        tokens = x.numel() // (n1 * n2)
        if tokens * 2 * self.A.shape[0] * m1 * n2 > m1 * m2 * n1 * n2:  # the factored form's intermediate > ΔW
            return base_out + F.linear(x.to(self.A.dtype), self.delta_weight(base)).to(base_out.dtype)
        a = torch.cat([self.A, self.A0])
        b = torch.cat([self.B, -self.B0])
        xs = x.reshape(*x.shape[:-1], n1, n2).to(a.dtype)
        y = torch.einsum("tij,...jk,tlk->...il", a, xs, b)  # [..., m1, m2]
        return base_out + y.reshape(base_out.shape).to(base_out.dtype)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: SoKAConfig) -> int:
        m1, m2, n1, n2 = kron_dims(base.out_features, base.in_features)
        return soka_rank(base, config) * (m1 * n1 + m2 * n2)
