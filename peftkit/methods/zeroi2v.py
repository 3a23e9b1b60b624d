"""ZeroI2V linear adapters: zero-cost adaptation by structural re-parametrisation ("ZeroI2V: Zero-Cost
Adaptation of Pre-trained Transformers from Image to Video", 2024; official code MCG-NJU/ZeroI2V,
``vit_zero_clip.py``, ``tools/weight_reparam.py``).

A linear adapter ``A(h) = h + s · fc2(drop(fc1(h)))`` (no activation; ``fc1: d→r``, ``fc2: r→d``, biases;
``2rd + r + d`` trainable) next to a frozen linear ``(W, b)``. With ``M = I + s·W₂W₁`` and
``c = s·(W₂b₁ + b₂)``:

* ``side="output"`` (``S_Adapter`` after the attention out-projection, ``MLP_Adapter_out`` after ``fc2``):
  ``y = A(W x + b)``, folded as ``W' = M W``, ``b' = M b + c``;
* ``side="input"`` (``T_Adapter_in`` before q/k/v, ``MLP_Adapter`` before ``fc1``): ``y = W A(x) + b``, folded as
  ``W' = W M``, ``b' = W c + b``.

Both are exact (``delta_weight`` / ``delta_bias``), so ``merge()`` leaves exactly the base's parameters.

Bias-free linears (*decision*; the spec's CLIP/ViT linears all have biases): the constant ``c`` (and ``W c``) is
an offset that only a bias can hold, so by default (``bias=None``) the adapter has biases exactly when the
adapted linear has one. On a bias-free linear it is then ``A(h) = h + s·W₂W₁h`` (``2rd`` trainable), ``c = 0``,
and it folds into ``W`` alone: every default ZeroI2V adapter is mergeable. ``bias=True`` forces the biases; on
a bias-free linear such an adapter trains and runs, but merging it raises :class:`NotMergeableError` (its
``delta_bias`` is a bias change that the base cannot take). ``bias=False`` drops them everywhere.
Init: ``fc1`` trunc-normal std 0.02, bias 0; ``fc2`` weight and bias 0 (identity at init).
Defaults: ``s = 0.5``, ``r = d/4``, dropout 0.1.

*Decisions*: one adapter per adapted module (the official ``T_Adapter_in`` is one adapter shared by q, k and v
of a fused ``in_proj``; HF models have three projections, so each gets its own input-side adapter, 3× its
parameters — folding is then per projection, as the spec's "all three slices" rule). Which modules are input-side
is set per module with ``overrides`` (:func:`zeroi2v_config` builds the spec's placement for HF ViT / CLIP
names). STDHA (the zero-parameter spatio-temporal head shift) changes the attention's keys and values, not a
module's output, so it is not an adapter: :func:`stdha_shift` is the shift itself, for attention code that
applies it after the qkv projection (wiring it into HF attention classes is not done here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    PositiveFraction,
    PositiveInt,
    Probability,
    register,
)


@dataclass(kw_only=True)
class ZeroI2VConfig(AdapterConfig):
    """Settings of a ZeroI2V linear adapter.

    Attributes:
        side: ``"output"`` (adapter on the module's output) or ``"input"`` (on its input); vary it per module
            with ``overrides`` (see :func:`zeroi2v_config`).
        r: bottleneck width; ``None``: ``max(1, round(ratio · d))`` with ``d`` the adapted width.
        ratio: ``r / d`` when ``r`` is ``None`` (official 0.25).
        scale: ``s`` (official ``adapter_scale`` 0.5).
        dropout: dropout between ``fc1`` and ``fc2`` (off in eval mode).
        bias: whether ``fc1`` / ``fc2`` have biases; ``None`` (default): as the adapted linear, so the adapter
            always folds into it (see the module docstring); ``True`` on a bias-free linear is not mergeable.
    """

    side: Literal["output", "input"] = "output"
    r: PositiveInt | None = None
    ratio: PositiveFraction = 0.25
    scale: float = 0.5
    dropout: Probability = 0.1
    bias: bool | None = None

    def has_bias(self, base: BaseView) -> bool:
        """Whether the adapter on ``base`` has biases (``bias``, or ``None``: whether ``base`` has one)."""
        return base.bias is not None if self.bias is None else self.bias

    def width(self, d: int) -> int:
        return self.r if self.r is not None else max(1, round(self.ratio * d))

    tiny_fields: ClassVar[dict] = {"r": 4}
    variant_fields: ClassVar[list[dict]] = [{"side": "input", "dropout": 0.0}]


def zeroi2v_config(
    *,
    attention_in: tuple[str, ...] = ("q_proj", "k_proj", "v_proj"),
    attention_out: str = "o_proj",
    mlp_in: str = "fc1",
    mlp_out: str | None = "fc2",
    **fields: Any,
) -> ZeroI2VConfig:
    """The spec's placement (``T_Adapter_in`` on the attention input, ``S_Adapter`` on its output,
    ``MLP_Adapter`` on the MLP input, ``MLP_Adapter_out`` on its output when ``mlp_out`` is set,
    ``num_tadapter=2``) for module names of HF ViT (defaults) or CLIP (``attention_out="out_proj"``)."""
    inputs = (*attention_in, mlp_in)
    outputs = (attention_out,) + ((mlp_out,) if mlp_out else ())
    overrides = {name: {"side": "input"} for name in inputs}
    return ZeroI2VConfig(targets=[*inputs, *outputs], overrides=overrides, **fields)


@register("zeroi2v", ZeroI2VConfig)
class ZeroI2V(Adapter[ZeroI2VConfig]):
    """A linear adapter beside a frozen linear, folded into it on merge; see the module docstring."""

    def __init__(self, base: BaseView, config: ZeroI2VConfig) -> None:
        super().__init__(base, config)
        self.input_side = config.side == "input"
        d = base.in_features if self.input_side else base.out_features
        r = config.width(d)
        bias = config.has_bias(base)
        self.fc1 = nn.Linear(d, r, bias=bias)
        self.fc2 = nn.Linear(r, d, bias=bias)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        nn.init.trunc_normal_(self.fc1.weight, std=0.02)
        self.fc2.weight.zero_()
        for t in (self.fc1.bias, self.fc2.bias):
            if t is not None:
                t.zero_()

    def fit_state(self, state: dict[str, Tensor]) -> None:
        """Files saved when the adapter always had biases keep them on a bias-free linear (such an adapter is
        not mergeable there, as it was not then)."""
        for name, lin in (("fc1", self.fc1), ("fc2", self.fc2)):
            if f"{name}.bias" in state and lin.bias is None:
                w = lin.weight
                lin.bias = nn.Parameter(torch.empty(w.shape[0], dtype=w.dtype, device=w.device), w.requires_grad)

    def change(self, h: Tensor) -> Tensor:
        """``A(h) − h = s · fc2(drop(fc1(h)))``."""
        z = self.fc1(h)
        return self.config.scale * self.fc2(self.dropout(z) if self.dropout is not None else z)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        if self.input_side:  # W A(x) + b = base_out + W (A(x) − x)
            return base_out + base.apply(self.change(x), base.weight)
        return base_out + self.change(base_out)

    def _m_minus_identity(self) -> Tensor:
        return self.config.scale * (self.fc2.weight @ self.fc1.weight)  # M − I = s W₂W₁

    def _c(self) -> Tensor | None:
        """``c = s·(W₂b₁ + b₂)``; ``None`` when the adapter has no biases (``c = 0``)."""
        if self.fc1.bias is None or self.fc2.bias is None:
            return None
        return self.config.scale * (self.fc2.weight @ self.fc1.bias + self.fc2.bias)

    def delta_weight(self, base: BaseView) -> Tensor:
        m = self._m_minus_identity()
        return base.weight @ m if self.input_side else m @ base.weight

    def delta_bias(self, base: BaseView) -> Tensor | None:
        """``b' − b``: ``W c`` (input side) or ``(M − I) b + c`` (output side); ``None`` when it is zero by
        construction (no adapter biases and, on the output side, no base bias), which is what lets a default
        adapter merge into a bias-free linear."""
        c = self._c()
        if self.input_side:
            return None if c is None else base.weight @ c
        folded = self._m_minus_identity() @ base.bias if base.bias is not None else None
        if folded is None or c is None:
            return c if folded is None else folded
        return folded + c

    @classmethod
    def expected_trainable(cls, base: BaseView, config: ZeroI2VConfig) -> int:
        d = base.in_features if config.side == "input" else base.out_features
        r = config.width(d)
        return 2 * r * d + (r + d if config.has_bias(base) else 0)


def stdha_shift(t: Tensor, frames: int, fold: int) -> Tensor:
    """STDHA's temporal shift of keys or values ``t [B·T, N, C]`` (frames of one clip consecutive): channels
    ``[0, fold)`` take the previous frame's values, ``[fold, 2·fold)`` the next frame's; the first / last frame
    keep their own (no zero padding). Official ``fold = C // shift_div`` (``shift_div = 12``); queries are not
    shifted (``shift_pattern="kv"``). With ``frames = 1`` it is the identity."""
    if t.shape[0] % frames:
        raise ValueError(f"{t.shape[0]} rows are not a whole number of {frames}-frame clips")
    if 2 * fold > t.shape[-1]:
        raise ValueError(f"2·fold = {2 * fold} exceeds the {t.shape[-1]} channels")
    clips = t.reshape(-1, frames, *t.shape[1:])
    out = clips.clone()
    out[:, 1:, ..., :fold] = clips[:, :-1, ..., :fold]  # from the previous frame
    out[:, :-1, ..., fold : 2 * fold] = clips[:, 1:, ..., fold : 2 * fold]  # from the next frame
    return out.reshape(t.shape)
