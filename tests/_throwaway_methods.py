"""Tiny methods registered temporarily by tests: they prove a new method gets the whole conformance suite by
registering, and give the error tests a method that cannot be merged. Never registered at import time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.base import BaseView, layer_kind
from peftkit.core.config import AdapterConfig
from peftkit.core.protocol import Adapter
from peftkit.core.registry import list_methods, register, unregister


@dataclass(kw_only=True)
class ScaledDiagConfig(AdapterConfig):
    """``ΔW = scale · diag(d)`` on the leading square block of a Linear weight."""

    scale: float = 1.0

    @classmethod
    def tiny(cls) -> ScaledDiagConfig:
        return cls(scale=2.0)


class ScaledDiag(Adapter):
    """``y = base(x) + base_op(x, scale · diag(d))``; ``d = 0`` at init."""

    def __init__(self, base: BaseView, config: ScaledDiagConfig) -> None:
        super().__init__(base, config)
        self.d = nn.Parameter(torch.zeros(min(base.out_features, base.in_features)))

    def delta_weight(self, base: BaseView) -> Tensor:
        n = self.d.shape[0]
        delta = torch.zeros(base.out_features, base.in_features, dtype=self.d.dtype, device=self.d.device)
        return delta.index_put((torch.arange(n), torch.arange(n)), self.config.scale * self.d)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        return base_out + base.apply(x, self.delta_weight(base))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: AdapterConfig) -> int:
        return min(base.out_features, base.in_features)


@dataclass(kw_only=True)
class TanhBranchConfig(AdapterConfig):
    """A nonlinear side branch ``B tanh(A x)``: no weight-space equivalent, so it cannot be merged."""

    r: int = 2

    @classmethod
    def tiny(cls) -> TanhBranchConfig:
        return cls(r=2)


class TanhBranch(Adapter):
    """``y = base(x) + B tanh(A x)`` with ``B = 0`` at init."""

    exempt: ClassVar[dict[str, str]] = {"mergeable": "test method: the tanh branch has no weight-space equivalent"}

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        return layer_kind(base) == "linear"

    def __init__(self, base: BaseView, config: TanhBranchConfig) -> None:
        super().__init__(base, config)
        self.A = nn.Parameter(torch.randn(config.r, base.in_features) / base.in_features**0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, config.r))

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        return base_out + torch.tanh(x @ self.A.T) @ self.B.T

    @classmethod
    def expected_trainable(cls, base: BaseView, config: TanhBranchConfig) -> int:
        return config.r * (base.in_features + base.out_features)


THROWAWAY = {"scaled_diag": (ScaledDiag, ScaledDiagConfig), "tanh_branch": (TanhBranch, TanhBranchConfig)}


@contextlib.contextmanager
def registered(name: str) -> Iterator[type[Adapter]]:
    """Register the throwaway method ``name`` for the duration of the block, then remove it again."""
    adapter_class, config_class = THROWAWAY[name]
    assert name not in list_methods(), f"{name!r} leaked from an earlier test"
    register(name, config_class)(adapter_class)
    try:
        yield adapter_class
    finally:
        unregister(name)
