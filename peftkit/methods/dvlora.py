"""DV-LoRA, the vector-scaled LoRA of EndoDAC (Cui et al., 2024, "EndoDAC: Efficient Adapting Foundation
Model for Self-Supervised Depth Estimation from Any Endoscopic Camera"; official ``DVLinear``).

A LoRA pair with a trainable scale vector on each factor: ``U [r, 1]`` scales the rows of ``A``, ``V [out, 1]``
the rows of ``B``:

``y = x Wᵀ + b + (alpha / r) · drop(x) (A ⊙ U)ᵀ (B ⊙ V)ᵀ``, ``ΔW = (alpha / r) (B ⊙ V)(A ⊙ U)`` (exact merge).

Init (official): ``A``, ``U``, ``V`` Kaiming-uniform (``a=√5``; for ``U``/``V`` the fan-in is 1, so
``U(−1, 1)``), ``B = 0``: identity at init.

Two training phases (official ``trainer_end_to_end.py``): while ``global_step < warm_up_step`` only ``A``, ``B``
train; afterwards ``A``, ``B`` freeze and only ``U``, ``V`` train. :meth:`DVLoRA.step` (called by the trainer
after every optimizer step) switches the phase and sets ``requires_grad`` accordingly; the forward also
detaches the frozen pair, so the phase holds even where the core resets ``requires_grad`` (``set_adapter``).
``warm_up_step=None`` trains all four throughout. The official neck and depth-head training are not part of
the adapter. Supported: ``nn.Linear`` and GPT-2 ``Conv1D``.
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
    LowRank,
    NonNegativeInt,
    RankConfig,
    add_lowrank,
    init_lora_pair,
    input_dropout,
    lowrank_pair,
    register,
    require_rank_fits,
)


@dataclass(kw_only=True)
class DVLoRAConfig(RankConfig):
    """Settings of DV-LoRA (defaults: the official EndoDAC code).

    Attributes:
        r: rank of the update. Default 4.
        alpha: scale numerator, ``s = alpha / r``. Default ``alpha = r = 4`` (``s = 1``).
        dropout: dropout probability on the adapter branch's input (off in eval mode).
        warm_up_step: optimizer steps of phase 1 (``A``, ``B`` train); from then on only ``U``, ``V`` train.
            ``None``: one phase, all four train. Default 20 000.
    """

    r: int = 4
    alpha: float = 4.0
    warm_up_step: NonNegativeInt | None = 20_000

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 4.0}
    variant_fields: ClassVar[list[dict]] = [{"warm_up_step": None, "dropout": 0.1}]


@register("dvlora", DVLoRAConfig)
class DVLoRA(Adapter[DVLoRAConfig]):
    """Vector-scaled LoRA with a two-phase schedule; see the module docstring."""

    def __init__(self, base: BaseView, config: DVLoRAConfig) -> None:
        super().__init__(base, config)
        r = config.r
        require_rank_fits(r, base)
        self.scale = config.scale
        self.A, self.B = lowrank_pair(base, r)
        self.U = nn.Parameter(torch.empty(r, 1))
        self.V = nn.Parameter(torch.empty(base.out_features, 1))
        self.dropout = input_dropout(config.dropout)
        self.phase = 1 if config.warm_up_step is not None else 0  # 0: no phases

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        init_lora_pair(self.A, self.B)  # draws A first, then U and V: the official order
        for p in (self.U, self.V):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    # ------------------------------------------------------------------------------------------------ phases
    def set_phase(self, phase: int) -> None:
        """Phase 1: ``A``, ``B`` train; phase 2: ``U``, ``V`` train; 0: all four. Sets ``requires_grad`` when the
        adapter is trainable (active)."""
        if phase not in (0, 1, 2):
            raise ValueError(f"phase must be 0, 1 or 2, got {phase}")
        self.phase = phase
        if any(p.requires_grad for p in self.parameters()):
            for p in (self.A, self.B):
                p.requires_grad_(phase != 2)
            for p in (self.U, self.V):
                p.requires_grad_(phase != 1)

    def step(self, global_step: int) -> None:
        warm = self.config.warm_up_step
        self.set_phase(0 if warm is None else 1 if global_step < warm else 2)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``A ⊙ U`` and ``B ⊙ V``, with the pair frozen in this phase detached."""
        a, b, u, v = self.A, self.B, self.U, self.V
        if self.phase == 1:
            u, v = u.detach(), v.detach()
        elif self.phase == 2:
            a, b = a.detach(), b.detach()
        return a * u, b * v

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        down, up = self.factors()
        hidden = self.dropout(x) @ down.T
        return add_lowrank(base_out, hidden, up, self.scale)

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.scale * ((self.B * self.V) @ (self.A * self.U))

    def lowrank(self, base: BaseView) -> LowRank:
        return LowRank(self.A * self.U, self.B * self.V, self.scale)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: DVLoRAConfig) -> int:
        return config.r * (base.in_features + base.out_features) + config.r + base.out_features
