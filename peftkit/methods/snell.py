"""SNELL (Shen et al., 2024, "Expanding Sparse Tuning for Low Memory Usage") and SNELLA (2025, "Kernelized
Sparse Fine-Tuning with Bi-level Parameter Competition for Vision Models"), after ssfgunner/SNELL
(``KLoRA``, ``SNELL``, ``SNELLA``, ``sparse_allocator.py``).

Trainable ``In_Qs [h, d_in, q/h]`` and ``Out_Qs [h, d_out, q/h]`` (``h = 2``, ``q = low_rank_dim``) build a
distance-kernel matrix with frozen ``c = 0.1 · [+1, −1]``:

``K = Σ_t c_t · cdist(In_Qs[t], Out_Qs[t])``  (``[d_in, d_out]``, rank ≫ q),

SNELLA adds trainable scalars ``α = 1``, ``γ = 1``, ``β = 0``: ``K' = K + α · softmax(K / γ, dim=-1) + β``.
Competition-based sparsification (no stored indices): ``τ`` = the ``⌊s·numel⌋``-th smallest ``|K|``
(``kthvalue``, valid above 2^24 entries where ``torch.quantile`` fails), ``K_s = K ⊙ sg(|K| · 1[|K| > τ])``
(kept entries are multiplied by their own detached magnitude, as the official code does); ``s = 0`` uses
plain ``K``. Forward ``y = base(x) + DropPath(drop(x) K_s)``; merge exact for the current threshold,
``ΔW = K_sᵀ``. Cost: the kernel is ``O(d_in·d_out·q)`` per forward plus the dense product.

Init (faithful): Kaiming-uniform (``a=√5``) factors ⇒ ``K ≠ 0`` ⇒ **not identity at init**. ``zero_start``
(decision, off) subtracts a frozen copy of the initial ``K_s`` (a persistent buffer ``K0``).
Count ``q · (d_in + d_out)`` (+3 for SNELLA). ``dropout`` / ``drop_path`` default to 0 here (official ViT
scripts: 0.1 each).

SNELLA's layer ratio ``s_l`` is a persistent buffer ``sparsity`` (starts at ``init_thres``). Bi-level
allocation (``sparse_allocator.py``): every backward updates ``Ī ← β1 Ī + (1−β1) I``, ``Ū ← β2 Ū + (1−β2)|I − Ī|``
with ``I = |p ⊙ ∇p|``; :func:`reallocate` (call it once per epoch for the first ``alloc_epoch`` epochs; it
needs every layer, so it is a function over adapters, not a per-layer hook) scores layers by
``z_l = mean(Ī⊙Ū)[In_Qs] + mean(Ī⊙Ū)[Out_Qs]`` (normalised), computes the cubic budget :func:`budget` and
:func:`allocate` s the nonzeros, then sets ``s_l = clip(1 − v_l / (d_in·d_out), 0, 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    InvalidConfigError,
    NonNegativeInt,
    PositiveInt,
    Probability,
    input_dropout,
    register,
    seeded_generator,
)

HEADS = 2


@dataclass(kw_only=True)
class SNELLConfig(AdapterConfig):
    """Settings of SNELL (official script defaults where given).

    Attributes:
        low_rank_dim: ``q`` (even: split over ``h = 2`` kernels; scripts use 8, 16 or 32).
        init_thres: ``s``, the fraction of kernel entries zeroed (0: dense "KLoRA"; e.g. 0.3 for CUB).
        dropout: dropout on the branch input (official attention branches: 0.1).
        drop_path: stochastic depth on the branch output (official: 0.1).
        zero_start: subtract the initial ``K_s`` so the adapter starts as identity (decision; off).
    """

    low_rank_dim: PositiveInt = 8
    init_thres: Probability = 0.0
    dropout: Probability = 0.0
    drop_path: Probability = 0.0
    zero_start: bool = False

    def validate(self) -> None:
        if self.low_rank_dim % HEADS:
            raise InvalidConfigError(f"low_rank_dim must be a positive multiple of {HEADS}, got {self.low_rank_dim!r}")

    tiny_fields: ClassVar[dict] = {"low_rank_dim": 4, "init_thres": 0.3}
    variant_fields: ClassVar[list[dict]] = [{"low_rank_dim": 2, "init_thres": 0.0, "seed": 5, "zero_start": True}]


@dataclass(kw_only=True)
class SNELLAConfig(SNELLConfig):
    """Settings of SNELLA (official ``snella32`` defaults).

    Attributes:
        target_ratio: final fraction of zeros over all layers (0.3).
        init_warmup: allocation steps at the initial budget (0).
        final_warmup: last allocation steps at the target budget (0).
        beta1: EMA factor of the importance ``Ī`` (0.85).
        beta2: EMA factor of the uncertainty ``Ū`` (0.85).
    """

    low_rank_dim: int = 32
    target_ratio: Probability = 0.3
    init_warmup: NonNegativeInt = 0
    final_warmup: NonNegativeInt = 0
    beta1: Probability = 0.85
    beta2: Probability = 0.85

    tiny_fields: ClassVar[dict] = {"low_rank_dim": 4, "init_thres": 0.2}
    variant_fields: ClassVar[list[dict]] = [{"low_rank_dim": 2, "init_thres": 0.0, "seed": 5}]


def kernel(in_qs: Tensor, out_qs: Tensor) -> Tensor:
    """``K = Σ_t c_t cdist(In_Qs[t], Out_Qs[t])``, ``c = 0.1 · (−1)^t``: ``[d_in, d_out]``."""
    c = 0.1 * torch.tensor([(-1.0) ** t for t in range(in_qs.shape[0])], dtype=in_qs.dtype, device=in_qs.device)
    return torch.einsum("t,tio->io", c, torch.cdist(in_qs, out_qs, p=2))


def sparsify(k: Tensor, s: float) -> Tensor:
    """``K ⊙ sg(|K| · 1[|K| > τ])`` with ``τ`` the ``⌊s·numel⌋``-th smallest ``|K|``; ``K`` if that is 0."""
    n = int(s * k.numel())
    if n <= 0:
        return k
    mag = k.detach().abs()
    tau = mag.flatten().kthvalue(n).values
    return k * (mag * (mag > tau))


@register("snell", SNELLConfig)
class SNELL(Adapter[SNELLConfig]):
    """``y = base(x) + x K_s``; see the module docstring."""

    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: 'In_Qs, Out_Qs kaiming-uniform(a=√5) ⇒ K ≠ 0 ⇒ not identity at init (faithful)'",
    }

    def __init__(self, base: BaseView, config: SNELLConfig) -> None:
        super().__init__(base, config)
        d_out, d_in, q = base.out_features, base.in_features, config.low_rank_dim
        self.In_Qs = nn.Parameter(torch.empty(HEADS, d_in, q // HEADS, device=base.device))
        self.Out_Qs = nn.Parameter(torch.empty(HEADS, d_out, q // HEADS, device=base.device))
        self.dropout = input_dropout(config.dropout)
        self.setup_extra(base)
        if config.zero_start:
            self.register_buffer("K0", torch.empty(d_in, d_out, device=base.device))

    def reset_parameters(self, base: BaseView) -> None:
        g = seeded_generator(self.config.seed)
        for p in (self.In_Qs, self.Out_Qs):
            cpu = torch.empty(p.shape)
            nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=g)
            p.copy_(cpu)
        self.reset_extra()
        if self.config.zero_start:
            self.K0.zero_()
            self.K0.copy_(self.sparse_kernel())

    def setup_extra(self, base: BaseView) -> None:
        """Hook for SNELLA's extra parameters (allocation)."""

    def reset_extra(self) -> None:
        """Hook for SNELLA's extra parameters (initial values)."""

    def ratio(self) -> float:
        return self.config.init_thres

    def full_kernel(self) -> Tensor:
        return kernel(self.In_Qs, self.Out_Qs)

    def sparse_kernel(self) -> Tensor:
        k = sparsify(self.full_kernel(), self.ratio())
        return k - self.K0 if self.config.zero_start else k

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.sparse_kernel().T

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        y = base.apply(self.dropout(x), self.delta_weight(base).to(x.dtype))
        p = self.config.drop_path
        if self.training and p > 0:
            keep = torch.rand(y.shape[0], *[1] * (y.dim() - 1), device=y.device) >= p
            y = y * keep.to(y.dtype) / (1 - p)
        return base_out + y

    @classmethod
    def expected_trainable(cls, base: BaseView, config: SNELLConfig) -> int:
        return config.low_rank_dim * (base.in_features + base.out_features)


