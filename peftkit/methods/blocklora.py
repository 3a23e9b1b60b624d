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

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    BaseView,
    LowRank,
    PositiveInt,
    RankConfig,
    UnsupportedLayerError,
    add_lowrank,
    init_lora_pair,
    input_dropout,
    register,
)


@dataclass(kw_only=True)
class BlockLoRAConfig(RankConfig):
    """Settings of Block-LoRA (defaults: spec decision, the CLIP-LoRA few-shot setting).

    Attributes:
        r: rank of the update. Default 2.
        alpha: scale numerator, ``s = alpha / r``. Default 1.
        n: number of input blocks sharing the down-projection; must divide the layer's input width. Default 8.
        dropout: dropout probability on the adapter branch's input (off in eval mode). Default 0.25.
    """

    r: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    n: PositiveInt = 8

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 2.0, "n": 4, "dropout": 0.0}
    variant_fields: ClassVar[list[dict]] = [{"n": 2, "dropout": 0.25}]


@register("blocklora", BlockLoRAConfig)
class BlockLoRA(Adapter[BlockLoRAConfig]):
    """LoRA whose down-projection is one block shared by ``n`` input chunks; see the module docstring."""

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

    def reset_parameters(self, base: BaseView) -> None:
        init_lora_pair(self.A_s, self.B)

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
