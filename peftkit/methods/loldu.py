"""LoLDU (Shi et al., 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning"; official code SKDDJ/LoLDU, ``minloldu/loldu.py``).

The LU factorisation with partial pivoting of the frozen weight (flattened to ``[out, fan_in]``),
``W = P L U = P L diag(D) U_unit`` (``torch.linalg.lu`` in float32, ``D = diag(U)``, ``U_unit = U / D``), gives
frozen ``P`` (kept as an index vector ``perm``: ``P M == M[perm]``), ``L_r = L[:, :r]`` (unit lower-triangular
columns) and ``U_r = U_unit[:r]`` (unit-diagonal rows); only ``z ∈ R^r`` (the diagonal, ``vector_z``
officially) trains, initialised to ``D_r = D[:r]``. The paper's layer is ``W_eff = W_res + c·P L_r diag(z) U_r``
with the residual ``W_res = W − c₀·P L_r diag(D_r) U_r`` and ``c = alpha / r``. The user's base weight is never
changed: the adapter applies only the *difference* to the untouched base,

``y = base(x) + ((x U_rᵀ) ⊙ (c·z − c₀·D_r)) (P L_r)ᵀ``, ``ΔW = P L_r diag(c·z − c₀·D_r) U_r``

(``c = c₀`` unless ``train_scaling``), which equals the paper's ``W_eff`` and is exactly the identity at init.
The forward is two thin products through ``r`` channels (a conv with the base geometry, then a 1x1 conv, for
``nn.Conv2d``; a lookup for ``nn.Embedding``); no dense ``[out, in]`` matrix is made.

Saved file (``state_dict``): ``perm [out]`` (int64), ``L [out, r]``, ``U [r, fan_in]``, ``D [r]`` (persistent
buffers: an LU is not bit-identical across machines, so the factors are stored, not recomputed), the
trainable ``z [r]`` and, with ``train_scaling``, ``c`` (scalar): ``r·(out + fan_in + 2)`` numbers plus ``out``
indices per layer, about a rank-``r`` LoRA's size.

Decisions: ``c`` is frozen by default (the official parameter filter trains only ``vector_z``;
``train_scaling=True`` makes it a parameter); zero pivots are clamped sign-preservingly to ``|D_i| ≥ eps``
(``eps = 1e-8``) before dividing, so ``U_unit`` stays finite and ``P L diag(D) U_unit`` still equals ``W`` (the
row of a clamped pivot is up to ``1/eps`` times larger: finite in float32/bfloat16, but it can overflow a
float16 base's range);
``r=None`` means full rank ``min(out, fan_in)`` per layer (the package's ``rank=768`` is full rank on ViT-B),
``alpha = 1`` (``from_linear``'s default, ``c = 1/r``); only the ``"lu"`` init of ``z`` (the official default;
the other ``init_method`` values are experiments in the code, not the method) and no dropout (spec: 0).
Supported layers: ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding`` and ``nn.Conv2d`` with ``groups=1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    LowRank,
    PositiveFloat,
    PositiveInt,
    add_lowrank,
    register,
    require_rank_fits,
)

from .lora import float_dtype

PIVOT_EPS = 1e-8  # spec decision: sign-preserving clamp |D_i| >= 1e-8


@torch.no_grad()
def ldu(weight: Tensor, eps: float = PIVOT_EPS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``W = P L diag(D) U_unit`` from ``torch.linalg.lu`` in float32 (``W`` flattened to ``[out, fan_in]``).

    Pivots with ``|D_i| < eps`` (zero pivots of a singular ``W``) are clamped to ``±eps`` keeping their sign
    (``+eps`` for an exact zero) before ``U`` is divided by them, so ``U_unit`` is finite; the product still
    reproduces ``W`` because ``diag(D)`` multiplies back what was divided.

    Returns:
        ``perm [out]`` (``P M == M[perm]``), ``L [out, q]``, ``D [q]``, ``U_unit [q, fan_in]``,
        ``q = min(out, fan_in)``.
    """
    p, lower, upper = torch.linalg.lu(weight.detach().reshape(weight.shape[0], -1).float())
    pivots = upper.diagonal()
    pivots = torch.where(pivots < 0, pivots.clamp(max=-eps), pivots.clamp(min=eps))
    return p.argmax(dim=1), lower, pivots, upper / pivots[:, None]


