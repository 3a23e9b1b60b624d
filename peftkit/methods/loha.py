"""LoHa: low-rank Hadamard product adapter (FedPara, Hyeon-Woo et al., 2022, "FedPara: Low-Rank Hadamard
Product for Communication-Efficient Federated Learning"; LyCORIS), as in Hugging Face PEFT's ``LoHaConfig``.

``ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b)``, ``s = alpha / r``, with ``w*_a [d_out, r]`` and ``w*_b [r, fan_in]``
(``fan_in = in · kh · kw`` on a Conv2d, reshaped to ``[out, in, kh, kw]``). The rank of ``ΔW`` is at most
``r²``, so it can exceed ``r`` with ``2r(d_in + d_out)`` parameters. With ``use_effective_conv2d`` on a
non-1x1 Conv2d each factor is a CP form: ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)`` with cores
``t1, t2 [r, r, kh, kw]``, ``w*_a [r, out]``, ``w*_b [r, in]``. Tensor names and shapes follow PEFT's
``hada_*`` parameters without the prefix.

Forward: ``ΔW`` is materialised (an ``O(d_out · d_in · r)`` product; a Hadamard product has no cheaper
factored form) and the base operation runs with it: ``y = base(x) + base.apply(x, ΔW)``. PEFT's custom
autograd (``HadaWeight``) only saves memory; plain autograd gives the same numbers.

Init (PEFT): ``w1_a``, ``w1_b``, ``w2_a`` (and the cores) Kaiming-uniform (``a=√5``), ``w2_b = 0`` → identity
at init. ``init="random"`` (PEFT ``init_weights=False``, tests only): everything Kaiming. Training extras:
``rank_dropout`` drops output rows of ``ΔW`` and rescales by the kept fraction (as PEFT), ``module_dropout``
skips the adapter with that probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, PositiveFloat, PositiveInt, Probability, register


@dataclass(kw_only=True)
class LoHaConfig(AdapterConfig):
    """Settings of LoHa (PEFT ``LoHaConfig`` defaults).

    Attributes:
        r: rank of each of the two factors (``ΔW`` has rank ≤ ``r²``).
        alpha: the update is scaled by ``alpha / r``. Default 8 (= r).
        use_effective_conv2d: CP-decompose the factors of a non-1x1 Conv2d (``t1``, ``t2`` cores).
        rank_dropout: in training, the probability of dropping each output row of ``ΔW`` (kept rows are
            rescaled by ``1 / mean(kept)``, as PEFT).
        module_dropout: in training, the probability of skipping the adapter for a whole forward.
        init: ``"peft"`` (``w2_b`` zero: identity) or ``"random"`` (everything Kaiming; tests).
    """

    r: PositiveInt = 8
    alpha: PositiveFloat = 8.0
    use_effective_conv2d: bool = False
    rank_dropout: Probability = 0.0
    module_dropout: Probability = 0.0
    init: Literal["peft", "random"] = "peft"

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def tiny(cls) -> LoHaConfig:
        return cls(r=2, alpha=4.0)

    @classmethod
    def tiny_variants(cls) -> list[AdapterConfig]:
        t = cls.tiny()
        return [t, t.replace(use_effective_conv2d=True, alpha=3.0)]


def loha_shapes(base: BaseView, config: LoHaConfig) -> dict[str, tuple[int, ...]]:
    """The trainable tensors' names and shapes for ``base`` (PEFT's ``create_adapter_parameters``)."""
    r, out, k = config.r, base.out_features, base.kernel_size
    in_ch = base.weight_shape[1]
    if config.use_effective_conv2d and base.kind == "conv2d" and k != (1, 1):
        return {
            "t1": (r, r, *k),
            "w1_a": (r, out),
            "w1_b": (r, in_ch),
            "t2": (r, r, *k),
            "w2_a": (r, out),
            "w2_b": (r, in_ch),
        }
    fan_in = in_ch * math.prod(k)
    return {"w1_a": (out, r), "w1_b": (r, fan_in), "w2_a": (out, r), "w2_b": (r, fan_in)}


@register("loha", LoHaConfig)
class LoHa(Adapter[LoHaConfig]):
    """``y = base(x) + s · ((w1_a w1_b) ⊙ (w2_a w2_b)) x``; see the module docstring."""

    kinds = frozenset({"linear", "conv2d"})

    def __init__(self, base: BaseView, config: LoHaConfig) -> None:
        super().__init__(base, config)
        self.scale = config.scale
        self.shapes = loha_shapes(base, config)
        self.cp = "t1" in self.shapes
        for name, shape in self.shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        for name in self.shapes:
            p = getattr(self, name)
            if name == "w2_b" and self.config.init == "peft":
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self, base: BaseView) -> Tensor:
        if self.cp:
            w1 = torch.einsum("ijkl,jr,ip->prkl", self.t1, self.w1_b, self.w1_a)
            w2 = torch.einsum("ijkl,jr,ip->prkl", self.t2, self.w2_b, self.w2_a)
        else:
            w1, w2 = self.w1_a @ self.w1_b, self.w2_a @ self.w2_b
        return (self.scale * (w1 * w2)).reshape(base.weight_shape)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        if self.training and self.config.module_dropout > 0 and torch.rand(1).item() < self.config.module_dropout:
            return base_out
        delta = self.delta_weight(base)
        if self.training and self.config.rank_dropout > 0:
            drop = (torch.rand(delta.shape[0], device=delta.device) > self.config.rank_dropout).to(delta.dtype)
            drop = drop / drop.mean().clamp_min(1e-12)
            delta = delta * drop.view(-1, *[1] * (delta.dim() - 1))
        return base_out + base.apply(x, delta.to(x.dtype))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: LoHaConfig) -> int:
        return sum(math.prod(s) for s in loha_shapes(base, config).values())
