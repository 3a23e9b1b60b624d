"""LoRA-XS (Bałazy et al., 2024, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters").

The truncated SVD of the frozen weight, ``W ≈ U_r Σ_r V_rᵀ``, gives two *frozen* factors, ``B = U_r``
(``[out, r]``) and ``A = Σ_r V_rᵀ`` (``[r, in]``, the singular values sit in ``A`` as in the official code);
only a small ``R [r, r]`` trains:

``y = x Wᵀ + b + s · B R A drop(x)``, ``s = alpha / r``, ``ΔW = s · B R A`` (exact merge).

``R ~ N(0, (1e-5)²)`` at init, so the adapter is only *approximately* the identity (exempt from the exact
identity check). ``A`` and ``B`` are persistent buffers: a saved adapter carries them, so it reloads onto the
untouched base without recomputing the SVD. The official code uses sklearn's ``TruncatedSVD`` (randomised);
the spec's decision, followed here, is an exact ``torch.linalg.svd`` in float64 with a deterministic sign
convention: the largest-``|entry|`` of each column of ``U`` is positive (the matching row of ``Vᵀ`` flips
with it). Supported layers: ``nn.Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    BaseView,
    LowRank,
    RankConfig,
    add_lowrank,
    input_dropout,
    register,
    require_rank_fits,
)

from .lora import fix_signs, float_dtype

R_INIT_STD = 1e-5  # spec: R ~ N(0, (1e-5)²)


@torch.no_grad()
def svd_signed(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Full (thin) SVD ``W = U diag(S) Vh`` in float64 with a deterministic sign per singular pair.

    The entry of largest magnitude in each column of ``U`` is made positive and the matching row of ``Vh`` is
    flipped with it (:func:`~peftkit.methods.lora.fix_signs`, the convention of peftkit's SVD inits), so the
    factors do not depend on the LAPACK backend's sign choice.

    Returns:
        ``U [out, q]``, ``S [q]``, ``Vh [q, in]`` in float64, ``q = min(out, in)``.
    """
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    u, vh = fix_signs(u, vh)
    return u, s, vh


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """The smallest ``r`` with ``Σ_{i≤r} σ_i² / Σ σ² ≥ energy`` (at least 1, at most ``len(σ)``), in float64: SVFit's
    energy rank and Comp-LoRA's energy-chosen ``k_top``."""
    squares = singular_values.detach().double().square()
    kept = squares.cumsum(0) / squares.sum()
    return max(1, min(int((kept < energy).sum()) + 1, squares.numel()))


@dataclass(kw_only=True)
class LoRAXSConfig(RankConfig):
    """Settings of LoRA-XS (:class:`RankConfig`'s fields and defaults).

    Attributes:
        r: rank of the frozen SVD bases; ``R`` has ``r²`` trainable entries. At most ``min(in, out)``.
        alpha: scale numerator, ``s = alpha / r``. Default ``alpha = r = 8`` (``s = 1``, the paper's
            math/commonsense setting; its GLUE runs use ``alpha = 16``).
        dropout: dropout probability on the adapter branch's input (off in eval mode).
    """

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 4.0}
    variant_fields: ClassVar[list[dict]] = [{"dropout": 0.1}]


@register("loraxs", LoRAXSConfig)
class LoRAXS(Adapter[LoRAXSConfig]):
    """``y = base(x) + s · B R A drop(x)`` with frozen SVD factors ``A``, ``B``; see the module docstring."""

    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec (LoRA-XS): R ~ N(0, (1e-5)^2), W is not modified; identity at init is only "
        "approximate (delta ~ 1e-5 * sigma)"
    }

    def __init__(self, base: BaseView, config: LoRAXSConfig) -> None:
        super().__init__(base, config)
        r = config.r
        require_rank_fits(r, base)
        self.scale = config.scale
        u, s, vh = svd_signed(base.weight)
        dtype = float_dtype(base)
        self.register_buffer("A", (s[:r, None] * vh[:r]).to(dtype))  # Σ_r V_rᵀ  [r, in]
        self.register_buffer("B", u[:, :r].contiguous().to(dtype))  # U_r  [out, r]
        self.R = nn.Parameter(torch.empty(r, r, dtype=dtype, device=base.device))
        self.dropout = input_dropout(config.dropout)

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        nn.init.normal_(self.R, std=R_INIT_STD)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        hidden = self.dropout(x) @ self.A.T  # [.., r]
        up = self.B @ self.R  # [out, r]
        return add_lowrank(base_out, hidden, up, self.scale)

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.scale * (self.B @ self.R @ self.A)

    def lowrank(self, base: BaseView) -> LowRank:
        return LowRank(self.A, self.B @ self.R, self.scale)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: LoRAXSConfig) -> int:
        return config.r * config.r
