"""DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

The adapted weight is split into a magnitude and a direction: ``W' = m ⊙ (W + s·BA) / ||W + s·BA||_row``,
with ``m [out]`` trainable and the LoRA pair ``A, B`` as in :mod:`peftkit.methods.lora` (rsLoRA scale works
too). The row norm (per output row, over every input dim, spec decision) is detached from the graph, as
in the paper (§4.3). At init ``m = ||W||_row`` and ``B = 0``, so DoRA starts as the identity.

Forward (as PEFT computes it; the bias is not rescaled), with ``g = m / ||W + s·BA||_row``:

* no dropout, or eval mode: ``y = b + g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ)``;
* dropout active in training, ``x_d = drop(x)``: ``y = base(x) + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ``.
  The frozen output ``base(x)`` keeps the un-dropped input (so a fresh adapter, ``g = 1`` and ``B = 0``, is the
  identity in training too); only the magnitude's rescaling term and the LoRA term see the dropped input.
  This is PEFT's formula (``DoraLinearLayer.forward`` / ``_DoraConvNdLayer.forward`` given ``base_result=None``:
  ``x_d Wᵀ`` without the bias, added to the full base output); for Conv2d ``x_d Wᵀ`` is the base convolution
  (stride, padding, dilation) of ``x_d`` without bias, and the LoRA term a conv with ``A`` then a 1x1 conv with ``B``.

Supported: ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv2d`` (groups=1). Merge: ``ΔW = W' − W`` (exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import BaseView, InvalidConfigError, register

from .lora import LoRA, LoRAConfig, float_dtype


@dataclass(kw_only=True)
class DoRAConfig(LoRAConfig):
    """LoRA settings (``r``, ``alpha``, ``dropout``, ``rslora``, ``init``); ``bias`` is not supported."""

    def validate(self) -> None:
        super().validate()
        if self.bias:
            raise InvalidConfigError("DoRA does not support bias=True (PEFT's use_dora excludes lora_bias too)")

    variant_fields: ClassVar[list[dict]] = [{"rslora": True, "dropout": 0.1}]


@register("dora", DoRAConfig)
class DoRA(LoRA):
    """Magnitude vector ``m`` + LoRA direction update; see the module docstring."""

    config: DoRAConfig  # narrows LoRA.config
    kinds = frozenset({"linear", "conv2d"})  # LoRA's supports() adds: no grouped convs

    def __init__(self, base: BaseView, config: DoRAConfig) -> None:
        super().__init__(base, config)
        dtype = float_dtype(base)
        self.magnitude = nn.Parameter(torch.empty(base.out_features, dtype=dtype, device=base.device))

    def reset_parameters(self, base: BaseView) -> None:
        super().reset_parameters(base)
        self.magnitude.copy_(self.weight_norm(base))  # m = ||W + s·BA|| = ||W|| (B = 0): identity at init

    @torch.no_grad()
    def weight_norm(self, base: BaseView) -> Tensor:
        """``||W + s·BA||`` per output row, detached (paper §4.3).

        Computed without materialising ``W + s·BA`` (in float32/float64):
        ``||W_i||² + 2s·(W Aᵀ)_i·B_i + s²·(B A Aᵀ)_i·B_i``, with the frozen ``||W_i||²`` cached until the base
        weight changes (``base.weight_version()``). Other dtypes take the direct route.
        """
        w = base.weight.reshape(base.out_features, -1)
        if w.dtype not in (torch.float32, torch.float64):
            adapted = base.weight + self.delta_lora(base)
            return adapted.reshape(adapted.shape[0], -1).norm(dim=1)
        key = base.weight_version()
        cache = self.__dict__.get("_w_sq")
        if cache is None or cache[0] != key:
            cache = (key, w.pow(2).sum(dim=1))
            self.__dict__["_w_sq"] = cache
        a = self.A.reshape(self.A.shape[0], -1)
        s = self.scale
        wa = w @ a.T  # [out, r]
        ba = self.B @ (a @ a.T)  # [out, r]
        sq = cache[1] + 2 * s * (wa * self.B).sum(dim=1) + (s * s) * (ba * self.B).sum(dim=1)
        return sq.clamp_min(0).sqrt()

    def delta_lora(self, base: BaseView) -> Tensor:
        return super().delta_weight(base)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        gain = self.magnitude / self.weight_norm(base)
        bias = base.bias
        if self.kind == "conv2d":
            gain = gain[:, None, None]
            bias = None if bias is None else bias[:, None, None]
        dropped = self.training and isinstance(self.dropout, nn.Dropout)
        if self.kind != "conv2d" and not dropped:
            # y = g⊙(x Wᵀ) + b + s·g⊙(h Bᵀ) = g⊙base_out + (1−g)⊙b + s·h (g⊙B)ᵀ: one elementwise pass, then
            # the low-rank product accumulates in place (no base_out − b, no separate "inner" tensor).
            # (2-D from the start: an in-place op on a view would make autograd copy the gradient back.)
            flat = base_out.reshape(-1, base_out.shape[-1])
            out = flat * gain if bias is None else torch.addcmul(bias * (1 - gain), flat, gain)
            hidden = base.apply(x, self.A)
            out.addmm_(hidden.reshape(-1, hidden.shape[-1]), (self.B * gain[:, None]).T, alpha=self.scale)
            return out.view(base_out.shape)
        if dropped:
            # PEFT's training formula: y = base(x) + (g − 1)·(x_d Wᵀ) + g·s·B A x_d, base(x) with the undropped x.
            x_d = self.dropout(x)
            frozen = base.apply(x_d, base.weight)  # x_d Wᵀ, no bias
            hidden = base.apply(x_d, self.A)
            if self.kind == "conv2d":
                lora = torch.nn.functional.conv2d(hidden, self.B[:, :, None, None])
                return base_out + (gain - 1) * frozen + (self.scale * gain) * lora
            flat = torch.addcmul(
                base_out.reshape(-1, base_out.shape[-1]), frozen.reshape(-1, frozen.shape[-1]), gain - 1
            )
            flat.addmm_(hidden.reshape(-1, hidden.shape[-1]), (self.B * gain[:, None]).T, alpha=self.scale)
            return flat.view(base_out.shape)
        # conv2d, no dropout: y = g·(x Wᵀ + s·B A x) + b
        base_term = base_out if bias is None else base_out - bias
        hidden = base.apply(x, self.A)
        inner = base_term + self.scale * torch.nn.functional.conv2d(hidden, self.B[:, :, None, None])
        return inner * gain if bias is None else torch.addcmul(bias, inner, gain)

    def delta_weight(self, base: BaseView) -> Tensor:
        adapted = base.weight + self.delta_lora(base)
        gain = self.magnitude / self.weight_norm(base)
        return gain.view(-1, *([1] * (adapted.dim() - 1))) * adapted - base.weight

    def lowrank(self, base: BaseView) -> None:
        return None  # the magnitude rescales whole rows of W: not a low-rank change

    @classmethod
    def expected_trainable(cls, base: BaseView, config: DoRAConfig) -> int:
        return super().expected_trainable(base, config) + base.out_features
