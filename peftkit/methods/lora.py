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

Residual (data-aware) initialisations (``init="pissa"``, ``"pissa_niter_<K>"``, ``"lora_ga"``, ``"loku"``:
PiSSA, Meng et al., 2024; LoRA-GA, Wang et al., 2024; LoKU/FILA, Cha et al., 2025). These choose non-zero
initial factors ``A₀``, ``B₀`` and, in the papers and in PEFT, replace the frozen weight by
``W_res = W − s·B₀A₀`` so the model is unchanged at step 0. **Decision:** we never touch the user's base weight.
The adapter keeps ``A₀ [r, in]``, ``B₀ [out, r]`` as frozen persistent buffers (the "residual offset") and
computes

``y = base(x) + s · (B A drop(x) − B₀ A₀ x)``  (one fused rank-``2r`` up-product ``[B, −B₀] · [A drop(x); A₀ x]``),

so ``ΔW = s(BA − B₀A₀)`` and :meth:`LoRA.lowrank` is the rank-``2r`` concatenation. This is the same function
as LoRA on ``W_res`` (``W_res x + s·BA drop(x) = W x − s·B₀A₀ x + s·BA drop(x)``), and it costs one extra
frozen rank-``r`` product per layer. Dropout belongs to the trainable branch only: the frozen offset stands for
part of the residual base weight and sees the undropped ``x`` (with dropout inactive — eval mode or ``p = 0`` —
both down-products share one input and run as one ``[A; A₀] x``). In exchange the base stays untouched, so
disabling the adapter, mixed batches (rows with ``-1`` get the real base), several adapters on one base,
merge/unmerge, saving and loading onto a fresh base and the export to a plain PEFT LoRA of rank ``2r`` all stay
exact through the generic core with no special case; PEFT's in-place residual makes ``disable_adapter()``
return the *residual* model, not the base.
PiSSA needs only the weight, so its SVD runs in :meth:`LoRA.reset_parameters`; ``"lora_ga"`` and ``"loku"``
need calibration data: the adapter starts as plain LoRA with a zero offset and an initialiser from
:mod:`peftkit.init` writes the factors with :meth:`LoRA.set_factors`. The init name is saved with the
config, so loading allocates the offset buffers before the saved values are copied in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    AdaptedModel,
    Adapter,
    BaseView,
    InvalidConfigError,
    LowRank,
    RankConfig,
    UnsupportedLayerError,
    add_lowrank,
    input_dropout,
    register,
    require_rank_fits,
)


@dataclass(kw_only=True)
class LoRAConfig(RankConfig):
    """Settings of LoRA / rsLoRA (:class:`RankConfig`'s ``r``, ``alpha``, ``dropout`` and defaults).

    Attributes:
        r: rank of the update.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
            Default ``alpha = r = 8`` (PEFT's default, spec decision).
        dropout: dropout probability on the LoRA branch's input (off in eval mode; with a residual init the
            frozen offset ``B₀A₀`` sees the undropped input).
        rslora: use the rank-stabilised scale ``alpha / sqrt(r)``.
        bias: give ``B`` a trainable bias (PEFT ``lora_bias``); merging then changes the base bias.
        init: ``"kaiming"`` (PEFT default) or ``"gaussian"`` initialisation of ``A`` (``B`` starts at zero);
            or a residual initialisation (see the module docstring): ``"pissa"`` (full SVD of ``W``),
            ``"pissa_niter_<K>"`` (``torch.svd_lowrank`` with ``K`` subspace iterations), ``"lora_ga"`` or
            ``"loku"`` (factors written by :class:`peftkit.init.LoRAGA` / :class:`peftkit.init.LoKU`).
    """

    rslora: bool = False
    bias: bool = False
    init: str = "kaiming"

    def validate(self) -> None:
        if self.init not in ("kaiming", "gaussian", *RESIDUAL_INITS) and not _PISSA_NITER.fullmatch(str(self.init)):
            raise InvalidConfigError(
                f"init must be 'kaiming', 'gaussian', 'pissa', 'pissa_niter_<K>' (K >= 1), 'lora_ga' or 'loku', "
                f"got {self.init!r}"
            )

    @property
    def residual(self) -> bool:
        """Whether the adapter carries a frozen residual offset ``B₀A₀`` (a residual initialisation)."""
        return self.init in RESIDUAL_INITS or bool(_PISSA_NITER.fullmatch(self.init))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def export_config(self) -> LoRAConfig:
        """The config of the plain LoRA that :meth:`LoRA.export_state` writes (what other formats, e.g. PEFT's
        ``LoraConfig``, hold): this config, or for a residual init rank ``2r`` with the alpha that keeps the scale
        (``2α / 2r``; rsLoRA ``√2·α / √(2r)``) and the plain init. Per-module settings: call it on
        ``for_module(path)`` (the result has no ``overrides``)."""
        if not self.residual:
            return self
        alpha = self.alpha * (math.sqrt(2.0) if self.rslora else 2.0)
        return self.replace(r=2 * self.r, alpha=alpha, init="kaiming", overrides={})

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 4.0}
    variant_fields: ClassVar[list[dict]] = [
        {"rslora": True},
        {"bias": True, "dropout": 0.1},
        {"init": "gaussian"},
        {"init": "pissa"},
    ]


