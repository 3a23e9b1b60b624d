"""Full fine-tuning of a module, as an adapter: a dense ``ΔW`` (and ``Δb``) that starts at zero.

This is what ``modules_to_save`` uses (a new task head trains whole and is saved with the adapter), so it is
part of the core; it is also registered as the method ``"full"``, the "full fine-tuning" reference for a
single layer: ``y = base_op(x, W + ΔW, b + Δb)``.
Identity at init; merge is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import BaseView, layer_kind
from .config import AdapterConfig
from .protocol import Adapter
from .registry import register


@dataclass(kw_only=True)
class FullConfig(AdapterConfig):
    """No settings besides the targets: every weight (and bias) entry of the targeted modules trains."""


@register("full", FullConfig)
class Full(Adapter):
    """Dense delta on the whole weight and bias."""

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        return layer_kind(base) is not None

    def __init__(self, base: BaseView, config: FullConfig) -> None:
        super().__init__(base, config)
        self.weight_delta = nn.Parameter(torch.empty(base.weight_shape))
        self.bias_delta = nn.Parameter(torch.empty(base.out_features)) if base.bias is not None else None

    def reset_parameters(self, base: BaseView) -> None:
        self.weight_delta.zero_()  # ΔW = 0, Δb = 0: identity at init
        if self.bias_delta is not None:
            self.bias_delta.zero_()

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        return base_out + base.apply(x, self.weight_delta, self.bias_delta)

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.weight_delta

    def delta_bias(self, base: BaseView) -> Tensor | None:
        return self.bias_delta

    @classmethod
    def expected_trainable(cls, base: BaseView, config: FullConfig) -> int:
        return int(torch.Size(base.weight_shape).numel()) + (base.out_features if base.bias is not None else 0)
