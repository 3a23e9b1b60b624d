"""Truncated-SVD conversion of a mergeable adapter to a low-rank (LoRA) form.

An adapter with a weight-space update ``ΔW`` (:meth:`Adapter.delta_weight`) but no low-rank form (LoKr, LoHa,
SHiRA, DoRA, ...) is replaced by the rank-``k`` truncated SVD of ``ΔW``: ``ΔW = U S Vᵀ``,
``down = √S_k V_kᵀ`` (``[k, in]``), ``up = U_k √S_k`` (``[out, k]``), ``up · down = U_k S_k V_kᵀ``. By the
Eckart–Young–Mirsky theorem (Eckart & Young, 1936, "The approximation of one matrix by another of lower rank")
this is the best rank-``k`` approximation in the Frobenius norm, and its relative error is
``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = √(Σ_{i>k} σ_i² / Σ_i σ_i²)``. The balanced split of ``√S`` over both factors is a
choice (any split gives the same product); it keeps both factors on one scale for the fp16/bf16 serving banks.

The serving engine (``svd_rank``) uses :func:`svd_lowrank` so such adapters join the stacked low-rank bank;
:func:`svd_to_lora` turns a whole adapter into a LoRA adapter (to export it as a PEFT LoRA, say).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from peftkit.core import inject
from peftkit.core.base import BaseView
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import Full, FullConfig
from peftkit.core.errors import NotMergeableError
from peftkit.core.protocol import Adapter, LowRank, add_lowrank
from peftkit.lowrank import dense_svd, truncate
from peftkit.methods.lora import LoRAConfig

from .configs import exact_targets

if TYPE_CHECKING:
    from peftkit.core.model import AdaptedModel

__all__ = ["SVDFactors", "SVDLoRA", "SVDLowRank", "svd_factors", "svd_lowrank", "svd_to_lora"]


class SVDFactors(NamedTuple):
    """A truncated SVD ``up · down ≈ delta`` and its relative Frobenius error."""

    down: Tensor  # [k, in]
    up: Tensor  # [out, k]
    error: float


@torch.no_grad()
def svd_factors(delta: Tensor, rank: int) -> SVDFactors:
    """The rank-``rank`` truncated SVD of ``delta`` (``[out, in]``; more dims are flattened into ``in``):
    ``min(rank, out, in)`` triplets (:func:`peftkit.lowrank.truncate`, float64, returned in float32), and
    ``error = ‖delta − up·down‖_F / ‖delta‖_F`` (0 for a zero ``delta``).

    Raises:
        ValueError: ``rank < 1``.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    factors = truncate(dense_svd(delta), rank, cut_at_numerical_rank=False)
    return SVDFactors(factors.down, factors.up, factors.error)


class SVDLowRank(Adapter):
    """A rank-k stand-in for an adapter without a low-rank form on a linear layer: ``Δy = (x downᵀ) upᵀ`` with
    ``up · down`` the truncated SVD of the original adapter's ``delta_weight`` (built by :func:`svd_lowrank`;
    never saved: its buffers are not persistent)."""

    method = "svd-lowrank"

    def __init__(self, base: BaseView, config: AdapterConfig, down: Tensor, up: Tensor) -> None:
        super().__init__(base, config)
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        return add_lowrank(base_out, x @ self.down.T, self.up)

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.up @ self.down

    def lowrank(self, base: BaseView) -> LowRank:
        return LowRank(self.down, self.up, 1.0)


def svd_lowrank(adapter: Adapter, base: BaseView, rank: int) -> tuple[SVDLowRank, float] | None:
    """``adapter`` (on ``base``) as an :class:`SVDLowRank` of rank ``min(rank, out, in)``, and the relative error
    ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` of the conversion; ``None`` where it does not apply: a base that is not a
    Linear / GPT-2 Conv1D, an adapter that changes the bias (the low-rank form has none) or has no
    ``delta_weight`` (it cannot be merged). The factors take the base's dtype (float32 for a quantised base).

    Raises:
        ValueError: ``rank < 1``.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if base.kind != "linear" or adapter.delta_bias(base) is not None:
        return None
    delta = adapter.delta_weight(base)
    if delta is None:
        return None
    down, up, error = svd_factors(delta, rank)
    dtype = base.dtype if base.dtype.is_floating_point else torch.float32
    return SVDLowRank(base, adapter.config, down.to(dtype), up.to(dtype)), error


class SVDLoRA(NamedTuple):
    """A LoRA adapter approximating another one: its config, its tensors (``AdaptedModel.load_tensors`` keys) and
    the relative error ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` of each converted module."""

    config: LoRAConfig
    tensors: dict[str, Tensor]
    errors: dict[str, float]


@torch.no_grad()
def svd_to_lora(model: AdaptedModel, adapter: str, rank: int) -> SVDLoRA:
    """Adapter ``adapter`` of ``model`` as a LoRA of rank ``min(rank, out, fan_in)`` per module (scale 1:
    ``alpha = r``), from the truncated SVD of each module's ``delta_weight``; its bias changes become LoRA's
    ``bias`` (zero on the modules without one), its ``modules_to_save`` are copied. Add it with
    ``model.load_tensors(name, *svd_to_lora(model, adapter, rank)[:2])``; then e.g.
    ``pk.export_peft(model, path, name)`` writes it as a PEFT LoRA.

    Raises:
        NotMergeableError: a module has no ``delta_weight`` (no weight-space update to approximate).
        ValueError: ``rank < 1``.
    """
    modules = model.adapter_modules(adapter)
    bases = {p: model.model.get_submodule(p).base for p in modules}
    # the modules_to_save of an adapter are copied; a "full" adapter's own dense deltas are converted
    saved = not isinstance(model.configs[adapter], FullConfig)
    dense = [p for p, m in modules.items() if saved and isinstance(m, Full)]
    tensors = {f"{p}.{k}": t for p in dense for k, t in modules[p].state_dict().items()}
    biases = {p: m.delta_bias(bases[p]) for p, m in modules.items() if p not in dense}
    biased = any(b is not None for b in biases.values())
    errors: dict[str, float] = {}
    overrides: dict[str, dict[str, Any]] = {}
    for path, bias in biases.items():
        base = bases[path]
        delta = modules[path].delta_weight(base)
        if delta is None:
            raise NotMergeableError(
                f"{path!r}: method {modules[path].method!r} has no weight-space update to approximate"
            )
        down, up, errors[path] = svd_factors(delta, rank)
        tensors[f"{path}.A"] = down.reshape(down.shape[0], *base.weight_shape[1:])
        tensors[f"{path}.B"] = up
        if down.shape[0] != rank:
            overrides[path] = {"r": down.shape[0], "alpha": float(down.shape[0])}
        if biased and base.kind == "embedding":  # nn.Embedding has no bias (nor has LoRA there)
            overrides.setdefault(path, {})["bias"] = False
        elif biased:
            tensors[f"{path}.bias"] = bias.detach().float() if bias is not None else torch.zeros(base.out_features)
    paths = dict(inject.base_modules(model.model))
    config = LoRAConfig(
        r=rank,
        alpha=float(rank),
        bias=biased,
        targets=exact_targets(sorted(biases), paths),
        modules_to_save=sorted(dense),
        overrides=overrides,
    )
    return SVDLoRA(config, tensors, errors)
