"""KnOTS (Stoica et al., ICLR 2025, "Model Merging with SVD to Tie the KnOTS"; official code gstoica27/KnOTS,
``task_merger.py::SVDMerger``): align the LoRA updates of one layer in a shared basis before merging them.

Per layer, the tasks' updates (scale included; a bias change appended as a last column) are concatenated along
the input axis, ``M = [ΔW_1 | … | ΔW_n]``, and decomposed ``M = U S Vᵀ`` (thin SVD in float64, singular values
above :data:`~peftkit.lowrank.RANK_TOL` ``· σ_max`` kept: ``k ≤ Σ r_i``). With ``Vᵀ`` split column-wise into
``Vᵀ_i``, task ``i`` is ``Z_i = S Vᵀ_i`` (``k × in``) and ``ΔW_i = U Z_i`` exactly. Any element-wise merge
(:mod:`peftkit.merge.combine`) then runs on the ``Z_i``, over all layers at once by default (``scope="model"``, as
the official code flattens every layer's ``Z_i`` into one vector per task), and ``ΔW = U Z_merged``: a LoRA of
rank ``k`` (``up = U``, ``down = Z_merged``) with no SVD truncation. When every update has a low-rank form,
``M = [up_1 … up_n] · blockdiag(s_i down_i)`` is decomposed from its factors (:func:`factored_svd`).

Where the official code's threshold is absolute (``σ > 1e-5``), ours is relative to ``σ_max`` (a decision: scale
free; it drops only components below float32's resolution of the update).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from peftkit.lowrank import SVD, dense_svd, factored_svd, numerical_rank

from .sources import Source

__all__ = ["Aligned", "align"]


class Aligned(NamedTuple):
    """One layer in the shared basis: ``ΔW_i = u · z[i]`` (``[:, fan_in]`` of each ``z[i]`` is the bias column when
    ``bias``)."""

    u: Tensor  # [out, k] float64, orthonormal columns
    z: Tensor  # [n, k, fan_in (+1)] float64
    bias: bool


def align(source: Source) -> Aligned | None:
    """``source``'s updates in their shared basis; ``None`` if an adapter has no weight-space update there."""
    n = len(source.adapters)
    forms = source.factors()
    if forms is not None:
        up = torch.cat([u for u, _ in forms], dim=1)
        svd, cols, bias = factored_svd(up, torch.block_diag(*[d for _, d in forms])), source.fan_in, False
    else:
        deltas = source.deltas()
        if deltas is None:
            return None
        weights, biases = deltas
        bias = biases is not None
        blocks = [torch.cat([w, b[:, None]], dim=1) for w, b in zip(weights, biases)] if biases else weights
        svd, cols = dense_svd(torch.cat(blocks, dim=1)), blocks[0].shape[1]
    u, s, vh = _kept(svd)
    z = (s[:, None] * vh).reshape(len(s), n, cols).transpose(0, 1)
    return Aligned(u, z.contiguous(), bias)


def _kept(svd: SVD) -> SVD:
    k = numerical_rank(svd.s)
    return SVD(svd.u[:, :k], svd.s[:k], svd.vh[:k])
