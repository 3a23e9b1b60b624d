"""PaCA: Partial Connection Adaptation (Woo et al., 2025, "PaCA: Partial Connection Adaptation for Efficient
Fine-Tuning"; official code WooSunghyeon/paca, ``PacaConfig`` / ``pacalinear``).

PaCA trains ``r`` randomly chosen **input columns** of the frozen weight directly, with no extra low-rank
factors: ``columns [out, r]`` is a copy of ``W[:, idx] / s`` (``s = alpha / r``, a pure reparametrisation that
changes the effective learning rate, spec), and the effective weight is ``W`` with those columns replaced:
``W_eff[:, idx] = s · columns``. Identity at init (``s · (W[:, idx] / s) = W[:, idx]`` up to rounding).

Forward (spec's functional form, decision): ``y = base_out + x[..., idx] · (s · columns − W[:, idx])ᵀ``, the
correction fused into one ``addmm`` onto the base output the core already computed. Autograd then saves only
the gathered slice ``x[..., idx]`` (``r`` of the ``d_in`` features per token, ``index_select`` keeps only the
indices for its backward) and the ``[out, r]`` column difference: this is PaCA's memory saving. The frozen base
weight gets no gradient (it is frozen; the official custom autograd function likewise returns only
``grad_columns = s · gᵀ x[..., idx]`` and ``grad_x = g · W_eff``). LoRA of the same parameter count saves the
whole input ``x`` (for ``∂A``) plus its ``[tokens, r']`` hidden; full fine-tuning saves ``x``. Extra compute
over the base op: one ``[tokens, r] × [r, out]`` product (``r/d_in`` of the base matmul); the official code
instead writes the columns into ``W`` in place before one matmul, which the functional form makes
unnecessary (spec: "with the functional form this is unnecessary").

Column indices: ``idx = randperm(d_in)[:r]`` (distinct), drawn per layer. The official code draws each layer's
columns from the global RNG in turn, so layers of one width train different columns; here each layer draws
from the adapter's seeded RNG (the core seeds it with ``config.seed`` and builds the layers in a fixed order,
so the same config and seed select the same columns; with ``seed=None`` the draw follows torch's global RNG,
like every other random init). *Decision*: the spec's dedicated seed is kept as the opt-in ``column_seed``,
a CPU generator seeded by it for every layer; it makes all layers of one width train the *same* columns, so
it is off by default. The indices are a persistent ``int64`` buffer ``indices [r]``: a reload takes them from
the file (never redrawn), exact whatever the seed.

Merge: ``ΔW[:, idx] = s · columns − W[:, idx]``, zero elsewhere, so ``W + ΔW`` is the column overwrite, exact;
the core keeps the delta, so unmerge restores the original columns exactly (the official code has no
unmerge). ``ΔW`` is the rank-``r`` product ``D · E_idxᵀ`` (``E_idx`` the one-hot columns), so the adapter also
answers :meth:`PaCA.lowrank` for serving banks and grouped mixed batches.

Supported layers: ``nn.Linear`` and GPT-2 ``Conv1D`` (the spec's targets). Defaults ``r = 8``, ``alpha = 8``
(official config defaults; the MMLU script uses ``r = 16``, ``alpha = 64``). No dropout, bias ``"none"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    InvalidConfigError,
    LowRank,
    PositiveFloat,
    PositiveInt,
    add_lowrank,
    register,
    seeded_generator,
)


@dataclass(kw_only=True)
class PaCAConfig(AdapterConfig):
    """Settings of PaCA (official ``PacaConfig`` defaults).

    Attributes:
        r: number of input columns of ``W`` that train (at most ``d_in``).
        alpha: the trained columns are stored divided by ``s = alpha / r`` (``paca_alpha``).
        column_seed: ``None`` (default): each layer draws its columns ``randperm(d_in)[:r]`` from the adapter's
            seeded RNG (``seed``), so layers differ, as in the official code. An int: every layer draws from a
            generator seeded by it, so layers of one width train the same columns (the spec's former decision,
            kept for configs that set it).
    """

    r: PositiveInt = 8
    alpha: PositiveFloat = 8.0
    column_seed: int | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 4.0}
    variant_fields: ClassVar[list[dict]] = [{"r": 3, "alpha": 3.0, "column_seed": 5}]


def column_indices(d_in: int, r: int, seed: int | None = None) -> Tensor:
    """``r`` distinct input columns, ``randperm(d_in)[:r]``: from a CPU generator seeded by ``seed``, or from
    torch's current (CPU) RNG when ``seed`` is ``None`` (inside adapter construction: the adapter's seeded RNG)."""
    return torch.randperm(d_in, generator=seeded_generator(seed))[:r]


@register("paca", PaCAConfig)
class PaCA(Adapter[PaCAConfig]):
    """``W_eff = W`` with columns ``idx`` replaced by ``s · columns``; see the module docstring."""

    def __init__(self, base: BaseView, config: PaCAConfig) -> None:
        super().__init__(base, config)
        if config.r > base.in_features:
            raise InvalidConfigError(
                f"r={config.r} columns is more than this layer's {base.in_features} input features "
                f"(shape {tuple(base.weight_shape)})"
            )
        self.scale = config.scale
        # Drawn in reset_parameters (one draw per layer from the adapter's RNG), or read from a saved file.
        self.register_buffer("indices", torch.empty(config.r, dtype=torch.long, device=base.device))
        self.columns = nn.Parameter(torch.empty(base.out_features, config.r, device=base.device))

    def reset_parameters(self, base: BaseView) -> None:
        self.indices.copy_(column_indices(base.in_features, self.config.r, self.config.column_seed))
        self.columns.copy_(base.weight[:, self.indices].float() / self.scale)

    def _column_change(self, base: BaseView) -> Tensor:
        """``D = s · columns − W[:, idx]`` (``[out, r]``): what the overwrite adds to the selected columns."""
        return self.scale * self.columns - base.weight[:, self.indices].to(self.columns.dtype)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        # index_select's backward keeps only the indices, and addmm keeps its two small operands: the only
        # activation saved for backward is the gathered [tokens, r] slice.
        picked = x.index_select(-1, self.indices)
        return add_lowrank(base_out, picked, self._column_change(base).to(base_out.dtype))

    def delta_weight(self, base: BaseView) -> Tensor:
        delta = torch.zeros(base.weight_shape, dtype=self.columns.dtype, device=self.columns.device)
        return delta.index_copy(1, self.indices, self._column_change(base))

    def lowrank(self, base: BaseView) -> LowRank:
        down = F.one_hot(self.indices, base.in_features).to(self.columns.dtype)  # E_idxᵀ: [r, in]
        return LowRank(down, self._column_change(base), 1.0)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: PaCAConfig) -> int:
        return base.out_features * config.r
