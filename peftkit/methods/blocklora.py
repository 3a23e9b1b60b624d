"""Block-LoRA (Zhou et al., 2025, "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based
Few-Shot Learning"). No official code: the parametrisation below is *inferred* (spec decision).

The down-projection is one block ``A_s [r, in/n]`` shared by the ``n`` column blocks of ``A = [A_s, …, A_s]``.
So the input's ``n`` feature chunks are first *added* and then projected once (the paper's "multiplication
into addition" saving):

``y = x Wᵀ + b + s · B A_s (Σ_j x_j)ᵀ``, ``x = [x_1 | … | x_n]``, ``s = alpha / r``,
``ΔW = s · B [A_s, A_s, …, A_s]`` (exact merge).

Init: ``A_s`` Kaiming-uniform, ``B = 0``: identity at init. Requires ``n | in`` (a layer with another width
is refused with ``UnsupportedLayerError``). Supported: ``nn.Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftkit.core.base import BaseView
from peftkit.core.errors import UnsupportedLayerError
from peftkit.core.protocol import (
    Adapter,
    AdapterConfig,
    LowRank,
    add_lowrank,
    input_dropout,
    require_positive_int,
    require_probability,
)
from peftkit.core.registry import register


@dataclass(kw_only=True)
class BlockLoRAConfig(AdapterConfig):
    """Settings of Block-LoRA (defaults: spec decision, the CLIP-LoRA few-shot setting).

    Attributes:
        r: rank of the update. Default 2.
        alpha: scale numerator, ``s = alpha / r``. Default 1.
        n: number of input blocks sharing the down-projection; must divide the layer's input width. Default 8.
        dropout: dropout probability on the adapter branch's input (off in eval mode). Default 0.25.
    """

    r: int = 2
    alpha: float = 1.0
    n: int = 8
    dropout: float = 0.25

    def validate(self) -> None:
        for name in ("r", "n"):
            v = getattr(self, name)
            require_positive_int(name, v)
        require_probability("dropout", self.dropout)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def tiny(cls) -> BlockLoRAConfig:
        return cls(r=2, alpha=2.0, n=4, dropout=0.0)

    @classmethod
    def tiny_variants(cls) -> list[AdapterConfig]:
        return [cls.tiny(), cls.tiny().replace(n=2, dropout=0.25)]


@register("blocklora", BlockLoRAConfig)
class BlockLoRA(Adapter):
    """LoRA whose down-projection is one block shared by ``n`` input chunks; see the module docstring."""

    config: BlockLoRAConfig

    def __init__(self, base: BaseView, config: BlockLoRAConfig) -> None:
        super().__init__(base, config)
        if base.in_features % config.n:
            raise UnsupportedLayerError(
                f"Block-LoRA needs n={config.n} to divide the input width, got in_features={base.in_features}"
            )
        self.scale = config.scale
        self.block = base.in_features // config.n
        self.A_s = nn.Parameter(torch.empty(config.r, self.block))
        self.B = nn.Parameter(torch.empty(base.out_features, config.r))
        self.dropout = input_dropout(config.dropout)

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        nn.init.kaiming_uniform_(self.A_s, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        chunks = self.dropout(x).reshape(-1, self.config.n, self.block).sum(dim=1)  # Σ_j x_j  [tokens, in/n]
        return add_lowrank(base_out, chunks @ self.A_s.T, self.B, self.scale)

    def tiled(self) -> Tensor:
        """``[A_s, …, A_s]`` (``n`` times along the input axis), ``[r, in]``."""
        return self.A_s.repeat(1, self.config.n)

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.scale * (self.B @ self.tiled())

    def lowrank(self, base: BaseView) -> LowRank:
        return LowRank(self.tiled(), self.B, self.scale)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: BlockLoRAConfig) -> int:
        return config.r * base.in_features // config.n + base.out_features * config.r
