"""Bottleneck adapters: Houlsby (serial, two per block), Pfeiffer (serial, one per block) and the parallel
adapter / AdaptFormer (Houlsby et al., 2019; Pfeiffer et al., 2021; Chen et al., 2022; official code
adapter-hub/adapters and ShoufaChen/AdaptFormer).

One shared branch, :class:`BottleneckBranch`: ``a(h) = s · up(drop(σ(down(LN?(h)))))`` with
``down: Linear(d_in→r)`` and ``up: Linear(r→d_out)`` (both with bias), an optional input LayerNorm and an
optional learnable scalar ``s``. Per adapter ``r·d_in + r + r·d_out + d_out`` trainable (``2rd + r + d`` for
``d_in = d_out = d``; ``+2d_in`` with the LayerNorm, ``+1`` with a learnable scale).

* **Serial** (Houlsby, Pfeiffer; Houlsby et al., 2019; Pfeiffer et al., 2021): ``h' = h + a(h)`` on the output
  ``h`` of the wrapped module. Houlsby wraps the sub-layers' output projections, so ``h = o`` (the attention or
  FFN output, before the block's residual add and, in post-LN models, its LayerNorm). Pfeiffer's adapter reads
  the hidden state *after* the FFN's residual add (Pfeiffer et al., 2021, AdapterFusion: ``Ψ = U(ReLU(D(h))) +
  r`` with ``h`` the FFN sub-layer's output hidden state; adapter-hub ``SeqBnConfig``, ``original_ln_before=True``,
  computes ``a(o + x₁) + o + x₁`` in a pre-LN block): in pre-LN ViT/GPT-2 blocks that is the block output
  ``x₂ = x₁ + FFN(LN₂(x₁))``, so the preset wraps the whole block and ``x₂' = x₂ + a(x₂)``.
* **Parallel** (AdaptFormer, Chen et al., 2022; He et al., 2022): ``y = F(x) + a(x)`` beside a module ``F``.

Init (``init``): ``"lora"`` (default; down Kaiming-uniform(a=√5), down bias 0, up weight and bias 0: identity at
init), ``"houlsby"`` (every weight and bias truncated normal std 1e-2 at ±2σ: near-identity only), ``"bert"``
(weights N(0, 0.02), biases 0: not identity). Not mergeable (σ is non-linear).

Placement presets (``targets`` regexes, :data:`PRESETS`, and :func:`bottleneck_targets` to list what a preset
selects in a model): BERT-like (``layer.N.attention.output.dense`` / ``layer.N.output.dense``, also the old HF ViT
names), GPT-2-like (``h.N.attn.c_proj`` / ``h.N.mlp.c_proj``) and HF ViT (``layers.N.attention.o_proj`` /
``layers.N.mlp.fc2``):

* ``"houlsby"``: attention output and FFN output projections.
* ``"pfeiffer"``: the whole block in GPT-2 (``h.N``) and HF ViT (``layers.N``, and any model whose blocks are
  named so), a weightless ``"module"`` view, so the adapter reads and adds to the block output ``x₂`` (exactly
  adapter-hub's ``SeqBnConfig`` on pre-LN blocks). BERT-like post-LN models: the FFN output projection
  ``output.dense`` (``LN(o + a(o) + x₁)``); adapter-hub there computes ``LN(o + a(LN(o + x₁)) + x₁)``, which no
  single module's output gives (its frozen LayerNorm runs twice) — the nearest placement, documented. Reading
  ``x₂`` rather than the FFN's change ``o`` matters: on the MNIST ViT benchmark the FFN-output placement (which
  is Houlsby's FFN adapter alone) trained markedly slower. Wrapping a whole block means the layers inside it can
  no longer carry other adapters (wrappers never nest).
* ``"parallel"``: the whole MLP module (GPT-2 ``h.N.mlp``, ViT ``layers.N.mlp``, a weightless ``"module"``
  view): the adapter reads the MLP input and its output is added to the MLP output.
  *Decision*: official AdaptFormer feeds the un-normalised residual stream ``x₁`` to the adapter; in HF
  ViT/GPT-2 no submodule takes ``x₁`` as its input and returns something the adapter output can be added to
  linearly (``x₁`` only reaches ``LN2``), so the nearest faithful placement is the MLP's input ``LN2(x₁)``
  (He et al.'s parallel adapter; MoSA's AdaptFormer style also normalises the adapter input). For BERT-like
  models the FFN is split over two modules (``intermediate`` and ``output``, which takes ``x₁`` as its
  second argument), so the preset puts the parallel branch beside the FFN output projection ``output.dense``
  (input: the FFN hidden activation, output added before the residual + LayerNorm) — inferred, documented.

Defaults: Houlsby/Pfeiffer ``r = d // 16`` (adapter-hub ``reduction_factor=16``), Houlsby σ = swish
(adapter-hub ``double_seq_bn``), Pfeiffer σ = ReLU (``seq_bn``); parallel ``r = 64``, ``s = 0.1``, dropout 0.1,
ReLU (AdaptFormer ``main_image.py``). *Decision*: a "GELU for ViTs, swish for BERT-like" Houlsby default
is one default here (swish; pass ``activation="gelu"`` for ViTs): an adapter does not see the model family.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
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
    TargetModuleNotFound,
    register,
)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "swish": F.silu,
    "identity": lambda h: h,
}
Activation = Literal["relu", "gelu", "swish", "identity"]  # the keys of ACTIVATIONS

_BERT_ATTN, _BERT_FFN = r"(.*\.)?layer\.\d+\.attention\.output\.dense", r"(.*\.)?layer\.\d+\.output\.dense"
_GPT2_ATTN, _GPT2_FFN = r"(.*\.)?h\.\d+\.attn\.c_proj", r"(.*\.)?h\.\d+\.mlp\.c_proj"
_VIT_ATTN, _VIT_FFN = r"(.*\.)?layers\.\d+\.attention\.o_proj", r"(.*\.)?layers\.\d+\.mlp\.fc2"
PRESETS: dict[str, str] = {
    "houlsby": "|".join((_BERT_ATTN, _BERT_FFN, _GPT2_ATTN, _GPT2_FFN, _VIT_ATTN, _VIT_FFN)),
    "pfeiffer": "|".join((_BERT_FFN, r"(.*\.)?(h|layers)\.\d+")),  # pre-LN blocks: the block output x₂
    "parallel": "|".join((r"(.*\.)?(h|layers)\.\d+\.mlp", _BERT_FFN)),
}
"""Named placements as ``targets`` regexes (full-name matches) for BERT-like, GPT-2-like and HF ViT models."""


def bottleneck_targets(model: nn.Module, placement: str) -> list[str]:
    """The module names preset ``placement`` (``"houlsby"``, ``"pfeiffer"``, ``"parallel"``) selects in ``model``.

    Raises:
        InvalidConfigError: unknown preset.
        TargetModuleNotFound: the preset matches no module of this model (not BERT/GPT-2/ViT-like).
    """
    if placement not in PRESETS:
        raise InvalidConfigError(f"unknown placement preset {placement!r}; known: {sorted(PRESETS)}")
    modules = dict(model.named_modules())
    found = [n for n in modules if re.fullmatch(PRESETS[placement], n)]
    if not found:
        raise TargetModuleNotFound(placement, modules)
    return found


# ------------------------------------------------------------------------------------------------- branch
class BottleneckBranch(nn.Module):
    """``a(h) = s · up(drop(σ(down(LN?(h)))))`` (the common bottleneck module of every variant)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        r: int,
        *,
        activation: str,
        in_ln: bool = False,
        dropout: float = 0.0,
        scale: float = 1.0,
        learnable_scale: bool = False,
    ) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_in) if in_ln else None
        self.down = nn.Linear(d_in, r)
        self.up = nn.Linear(r, d_out)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # learnable: a parameter initialised to 1.0 (AdaptFormer "learnable_scalar"); else a fixed float
        self.scale: nn.Parameter | float = nn.Parameter(torch.empty(())) if learnable_scale else scale

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if self.ln is not None:
            self.ln.reset_parameters()
        if isinstance(self.scale, nn.Parameter):
            self.scale.fill_(1.0)
        if init == "lora":
            bound = 1.0 / math.sqrt(self.down.in_features)  # = kaiming_uniform_(a=√5)
            self.down.weight.uniform_(-bound, bound)
            for t in (self.down.bias, self.up.weight, self.up.bias):
                t.zero_()
        elif init == "houlsby":
            for t in (self.down.weight, self.down.bias, self.up.weight, self.up.bias):
                nn.init.trunc_normal_(t, std=1e-2, a=-2e-2, b=2e-2)
        else:  # "bert"
            for lin in (self.down, self.up):
                lin.weight.normal_(0.0, 0.02)
                lin.bias.zero_()

    def hidden(self, h: Tensor) -> Tensor:
        """``drop(σ(down(LN?(h))))``."""
        if self.ln is not None:
            h = self.ln(h)
        z = self.act(self.down(h))
        return self.dropout(z) if self.dropout is not None else z

    def forward(self, h: Tensor) -> Tensor:
        return self.scale * self.up(self.hidden(h))

    @staticmethod
    def count(d_in: int, d_out: int, r: int, *, in_ln: bool, learnable_scale: bool) -> int:
        return r * d_in + r + r * d_out + d_out + (2 * d_in if in_ln else 0) + (1 if learnable_scale else 0)


