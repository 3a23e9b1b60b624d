"""SST (Zhao et al., 2024, "Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural
Networks"). *Inferred*: the official repository was not retrievable; the spec's decisions are followed.

The weight is reparametrised by its SVD, ``W = U diag(σ) Vᵀ`` (``U [d_out, m]``, ``V [d_in, m]``,
``m = min(d_out, d_in)``, computed in float64 from the base weight), and the layer computes

``y = ((x V) · σ) Uᵀ + b``  (``O(tokens · m · (d_in + d_out))``; ``ΔW = U diag(σ) Vᵀ − W`` for merging),

identity at init up to SVD rounding (~1e-7). Trainable: all of ``σ`` and only ``r`` sampled singular vectors,
the parameters ``U_s = U[:, S]`` and ``V_s = V[:, S]``; the other columns are frozen buffers, so their gradient
is zero by construction. ``r = min(config.r, m)``; count ``m + r · (d_in + d_out)``.

Rounds (decision): every ``round_steps`` optimizer steps (:meth:`step`) the sampled columns are written back,
``U diag(σ) Vᵀ`` is re-orthogonalised by a fresh SVD (float64; the function is unchanged) and a new set
``S = multinomial(|σ|, r, replacement=False)`` is drawn from a generator seeded by ``(seed, round)``.
Enhanced gradient (decision, on by default): ``∂L/∂U_i = (∂L/∂W) V_i`` and ``∂L/∂V_i = (∂L/∂W)ᵀ U_i``, i.e. the
usual gradients divided by ``σ_i`` (a custom autograd identity). Simplification: optimizer states of
``U_s``/``V_s`` are not reset at a round boundary (the adapter does not own the optimizer). The evolving
``U``, ``V``, ``S`` and the round counter ``round_index`` are persistent buffers (saved: SST is full training,
the saved state is weight-sized), so a run saved and resumed draws the same samples at its next rounds as one
that was never interrupted.
Hyperbolic (Lorentz) layers are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, PositiveInt, register


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor`` (per column)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: Tensor) -> Tensor:
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor, None


@dataclass(kw_only=True)
class SSTConfig(AdapterConfig):
    """Settings of SST (spec decisions).

    Attributes:
        r: sampled singular vectors per round (clamped to ``min(d_in, d_out)``; paper: 64 of 768, about 8 %).
        round_steps: optimizer steps per round (default 200).
        enhanced_grad: divide the sampled vectors' gradients by their ``σ_i`` (paper's enhanced gradient).
    """

    r: PositiveInt = 64
    round_steps: PositiveInt = 200
    enhanced_grad: bool = True

    tiny_fields: ClassVar[dict] = {"r": 4, "round_steps": 2}
    variant_fields: ClassVar[list[dict]] = [{"r": 100, "round_steps": 1, "enhanced_grad": False, "seed": 1}]


def _rank(base: BaseView, config: SSTConfig) -> tuple[int, int]:
    m = min(base.out_features, base.in_features)
    return m, min(config.r, m)


@register("sst", SSTConfig)
class SST(Adapter[SSTConfig]):
    """``y = x V diag(σ) Uᵀ + b`` with ``r`` sampled trainable singular vectors; see the module docstring."""

    def __init__(self, base: BaseView, config: SSTConfig) -> None:
        super().__init__(base, config)
        m, r = _rank(base, config)
        d_out, d_in, kw = base.out_features, base.in_features, {"dtype": base.dtype, "device": base.device}
        self.register_buffer("U", torch.empty(d_out, m, **kw))
        self.register_buffer("V", torch.empty(d_in, m, **kw))
        self.register_buffer("S", torch.empty(r, dtype=torch.long, device=base.device))
        self.sigma = nn.Parameter(torch.empty(m, **kw))
        self.U_s = nn.Parameter(torch.empty(d_out, r, **kw))
        self.V_s = nn.Parameter(torch.empty(d_in, r, **kw))
        # Rounds done so far: it seeds the next draw, so it is saved (a resumed run continues the same sequence).
        self.register_buffer("round_index", torch.zeros((), dtype=torch.long, device=base.device))

    def reset_parameters(self, base: BaseView) -> None:
        u, s, vh = torch.linalg.svd(base.weight.detach().double(), full_matrices=False)
        self.U.copy_(u)
        self.V.copy_(vh.T)
        self.sigma.copy_(s)
        self.round_index.zero_()
        self._sample()

    def fit_state(self, state: dict[str, Tensor]) -> None:
        """Files saved before the round counter was saved have no ``round_index``: they load at round 0 (as
        they did then), the counter staying unsaved for this module."""
        if "round_index" not in state:
            self.register_buffer("round_index", self.round_index, persistent=False)

    @property
    def round(self) -> int:
        """Rounds done so far (the saved ``round_index``); round ``k``'s sample is drawn from ``(seed, k)``."""
        return int(self.round_index)

    @round.setter
    def round(self, value: int) -> None:
        self.round_index.fill_(int(value))

    # ------------------------------------------------------------------------------------------- rounds
    @torch.no_grad()
    def _sample(self) -> None:
        seed = 0 if self.config.seed is None else self.config.seed
        g = torch.Generator().manual_seed(seed * 1_000_003 + self.round)
        weights = self.sigma.detach().abs().double().cpu().clamp_min(1e-12)
        self.S.copy_(torch.multinomial(weights, self.S.numel(), replacement=False, generator=g))
        self.U_s.copy_(self.U[:, self.S])
        self.V_s.copy_(self.V[:, self.S])

    def full_factors(self) -> tuple[Tensor, Tensor]:
        """``(U, V)`` with the sampled (trainable) columns in place."""
        u_s, v_s = self.U_s, self.V_s
        if self.config.enhanced_grad:
            inv = (1.0 / self.sigma.detach()[self.S].abs().clamp_min(1e-12)).to(u_s.dtype)
            u_s, v_s = _ScaleGrad.apply(u_s, inv), _ScaleGrad.apply(v_s, inv)
        return self.U.index_copy(1, self.S, u_s), self.V.index_copy(1, self.S, v_s)

    @torch.no_grad()
    def new_round(self) -> None:
        """Write the sampled columns back, re-orthogonalise by SVD and draw a new sample."""
        u, v = self.full_factors()
        w = (u.double() * self.sigma.double()) @ v.double().T
        u2, s2, vh2 = torch.linalg.svd(w, full_matrices=False)
        self.U.copy_(u2)
        self.V.copy_(vh2.T)
        self.sigma.copy_(s2)
        self.round_index.add_(1)
        self._sample()

    def step(self, global_step: int) -> None:
        """A new round at every ``round_steps``-th step, once: a resumed run calls ``step`` again with the step its
        checkpoint was written at, whose round the saved ``round_index`` already counts."""
        rounds = global_step // self.config.round_steps
        if global_step > 0 and global_step % self.config.round_steps == 0 and self.round < rounds:
            self.new_round()

    # ------------------------------------------------------------------------------------------- weights
    def weight(self) -> Tensor:
        u, v = self.full_factors()
        return (u * self.sigma) @ v.T

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.weight().float() - base.weight.float()

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        u, v = self.full_factors()
        y = ((x.to(v.dtype) @ v) * self.sigma) @ u.T
        if base.bias is not None:
            y = y + base.bias
        return y.to(base_out.dtype)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: SSTConfig) -> int:
        m, r = _rank(base, config)
        return m + r * (base.in_features + base.out_features)
