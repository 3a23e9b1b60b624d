"""QWHA (2025, "QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient Fine-Tuning on
Large Language Models"), after vantaa89/qwha (``QHFT``).

A sparse spectrum ``S = scatter(indices, c)`` (``d_out × d_in``; row = output channel, column = Hadamard
frequency) is mapped back by a 1-D inverse Walsh–Hadamard transform along the input dimension:

``ΔW = iwht(S) · scaling / √d_out = S Hᵀ · scaling / (d_in · √d_out)``,  ``y = x (Ŵ + ΔW)ᵀ + b``

with the Sylvester (natural-order) ``H`` (``H Hᵀ = d_in I``, symmetric). The forward never builds ``H`` nor
``ΔW``: ``x ΔWᵀ = fwht(x) Sᵀ · scaling / (d_in √d_out)``, with the fast transform done by ``log₂ d_in`` reshape +
add/subtract passes (``O(tokens · d_in · log d_in)``) plus the ``O(tokens · d_in · d_out)`` product with the
scattered ``S``. ``Ŵ`` is whatever the base module holds (peftkit's base is the dequantized weight; the
official forward drops the bias, we keep it). ``d_in`` must be a power of two (the official ``K × 2^k``
Hadamard blocks are not implemented).

Budget ``n = r · (d_in + d_out)`` (``n_frequency`` overrides), count ``n``. Init ``"zero"``: FourierFT's
locations (``randperm(d_out·d_in)`` seeded by ``random_loc_seed``, a non-persistent buffer), ``c = 0`` →
identity. Init ``"qwha"`` (quantization-aware; *simplified*: the adapter cannot see calibration data or the
full-precision weight, so the layer starts as ``"zero"`` and :meth:`QWHA.quant_init` fits it from calibration
inputs ``X`` and the quantization error ``E = W − Ŵ``; the indices are then data-dependent and saved, a
persistent buffer): ``Σ = XᵀX + 1e-4·mean(diag Σ)·I`` (float64), ``R = diag(√λ) Vᵀ``, ``B = R H / d_in``,
``F = H Eᵀ``; AdaAlloc ``k_i ∝ ‖F[:, i]‖`` (floor, capped at ``d_in``, remainder spread evenly, last units to the
smallest ``k_i``); per channel the top-``k_i`` frequencies by ``‖B[:, j]‖² F[j, i]²`` and least-squares values
``v = argmin ‖B_s v − R Eᵀ[:, i]‖``; ``c = v · √d_out / scaling``. ``quant_init`` also uses the fast transform
(``R H`` and ``H Eᵀ`` in ``O(d² log d)``); its cost is dominated by the ``O(d_in³)`` eigendecomposition and the
per-channel least squares, once. Merge exact (into ``Ŵ``); ``delta_weight`` is ``fwht`` of the dense ``S``
(``O(d_out · d_in · log d_in)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, InvalidConfigError, PositiveInt, register

from .fourierft import spectral_indices


def fwht(x: Tensor) -> Tensor:
    """``x H`` along the last axis (natural-order Sylvester ``H``; length a power of two), ``O(d log d)``."""
    d = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < d:
        y = x.reshape(*lead, d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, d)
        h *= 2
    return x


def hadamard(d: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The dense Sylvester ``H`` (reference and init only)."""
    return fwht(torch.eye(d, dtype=dtype))


def ada_alloc(norms: Tensor, n: int, cap: int) -> Tensor:
    """Per-channel counts ``k_i`` (sum ``n``): ``⌊n·w_i/Σw⌋`` capped at ``cap``, remainder spread evenly over the
    uncapped channels, the last units (+1 each) to the smallest ``k_i``."""
    w = norms.double().clamp_min(0)
    w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / w.numel())
    k = torch.floor(n * w).long().clamp(max=cap)
    while (rem := n - int(k.sum())) > 0:
        free = (k < cap).nonzero().flatten()
        if free.numel() == 0:
            break
        each = rem // free.numel()
        if each > 0:
            k[free] = (k[free] + each).clamp(max=cap)
        else:
            order = free[torch.argsort(k[free], stable=True)][:rem]
            k[order] += 1
    return k


