"""WaRA (Heidari et al., 2025, "WaRA: Wavelet Low Rank Adaptation"). *Inferred*: the official repository was
not retrievable; the spec's closed form is used.

The layer input ``X [tokens, d_in]`` is split by an orthonormal single-level 2-D Haar DWT (``db1``) over the
(token, feature) axes into ``LL, LH, HL, HH``; one shared low-rank adapter ``M = B A`` (``A [r, d_in/2]``,
``B [d_out/2, r]``) maps every subband and the inverse DWT gives the update. The token-axis transforms cancel
and along the features ``Hᵀ (I₂ ⊗ M) H = M ⊗ I₂``, so (exactly)

``ΔW = s · (B A) ⊗ I₂``,  ``ΔW[2i+p, 2j+q] = s · (BA)[i, j] · δ_pq``,  ``y = base(x) + drop(x) ΔWᵀ``,

``s = alpha / r``. Fast forward: ``x.view(..., d_in/2, 2)``, the two phases ``q`` go through ``A`` then ``B``
and are interleaved back (``O(tokens · r · (d_in + d_out))``, no transform at all). ``explicit=True`` runs the
Haar DWT2 / IDWT2 literally with reshapes and adds (``O(tokens · d)`` for the transforms; needs an even
token count) and agrees with the closed form. It is also a low-rank product of rank ``2r``
(``down = A ⊗ I₂``, ``up = B ⊗ I₂``), so :meth:`lowrank` answers.

Count ``r · (d_in + d_out) / 2``; even ``d_in`` and ``d_out`` are required. Init (decision, LoRA-style):
``A`` Kaiming-uniform (``a=√5``), ``B = 0`` → identity at init. Merge exact. Not implemented: the spec's
multi-level variant (``levels > 1``) and the v2 spatial-grid DWT (which reduces to plain LoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    BaseView,
    InvalidConfigError,
    LowRank,
    RankConfig,
    input_dropout,
    register,
    seeded_generator,
)

_SQRT2 = math.sqrt(2.0)


def haar(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Orthonormal single-level Haar analysis along ``dim`` (even length): ``(low, high)``."""
    x = x.movedim(dim, -1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return ((even + odd) / _SQRT2).movedim(-1, dim), ((even - odd) / _SQRT2).movedim(-1, dim)


def ihaar(low: Tensor, high: Tensor, dim: int) -> Tensor:
    """Inverse of :func:`haar`: interleave ``(low ± high) / √2`` along ``dim``."""
    low, high = low.movedim(dim, -1), high.movedim(dim, -1)
    out = torch.stack(((low + high) / _SQRT2, (low - high) / _SQRT2), dim=-1).flatten(-2)
    return out.movedim(-1, dim)


@dataclass(kw_only=True)
class WaRAConfig(RankConfig):
    """Settings of WaRA (spec decisions).

    Attributes:
        r: rank of the shared subband adapter ``B A`` (default 8).
        alpha: ``s = alpha / r`` (default 16).
        dropout: dropout on the adapter branch's input.
        explicit: run the literal Haar DWT2 / IDWT2 over (tokens, features) (reference path; needs inputs
            ``[..., tokens, d_in]`` with an even token count) instead of the closed form.
    """

    alpha: float = 16.0
    explicit: bool = False

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 4.0}
    variant_fields: ClassVar[list[dict]] = [{"r": 3, "alpha": 3.0, "seed": 2}]


@register("wara", WaRAConfig)
class WaRA(Adapter[WaRAConfig]):
    """``y = base(x) + s · x ((B A) ⊗ I₂)ᵀ``; see the module docstring."""

    def __init__(self, base: BaseView, config: WaRAConfig) -> None:
        super().__init__(base, config)
        d_out, d_in = base.out_features, base.in_features
        if d_out % 2 or d_in % 2:
            raise InvalidConfigError(f"WaRA needs even d_in and d_out, got d_in={d_in}, d_out={d_out}")
        self.scale = config.scale
        self.A = nn.Parameter(torch.empty(config.r, d_in // 2, device=base.device))
        self.B = nn.Parameter(torch.empty(d_out // 2, config.r, device=base.device))
        self.dropout = input_dropout(config.dropout)

    def reset_parameters(self, base: BaseView) -> None:
        g = seeded_generator(self.config.seed)
        bound = 1.0 / math.sqrt(self.A.shape[1])  # kaiming_uniform_(a=√5)
        self.A.copy_(torch.rand(self.A.shape, generator=g) * 2 * bound - bound)
        self.B.zero_()

    def _subband(self, z: Tensor) -> Tensor:
        return (z @ self.A.T) @ self.B.T

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        x = self.dropout(x).to(self.A.dtype)
        if self.config.explicit:
            return base_out + self.scale * self.explicit_update(x).to(base_out.dtype)
        phases = x.reshape(*x.shape[:-1], -1, 2).transpose(-1, -2)  # [..., 2, d_in/2]
        y = self._subband(phases).transpose(-1, -2).reshape(base_out.shape)
        return base_out + self.scale * y.to(base_out.dtype)

    def explicit_update(self, x: Tensor) -> Tensor:
        """``IDWT2(M · DWT2(x))`` over the (token, feature) axes of ``x [..., tokens, d_in]`` (unscaled)."""
        if x.dim() < 2 or x.shape[-2] % 2:
            raise ValueError(f"explicit WaRA needs [..., tokens, d_in] with an even token count, got {tuple(x.shape)}")
        f_low, f_high = haar(x, -1)
        bands = [haar(f_low, -2), haar(f_high, -2)]
        out = [[self._subband(b) for b in pair] for pair in bands]  # the shared adapter on every subband
        return ihaar(ihaar(*out[0], dim=-2), ihaar(*out[1], dim=-2), dim=-1)

    def _kron_eye(self, m: Tensor) -> Tensor:
        return torch.kron(m, torch.eye(2, dtype=m.dtype, device=m.device))

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.scale * self._kron_eye(self.B @ self.A)

    def lowrank(self, base: BaseView) -> LowRank:
        return LowRank(self._kron_eye(self.A), self._kron_eye(self.B), self.scale)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: WaRAConfig) -> int:
        return config.r * (base.in_features + base.out_features) // 2
