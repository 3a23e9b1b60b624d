"""AFM, Atomic Feature Mimicking (Yu et al., "Unified Low-rank Compression Framework for Click-through Rate
Prediction", KDD 2024; demo code yuhao318/Atomic_Feature_Mimicking): low-rank compression of the *output
features* of MLP layers and embedding tables, from their mean ``μ`` and covariance ``Σ = E[yyᵀ] − μμᵀ`` on
calibration inputs (for an embedding table: over the looked-up rows, i.e. frequency-weighted).

With ``Σ = USUᵀ`` (eigenvalues descending) and ``U_k = U[:, :k]`` every output is approximated by
``ŷ = U_kU_kᵀ(y − μ) + μ``:

* Linear ``y = Wx + b`` becomes two Linears with no nonlinearity between them (the demo's ReLU is a bug):
  ``W₁ = U_kᵀW``, ``b₁ = U_kᵀb`` then ``W₂ = U_k``, ``b₂ = (I − U_kU_kᵀ)μ``; ``k(d_in + d_out) + k + d_out``
  parameters.
* Embedding ``E [n, d]`` becomes ``E' = (E − 1μᵀ)U_k [n, k]`` followed by ``Linear(k → d)`` with weight ``U_k``
  and bias ``μ``; that Linear fuses into the next fully connected layer (``W_fc' = W_fc U_k``,
  ``b_fc' = b_fc + W_fc μ``) unless a feature interaction (e.g. DeepFM's FM term) reads the embeddings first.

Exact at ``k = d_out``; for any ``k`` the mean output over the calibration data is ``μ`` exactly and the mean
squared reconstruction error per output row is the sum of the dropped eigenvalues ``Σ_{i>k} s_i``. Statistics
come from the original model's outputs (stacked layers are not compressed sequentially: demo's choice).
LoRD's activation-aware ``feature`` mode uses :func:`linear_factors` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.compress.arch import FactoredLinear, replace
from peftkit.compress.errors import CompressOptionError, UnknownArchitectureError, check_rank
from peftkit.init._calibration import Moments, module_statistics


def principal(covariance: Tensor, k: int) -> Tensor:
    """``U_k``: the ``k`` leading eigenvectors of a symmetric PSD covariance (float64, eigenvalues descending)."""
    _, vectors = torch.linalg.eigh(covariance.double())
    return vectors.flip(-1)[:, :k]


@torch.no_grad()
def linear_factors(
    weight: Tensor, bias: Tensor | None, stats: Moments, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W₁ [k, in], b₁ [k], W₂ [out, k], b₂ [out])`` of AFM for a Linear with output statistics ``stats``."""
    check_rank(k, (weight.shape[0],), "the layer's outputs")
    u, mu = principal(stats.covariance, k), stats.mean
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    down, down_bias = u.T @ w, u.T @ b
    up_bias = mu - u @ (u.T @ mu)
    dtype = weight.dtype
    return down.to(dtype), down_bias.to(dtype), u.to(dtype), up_bias.to(dtype)


class CompressedEmbedding(nn.Module):
    """``e = U_k · E'[i] + μ``: a ``[n, k]`` table and ``Linear(k → d)`` (weight ``U_k``, bias ``μ``)."""

    def __init__(self, num_embeddings: int, k: int, dim: int) -> None:
        super().__init__()
        self.codes = nn.Embedding(num_embeddings, k)
        self.expand = nn.Linear(k, dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.expand(self.codes(ids))


@torch.no_grad()
def embedding_factors(table: Tensor, stats: Moments, k: int) -> CompressedEmbedding:
    """AFM's compressed embedding for ``table [n, d]`` with output (looked-up row) statistics ``stats``."""
    check_rank(k, (table.shape[1],), "the embedding dimension")
    u, mu = principal(stats.covariance, k), stats.mean
    module = CompressedEmbedding(table.shape[0], k, table.shape[1]).to(table.dtype)
    module.codes.weight.copy_((table.double() - mu) @ u)
    module.expand.weight.copy_(u)
    module.expand.bias.copy_(mu)
    return module


@torch.no_grad()
def fuse(fc: nn.Linear, embedding: CompressedEmbedding, fields: int) -> nn.Linear:
    """``fc`` reading ``fields`` concatenated embeddings ``[e_1, …, e_F]`` (``F·d`` inputs) rewritten to read the
    codes ``[c_1, …, c_F]`` (``F·k`` inputs) directly: per field block ``W_f U_k``, bias ``b + Σ_f W_f μ``."""
    u, mu = embedding.expand.weight.detach().double(), embedding.expand.bias.detach().double()
    d, k = u.shape
    if fc.in_features != fields * d:
        raise CompressOptionError(f"fc has {fc.in_features} inputs, not fields × d = {fields} × {d}")
    w = fc.weight.detach().double().reshape(fc.out_features, fields, d)
    bias = fc.bias.detach().double() if fc.bias is not None else torch.zeros(fc.out_features, dtype=torch.float64)
    out = nn.Linear(fields * k, fc.out_features, dtype=fc.weight.dtype)
    out.weight.copy_((w @ u).reshape(fc.out_features, fields * k))
    out.bias.copy_(bias + (w @ mu).sum(1))
    return out


@torch.no_grad()
def afm(model: nn.Module, calibration: Iterable[Any], ranks: Mapping[str, int]) -> dict[str, Moments]:
    """Compress the Linears and Embeddings of ``model`` named in ``ranks`` (``{path: k}``) **in place**, with
    statistics of the original model's outputs on ``calibration`` (one pass before any replacement). Returns
    the statistics.

    Raises:
        UnknownArchitectureError: a path that is not a Linear or Embedding; RankError: ``k`` outside ``[1, d_out]``.
    """
    modules = {path: model.get_submodule(path) for path in ranks}
    for path, module in modules.items():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            found = f"; {path} is a {type(module).__name__}"
            raise UnknownArchitectureError("AFM", ["nn.Linear", "nn.Embedding"], found)
        check_rank(ranks[path], (module.weight.shape[0 if isinstance(module, nn.Linear) else 1],), path)
    was_training = model.training
    model.eval()
    stats = module_statistics(model, modules, calibration, side="output", desc="AFM statistics")
    model.train(was_training)
    for path, module in modules.items():
        k = ranks[path]
        if isinstance(module, nn.Embedding):
            replace(model, path, embedding_factors(module.weight, stats[path], k))
        else:
            down, down_bias, up, up_bias = linear_factors(module.weight, module.bias, stats[path], k)
            replace(model, path, FactoredLinear.from_factors(down, up, up_bias, down_bias=down_bias))
    return stats


def linear_params(d_in: int, d_out: int, k: int) -> int:
    """Parameters of an AFM-compressed Linear: ``k(d_in + d_out) + k + d_out``."""
    return k * (d_in + d_out) + k + d_out