@register("snella", SNELLAConfig)
class SNELLA(SNELL):
    """SNELL with ``K' = K + α softmax(K/γ) + β`` and a layer-specific ratio; see the module docstring."""

    config: SNELLAConfig  # narrows SNELL.config

    def setup_extra(self, base: BaseView) -> None:
        self.alpha = nn.Parameter(torch.empty((), device=base.device))
        self.gamma = nn.Parameter(torch.empty((), device=base.device))
        self.beta = nn.Parameter(torch.empty((), device=base.device))
        self.register_buffer("sparsity", torch.empty((), device=base.device))
        self.ema: dict[str, tuple[Tensor, Tensor]] = {}

    def reset_extra(self) -> None:
        self.alpha.fill_(1.0)
        self.gamma.fill_(1.0)
        self.beta.zero_()
        self.sparsity.fill_(self.config.init_thres)

    def ratio(self) -> float:
        return float(self.sparsity)

    def full_kernel(self) -> Tensor:
        in_qs, out_qs = self.In_Qs, self.Out_Qs
        if self.training and torch.is_grad_enabled() and in_qs.requires_grad:
            in_qs, out_qs = in_qs.view_as(in_qs), out_qs.view_as(out_qs)
            in_qs.register_hook(lambda g: self._importance("In_Qs", g))
            out_qs.register_hook(lambda g: self._importance("Out_Qs", g))
        k = kernel(in_qs, out_qs)
        return k + self.alpha * torch.softmax(k / self.gamma, dim=-1) + self.beta

    @torch.no_grad()
    def _importance(self, name: str, grad: Tensor) -> None:
        ipt = (getattr(self, name).detach() * grad).abs()
        b1, b2 = self.config.beta1, self.config.beta2
        if name not in self.ema:
            self.ema[name] = (torch.zeros_like(ipt), torch.zeros_like(ipt))
        i_bar, u_bar = self.ema[name]
        i_bar = b1 * i_bar + (1 - b1) * ipt
        u_bar = b2 * u_bar + (1 - b2) * (ipt - i_bar).abs()
        self.ema[name] = (i_bar, u_bar)

    def score(self) -> float:
        """``z_l = mean(Ī⊙Ū)[In_Qs] + mean(Ī⊙Ū)[Out_Qs]`` (0 before any backward)."""
        return float(sum((i * u).mean() for i, u in self.ema.values()))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: SNELLAConfig) -> int:
        return super().expected_trainable(base, config) + 3


