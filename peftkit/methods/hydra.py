"""Hydra (Kim et al., 2024, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning").

Two low-rank branches with biases on one Linear: a *parallel* branch on the layer's input and a *sequential*
branch on its output ``h = x Wᵀ + b``:

``y = h + σ · U_p(D_p x) + σ · U_s(D_s h)``, each ``D``/``U`` an affine map (``D(x) = x Dᵀ + d``,
``U(z) = z Uᵀ + u``), ``D_p [r, in]``, ``U_p [out, r]``, ``D_s [r, out]``, ``U_s [out, r]``.

Init (official ``init_option="lora"``): ``D ~ N(0, 0.02²)``, ``U = 0``, all biases 0: identity at init
(``init="adaptformer"``: Kaiming-uniform ``D``). ``σ = 1`` fixed, or a learnable scalar.

Exact merge, bias included:
``W' = W + σ (U_p D_p + U_s D_s W)``, ``b' = b + σ (U_p d_p + u_p + U_s (D_s b + d_s) + u_s)``.
A base layer without a bias cannot take ``Δb``: merging it raises ``NotMergeableError`` (the core's rule).
No :meth:`lowrank` form: the change is affine (it has a bias), not ``Δy = x ΔWᵀ`` alone.

Placement (spec decision): any Linear / GPT-2 ``Conv1D`` may host Hydra; the official CLIP code adapts the
MLP's output Linear (``c_proj``), so name it in ``targets`` to follow the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, PositiveInt, register


@dataclass(kw_only=True)
class HydraConfig(AdapterConfig):
    """Settings of Hydra (defaults: the official code).

    Attributes:
        r: bottleneck width of both branches. Default 2.
        scale: ``σ``, the branches' scale (its initial value when ``learnable_scale``). Default 1.0.
        learnable_scale: train ``σ`` as one scalar parameter per layer.
        init: ``"lora"`` (``D ~ N(0, 0.02²)``) or ``"adaptformer"`` (Kaiming-uniform ``D``); ``U`` and every bias
            start at zero either way.
    """

    r: PositiveInt = 2
    scale: float = 1.0
    learnable_scale: bool = False
    init: Literal["lora", "adaptformer"] = "lora"

    tiny_fields: ClassVar[dict] = {"r": 2}
    variant_fields: ClassVar[list[dict]] = [{"learnable_scale": True, "scale": 0.5, "init": "adaptformer"}]


@register("hydra", HydraConfig)
class Hydra(Adapter[HydraConfig]):
    """Parallel + sequential low-rank branches with biases; see the module docstring."""

    def __init__(self, base: BaseView, config: HydraConfig) -> None:
        super().__init__(base, config)
        r, d_in, d_out = config.r, base.in_features, base.out_features
        self.D_p = nn.Parameter(torch.empty(r, d_in))
        self.d_p = nn.Parameter(torch.empty(r))
        self.U_p = nn.Parameter(torch.empty(d_out, r))
        self.u_p = nn.Parameter(torch.empty(d_out))
        self.D_s = nn.Parameter(torch.empty(r, d_out))
        self.d_s = nn.Parameter(torch.empty(r))
        self.U_s = nn.Parameter(torch.empty(d_out, r))
        self.u_s = nn.Parameter(torch.empty(d_out))
        self.sigma: Tensor | float
        if config.learnable_scale:
            self.sigma = nn.Parameter(torch.tensor(float(config.scale)))
        else:
            self.sigma = float(config.scale)

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        for d in (self.D_p, self.D_s):
            if self.config.init == "lora":
                nn.init.normal_(d, std=0.02)
            else:
                nn.init.kaiming_uniform_(d, a=math.sqrt(5))
        for t in (self.d_p, self.U_p, self.u_p, self.d_s, self.U_s, self.u_s):
            nn.init.zeros_(t)
        if isinstance(self.sigma, nn.Parameter):
            self.sigma.fill_(self.config.scale)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        parallel = nn.functional.linear(nn.functional.linear(x, self.D_p, self.d_p), self.U_p, self.u_p)
        sequential = nn.functional.linear(nn.functional.linear(base_out, self.D_s, self.d_s), self.U_s, self.u_s)
        return base_out + self.sigma * (parallel + sequential)

    def delta_weight(self, base: BaseView) -> Tensor:
        w = base.weight.to(self.D_s.dtype)
        return self.sigma * (self.U_p @ self.D_p + self.U_s @ (self.D_s @ w))

    def delta_bias(self, base: BaseView) -> Tensor:
        b = base.bias
        hidden_s = self.d_s if b is None else self.D_s @ b.to(self.D_s.dtype) + self.d_s
        return self.sigma * (self.U_p @ self.d_p + self.u_p + self.U_s @ hidden_s + self.u_s)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: HydraConfig) -> int:
        r, d_in, d_out = config.r, base.in_features, base.out_features
        return r * (d_in + d_out) + r + d_out + r * 2 * d_out + r + d_out + int(config.learnable_scale)
