"""RandLoRA (Albert et al., 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models"), as
in Hugging Face PEFT's ``RandLoraConfig``.

Frozen random bases ``A [r, 1, D_min]`` and ``B [D_max, N_max, r]`` (one pair per model, drawn from
``projection_prng_key``) and trainable diagonal scalings ``λ [r, N]`` and ``γ [N, d_min]`` per layer, with
``d_min = min(d_in, d_out)``, ``d_max = max(d_in, d_out)``, ``N = ceil(d_min / r)`` (so ``N·r ≥ d_min``: full
rank). PEFT-exact flattening:

``Â = (λ[:, :, None] · A[:, :, :d_min] · γ[None]).reshape(r·N, d_min)``,  ``B̂ = B[:d_max, :N].reshape(d_max, N·r)``,
``ΔW = s · B̂ Â`` if ``d_min == d_in`` else ``s · (B̂ Â)ᵀ``,  ``s = alpha / r`` (``/ sqrt(N)`` with
``scale_by_sqrt_bases``, the official code's scale).

Paper form ``ΔW = s Σ_n B_n diag(λ_n) A diag(γ_n)``; PEFT's flattening pairs ``B̂`` column ``b·r+k`` with ``Â``
row ``b·r+k`` — a fixed index permutation of it, the same function class (spec). Forward
``y = base(x) + s · drop(x) ·`` two matmuls (``O(tokens · N·r · (d_in + d_out))``, about a dense layer's cost,
never materialising ``ΔW``); bases are kept in bfloat16 and computed in float32.

Bases (PEFT): generator ``torch.Generator('cpu').manual_seed(projection_prng_key)``; ``A`` Kaiming-uniform
(``a=√5``) of shape ``(r, 1, D_min)`` in bfloat16, then ``N_max`` Kaiming-uniform ``(D_max, 1, r)`` slices
concatenated into ``B``; each divided by its std. ``sparse`` / ``very_sparse``: ``U(0, 1)`` entries mapped to
``-1`` below ``1/(2s)``, ``+1`` above ``1 − 1/(2s)``, else 0 (``s = 3`` or ``sqrt(D_min)``), then divided by std.

Saved tensors: ``lam`` (λ, PEFT ``randlora_lambda``) and ``gamma`` (PEFT ``randlora_gamma``).

Decisions: the bases are **non-persistent** buffers rebuilt from the key (PEFT's ``save_projection=False``), so
a saved adapter holds only ``λ`` and ``γ``; layers with the same bases share one CPU tensor. *Inferred*: a
layer cannot see the rest of the model, so ``(D_max, D_min)`` default to the layer's own ``(d_max, d_min)``;
this equals PEFT whenever all targeted layers have one shape, and ``projection_shape`` (PEFT's largest
``(d_out, d_in)`` over the targeted layers) reproduces PEFT's shared bases for mixed shapes. Init (PEFT's
``init_weights=True`` reset): ``λ = 0`` (identity at init), ``γ = 1 / max(N, d_min)`` (the spec's ``1/d_max`` is
overwritten by PEFT's reset). Gradients by plain autograd (PEFT's ``UniqueBaseGrad`` only saves memory).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    BaseView,
    InvalidConfigError,
    PositiveInt,
    RankConfig,
    input_dropout,
    register,
)


@dataclass(kw_only=True)
class RandLoRAConfig(RankConfig):
    """Settings of RandLoRA (PEFT ``RandLoraConfig`` defaults).

    Attributes:
        r: rank of each random basis; the layer uses ``N = ceil(d_min / r)`` bases.
        alpha: scale numerator, ``s = alpha / r`` (PEFT default 640, i.e. ``s = 20``; paper: alpha ≈ 20·r).
        dropout: dropout on the adapter branch's input.
        projection_prng_key: seed of the shared random bases.
        projection_shape: ``[d_out, d_in]`` to size the shared bases (PEFT: the elementwise max over the targeted
            layers); ``None`` sizes them per layer (equal to PEFT when all targeted layers have one shape).
        sparse: ternary sparse bases with ``s = 3``.
        very_sparse: ternary sparse bases with ``s = sqrt(D_min)``.
        scale_by_sqrt_bases: divide the scale by ``sqrt(N)`` (the official code; PEFT does not).
    """

    r: int = 32
    alpha: float = 640.0
    projection_prng_key: int = 0
    projection_shape: list[PositiveInt] | None = None
    sparse: bool = False
    very_sparse: bool = False
    scale_by_sqrt_bases: bool = False

    def validate(self) -> None:
        if self.projection_shape is not None and len(self.projection_shape) != 2:
            raise InvalidConfigError(
                f"projection_shape must be [d_out, d_in] of positive ints, got {self.projection_shape!r}"
            )

    tiny_fields: ClassVar[dict] = {"r": 4, "alpha": 8.0}
    variant_fields: ClassVar[list[dict]] = [
        {"sparse": True, "dropout": 0.1, "projection_prng_key": 3},
        {"very_sparse": True, "scale_by_sqrt_bases": True, "projection_shape": [128, 48]},
    ]


def n_bases(d_min: int, r: int) -> int:
    return math.ceil(d_min / r)


@functools.lru_cache(maxsize=16)
def random_bases(key: int, r: int, d_max: int, d_min: int, sparsity: float) -> tuple[Tensor, Tensor]:
    """PEFT's shared bases ``(A [r, 1, d_min], B [d_max, ceil(d_min/r), r])``, std-normalised. ``sparsity`` 0
    means dense Kaiming-uniform bases in bfloat16; otherwise ternary with that ``s`` (float32)."""
    g = torch.Generator(device="cpu").manual_seed(key)
    n = n_bases(d_min, r)
    if sparsity == 0:

        def kaiming(shape: tuple[int, ...]) -> Tensor:
            t = torch.empty(shape, dtype=torch.bfloat16)
            return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)

        with torch.no_grad():
            a = kaiming((r, 1, d_min))
            b = torch.cat([kaiming((d_max, 1, r)) for _ in range(n)], dim=1)
        return a / a.std(), b / b.std()
    a_u, b_u = torch.rand((r, 1, d_min), generator=g), torch.rand((d_max, n, r), generator=g)

    def ternary(u: Tensor) -> Tensor:
        t = torch.zeros(u.shape)
        t[u < 1 / (2 * sparsity)] = -1
        t[u > 1 - 1 / (2 * sparsity)] = 1
        return t / t.std()

    return ternary(a_u), ternary(b_u)


@register("randlora", RandLoRAConfig)
class RandLoRA(Adapter[RandLoRAConfig]):
    """``y = base(x) + s · B̂ Â x`` with random frozen bases and trainable ``λ``, ``γ``; see the module docstring."""

    def __init__(self, base: BaseView, config: RandLoRAConfig) -> None:
        super().__init__(base, config)
        d_out, d_in, r = base.out_features, base.in_features, config.r
        self.d_min, self.d_max = min(d_in, d_out), max(d_in, d_out)
        self.in_is_min = self.d_min == d_in
        self.n = n_bases(self.d_min, r)
        big = (self.d_max, self.d_min)
        if config.projection_shape is not None:
            big = (max(config.projection_shape), min(config.projection_shape))
            if big[0] < self.d_max or big[1] < self.d_min:
                raise InvalidConfigError(
                    f"projection_shape {config.projection_shape} is smaller than this layer {tuple(base.weight_shape)}"
                )
        sparsity = math.sqrt(big[1]) if config.very_sparse else 3.0 if config.sparse else 0.0
        a, b = random_bases(config.projection_prng_key, r, big[0], big[1], sparsity)
        self.register_buffer("A", a[:, :, : self.d_min].to(base.device), persistent=False)
        self.register_buffer("B", b[: self.d_max, : self.n, :].to(base.device), persistent=False)
        self.scale = config.alpha / r / (math.sqrt(self.n) if config.scale_by_sqrt_bases else 1.0)
        self.lam = nn.Parameter(torch.empty(r, self.n, device=base.device))
        self.gamma = nn.Parameter(torch.empty(self.n, self.d_min, device=base.device))
        self.dropout = input_dropout(config.dropout)

    def reset_parameters(self, base: BaseView) -> None:
        self.lam.zero_()
        self.gamma.fill_(1.0 / max(self.n, self.d_min))

    def bases(self) -> tuple[Tensor, Tensor]:
        """``(Â [r·N, d_min], B̂ [d_max, N·r])`` in float32 (or the parameters' wider dtype)."""
        dtype = torch.promote_types(self.lam.dtype, torch.float32)
        a_hat = (self.lam[:, :, None].to(dtype) * self.A.to(dtype) * self.gamma[None].to(dtype)).flatten(0, 1)
        return a_hat, self.B.to(dtype).flatten(1)

    def delta_weight(self, base: BaseView) -> Tensor:
        a_hat, b_hat = self.bases()
        m = b_hat @ a_hat
        return self.scale * (m if self.in_is_min else m.T)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        a_hat, b_hat = self.bases()
        h = self.dropout(x).to(a_hat.dtype)
        y = F.linear(F.linear(h, a_hat), b_hat) if self.in_is_min else F.linear(F.linear(h, b_hat.T), a_hat.T)
        return base_out + (self.scale * y).to(base_out.dtype)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: RandLoRAConfig) -> int:
        d_min = min(base.in_features, base.out_features)
        n = n_bases(d_min, config.r)
        return config.r * n + n * d_min
