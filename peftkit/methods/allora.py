"""ALLoRA (Huang & Balestriero, 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws").

LoRA without dropout and without scaling (``s = 1``): ``y = x Wᵀ + b + B A x``, ``ΔW = B A`` (exact merge).
Init as LoRA (``A`` Kaiming-uniform, ``B = 0``): identity at init.

The method's training change (*inferred* from the abstract; no official code) rescales each gradient row by
the inverse of its parameter row's norm before the optimizer step:

``grad_p ← grad_p / sqrt(||p||² + eps)`` for every row ``p`` of ``A`` (``[in]``) and of ``B`` (``[r]``),

so a zero row's gradient is multiplied by ``1/sqrt(eps)`` (fast escape from ``B = 0``) and large rows take
smaller steps. Spec decision: per-row norm, ``eps = 1/η² = 1e-3`` (factor ≈ 31.6 at zero).

Implementation: the forward passes ``A`` and ``B`` through an identity autograd function whose backward applies
the factor (from the weights at forward time, which the optimizer has not yet changed). So the rescaling is
part of the graph: it survives ``deepcopy`` / reloading (unlike tensor hooks), and with gradient accumulation
each micro-batch's gradient is scaled before it is summed, as a pre-step rescale of the sum would be.
Supported: ``nn.Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    LowRank,
    PositiveFloat,
    PositiveInt,
    add_lowrank,
    init_lora_pair,
    lowrank_pair,
    register,
    require_rank_fits,
)


def allora_grad_factor(p: Tensor, eps: float) -> Tensor:
    """The per-row gradient factor ``1 / sqrt(||p_row||² + eps)``, shape ``[rows, 1]``."""
    return torch.rsqrt(p.detach().pow(2).sum(dim=-1, keepdim=True) + eps)


class _RowGradScale(torch.autograd.Function):
    """Identity in the forward pass; the backward multiplies each row's gradient by ``allora_grad_factor``."""

    @staticmethod
    def forward(ctx: Any, p: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(p)
        ctx.eps = eps
        return p.view_as(p)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        return grad * allora_grad_factor(p, ctx.eps), None


@dataclass(kw_only=True)
class ALLoRAConfig(AdapterConfig):
    """Settings of ALLoRA (no ``alpha`` and no ``dropout``: the method drops both).

    Attributes:
        r: rank of the update.
        eps: ``1/η²`` in the gradient factor ``1 / sqrt(||p||² + eps)``. Default 1e-3 (spec decision, inferred).
        grad_scaling: apply the row-wise gradient rescaling (``False``: plain LoRA with ``s = 1``, no dropout).
    """

    r: PositiveInt = 8
    eps: PositiveFloat = 1e-3
    grad_scaling: bool = True

    tiny_fields: ClassVar[dict] = {"r": 2}
    variant_fields: ClassVar[list[dict]] = [{"grad_scaling": False}]


@register("allora", ALLoRAConfig)
class ALLoRA(Adapter[ALLoRAConfig]):
    """LoRA with ``s = 1``, no dropout and norm-adaptive gradient rows; see the module docstring."""

    def __init__(self, base: BaseView, config: ALLoRAConfig) -> None:
        super().__init__(base, config)
        require_rank_fits(config.r, base)
        self.A, self.B = lowrank_pair(base, config.r)

    def reset_parameters(self, base: BaseView) -> None:
        init_lora_pair(self.A, self.B)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``A``, ``B`` as the forward uses them (with the gradient rescaling when it applies)."""
        if self.config.grad_scaling and torch.is_grad_enabled():
            return _RowGradScale.apply(self.A, self.config.eps), _RowGradScale.apply(self.B, self.config.eps)
        return self.A, self.B

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        a, b = self.factors()
        hidden = x @ a.T
        return add_lowrank(base_out, hidden, b)

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.B @ self.A

    def lowrank(self, base: BaseView) -> LowRank:
        return LowRank(self.A, self.B, 1.0)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: ALLoRAConfig) -> int:
        return config.r * (base.in_features + base.out_features)
