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

What LoHa and LoKr (:mod:`peftkit.methods.lokr`) share, as PEFT's ``LycorisConfig`` / ``LycorisLayer`` do, is
written once here: :class:`LyCORISConfig` (rank, scale, the two dropouts) and :class:`LyCORIS` (PEFT-named
factor tensors, Kaiming-uniform but for the zeroed ones, the count, module and rank dropout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, PositiveFloat, PositiveInt, Probability, register


@dataclass(kw_only=True)
class LyCORISConfig(AdapterConfig):
    """Settings LoHa and LoKr share (PEFT's ``LycorisConfig`` defaults).

    Attributes:
        r: rank of the factors.
        alpha: the update is scaled by ``alpha / r``. Default 8 (= r).
        use_effective_conv2d: CP-decompose the factors of a non-1x1 Conv2d.
        rank_dropout: in training, the probability of dropping each output row of ``ΔW``.
        module_dropout: in training, the probability of skipping the adapter for a whole forward.
    """

    r: PositiveInt = 8
    alpha: PositiveFloat = 8.0
    use_effective_conv2d: bool = False
    rank_dropout: Probability = 0.0
    module_dropout: Probability = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass(kw_only=True)
class LoHaConfig(LyCORISConfig):
    """Settings of LoHa (PEFT ``LoHaConfig`` defaults): :class:`LyCORISConfig`'s, where ``r`` is the rank of each
    of the two factors (``ΔW`` has rank ≤ ``r²``), ``use_effective_conv2d`` gives the ``t1``, ``t2`` cores and
    the rows ``rank_dropout`` keeps are rescaled by ``1 / mean(kept)`` (as PEFT), and

    Attributes:
        init: ``"peft"`` (``w2_b`` zero: identity) or ``"random"`` (everything Kaiming; tests).
    """

    init: Literal["peft", "random"] = "peft"

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 4.0}
    variant_fields: ClassVar[list[dict]] = [{"use_effective_conv2d": True, "alpha": 3.0}]


def loha_shapes(base: BaseView, config: LyCORISConfig) -> dict[str, tuple[int, ...]]:
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


class LyCORIS(Adapter[LyCORISConfig]):
    """What LoHa and LoKr share: the factor tensors named and shaped by :meth:`factor_shapes` (PEFT's names),
    Kaiming-uniform (``a=√5``) but for :meth:`zeroed`, the count, and the training-time module / rank dropout."""

    kinds = frozenset({"linear", "conv2d"})

    @classmethod
    def factor_shapes(cls, base: BaseView, config: LyCORISConfig) -> dict[str, tuple[int, ...]]:
        """The trainable tensors' names and shapes for ``base``."""
        raise NotImplementedError

    def zeroed(self) -> set[str]:
        """The tensors initialised to zero (the others are Kaiming-uniform)."""
        return set()

    def __init__(self, base: BaseView, config: LyCORISConfig) -> None:
        super().__init__(base, config)
        self.scale = config.scale
        self.shapes = self.factor_shapes(base, config)
        for name, shape in self.shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        zero = self.zeroed()
        for name in self.shapes:
            p = getattr(self, name)
            if name in zero:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def module_dropped(self) -> bool:
        """Module dropout: in training, skip the whole adapter with probability ``module_dropout`` (one draw)."""
        p = self.config.module_dropout
        return self.training and p > 0 and torch.rand(1).item() < p

    def drop_rows(self, delta: Tensor, rescale: bool) -> Tensor:
        """Rank dropout: each output row of ``delta`` dropped with probability ``rank_dropout``, the kept ones
        rescaled by ``1 / mean(kept)`` when ``rescale``."""
        drop = (torch.rand(delta.shape[0], device=delta.device) > self.config.rank_dropout).to(delta.dtype)
        if rescale:
            drop = drop / drop.mean().clamp_min(1e-12)
        return delta * drop.view(-1, *[1] * (delta.dim() - 1))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: LyCORISConfig) -> int:
        return sum(math.prod(s) for s in cls.factor_shapes(base, config).values())


@register("loha", LoHaConfig)
class LoHa(LyCORIS):
    """``y = base(x) + s · ((w1_a w1_b) ⊙ (w2_a w2_b)) x``; see the module docstring."""

    config: LoHaConfig  # narrows LyCORIS.config

    @classmethod
    def factor_shapes(cls, base: BaseView, config: LyCORISConfig) -> dict[str, tuple[int, ...]]:
        return loha_shapes(base, config)

    def zeroed(self) -> set[str]:
        return {"w2_b"} if self.config.init == "peft" else set()

    @property
    def cp(self) -> bool:
        """Whether the factors are CP forms (``use_effective_conv2d`` on a non-1x1 conv)."""
        return "t1" in self.shapes

    def delta_weight(self, base: BaseView) -> Tensor:
        if self.cp:
            w1 = torch.einsum("ijkl,jr,ip->prkl", self.t1, self.w1_b, self.w1_a)
            w2 = torch.einsum("ijkl,jr,ip->prkl", self.t2, self.w2_b, self.w2_a)
        else:
            w1, w2 = self.w1_a @ self.w1_b, self.w2_a @ self.w2_b
        return (self.scale * (w1 * w2)).reshape(base.weight_shape)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        if self.module_dropped():
            return base_out
        delta = self.delta_weight(base)
        if self.training and self.config.rank_dropout > 0:
            delta = self.drop_rows(delta, rescale=True)
        return base_out + base.apply(x, delta.to(x.dtype))