#: Inits that keep a residual offset ``B₀A₀`` (besides ``"pissa_niter_<K>"``).
RESIDUAL_INITS = ("pissa", "lora_ga", "loku")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def float_dtype(base: BaseView) -> torch.dtype:
    """The dtype an adapter's own tensors take: the base weight's, or float32 for a non-float (quantised) base
    (LoRA variants with frozen SVD factors or a magnitude vector: DoRA, LoRA-XS, SVFit, SALT, Comp-LoRA, LoLDU)."""
    return base.dtype if base.dtype.is_floating_point else torch.float32


def fix_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Our sign convention for singular pairs (a decision: SVD signs are arbitrary): flip each pair so that the
    entry of largest magnitude of each left vector (column of ``u``) is positive; ``vh``'s rows flip with it.
    Makes SVD-based inits independent of the LAPACK backend's sign choice."""
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])
    sign[sign == 0] = 1.0
    return u * sign, vh * sign[:, None]


@torch.no_grad()
def pissa_factors(weight: Tensor, r: int, scale: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """PiSSA's initial factors (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors
    Adaptation of Large Language Models"; as PEFT's ``pissa_init``), in float32.

    ``W = U S Vᵀ`` (``torch.linalg.svd``, or ``torch.svd_lowrank(W, q=r, niter)`` when ``niter`` is set);
    ``S_r = S[:r] / s``; ``A = diag(√S_r) V_rᵀ`` (``[r, in]``), ``B = U_r diag(√S_r)`` (``[out, r]``), so
    ``s·BA`` is the best rank-``r`` approximation of ``W`` (full-SVD mode). Signs: :func:`fix_signs`.

    Args:
        weight: ``[out, in]`` (a conv weight is flattened to ``[out, in·k·k]`` by the caller).
        r: rank.
        scale: the LoRA scale ``s``.
        niter: subspace iterations for the randomised SVD; ``None``: exact SVD.
    """
    w = weight.detach().to(torch.float32)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.T
    u, vh = fix_signs(u[:, :r], vh[:r])
    root = (s[:r] / scale).sqrt()
    return root[:, None] * vh, u * root


@register("lora", LoRAConfig)
class LoRA(Adapter[LoRAConfig]):
    """``y = base(x) + s · B A drop(x)``; with a residual init ``y = base(x) + s · (B A drop(x) − B₀ A₀ x)``.

    See the module docstring. The residual form costs one extra frozen rank-``r`` product per layer; we chose
    it over PEFT's in-place ``W_res`` so the base stays untouched (disable and mixed batches give the true
    base; save/load/export need no conversion step).
    """

    kinds = frozenset({"linear", "embedding", "conv2d"})

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        return super().supports(base) and getattr(base, "groups", 1) == 1  # A is a conv with the base geometry

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
        self.dropout = input_dropout(config.dropout if base.kind != "embedding" else 0.0)
        self.residual = config.residual
        if self.residual:
            if type(self).forward is not LoRA.forward:  # e.g. DoRA: its own forward would ignore the offset
                raise InvalidConfigError(
                    f"init={config.init!r} (a residual init) is supported by plain LoRA only, not {type(self).__name__}"
                )
            if base.kind == "embedding":
                raise UnsupportedLayerError(
                    f"init={config.init!r} (a residual SVD/gradient init) adapts Linear, Conv1D and Conv2d layers, "
                    "not an Embedding (PEFT's PiSSA / LoRA-GA inits do not either)"
                )
            # Allocated here (not in reset_parameters): loading skips the init and copies the saved offset in.
            self.register_buffer("A0", torch.empty_like(self.A, requires_grad=False))
            self.register_buffer("B0", torch.empty_like(self.B, requires_grad=False))

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        if self.kind == "embedding":
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)
            return
        niter = _PISSA_NITER.fullmatch(self.config.init)
        if self.config.init == "pissa" or niter:  # weight-only: the SVD runs here (no random draw for A)
            weight = base.weight.reshape(base.out_features, -1)
            self.set_factors(*pissa_factors(weight, self.config.r, self.scale, int(niter.group(1)) if niter else None))
            return
        if self.config.init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / self.config.r)
        else:
            # = nn.init.kaiming_uniform_(A, a=√5): U(±√(6 / ((1 + 5)·fan_in))) = U(±1/√fan_in), same draws,
            # without its per-call overhead (this runs once per adapted module on every add/load).
            bound = math.sqrt(3.0) * (math.sqrt(2.0 / (1 + 5)) / math.sqrt(math.prod(self.A.shape[1:])))
            self.A.uniform_(-bound, bound)
        self.B.zero_()
        if self.residual:  # lora_ga / loku: plain LoRA with a zero offset until a peftkit.init initialiser runs
            self.A0.zero_()
            self.B0.zero_()

    @torch.no_grad()
    def set_factors(self, A: Tensor, B: Tensor, *, residual: bool = True) -> None:
        """Write initial factors (data-aware initialisers in :mod:`peftkit.init` call this).

        Args:
            A: ``[r, in]`` (any shape with ``r·fan_in`` entries; reshaped to ``A``'s layout).
            B: ``[out, r]``.
            residual: also store them as the frozen offset ``A₀ = A``, ``B₀ = B``, so the layer's output is
                unchanged (the residual trick); ``False`` zeroes the offset (the layer starts at ``W + s·BA``).

        Raises:
            InvalidConfigError: ``residual=True`` on an adapter whose config has no residual init.
        """
        if residual and not self.residual:
            raise InvalidConfigError(
                f"set_factors(residual=True) needs a residual init (config.init 'pissa', 'lora_ga' or 'loku'), "
                f"this adapter has init={self.config.init!r}"
            )
        self.A.copy_(A.reshape(self.A.shape))
        self.B.copy_(B.reshape(self.B.shape))
        if self.residual:
            self.A0.copy_(self.A if residual else torch.zeros_like(self.A))
            self.B0.copy_(self.B if residual else torch.zeros_like(self.B))

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(down, up)`` of the update ``s · up · down``: ``(A, B)``, or with a residual offset the rank-``2r``
        ``([A; A₀], [B, −B₀])``."""
        if not self.residual:
            return self.A, self.B
        return torch.cat([self.A, self.A0]), torch.cat([self.B, -self.B0], dim=1)

    def export_state(self) -> dict[str, Tensor]:
        """The tensors of the plain LoRA computing this module's update (its config: ``config.export_config()``):
        ``state_dict()``, or with a residual offset (``ΔW = s(BA − B₀A₀)``) the rank-``2r`` ``A = [A; A₀]``,
        ``B = [B, −B₀]`` (and ``bias``), which other libraries load onto the untouched base."""
        state = self.state_dict()
        if not self.residual:
            return state
        down, up = self.factors()
        return {**{k: v for k, v in state.items() if k not in ("A0", "B0")}, "A": down.detach(), "B": up.detach()}

    # --------------------------------------------------------------------------------------------- forward
    def down_project(self, x: Tensor, base: BaseView) -> tuple[Tensor, Tensor]:
        """``(hidden, up)`` with ``up · hidden`` the unscaled update: ``(A drop(x), B)``, or with a residual
        offset ``([A drop(x); A₀ x], [B, −B₀])`` (the rank-``2r`` form; ``hidden`` in the base output's layout,
        rank on the last dim, or on dim 1 for Conv2d)."""
        if self.residual and self.training and isinstance(self.dropout, nn.Dropout):
            # Dropout belongs to the trainable branch only: the frozen offset s·B₀A₀ stands for the residual base
            # weight (PEFT's W_res = W − s·B₀A₀), which sees the undropped x. Two down products, one up product.
            rank_dim = 1 if self.kind == "conv2d" else -1
            hidden = torch.cat([base.apply(self.dropout(x), self.A), base.apply(x, self.A0)], dim=rank_dim)
            return hidden, torch.cat([self.B, -self.B0], dim=1)
        down, up = self.factors()
        return base.apply(self.dropout(x), down), up

    def lora_out(self, x: Tensor, base: BaseView) -> Tensor:
        """``B A drop(x)`` (``B A drop(x) − B₀A₀ x`` with a residual offset; unscaled, without bias), in the base
        output's layout."""
        hidden, up = self.down_project(x, base)
        if self.kind == "conv2d":
            return F.conv2d(hidden, up[:, :, None, None])
        return hidden @ up.T

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        if self.kind == "conv2d" or self.bias is not None:
            delta = self.lora_out(x, base)
            if self.bias is not None:
                delta = delta + (self.bias if self.kind != "conv2d" else self.bias[:, None, None])
            return base_out + self.scale * delta
        # Linear / embedding: one fused addmm, so no [tokens, out] temporary besides the result.
        hidden, up = self.down_project(x, base)
        return add_lowrank(base_out, hidden, up, self.scale)

    # ------------------------------------------------------------------------------------------- weights
    def delta_weight(self, base: BaseView) -> Tensor:
        down, up = self.factors()
        return (self.scale * (up @ down.reshape(down.shape[0], -1))).reshape(base.weight_shape)

    def delta_bias(self, base: BaseView) -> Tensor | None:
        return None if self.bias is None else self.scale * self.bias

    def lowrank(self, base: BaseView) -> LowRank | None:
        if self.bias is not None or self.kind != "linear":
            return None
        return LowRank(*self.factors(), self.scale)

    def effective_rank(self) -> int:
        """The rank ``r`` of the update."""
        return self.config.r

    @classmethod
    def expected_trainable(cls, base: BaseView, config: LoRAConfig) -> int:
        fan_in = base.in_features * math.prod(base.kernel_size)
        return config.r * (fan_in + base.out_features) + (base.out_features if config.bias else 0)


# ----------------------------------------------------------------------------------------------- helpers
A = TypeVar("A", bound=Adapter)


def modules_in_all_adapters(model: nn.Module, cls: type[A]) -> list[A]:
    """Every ``cls`` module of every adapter of ``model`` (an ``AdaptedModel``, or a module holding some: a DDP
    wrapper, a model with several adapted parts), adapter by adapter in the order they were added, each layer by
    layer. For the helpers of rank-adaptive LoRAs that act on all adapters of their method at once (DyLoRA's
    :func:`~peftkit.methods.dylora.set_rank`, SoRA's sparsity terms); one adapter's modules are
    ``model.modules_of(name, cls)``. Empty when there is none."""
    adapted = [m for m in model.modules() if isinstance(m, AdaptedModel)]
    return [
        m for a in adapted for name in a.adapter_names for m in a.adapter_modules(name).values() if isinstance(m, cls)
    ]
