"""ConvLoRA / DSCLoRA: a low-rank update of a ``nn.Conv2d`` kernel ("Distillation-Supervised Convolutional
Low-Rank Adaptation for Efficient Image Super-Resolution", 2025; official code Yaozzz666/DSCF-SR
``models/team23_DSCF.py``, ``Lora_Conv2d``: the loralib ``ConvLoRA`` factorisation).

For a conv with ``C_in`` inputs, ``C_out`` outputs and a square ``k×k`` kernel (groups = 1):
``A ∈ R^{(r·k)×(C_in·k)}``, ``B ∈ R^{(C_out·k)×(r·k)}``, ``ΔW = (B A).view(C_out, C_in, k, k) · α/r`` and
``y = conv2d(x, W + ΔW, b)`` with the base stride / padding / dilation. ``r·k²·(C_in + C_out)`` trainable;
``ΔW`` has rank ≤ ``r·k`` as a ``(C_out·k)×(C_in·k)`` matrix. Init: ``A`` Kaiming-uniform (a=√5), ``B = 0``
(identity at init). Merge is exact. This is not PEFT's LoRA-Conv2d (a ``Conv_k(C_in→r)`` then ``Conv1×1``).

Defaults ``r = 2``, ``α = 4`` (the official config's SPAB convs; ``conv_2`` / ``upsampler.0`` use r = 8, α = 16:
set them with ``overrides``). :func:`affinity_kd` is the paper's spatial-affinity distillation loss
(*inferred*: the exact form and weight are not in the release).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import Adapter, BaseView, InvalidConfigError, RankConfig, register


@dataclass(kw_only=True)
class ConvLoRAConfig(RankConfig):
    """Settings of ConvLoRA.

    Attributes:
        r: rank per kernel row (``ΔW`` has rank ≤ ``r·k``); default 2 (official SPAB convs).
        alpha: the update is scaled by ``alpha / r``; default 4.
        dropout: unused by the official layer; must stay 0 (the update is a weight delta, merged exactly).
    """

    targets: list[str] | str = r".*conv.*"
    r: int = 2
    alpha: float = 4.0

    def validate(self) -> None:
        super().validate()
        if self.dropout:
            raise InvalidConfigError("dropout must be 0 for ConvLoRA (the update is a weight delta)")

    tiny_fields: ClassVar[dict] = {"r": 1, "alpha": 2.0}
    variant_fields: ClassVar[list[dict]] = [{"r": 2}]


@register("convlora", ConvLoRAConfig)
class ConvLoRA(Adapter[ConvLoRAConfig]):
    """``y = conv(x, W + (α/r)·(B A).view(W.shape))``; see the module docstring."""

    kinds = frozenset({"conv2d"})

    @classmethod
    def supports(cls, base: nn.Module) -> bool:  # the factorisation needs groups = 1 and a square kernel
        return super().supports(base) and base.groups == 1 and base.kernel_size[0] == base.kernel_size[1]  # type: ignore[index]

    def __init__(self, base: BaseView, config: ConvLoRAConfig) -> None:
        super().__init__(base, config)
        k = base.kernel_size[0]
        c_out, c_in = base.out_features, base.in_features
        if config.r > min(c_in, c_out):
            raise InvalidConfigError(f"r={config.r} is larger than min(C_in, C_out) = {min(c_in, c_out)}")
        self.scale = config.alpha / config.r
        self.A = nn.Parameter(torch.empty(config.r * k, c_in * k))
        self.B = nn.Parameter(torch.empty(c_out * k, config.r * k))

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        bound = 1.0 / math.sqrt(self.A.shape[1])  # = kaiming_uniform_(A, a=√5)
        self.A.uniform_(-bound, bound)
        self.B.zero_()

    def delta_weight(self, base: BaseView) -> Tensor:
        return (self.B @ self.A).view(base.weight_shape) * self.scale

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        # conv(x, W + ΔW) + b == base_out + conv(x, ΔW) (linearity): the base conv stays the frozen module's
        return base_out + base.apply(x, self.delta_weight(base))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: ConvLoRAConfig) -> int:
        return config.r * base.kernel_size[0] ** 2 * (base.in_features + base.out_features)


def affinity_kd(student: Tensor, teacher: Tensor, p: int = 1, weight: float = 1.0) -> Tensor:
    """Spatial-feature-affinity distillation (inferred): ``weight · mean |S_s − S_t|^p`` with
    ``S = F̂ᵀ F̂`` for features ``F [B, C, H, W]`` flattened to ``C × HW`` and L2-normalised per spatial position
    (each column), student and teacher of the same spatial size."""
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in B/H/W")

    def affinity(f: Tensor) -> Tensor:
        cols = torch.nn.functional.normalize(f.flatten(2), dim=1)  # [B, C, HW], unit columns
        return cols.transpose(1, 2) @ cols  # [B, HW, HW]

    diff = affinity(student) - affinity(teacher.detach())
    return weight * (diff.abs() if p == 1 else diff.pow(2)).mean()
