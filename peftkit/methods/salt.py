"""SALT (Elsayed et al., 2025, "SALT: Singular Value Adaptation with Low-Rank Transformation"; official code
BioMedIA-MBZUAI/SALT, ``SALTLinear``, ``SALTConv2d``).

The thin SVD of the frozen weight (a conv weight flattened to ``[out, fan_in]``), ``W = U diag(S) Vᵀ`` with
``q = min(out, fan_in)`` singular values, is kept frozen. The top ``k`` singular values are scaled and
shifted (``a, b ∈ R^k``), the remaining ``q − k`` get a low-rank update ``X [q−k, r]``, ``Y [r, q−k]``, and a
ReLU acts on the whole ``q × q`` matrix, as in the official code (negative off-diagonal entries of ``XY`` are
zeroed):

``Σ' = diag(S)``, ``Σ'[:k, :k] = diag(a ⊙ S[:k] + b)``, ``Σ'[k:, k:] += X Y``, ``W' = U ReLU(Σ') Vᵀ``.

The user's base weight is never changed: the adapter applies only the difference to the untouched base,

``y = base(x) + base_op(x, ΔW)``, ``ΔW = U (ReLU(Σ') − diag S) Vᵀ``

(the official layer computes ``x W'ᵀ`` with ``W' = U ReLU(Σ') Vᵀ``; the two differ only by the rounding of
``W − U diag(S) Vᵀ``), so disabling, mixed batches, merge and loading onto an untouched base go through the
core unchanged. ``ΔW`` is block-structured (a rank-``k`` diagonal part plus a dense ``(q−k)²`` block), not low
rank, so ``lowrank()`` is ``None``.

Cost: a conv forward materialises ``ΔW`` (``out·(q−k)² + out·q·fan_in`` multiply-adds and a weight-sized
temporary, independent of the batch) and runs one extra base-sized conv. A linear forward takes the cheaper of
that and the factored path ``x Vᵀ (ReLU(Σ') − diag S)ᵀ Uᵀ`` (``tokens·(in·q + (q−k)² + q·out)``, no weight-sized
temporary; the choice is :meth:`SALT.factored_is_cheaper`): few tokens (decoding) cost about 2-3 base matmuls
per token, long batches the base matmul plus a batch-independent ``≈ out·q·(in + q)``. Measured on one CPU
thread (``Linear(768, 768)``, ``k = 384``, ``r = 4``, forward + backward of the adapter): 1 token 2.8 ms
factored vs 84 ms dense; 512 tokens 57 vs 81 ms; 2048 tokens 135 vs 121 ms (the rule picks the faster in each).

Saved file (``state_dict``): ``U [out, q]``, ``S [q]``, ``Vh [q, fan_in]`` (persistent buffers: an SVD is not
bit-identical across machines, so the factors are stored rather than recomputed; ``q·(out + fan_in + 1)``
numbers per layer, twice the base weight for a square layer) and the trainable ``a [k]``, ``b [k]``,
``X [q−k, r]``, ``Y [r, q−k]``: ``2k + 2(q−k)r`` numbers.

Init (official): ``a = 1``, ``b = 0``, ``X, Y ~ 0.01·N(0, 1)`` drawn from the adapter's seed (decision: the
core's per-adapter seeded RNG instead of the official global ``torch.manual_seed(42)``), so SALT is *not* the
identity at init; ``zero_init_Y=True`` (spec decision) starts ``Y = 0`` and gives the exact identity (ReLU of
the non-negative ``S`` is ``S``). The official training loss adds ``reg_multiplier · Σ_layers reg`` (official
config: 0); :meth:`SALT.regularizer` returns this layer's ``reg``. Decisions: ``k = None`` means
``q // 2`` per layer (spec: default ``k = q/2``, recorded in the config as ``None``), ``r = 4`` (official
``r_lora``); the SVD is the shared :func:`~peftkit.methods.loraxs.svd_signed` (float64, at least the spec's
fp32, with the spec's sign convention). Supported layers: ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv2d``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import Adapter, AdapterConfig, BaseView, InvalidConfigError, PositiveInt, add_lowrank, register

from .lora import float_dtype
from .loraxs import svd_signed

XY_INIT_STD = 0.01  # official: X, Y ~ 0.01 * N(0, 1)


@dataclass(kw_only=True)
class SALTConfig(AdapterConfig):
    """Settings of SALT.

    Attributes:
        k: how many top singular values are scaled and shifted (official ``rank``); ``None`` (default, spec
            decision) = ``q // 2`` of each layer, ``q = min(out, fan_in)``. At most ``q``.
        r: rank of the ``X Y`` update of the remaining ``q − k`` singular values (official ``r_lora``, default 4).
        zero_init_Y: start ``Y = 0`` so the layer is exactly the base at init (default: the official random
            ``X, Y``).
    """

    k: PositiveInt | None = None
    r: PositiveInt = 4
    zero_init_Y: bool = False

    tiny_fields: ClassVar[dict] = {"r": 2}
    variant_fields: ClassVar[list[dict]] = [{"k": 2, "zero_init_Y": True}]


def salt_sizes(base: BaseView, config: SALTConfig) -> tuple[int, int]:
    """``(q, k)`` for this layer: ``q = min(out, fan_in)`` of the flattened weight, ``k`` from the config."""
    q = min(base.weight_shape[0], math.prod(base.weight_shape[1:]))
    k = config.k if config.k is not None else q // 2
    if k > q:
        raise InvalidConfigError(f"k={k} is larger than this {base.kind} layer's {q} singular values")
    return q, k


@register("salt", SALTConfig)
class SALT(Adapter[SALTConfig]):
    """``y = base(x) + base_op(x, U (ReLU(Σ') − diag S) Vᵀ)``; see the module docstring."""

    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec (SALT): identity at init: no (random X Y ~ 0.01 N(0,1) and the ReLU on the "
        "full Sigma' matrix); zero_init_Y=True gives the exact identity (tested in tests/methods/test_salt.py)"
    }
    kinds = frozenset({"linear", "conv2d"})

    def __init__(self, base: BaseView, config: SALTConfig) -> None:
        super().__init__(base, config)
        q, k = salt_sizes(base, config)
        self.k = k
        fan_in = math.prod(base.weight_shape[1:])
        kw = {"dtype": float_dtype(base), "device": base.device}
        self.register_buffer("U", torch.empty(base.out_features, q, **kw))
        self.register_buffer("S", torch.empty(q, **kw))
        self.register_buffer("Vh", torch.empty(q, fan_in, **kw))
        self.a = nn.Parameter(torch.empty(k, **kw))  # trainable_scale_A
        self.b = nn.Parameter(torch.empty(k, **kw))  # trainable_shift_B
        self.X = nn.Parameter(torch.empty(q - k, config.r, **kw))
        self.Y = nn.Parameter(torch.empty(config.r, q - k, **kw))

    @torch.no_grad()
    def reset_parameters(self, base: BaseView) -> None:
        u, s, vh = svd_signed(base.weight.reshape(base.out_features, -1))
        self.U.copy_(u)
        self.S.copy_(s)
        self.Vh.copy_(vh)
        self.a.fill_(1.0)
        self.b.zero_()
        self.X.normal_(std=XY_INIT_STD)
        if self.config.zero_init_Y:
            self.Y.zero_()
        else:
            self.Y.normal_(std=XY_INIT_STD)

    def spectrum_change(self) -> tuple[Tensor, Tensor]:
        """``ReLU(Σ') − diag S`` in its two non-zero blocks: the top ``k`` diagonal ``[k]`` and the bottom
        ``[(q−k), (q−k)]`` block (the off-diagonal blocks of ``Σ'`` are 0, which the ReLU keeps)."""
        top_s, rest_s = self.S[: self.k], self.S[self.k :]
        top = torch.relu(self.a * top_s + self.b) - top_s
        rest = torch.relu(torch.diag(rest_s) + self.X @ self.Y) - torch.diag(rest_s)
        return top, rest

    def delta_weight(self, base: BaseView) -> Tensor:
        top, rest = self.spectrum_change()
        k = self.k
        delta = (self.U[:, :k] * top) @ self.Vh[:k] + self.U[:, k:] @ rest @ self.Vh[k:]
        return delta.reshape(base.weight_shape)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        if base.kind == "linear" and self.factored_is_cheaper(x.numel() // x.shape[-1]):
            # x Vᵀ (ReLU(Σ') − diag S)ᵀ Uᵀ through the q-dim spectrum space: no [out, in] temporary.
            top, rest = self.spectrum_change()
            spectral = x @ self.Vh.T  # [.., q]
            hidden = torch.cat([spectral[..., : self.k] * top, spectral[..., self.k :] @ rest.T], dim=-1)
            return add_lowrank(base_out, hidden, self.U)
        return base_out + base.apply(x, self.delta_weight(base))

    def factored_is_cheaper(self, tokens: int) -> bool:
        """Whether ``tokens`` rows cost fewer multiply-adds through the spectrum space
        (``tokens·(in·q + (q−k)² + q·out)``) than materialising ``ΔW`` and applying it
        (``out·(q−k)² + out·q·in + tokens·in·out``); both give the same result."""
        out, q = self.U.shape
        inp, rest = self.Vh.shape[1], q - self.k
        factored = tokens * (inp * q + rest * rest + q * out)
        return factored < out * rest * rest + out * q * inp + tokens * inp * out

    def regularizer(self) -> Tensor:
        """The official ``reg`` of this layer: ``‖Σ'_top − diag(S_top)‖_F + ‖X Y‖_F`` (before the ReLU); the
        official loss adds ``reg_multiplier`` times its sum over layers (official config: 0)."""
        top_s = self.S[: self.k]
        scale_shift = self.a * top_s + self.b - top_s
        return torch.linalg.vector_norm(scale_shift) + torch.linalg.matrix_norm(self.X @ self.Y)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: SALTConfig) -> int:
        q, k = salt_sizes(base, config)
        return 2 * k + 2 * (q - k) * config.r