@dataclass(kw_only=True)
class LoLDUConfig(AdapterConfig):
    """Settings of LoLDU.

    Attributes:
        r: how many pivots train; ``None`` (default) = full rank ``min(out, fan_in)`` of each layer (the
            official package's ``rank=768`` on ViT-B). At most ``min(out, fan_in)``.
        alpha: scale numerator, ``c = alpha / r`` (default 1, the official ``from_linear``).
        train_scaling: train ``c`` too (an ``nn.Parameter`` in the official code, but its parameter filter
            trains only ``z``; spec decision: frozen by default).
        eps: smallest ``|D_i|`` a pivot is clamped to (sign kept) before ``U`` is divided by it.
    """

    r: PositiveInt | None = None
    alpha: PositiveFloat = 1.0
    train_scaling: bool = False
    eps: PositiveFloat = PIVOT_EPS

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 2.0}
    variant_fields: ClassVar[list[dict]] = [{"train_scaling": True}]


def loldu_rank(base: BaseView, config: LoLDUConfig) -> int:
    """The rank this layer uses: ``config.r``, or the full ``min(out, fan_in)`` when it is ``None``."""
    fan_in = base.in_features * math.prod(base.kernel_size)
    return config.r if config.r is not None else min(base.out_features, fan_in)


@register("loldu", LoLDUConfig)
class LoLDU(Adapter[LoLDUConfig]):
    """``y = base(x) + ((x U_rᵀ) ⊙ (c·z − c₀·D_r)) (P L_r)ᵀ``; see the module docstring."""

    kinds = frozenset({"linear", "embedding", "conv2d"})

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        return super().supports(base) and getattr(base, "groups", 1) == 1  # U_r has the base's ungrouped layout

    def __init__(self, base: BaseView, config: LoLDUConfig) -> None:
        super().__init__(base, config)
        r = loldu_rank(base, config)
        require_rank_fits(r, base)
        self.kind = base.kind
        self.scale0 = config.alpha / r  # c₀, the scale the residual was taken with
        kw = {"dtype": float_dtype(base), "device": base.device}
        self.register_buffer("perm", torch.empty(base.out_features, dtype=torch.long, device=base.device))
        self.register_buffer("L", torch.empty(base.out_features, r, **kw))  # L_r
        self.register_buffer("U", torch.empty(r, *base.weight_shape[1:], **kw))  # U_r in the base layout
        self.register_buffer("D", torch.empty(r, **kw))  # D_r, the (clamped) pivots at init
        self.z = nn.Parameter(torch.empty(r, **kw))
        self.c: nn.Parameter | float = nn.Parameter(torch.empty((), **kw)) if config.train_scaling else self.scale0

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        r = self.D.shape[0]
        perm, lower, pivots, upper_unit = ldu(base.weight, self.config.eps)
        self.perm.copy_(perm)
        self.L.copy_(lower[:, :r])
        self.U.copy_(upper_unit[:r].reshape(self.U.shape))
        self.D.copy_(pivots[:r])
        self.z.copy_(self.D)  # copied after the cast, so c·z − c₀·D is exactly 0 at init
        if isinstance(self.c, nn.Parameter):
            self.c.fill_(self.scale0)

    def coefficients(self) -> Tensor:
        """``c·z − c₀·D_r``: the diagonal of the update in the LDU basis."""
        return self.c * self.z - self.scale0 * self.D

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        hidden = base.apply(x, self.U)  # x U_rᵀ: [.., r] (or [B, r, H, W] for a conv)
        permuted_lower = self.L[self.perm]  # P L_r
        if self.kind == "conv2d":
            hidden = hidden * self.coefficients()[:, None, None]
            return base_out + F.conv2d(hidden, permuted_lower[:, :, None, None])
        return add_lowrank(base_out, hidden * self.coefficients(), permuted_lower)

    def delta_weight(self, base: BaseView) -> Tensor:
        up = self.L[self.perm] * self.coefficients()
        return (up @ self.U.reshape(up.shape[1], -1)).reshape(base.weight_shape)

    def lowrank(self, base: BaseView) -> LowRank | None:
        if self.kind != "linear":
            return None
        return LowRank(self.U, self.L[self.perm] * self.coefficients(), 1.0)

    def effective_rank(self) -> int:
        return self.D.shape[0]

    @classmethod
    def expected_trainable(cls, base: BaseView, config: LoLDUConfig) -> int:
        return loldu_rank(base, config) + (1 if config.train_scaling else 0)
