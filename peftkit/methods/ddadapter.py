"""DD-Adapter: depthwise-dilated convolutional adapter on a feature map ("Depthwise-Dilated Convolutional
Adapters for Medical Object Tracking and Segmentation Using the Segment Anything Model 2", 2025; official code
apple1986/DD-SAM2, ``sam2/adapter_ap.py``).

On a layer or block output ``x`` (``C`` channels, even): ``h = GELU(pw1(x))`` with ``pw1: Conv1×1(C→C/2)``,
``u = GELU(dw1(h)) + GELU(dw3(h))`` with depthwise 3×3 convs of dilation 1 and 3 (padding 1 and 3),
``a = GELU(pw2(u))`` with ``pw2: Conv1×1(C/2→C)``, and ``y = x + a``. ``C² + 11.5C`` trainable. Torch default
init everywhere: not identity at init (``zero_init=True`` zeroes ``pw2``, an option, off as official). Not
mergeable. The spatial size is preserved.

Where: the output of a ``nn.Conv2d`` (``[B, C, H, W]``), of a Linear (token sequence ``[B, N, C]``) or of a whole
block (``"module"`` kind; SAM2 Hiera blocks are channels-last: ``channels_last=True``); token sequences are
mapped to the patch grid by :mod:`peftkit.methods._feature_maps` (prefix tokens unchanged). *Decision*: the
official ``adapter_dim`` argument is unused (the bottleneck is always ``C/2``), so it is not a field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    NonNegativeInt,
    PositiveInt,
    UnsupportedLayerError,
    register,
)
from peftkit.methods._feature_maps import to_map


@dataclass(kw_only=True)
class DDAdapterConfig(AdapterConfig):
    """Settings of DD-Adapter.

    Attributes:
        dilations: the two depthwise branches' dilation rates (official (1, 3)).
        zero_init: zero ``pw2`` (identity at init); off by default (official: torch default init).
        prefix_tokens: leading tokens of a ``[B, N, C]`` output left out of the map (ViT cls: 1).
        channels_last: a 4-D output is ``[B, H, W, C]`` (SAM2 Hiera blocks) instead of ``[B, C, H, W]``.
        grid: ``(H, W)`` of the patch tokens; ``None``: inferred (see ``_feature_maps``).
    """

    targets: list[str] | str = r".*conv.*"
    dilations: list[PositiveInt] = field(default_factory=lambda: [1, 3])
    zero_init: bool = False
    prefix_tokens: NonNegativeInt = 0
    channels_last: bool = False
    grid: list[PositiveInt] | None = None

    variant_fields: ClassVar[list[dict]] = [{"prefix_tokens": 1, "dilations": [1, 2]}]


@register("dd_adapter", DDAdapterConfig)
class DDAdapter(Adapter[DDAdapterConfig]):
    """``y = x + GELU(pw2(GELU(dw1(h)) + GELU(dw3(h))))``, ``h = GELU(pw1(x))``; see the module docstring."""

    kinds = frozenset({"linear", "conv2d", None})  # a Linear's tokens, a conv's map, or a whole block
    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec: not identity at init (torch default init everywhere)",
        "mergeable": "spec: not mergeable (GELU, depthwise convs)",
    }

    def __init__(self, base: BaseView, config: DDAdapterConfig) -> None:
        super().__init__(base, config)
        c = base.out_features
        if c % 2:
            raise UnsupportedLayerError(f"DD-Adapter needs an even channel count, this layer has {c}")
        half = c // 2
        self.pw1 = nn.Conv2d(c, half, 1)
        self.dw = nn.ModuleList(nn.Conv2d(half, half, 3, padding=d, dilation=d, groups=half) for d in config.dilations)
        self.pw2 = nn.Conv2d(half, c, 1)

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        for conv in (self.pw1, *self.dw, self.pw2):
            conv.reset_parameters()
        if self.config.zero_init:
            self.pw2.weight.zero_()
            self.pw2.bias.zero_()

    def adapter(self, fmap: Tensor) -> Tensor:
        """``a(x)`` on a ``[B, C, H, W]`` map."""
        h = F.gelu(self.pw1(fmap))
        u = sum(F.gelu(dw(h)) for dw in self.dw)
        return F.gelu(self.pw2(u))

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        cfg = self.config
        fmap, back = to_map(base_out, prefix_tokens=cfg.prefix_tokens, channels_last=cfg.channels_last, grid=cfg.grid)
        return back(fmap + self.adapter(fmap))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: DDAdapterConfig) -> int:
        c = base.out_features
        half = c // 2
        return c * half + half + len(config.dilations) * (9 * half + half) + half * c + c
