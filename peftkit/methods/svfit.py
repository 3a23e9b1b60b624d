"""SVFit (Sun et al., 2024, "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using
Singular Values"; no official code: the equations here are *inferred* from the paper).

The truncated SVD of the frozen weight, ``W = U Σ Vᵀ``, gives frozen bases ``U_r [out, r]`` and ``V_r [in, r]``;
only the top-``r`` singular values ``σ ∈ R^r`` train, initialised to ``σ₀ = S[:r]``. The paper writes the
layer as ``y = x W_eᵀ + b + x V_r diag(σ) U_rᵀ`` with the residual ``W_e = W − U_r diag(σ₀) V_rᵀ``. Here the
user's base weight is never changed: the adapter applies only the *difference* to the untouched base,

``y = base(x) + (x V_r) diag(σ − σ₀) U_rᵀ``, ``ΔW = U_r diag(σ − σ₀) V_rᵀ``,

which is the same function (``W_e + U_r diag(σ) V_rᵀ = W + ΔW``), exactly the identity at init (``σ = σ₀``
gives ``ΔW = 0`` bit for bit), and makes disabling, mixed batches, merge/unmerge and loading onto an untouched
base work through the core with no special case. The forward is two thin products (``[tokens, r]`` in the
middle), never a dense ``[out, in]`` matrix; ``lowrank()`` exposes ``(V_rᵀ, U_r diag(σ − σ₀))`` for serving.

Saved file (``state_dict``): ``U [out, r]``, ``Vh [r, in]`` (``V_rᵀ``), ``sigma0 [r]`` (persistent buffers: an
SVD is not bit-identical across machines and BLAS builds, so the factors are stored rather than recomputed)
and the trainable ``sigma [r]``; ``r·(out + in + 2)`` numbers per layer, about a rank-``r`` LoRA's size.

Decisions: the SVD is the shared :func:`~peftkit.methods.loraxs.svd_signed` (exact ``torch.linalg.svd`` in
float64, cast to the weight dtype; at least the fp32 the spec asks for) with the spec's sign convention (the
largest-``|entry|`` of each left singular vector positive), so the factors are deterministic. Fixed ``r``
(default 16; per-module ranks through ``config.overrides``). The spec's option ``energy=0.99`` chooses each
layer's ``r`` as the smallest with ``Σ_{i≤r} σ_i² / Σ σ² ≥ energy``, in ``reset_parameters`` (where the SVD is
computed); the chosen rank is the length of the saved ``sigma``, and :meth:`SVFit.fit_state` sizes the tensors
from it on loading, so a saved adapter reloads with its shapes without recomputing any spectrum (a rank chosen
on another machine is kept even if rounding there would pick another one). Supported layers: ``nn.Linear`` and
GPT-2 ``Conv1D`` (spec: Linear).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    LowRank,
    PositiveFraction,
    PositiveInt,
    add_lowrank,
    register,
    require_rank_fits,
)

from .lora import float_dtype
from .loraxs import energy_rank, svd_signed


@dataclass(kw_only=True)
class SVFitConfig(AdapterConfig):
    """Settings of SVFit.

    Attributes:
        r: how many of the top singular values train (spec decision: fixed ``r``, default 16); at most
            ``min(in, out)``. Ignored when ``energy`` is set.
        energy: if set, each layer's ``r`` is the smallest keeping this fraction of the squared singular values,
            ``Σ_{i≤r} σ_i² / Σ σ² ≥ energy`` (the paper's "99% of the information": ``energy=0.99``).
    """

    r: PositiveInt = 16
    energy: PositiveFraction | None = None

    tiny_fields: ClassVar[dict] = {"r": 2}
    variant_fields: ClassVar[list[dict]] = [{"r": 16, "energy": 0.5}]


@register("svfit", SVFitConfig)
class SVFit(Adapter[SVFitConfig]):
    """``y = base(x) + (x V_r) diag(σ − σ₀) U_rᵀ`` with frozen SVD factors; see the module docstring."""

    def __init__(self, base: BaseView, config: SVFitConfig) -> None:
        super().__init__(base, config)
        if config.energy is None:
            require_rank_fits(config.r, base)
        # With ``energy`` the rank comes from the spectrum (reset_parameters) or the saved file (fit_state).
        r = config.r if config.energy is None else 0
        self.allocate(r, base.out_features, base.in_features, float_dtype(base), base.device)

    def allocate(self, r: int, out: int, inp: int, dtype: torch.dtype, device: torch.device) -> None:
        """(Re)allocate empty tensors for rank ``r``; a replaced ``sigma`` keeps its ``requires_grad``."""
        kw = {"dtype": dtype, "device": device}
        trainable = self.sigma.requires_grad if "sigma" in self._parameters else True
        self.register_buffer("U", torch.empty(out, r, **kw))  # U_r
        self.register_buffer("Vh", torch.empty(r, inp, **kw))  # V_rᵀ
        self.register_buffer("sigma0", torch.empty(r, **kw))  # σ₀ = S[:r], the singular values at init
        self.sigma = nn.Parameter(torch.empty(r, **kw), requires_grad=trainable)

    def reallocate(self, r: int) -> None:
        """Rank ``r`` with the current shapes, dtype and device (the rank ``energy`` or a saved file chose)."""
        self.allocate(r, self.U.shape[0], self.Vh.shape[1], self.sigma.dtype, self.sigma.device)

    def fit_state(self, state: dict[str, Tensor]) -> None:
        """Take the rank of the saved file (``energy`` chose it per layer when the adapter was made)."""
        if "sigma" in state and state["sigma"].shape != self.sigma.shape:
            self.reallocate(state["sigma"].shape[0])

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        u, s, vh = svd_signed(base.weight)
        if self.config.energy is not None:
            self.reallocate(energy_rank(s, self.config.energy))
        r = self.sigma.shape[0]
        self.U.copy_(u[:, :r])
        self.Vh.copy_(vh[:r])
        self.sigma0.copy_(s[:r])
        self.sigma.copy_(self.sigma0)  # copied after the cast, so σ − σ₀ is exactly 0 at init

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        hidden = (x @ self.Vh.T) * (self.sigma - self.sigma0)  # [.., r]
        return add_lowrank(base_out, hidden, self.U)

    def delta_weight(self, base: BaseView) -> Tensor:
        return (self.U * (self.sigma - self.sigma0)) @ self.Vh

    def lowrank(self, base: BaseView) -> LowRank:
        return LowRank(self.Vh, self.U * (self.sigma - self.sigma0), 1.0)

    def effective_rank(self) -> int:
        return self.sigma.shape[0]

    @classmethod
    def expected_trainable(cls, base: BaseView, config: SVFitConfig) -> int:
        if config.energy is None:
            return config.r
        return energy_rank(torch.linalg.svdvals(base.weight.detach().double()), config.energy)
