"""FourierFT (Gao et al., 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform"), as in
Hugging Face PEFT's ``FourierFTConfig``.

``n`` fixed random spectral locations ``idx = randperm(d_out·d_in, generator seeded by random_loc_seed)[:n]``
(rows ``idx // d_in``, cols ``idx % d_in``; the same seed everywhere, so every layer of one shape shares the
pattern) carry a trainable spectrum ``c ∈ R^n``: ``F = scatter(idx, c)`` (``d_out × d_in``, float32) and

``ΔW = Re(ifft2(F)) · scaling``,  ``y = base(x) + x ΔWᵀ``

with torch's ``"backward"`` normalisation (``ifft2`` includes ``1 / (d_out·d_in)``). Cost: one 2-D inverse FFT,
``O(d_out·d_in·log(d_out·d_in))``, per forward (training) plus the dense ``O(tokens·d_in·d_out)`` product; the
FFT always runs in float32 (or float64 for a float64 spectrum), never fp16/bf16.

The locations are a non-persistent buffer ``indices [2, n]`` rebuilt from ``random_loc_seed`` (saved in the
config), so only the spectrum is saved. Init (PEFT default, ``init="randn"``): ``c ~ N(0, 1)`` → **not
identity at init** (spec); ``init="zeros"`` (PEFT ``init_weights=True``) gives identity. Merge is exact.
PEFT's per-layer ``n_frequency_pattern`` is not implemented (one ``n`` per adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, InvalidConfigError, PositiveInt, register


@dataclass(kw_only=True)
class FourierFTConfig(AdapterConfig):
    """Settings of FourierFT (PEFT ``FourierFTConfig`` defaults).

    Attributes:
        n_frequency: number of trainable spectral coefficients per layer (at most ``d_in·d_out``).
        scaling: multiplies ``Re(ifft2(F))`` (PEFT default 150; the paper tunes it per task).
        random_loc_seed: seed of the spectral locations (same locations for every layer of one shape).
        init: ``"randn"`` (PEFT default: ``N(0, 1)``, not identity at init) or ``"zeros"`` (identity).
    """

    n_frequency: PositiveInt = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    init: Literal["randn", "zeros"] = "randn"

    tiny_fields: ClassVar[dict] = {"n_frequency": 24, "scaling": 10.0}
    variant_fields: ClassVar[list[dict]] = [{"init": "zeros", "random_loc_seed": 3}]


def spectral_indices(d_out: int, d_in: int, n: int, seed: int) -> Tensor:
    """PEFT's locations: ``[2, n]`` (rows, cols) of ``randperm(d_out·d_in)[:n]`` from a generator seeded by
    ``seed`` (LoCA's and QWHA's initial locations too)."""
    idx = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([idx // d_in, idx % d_in])


@register("fourierft", FourierFTConfig)
class FourierFT(Adapter[FourierFTConfig]):
    """``y = base(x) + x (scaling · Re ifft2(scatter(idx, c)))ᵀ``; see the module docstring."""

    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: 'spectrum ~ N(0,1) (init_weights=False, default) ⇒ not identity at init'",
    }

    def __init__(self, base: BaseView, config: FourierFTConfig) -> None:
        super().__init__(base, config)
        d_out, d_in, n = base.out_features, base.in_features, config.n_frequency
        if n > d_out * d_in:
            raise InvalidConfigError(
                f"n_frequency={n} is larger than this layer's d_out·d_in = {d_out * d_in} {tuple(base.weight_shape)}"
            )
        self.shape = (d_out, d_in)
        indices = spectral_indices(d_out, d_in, n, config.random_loc_seed).to(base.device)
        self.register_buffer("indices", indices, persistent=False)
        self.spectrum = nn.Parameter(torch.empty(n, device=base.device))

    def reset_parameters(self, base: BaseView) -> None:
        if self.config.init == "randn":
            self.spectrum.normal_()
        else:
            self.spectrum.zero_()

    def delta_weight(self, base: BaseView) -> Tensor:
        c = self.spectrum
        dtype = torch.promote_types(c.dtype, torch.float32)
        dense = torch.zeros(self.shape, dtype=dtype, device=c.device).index_put(
            (self.indices[0], self.indices[1]), c.to(dtype)
        )
        return (torch.fft.ifft2(dense).real * self.config.scaling).to(c.dtype)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        return base_out + base.apply(x, self.delta_weight(base).to(x.dtype))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: FourierFTConfig) -> int:
        return config.n_frequency
