"""LoRA and rsLoRA.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
``y = base(x) + s · B A drop(x)`` with ``A [r, in]``, ``B [out, r]``, ``s = alpha / r``.
rsLoRA (Kalajdzievski, 2023) only changes the scale to ``s = alpha / sqrt(r)`` (``rslora=True``).

Supported layers: ``nn.Linear`` and GPT-2 ``Conv1D`` (``A`` acts on the input features), ``nn.Conv2d``
(``A`` is a conv with the base kernel, stride, padding and dilation; ``B`` a 1x1 conv), ``nn.Embedding``
(``A [r, vocab]`` is looked up by id, as in PEFT). Init as PEFT: ``A`` Kaiming-uniform (``a=√5``) or
Gaussian ``N(0, 1/r²)``, ``B = 0``; for embeddings ``A = 0`` and ``B ~ N(0, 1)``. Identity at init.
``ΔW = s · B A`` (exact merge). With ``bias=True`` (PEFT ``lora_bias``) ``B`` carries a bias, scaled by ``s``
(not on embeddings, which have no bias to merge it into; PEFT refuses it there too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.base import BaseView, layer_kind
from peftkit.core.errors import InvalidConfigError, UnsupportedLayerError
from peftkit.core.protocol import (
    Adapter,
    AdapterConfig,
    LowRank,
    add_lowrank,
    require_positive_int,
    require_probability,
    require_rank_fits,
)
from peftkit.core.registry import register


@dataclass(kw_only=True)
class LoRAConfig(AdapterConfig):
    """Settings of LoRA / rsLoRA.

    Attributes:
        r: rank of the update.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
            Default ``alpha = r = 8`` (PEFT's default, spec decision).
        dropout: dropout probability on the LoRA branch's input (off in eval mode).
        rslora: use the rank-stabilised scale ``alpha / sqrt(r)``.
        bias: give ``B`` a trainable bias (PEFT ``lora_bias``); merging then changes the base bias.
        init: ``"kaiming"`` (PEFT default) or ``"gaussian"`` initialisation of ``A`` (``B`` starts at zero).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    bias: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"

    def validate(self) -> None:
        require_positive_int("r", self.r)
        require_probability("dropout", self.dropout)
        if self.init not in ("kaiming", "gaussian"):
            raise InvalidConfigError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @classmethod
    def tiny(cls) -> LoRAConfig:
        return cls(r=2, alpha=4.0)

    @classmethod
    def tiny_variants(cls) -> list[AdapterConfig]:
        t = cls.tiny()
        return [t, t.replace(rslora=True), t.replace(bias=True, dropout=0.1), t.replace(init="gaussian")]


def _identity(x: Tensor) -> Tensor:
    return x


@register("lora", LoRAConfig)
class LoRA(Adapter):
    """``y = base(x) + s · B A drop(x)``; see the module docstring."""

    config: LoRAConfig

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        kind = layer_kind(base)
        return kind in ("linear", "embedding") or (kind == "conv2d" and base.groups == 1)

    def __init__(self, base: BaseView, config: LoRAConfig) -> None:
        super().__init__(base, config)
        r = config.r
        require_rank_fits(r, base)
        if config.bias and base.kind == "embedding":
            raise UnsupportedLayerError(
                "bias=True is not supported on an Embedding: nn.Embedding has no bias to merge it into "
                "(PEFT refuses lora_bias there too)"
            )
        self.kind = base.kind
        self.scale = config.scale
        # A has the base weight's layout with r outputs, so base.apply(x, A) is the down-projection for
        # every layer kind (linear, conv with the base geometry, embedding lookup).
        self.A = nn.Parameter(torch.empty(r, *base.weight_shape[1:]))
        self.B = nn.Parameter(torch.empty(base.out_features, r))
        self.bias = nn.Parameter(torch.zeros(base.out_features)) if config.bias else None
        # Without dropout a plain function, not an nn.Identity child: one module less for every walk over the
        # adapter (construction, .to, train/eval, parameters, state_dict), which adds up on add/load.
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 and base.kind != "embedding" else _identity

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        if self.kind == "embedding":
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)
            return
        if self.config.init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / self.config.r)
        else:
            # = nn.init.kaiming_uniform_(A, a=√5): U(±√(6 / ((1 + 5)·fan_in))) = U(±1/√fan_in), same draws,
            # without its per-call overhead (this runs once per adapted module on every add/load).
            bound = math.sqrt(3.0) * (math.sqrt(2.0 / (1 + 5)) / math.sqrt(math.prod(self.A.shape[1:])))
            self.A.uniform_(-bound, bound)
        self.B.zero_()

    # --------------------------------------------------------------------------------------------- forward
    def lora_out(self, x: Tensor, base: BaseView) -> Tensor:
        """``B A drop(x)`` (unscaled, without bias), in the base output's layout."""
        hidden = base.apply(self.dropout(x), self.A)
        if self.kind == "conv2d":
            return F.conv2d(hidden, self.B[:, :, None, None])
        return hidden @ self.B.T

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        if self.kind == "conv2d" or self.bias is not None:
            delta = self.lora_out(x, base)
            if self.bias is not None:
                delta = delta + (self.bias if self.kind != "conv2d" else self.bias[:, None, None])
            return base_out + self.scale * delta
        # Linear / embedding: one fused addmm, so no [tokens, out] temporary besides the result.
        hidden = base.apply(self.dropout(x), self.A)
        return add_lowrank(base_out, hidden, self.B, self.scale)

    # ------------------------------------------------------------------------------------------- weights
    def delta_weight(self, base: BaseView) -> Tensor:
        r = self.config.r
        return (self.scale * (self.B @ self.A.reshape(r, -1))).reshape(base.weight_shape)

    def delta_bias(self, base: BaseView) -> Tensor | None:
        return None if self.bias is None else self.scale * self.bias

    def lowrank(self, base: BaseView) -> LowRank | None:
        if self.bias is not None or self.kind != "linear":
            return None
        return LowRank(self.A, self.B, self.scale)

    def effective_rank(self) -> int:
        """The rank ``r`` of the update."""
        return self.config.r

    @classmethod
    def expected_trainable(cls, base: BaseView, config: LoRAConfig) -> int:
        fan_in = base.in_features * math.prod(base.kernel_size)
        return config.r * (fan_in + base.out_features) + (base.out_features if config.bias else 0)