def budget(t: int, total: int, v_init: float, v_target: float, init_warmup: int = 0, final_warmup: int = 0) -> float:
    """Nonzeros allowed at allocation step ``t`` of ``total``: the cubic schedule of ``sparse_allocator.py``."""
    if t <= init_warmup:
        return v_init
    if t > total - final_warmup:
        return v_target
    span = max(total - final_warmup - init_warmup, 1)
    return v_target + (v_init - v_target) * (1 - (t - init_warmup) / span) ** 3


def allocate(v: float, scores: list[float], sizes: list[int]) -> list[int]:
    """``v_l = min(⌊V·z_l⌋, size_l)``, the rest redistributed by score over uncapped layers until exhausted."""
    total = sum(scores)
    z = [s / total for s in scores] if total > 0 else [1.0 / len(scores)] * len(scores)
    alloc = [min(math.floor(v * zl), n) for zl, n in zip(z, sizes)]
    while True:
        left = int(v) - sum(alloc)
        free = [i for i, n in enumerate(sizes) if alloc[i] < n]
        if left <= 0 or not free:
            return alloc
        zf = sum(z[i] for i in free) or 1.0
        added = 0
        for i in free:
            extra = min(math.floor(left * z[i] / zf), sizes[i] - alloc[i])
            alloc[i] += extra
            added += extra
        if added == 0:  # rounding: hand out the last units one by one, best score first
            for i in sorted(free, key=lambda i: -z[i])[:left]:
                alloc[i] += 1


@torch.no_grad()
def reallocate(adapters: Iterable[SNELLA], t: int, total: int) -> list[float]:
    """Across-layer competition at allocation step ``t`` of ``total``; sets and returns every layer's ``s_l``."""
    layers = list(adapters)
    cfg = layers[0].config
    sizes = [a.In_Qs.shape[1] * a.Out_Qs.shape[1] for a in layers]
    v = budget(t, total, sum((1 - cfg.init_thres) * n for n in sizes), sum((1 - cfg.target_ratio) * n for n in sizes))
    alloc = allocate(v, [a.score() for a in layers], sizes)
    ratios = [min(max(1 - k / n, 0.0), 1.0) for k, n in zip(alloc, sizes)]
    for a, s in zip(layers, ratios):
        a.sparsity.fill_(s)
    return ratios