@dataclass(kw_only=True)
class QWHAConfig(AdapterConfig):
    """Settings of QWHA (official helper defaults).

    Attributes:
        r: rank-equivalent budget, ``n = r · (d_in + d_out)`` (default 64, LoRA-64's count).
        n_frequency: an explicit ``n`` per layer (overrides ``r``).
        scaling: multiplies the inverse WHT (official helper 3000; GSM8K script 4000; the config's 150 is a
            leftover from FourierFT).
        random_loc_seed: seed of the initial locations (777).
        init: ``"zero"`` (identity) or ``"qwha"`` (quantization-aware, fitted by :meth:`QWHA.quant_init`).
    """

    r: PositiveInt = 64
    n_frequency: PositiveInt | None = None
    scaling: float = 3000.0
    random_loc_seed: int = 777
    init: Literal["zero", "qwha"] = "zero"

    def budget(self, d_out: int, d_in: int) -> int:
        return self.n_frequency if self.n_frequency is not None else self.r * (d_in + d_out)

    tiny_fields: ClassVar[dict] = {"r": 1, "scaling": 20.0}
    variant_fields: ClassVar[list[dict]] = [
        {"r": 64, "n_frequency": 40, "scaling": 5.0, "random_loc_seed": 3, "init": "qwha"}
    ]


@register("qwha", QWHAConfig)
class QWHA(Adapter[QWHAConfig]):
    """``y = base(x) + fwht(x) Sᵀ · scaling / (d_in √d_out)``; see the module docstring."""

    def __init__(self, base: BaseView, config: QWHAConfig) -> None:
        super().__init__(base, config)
        d_out, d_in = base.out_features, base.in_features
        if d_in & (d_in - 1):
            raise InvalidConfigError(
                f"QWHA needs a power-of-two d_in (K×2^k Hadamard blocks not implemented), got {d_in}"
            )
        n = config.budget(d_out, d_in)
        if n > d_out * d_in:
            raise InvalidConfigError(
                f"the spectrum budget n={n} is larger than this layer's d_out·d_in = {d_out * d_in}"
            )
        self.shape = (d_out, d_in)
        self.factor = config.scaling / (d_in * math.sqrt(d_out))
        indices = spectral_indices(d_out, d_in, n, config.random_loc_seed).to(base.device)
        self.register_buffer("indices", indices, persistent=config.init == "qwha")
        self.spectrum = nn.Parameter(torch.empty(n, device=base.device))

    def reset_parameters(self, base: BaseView) -> None:
        self.spectrum.zero_()  # the (cheap) seeded indices are built in __init__; quant_init may replace them

    def dense_spectrum(self) -> Tensor:
        s = torch.zeros(self.shape, dtype=self.spectrum.dtype, device=self.spectrum.device)
        return s.index_put((self.indices[0], self.indices[1]), self.spectrum)

    def delta_weight(self, base: BaseView) -> Tensor:
        return fwht(self.dense_spectrum()) * self.factor  # S H = S Hᵀ (H symmetric)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        s = self.dense_spectrum()
        y = fwht(x.to(s.dtype)) @ s.T
        return base_out + (self.factor * y).to(base_out.dtype)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: QWHAConfig) -> int:
        return config.budget(base.out_features, base.in_features)

    @torch.no_grad()
    def quant_init(self, x: Tensor, error: Tensor) -> Tensor:
        """Fit indices and spectrum so ``Ŵ + ΔW ≈ W`` in the ``X``-weighted norm; returns the counts ``k_i``.

        Args:
            x: calibration inputs of this layer, ``[..., d_in]``.
            error: the quantization error ``E = W − Ŵ``, ``[d_out, d_in]``.
        """
        d_out, d_in = self.shape
        n = self.spectrum.numel()
        xs = x.reshape(-1, d_in).double()
        sigma = xs.T @ xs
        sigma += 1e-4 * sigma.diagonal().mean() * torch.eye(d_in, dtype=sigma.dtype)
        lam, vecs = torch.linalg.eigh(sigma)
        r = lam.clamp_min(0).sqrt()[:, None] * vecs.T  # RᵀR = Σ
        # fast transforms, no dense H: R H = fwht(R) and H Eᵀ = (E H)ᵀ (H symmetric), O(d² log d) each
        basis = fwht(r) / d_in
        target = r @ error.double().T  # R Eᵀ  [d_in, d_out]
        spectrum_full = fwht(error.double()).T  # F = solve(B, R Eᵀ) = H Eᵀ
        counts = ada_alloc(spectrum_full.norm(dim=0), n, d_in)
        col_norm = basis.pow(2).sum(0)  # ‖B[:, j]‖²
        rows, cols, values = [], [], []
        for i in range(d_out):
            k = int(counts[i])
            if k == 0:
                continue
            top = torch.topk(col_norm * spectrum_full[:, i].pow(2), k).indices
            v = torch.linalg.lstsq(basis[:, top], target[:, i : i + 1]).solution.flatten()
            rows.append(torch.full((k,), i, dtype=torch.long))
            cols.append(top)
            values.append(v * math.sqrt(d_out) / self.config.scaling)
        self.indices.copy_(torch.stack([torch.cat(rows), torch.cat(cols)]).to(self.indices.device))
        self.spectrum.copy_(torch.cat(values).to(self.spectrum))
        return counts