# ------------------------------------------------------------------------------------------------- config
@dataclass(kw_only=True)
class BottleneckConfig(AdapterConfig):
    """Settings shared by the bottleneck adapters.

    Attributes:
        targets: module names, a regex, or a preset regex from :data:`PRESETS` (each method defaults to its own).
        r: bottleneck width; ``None``: ``max(1, d // reduction_factor)`` with ``d`` the adapted width.
        reduction_factor: ``d / r`` when ``r`` is ``None`` (adapter-hub default 16).
        activation: ``"relu"``, ``"gelu"``, ``"swish"`` or ``"identity"``.
        init: ``"lora"`` (identity at init), ``"houlsby"`` or ``"bert"`` (see the module docstring).
        in_ln: a trainable LayerNorm on the adapter input.
        dropout: dropout after the activation (off in eval mode).
        scale: the fixed output scale ``s``.
        learnable_scale: ``s`` is a trainable scalar initialised to 1.0 (replaces ``scale``).
    """

    targets: list[str] | str = PRESETS["houlsby"]
    r: PositiveInt | None = None
    reduction_factor: PositiveInt = 16
    activation: Activation = "swish"
    init: Literal["lora", "houlsby", "bert"] = "lora"
    in_ln: bool = False
    dropout: Probability = 0.0
    scale: float = 1.0
    learnable_scale: bool = False

    def width(self, d: int) -> int:
        """The bottleneck width for an adapted width ``d``."""
        return self.r if self.r is not None else max(1, d // self.reduction_factor)

    tiny_fields: ClassVar[dict] = {"r": 4}
    variant_fields: ClassVar[list[dict]] = [
        {"in_ln": True, "learnable_scale": True, "dropout": 0.1, "activation": "gelu"}
    ]


@dataclass(kw_only=True)
class HoulsbyConfig(BottleneckConfig):
    """Houlsby: serial adapters after the attention and the FFN output projections (σ = swish, ``d/16``)."""


@dataclass(kw_only=True)
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer: one serial adapter per block on the hidden state after the FFN's residual add (σ = ReLU, ``d/16``)."""

    targets: list[str] | str = PRESETS["pfeiffer"]
    activation: Activation = "relu"


@dataclass(kw_only=True)
class ParallelConfig(BottleneckConfig):
    """Parallel adapter / AdaptFormer: ``y = F(x) + s·up(drop(ReLU(down(x))))`` (r = 64, s = 0.1, dropout 0.1)."""

    targets: list[str] | str = PRESETS["parallel"]
    r: PositiveInt | None = 64
    activation: Activation = "relu"
    dropout: float = 0.1
    scale: float = 0.1


# ------------------------------------------------------------------------------------------------ adapters
class _Bottleneck(Adapter[BottleneckConfig]):
    """The protocol around one :class:`BottleneckBranch`; subclasses choose what the branch reads."""

    exempt: ClassVar[dict[str, str]] = {"mergeable": "spec: not mergeable (σ is non-linear)"}
    serial: ClassVar[bool] = True
    kinds = frozenset({"linear", None})  # Linear / Conv1D, or a whole module ("module" kind)

    @classmethod
    def _widths(cls, base: BaseView) -> tuple[int, int]:
        return (base.out_features if cls.serial else base.in_features), base.out_features

    def __init__(self, base: BaseView, config: BottleneckConfig) -> None:
        super().__init__(base, config)
        d_in, d_out = self._widths(base)
        self.branch = BottleneckBranch(
            d_in,
            d_out,
            config.width(d_in),
            activation=config.activation,
            in_ln=config.in_ln,
            dropout=config.dropout,
            scale=config.scale,
            learnable_scale=config.learnable_scale,
        )

    def reset_parameters(self, base: BaseView) -> None:
        self.branch.reset_parameters(self.config.init)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        return base_out + self.branch(base_out if self.serial else x)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: BottleneckConfig) -> int:
        d_in, d_out = cls._widths(base)
        return BottleneckBranch.count(
            d_in, d_out, config.width(d_in), in_ln=config.in_ln, learnable_scale=config.learnable_scale
        )


@register("houlsby", HoulsbyConfig)
class Houlsby(_Bottleneck):
    """Serial bottleneck on a sub-layer output: ``o' = o + a(o)`` (default placement: attention and FFN)."""


@register("pfeiffer", PfeifferConfig)
class Pfeiffer(_Bottleneck):
    """Serial bottleneck after the FFN's residual add: ``x₂' = x₂ + a(x₂)`` on the block output (pre-LN models)."""


@register("adaptformer", ParallelConfig)
class ParallelAdapter(_Bottleneck):
    """AdaptFormer / parallel adapter: ``y = F(x) + s · up(drop(σ(down(x))))`` with ``x`` the input of ``F``."""

    serial = False
