"""LoKr: low-rank Kronecker product adapter (LyCORIS; Yeh et al., 2024, "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation"), as in Hugging Face PEFT's ``LoKrConfig``.

``ΔW = s · (w1 ⊗ w2)``, reshaped to the base weight's ``[out, in, *k]`` layout, ``s = alpha / r``, where
``d_out = out_l · out_k`` and ``d_in = in_m · in_n`` come from :func:`factorization`. ``w1`` is
``[out_l, in_m]`` (full, or ``w1_a [out_l, r] @ w1_b [r, in_m]`` when ``decompose_both`` and
``r < max(out_l, in_m) / 2``); ``w2`` is ``[out_k, in_n, *k]`` (full when ``r ≥ max(out_k, in_n) / 2``, else
``w2_a [out_k, r] @ w2_b [r, in_n·k]``, or a CP form ``t2 [r, r, kh, kw]`` with ``w2_a [r, out_k]``,
``w2_b [r, in_n]`` for ``use_effective_conv2d`` on a non-1x1 conv). Tensor names and shapes follow PEFT's
``lokr_*`` parameters without the prefix.

Forward: Linear (and GPT-2 ``Conv1D``) uses the Kronecker identity
``(w1 ⊗ w2) vec(X) = vec(w1 X w2ᵀ)`` with ``X = x.reshape(..., in_m, in_n)``: cost
``O(tokens · (in_m·in_n·out_k + in_m·out_k·out_l))`` instead of ``O(tokens · d_in · d_out)``, and ``ΔW`` is
never materialised. Conv2d materialises ``ΔW`` and runs the base convolution with it.

Init (PEFT): ``w1`` (or ``w1_a``) zeros, the rest Kaiming-uniform (``a=√5``) → identity at init.
``init="lycoris"``: ``w1`` Kaiming, ``w2`` (or ``w2_b``) zeros. ``init="random"`` (PEFT ``init_weights=False``,
tests only): everything Kaiming. Training extras: ``rank_dropout`` drops output rows of ``ΔW`` (rescaled by
their mean with ``rank_dropout_scale``), ``module_dropout`` skips the whole adapter with that probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from peftkit.core.api import BaseView, InvalidConfigError, register

from .loha import LyCORIS, LyCORISConfig


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension = m · n`` with ``m ≤ n`` (PEFT / LyCORIS rule).

    If ``factor > 0`` divides ``dimension`` the answer is ``(factor, dimension / factor)``; otherwise divisors
    are tried from 1 upward, keeping the pair while ``m + n`` shrinks and ``m ≤ factor`` (``-1``: no limit,
    i.e. the most square split). Examples: ``256 → (16, 16)``, ``128 → (8, 16)``, ``127 → (1, 127)``,
    ``factor=4: 128 → (4, 32)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


@dataclass(kw_only=True)
class LoKrConfig(LyCORISConfig):
    """Settings of LoKr (PEFT ``LoKrConfig`` defaults): :class:`~peftkit.methods.loha.LyCORISConfig`'s, where
    ``r`` is the rank of the decomposed Kronecker factors (a factor is kept full when ``r`` is at least half its
    larger side) and ``use_effective_conv2d`` CP-decomposes ``w2`` of a non-1x1 Conv2d (``t2``, ``w2_a``,
    ``w2_b``), and

    Attributes:
        decompose_factor: ``factor`` of :func:`factorization` (``-1``: most square split).
        decompose_both: also decompose ``w1`` into ``w1_a @ w1_b`` when ``r`` is small enough.
        rank_dropout_scale: rescale the rows ``rank_dropout`` keeps by ``1 / mean(kept)``.
        init: ``"peft"`` (``w1`` zero), ``"lycoris"`` (``w2`` zero) or ``"random"`` (not identity; tests).
    """

    decompose_factor: int = -1
    decompose_both: bool = False
    rank_dropout_scale: bool = False
    init: Literal["peft", "lycoris", "random"] = "peft"

    def validate(self) -> None:
        if self.decompose_factor <= 0 and self.decompose_factor != -1:  # -1 or positive: no single range
            raise InvalidConfigError(
                f"decompose_factor must be -1 or a positive integer, got {self.decompose_factor!r}"
            )

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 4.0}
    variant_fields: ClassVar[list[dict]] = [
        {"r": 1, "decompose_both": True, "use_effective_conv2d": True},
        {"r": 16, "decompose_factor": 2, "init": "lycoris"},
    ]


def lokr_shapes(base: BaseView, config: LoKrConfig) -> dict[str, tuple[int, ...]]:
    """The trainable tensors' names and shapes for ``base`` (PEFT's ``create_adapter_parameters``)."""
    r, f = config.r, config.decompose_factor
    out_l, out_k = factorization(base.out_features, f)
    in_m, in_n = factorization(base.weight_shape[1], f)
    k = base.kernel_size
    shapes: dict[str, tuple[int, ...]] = {}
    if config.decompose_both and r < max(out_l, in_m) / 2:
        shapes.update(w1_a=(out_l, r), w1_b=(r, in_m))
    else:
        shapes["w1"] = (out_l, in_m)
    effective = config.use_effective_conv2d and base.kind == "conv2d" and k != (1, 1)
    if r >= max(out_k, in_n) / 2:
        shapes["w2"] = (out_k, in_n, *k)
    elif effective:
        shapes.update(t2=(r, r, *k), w2_a=(r, out_k), w2_b=(r, in_n))
    else:
        shapes.update(w2_a=(out_k, r), w2_b=(r, in_n * math.prod(k)))
    return shapes


@register("lokr", LoKrConfig)
class LoKr(LyCORIS):
    """``y = base(x) + s · (w1 ⊗ w2) x``; see the module docstring."""

    config: LoKrConfig  # narrows LyCORIS.config

    @classmethod
    def factor_shapes(cls, base: BaseView, config: LyCORISConfig) -> dict[str, tuple[int, ...]]:
        return lokr_shapes(base, config)  # type: ignore[arg-type]

    def zeroed(self) -> set[str]:
        return {"peft": {"w1", "w1_a"}, "lycoris": {"w2", "w2_b"}, "random": set()}[self.config.init]

    def __init__(self, base: BaseView, config: LoKrConfig) -> None:
        super().__init__(base, config)
        self.kind = base.kind
        self.kernel = base.kernel_size

    # ------------------------------------------------------------------------------------------- weights
    def factors(self) -> tuple[Tensor, Tensor]:
        """``(w1 [out_l, in_m], w2 [out_k, in_n, *k])``."""
        w1 = self.w1 if "w1" in self.shapes else self.w1_a @ self.w1_b
        if "w2" in self.shapes:
            w2 = self.w2
        elif "t2" in self.shapes:
            w2 = torch.einsum("ijkl,ip,jr->prkl", self.t2, self.w2_a, self.w2_b)
        else:
            w2 = (self.w2_a @ self.w2_b).reshape(self.w2_a.shape[0], -1, *self.kernel)
        return w1, w2

    def delta_weight(self, base: BaseView) -> Tensor:
        w1, w2 = self.factors()
        w1 = w1.reshape(*w1.shape, *([1] * len(self.kernel)))
        return (self.scale * torch.kron(w1, w2.contiguous())).reshape(base.weight_shape)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        if self.module_dropped():
            return base_out
        rank_drop = self.training and self.config.rank_dropout > 0
        if self.kind == "linear" and not rank_drop:
            w1, w2 = self.factors()
            xs = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1]).to(w1.dtype)
            y = torch.matmul(torch.matmul(w1, xs), w2.T)  # [..., out_l, out_k]
            return base_out + self.scale * y.reshape(base_out.shape).to(base_out.dtype)
        delta = self.delta_weight(base)
        if rank_drop:
            delta = self.drop_rows(delta, rescale=self.config.rank_dropout_scale)
        return base_out + base.apply(x, delta.to(x.dtype))
