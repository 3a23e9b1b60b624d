"""LoCA (Du et al., 2025, "Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning", arXiv
2502.06820). *Inferred* throughout: no official code was retrieved; the spec's decisions are followed.

``n`` trainable DCT coefficients ``a`` sit at integer locations ``l = (rows, cols)`` of a ``d_out × d_in``
spectrum ``S = scatter(l, a)``; the update is its orthonormal 2-D inverse DCT (DCT-III):

``ΔW = α · C_outᵀ S C_in``,  ``y = base(x) + x ΔWᵀ``,

``C_N[k, t] = sqrt(2/N) · c_k · cos(π(2t+1)k / (2N))`` (``c_0 = 1/√2``, else 1; ``C_N C_Nᵀ = I``), i.e.
``ΔW = α · scipy.fft.idctn(S, norm="ortho")``. Cost: the inverse DCT runs through zero-padded FFTs (length
``2N`` along each axis), ``O(d_out·d_in·log(d_out·d_in))`` per forward in training; no dense ``C_N`` is built
per step. The forward then adds the dense ``O(tokens·d_in·d_out)`` product (merged: free). The transform runs
in float32 (float64 for a float64 spectrum).

Init (decision): ``a = 0`` (identity at init); ``init="randn"`` draws ``a ~ N(0, 1)`` (FourierFT-style, not
identity). Initial locations: ``randperm(d_out·d_in, generator seeded by seed)[:n]`` (FourierFT's recipe; the
config's ``seed``, 777 when unset). Locations are integer state, not trainable parameters, and are saved (a
persistent ``locations`` buffer) because location learning moves them; the count reported is ``n``.

Location learning (*inferred*, spec decisions), enabled when ``total_steps`` is set: during training the
gradient ``G = ∂L/∂ΔW`` is captured; coefficient gradients in the spectrum are ``Ĝ = α · C_out G C_inᵀ`` (a
forward 2-D DCT). For coefficient ``i`` at ``(u, v)``: ``g_u = a_i (Ĝ[u+1, v] − Ĝ[u−1, v]) / 2`` and likewise
``g_v`` (one-sided differences at the borders); continuous locations ``l̃ ← l̃ − loc_lr · g`` and the active
location is ``round(clamp(l̃))``; a move onto an occupied cell keeps the old location. Schedule: during the
first ``T_loc = loc_fraction · total_steps`` steps, cycles of ``coef_steps`` coefficient steps then
``loc_steps`` location steps (run in :meth:`step`); afterwards locations are frozen. Simplification: the
trainer's optimizer still updates ``a`` on location steps (the adapter does not own the optimizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    Fraction,
    InvalidConfigError,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    register,
)

from .fourierft import spectral_indices


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal DCT-II matrix ``C_n`` (``[k, t]``); for tests and reference only."""
    k = torch.arange(n, dtype=dtype)[:, None]
    t = torch.arange(n, dtype=dtype)[None, :]
    c = torch.cos(math.pi * (2 * t + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def _weights(n: int, sign: float, x: Tensor) -> Tensor:
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    scale = torch.full((n,), math.sqrt(2.0 / n), device=x.device, dtype=x.dtype)
    scale[0] = math.sqrt(1.0 / n)
    return scale * torch.exp(sign * 1j * math.pi * k / (2 * n))


def idct(x: Tensor, dim: int = -1) -> Tensor:
    """Orthonormal inverse DCT (``Cᵀ x``) along ``dim`` by one length-``2N`` FFT: ``O(N log N)``."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    v = x * _weights(n, 1.0, x)
    y = torch.fft.ifft(v, n=2 * n)[..., :n].real * (2 * n)
    return y.movedim(-1, dim)


def dct(x: Tensor, dim: int = -1) -> Tensor:
    """Orthonormal DCT-II (``C x``) along ``dim`` by one length-``2N`` FFT: ``O(N log N)``."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    y = (torch.fft.fft(x, n=2 * n)[..., :n] * _weights(n, -1.0, x)).real
    return y.movedim(-1, dim)


@dataclass(kw_only=True)
class LoCAConfig(AdapterConfig):
    """Settings of LoCA (spec decisions).

    Attributes:
        n_frequency: number of trainable DCT coefficients per layer (spec ``n``; default 1000).
        alpha: scale of the inverse DCT (default 150, as FourierFT; *inferred*).
        init: ``"zeros"`` (decision: identity at init) or ``"randn"`` (``N(0, 1)``, not identity).
        total_steps: planned optimizer steps; ``None`` (default) disables location learning.
        loc_fraction: locations learn during the first ``loc_fraction · total_steps`` steps (0.3).
        coef_steps: coefficient steps per cycle (``B_a = 10``).
        loc_steps: location steps per cycle (``B_l = 1``).
        loc_lr: step size of the continuous locations (1.0, about one-cell moves).
    """

    n_frequency: PositiveInt = 1000
    alpha: PositiveFloat = 150.0
    init: Literal["zeros", "randn"] = "zeros"
    total_steps: NonNegativeInt | None = None
    loc_fraction: Fraction = 0.3
    coef_steps: PositiveInt = 10
    loc_steps: PositiveInt = 1
    loc_lr: PositiveFloat = 1.0

    tiny_fields: ClassVar[dict] = {"n_frequency": 24, "alpha": 2.0}
    variant_fields: ClassVar[list[dict]] = [{"seed": 3, "total_steps": 20, "coef_steps": 1}]


@register("loca", LoCAConfig)
class LoCA(Adapter[LoCAConfig]):
    """``y = base(x) + x (α · idct2(scatter(l, a)))ᵀ``; see the module docstring."""

    _last_step: int = 0  # the last global step seen by :meth:`step`

    def __init__(self, base: BaseView, config: LoCAConfig) -> None:
        super().__init__(base, config)
        d_out, d_in, n = base.out_features, base.in_features, config.n_frequency
        if n > d_out * d_in:
            raise InvalidConfigError(f"n_frequency={n} is larger than this layer's d_out·d_in = {d_out * d_in}")
        self.shape = (d_out, d_in)
        self.register_buffer("locations", torch.empty(2, n, dtype=torch.long, device=base.device))
        self.coefficients = nn.Parameter(torch.empty(n, device=base.device))
        self._grad_dw: Tensor | None = None
        self._cont: Tensor | None = None

    def reset_parameters(self, base: BaseView) -> None:
        d_out, d_in = self.shape
        seed = 777 if self.config.seed is None else self.config.seed
        self.locations.copy_(spectral_indices(d_out, d_in, self.coefficients.numel(), seed))
        if self.config.init == "randn":
            self.coefficients.normal_(generator=torch.Generator().manual_seed(seed + 1))
        else:
            self.coefficients.zero_()

    # ------------------------------------------------------------------------------------------- weights
    def spectrum(self) -> Tensor:
        a = self.coefficients
        dtype = torch.promote_types(a.dtype, torch.float32)
        dense = torch.zeros(self.shape, dtype=dtype, device=a.device)
        return dense.index_put((self.locations[0], self.locations[1]), a.to(dtype))

    def delta_weight(self, base: BaseView) -> Tensor:
        dw = idct(idct(self.spectrum(), dim=1), dim=0) * self.config.alpha
        return dw.to(self.coefficients.dtype)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        dw = self.delta_weight(base)
        if self.training and dw.requires_grad and self._learning_locations():
            dw.register_hook(self._capture)
        return base_out + base.apply(x, dw.to(x.dtype))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: LoCAConfig) -> int:
        return config.n_frequency

    # ------------------------------------------------------------------------------ location learning
    def _capture(self, grad: Tensor) -> None:
        g = grad.detach().float()
        self._grad_dw = g if self._grad_dw is None else self._grad_dw + g

    def _learning_locations(self, global_step: int | None = None) -> bool:
        total = self.config.total_steps
        if total is None:
            return False
        step = self._last_step if global_step is None else global_step
        return step < int(self.config.loc_fraction * total)

    def location_gradient(self, grad_dw: Tensor) -> Tensor:
        """``[2, n]`` finite-difference gradients ``(g_u, g_v)`` of the locations, from ``G = ∂L/∂ΔW``."""
        g_hat = dct(dct(grad_dw, dim=1), dim=0) * self.config.alpha
        u, v = self.locations
        grads = []
        for axis, (pos, size) in enumerate(((u, self.shape[0]), (v, self.shape[1]))):
            hi = (pos + 1).clamp(max=size - 1)
            lo = (pos - 1).clamp(min=0)
            at = (lambda p: g_hat[p, v]) if axis == 0 else (lambda p: g_hat[u, p])
            diff = (at(hi) - at(lo)) / (hi - lo).clamp(min=1).to(g_hat.dtype)
            grads.append(self.coefficients.detach().float() * diff)
        return torch.stack(grads)

    @torch.no_grad()
    def move_locations(self, grad: Tensor) -> int:
        """One location step with gradient ``[2, n]``; returns how many coefficients moved."""
        if self._cont is None or not torch.equal(self._cont.round().long(), self.locations):
            self._cont = self.locations.float().clone()
        limits = torch.tensor([self.shape[0] - 1, self.shape[1] - 1], device=grad.device)[:, None]
        cont = self._cont - self.config.loc_lr * grad
        cont = torch.minimum(cont.clamp(min=0), limits.float())
        new = cont.round().long()
        d_in = self.shape[1]
        old_flat = (self.locations[0] * d_in + self.locations[1]).tolist()
        new_flat = (new[0] * d_in + new[1]).tolist()
        occupied = set(old_flat)
        moved = 0
        for i, (o, f) in enumerate(zip(old_flat, new_flat)):
            if f == o:
                continue
            if f in occupied:  # collision: keep the old location (decision)
                cont[:, i] = self.locations[:, i].float()
                continue
            occupied.discard(o)
            occupied.add(f)
            self.locations[0, i], self.locations[1, i] = f // d_in, f % d_in
            moved += 1
        self._cont = cont
        return moved

    def step(self, global_step: int) -> None:
        self._last_step = global_step
        grad, self._grad_dw = self._grad_dw, None
        if grad is None or not self._learning_locations(global_step - 1):
            return
        cycle = self.config.coef_steps + self.config.loc_steps
        if (global_step - 1) % cycle >= self.config.coef_steps:
            self.move_locations(self.location_gradient(grad))
