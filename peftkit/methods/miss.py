"""MiSS / Bone (Kang & Yin, "Bone: Block-Affine Adaptation of Large Language Models" and its successor "MiSS:
Balancing LoRA Performance and Efficiency with Simple Shard Sharing"), as in Hugging Face PEFT's ``MissConfig``.

Three modes (PEFT ``init_weights``):

* ``"miss"`` (PEFT ``True``; PEFT's former ``BoneConfig``): trainable ``D [r, d_out]``. The input is padded on
  the right to a multiple of ``r`` and its ``⌈d_in/r⌉`` chunks are summed, ``z = Σ_g x[..., g·r:(g+1)·r]``;
  ``y = base(x) + drop(z) D``. Equivalently ``ΔW[o, j] = D[j mod r, o]`` (``Dᵀ`` tiled along the input axis; a
  trailing partial block uses the first ``d_in mod r`` rows). Cost ``O(tokens · (d_in + r·d_out))``.
* ``"mini"``: trainable ``D_mini [r, mini_r]``, ``D[k, o] = D_mini[k, o mod mini_r]``; needs
  ``d_out % mini_r == 0``.
* ``"bat"`` (Bone block-affine): trainable ``B [d_out/r, r, r]``; with ``W`` cut into ``r×r`` blocks ``W_ij``
  (``i`` output block, ``j`` input block), ``W'_ij = W_ij + W_ij B_i + B_i``; the forward materialises ``W'`` and
  runs the base op with it (``O(d_out · d_in · r)`` per forward, gradients flow through the frozen ``W``). Needs
  ``d_in % r == 0`` and ``d_out % r == 0``.

``delta_weight`` is exact in every mode (``bat``: ``ΔW_ij = W_ij B_i + B_i`` from the current base weight; the core
stores the merged delta, so unmerge is an exact subtraction and PEFT's ``(W' − B)(I + B)⁻¹`` is not needed).
Init: zeros in every mode (identity at init); ``init="kaiming"`` (PEFT ``init_weights=False``) for tests. No
scaling (PEFT's ``scale_layer`` only warns). Tensor name: ``block`` (PEFT ``miss_block``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    InvalidConfigError,
    PositiveInt,
    Probability,
    input_dropout,
    register,
)


@dataclass(kw_only=True)
class MiSSConfig(AdapterConfig):
    """Settings of MiSS / Bone (PEFT ``MissConfig`` defaults).

    Attributes:
        r: shard (block) size along the input axis; at most ``d_in``.
        mode: ``"miss"`` (default), ``"mini"`` or ``"bat"`` (Bone block-affine), see the module docstring.
        mini_r: output-axis period of the shared block in ``"mini"`` mode.
        dropout: dropout on the summed shards ``z`` (``"miss"`` / ``"mini"``; PEFT ``miss_dropout``).
        init: ``"zeros"`` (identity at init) or ``"kaiming"`` (PEFT ``init_weights=False``; tests).
    """

    r: PositiveInt = 64
    mode: Literal["miss", "mini", "bat"] = "miss"
    mini_r: PositiveInt = 1
    dropout: Probability = 0.0
    init: Literal["zeros", "kaiming"] = "zeros"

    tiny_fields: ClassVar[dict] = {"r": 3}  # 16 % 3 != 0: the padded (partial last shard) case
    variant_fields: ClassVar[list[dict]] = [
        {"r": 4, "dropout": 0.1},
        {"mode": "mini", "mini_r": 2},
        {"r": 4, "mode": "bat"},
    ]


def block_shape(base: BaseView, config: MiSSConfig) -> tuple[int, ...]:
    r, d_out = config.r, base.out_features
    return {"miss": (r, d_out), "mini": (r, config.mini_r), "bat": (d_out // r, r, r)}[config.mode]


@register("miss", MiSSConfig)
class MiSS(Adapter[MiSSConfig]):
    """``y = base(x) + drop(Σ_g x_g) D`` (or Bone's block-affine ``W'``); see the module docstring."""

    def __init__(self, base: BaseView, config: MiSSConfig) -> None:
        super().__init__(base, config)
        d_out, d_in, r = base.out_features, base.in_features, config.r
        if r > d_in:
            raise InvalidConfigError(f"r={r} must be at most in_features={d_in} {tuple(base.weight_shape)}")
        if config.mode == "bat" and (d_in % r or d_out % r):
            raise InvalidConfigError(f"mode='bat' needs r={r} to divide both dims of {tuple(base.weight_shape)}")
        if config.mode == "mini" and d_out % config.mini_r:
            raise InvalidConfigError(f"mode='mini' needs mini_r={config.mini_r} to divide out_features={d_out}")
        self.block = nn.Parameter(torch.empty(block_shape(base, config), device=base.device))
        self.dropout = input_dropout(config.dropout)

    def reset_parameters(self, base: BaseView) -> None:
        if self.config.init == "kaiming":
            nn.init.kaiming_uniform_(self.block, a=math.sqrt(5))
        else:
            self.block.zero_()

    def shared(self, d_out: int) -> Tensor:
        """``D [r, d_out]`` of the ``"miss"`` / ``"mini"`` modes."""
        return self.block if self.config.mode == "miss" else self.block.repeat(1, d_out // self.config.mini_r)

    def delta_weight(self, base: BaseView) -> Tensor:
        d_out, d_in, r = base.out_features, base.in_features, self.config.r
        if self.config.mode != "bat":
            return self.shared(d_out).T.repeat(1, math.ceil(d_in / r))[:, :d_in]
        w = base.weight.to(self.block.dtype)
        blocks = w.reshape(d_out // r, r, d_in // r, r).permute(2, 0, 1, 3)  # [j, i, r, r] = W_ij
        delta = blocks @ self.block + self.block  # B_i broadcast over the input blocks j
        return delta.permute(1, 2, 0, 3).reshape(d_out, d_in)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        if self.config.mode == "bat":
            weight = base.weight + self.delta_weight(base).to(base.weight.dtype)
            return base.apply(x, weight, base.bias)
        r = self.config.r
        pad = (r - x.shape[-1] % r) % r
        xp = F.pad(x, (0, pad)) if pad else x
        z = self.dropout(xp).reshape(*xp.shape[:-1], -1, r).sum(-2)
        return base_out + (z.to(self.block.dtype) @ self.shared(base.out_features)).to(base_out.dtype)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: MiSSConfig) -> int:
        return math.prod(block_shape(base, config))
