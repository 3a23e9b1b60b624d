"""A small click-through-rate model and synthetic click data, for AFM (:mod:`peftkit.compress.afm`).

**The data is synthesised here, not real clicks** (no click log ships in a package, and nothing may be
downloaded at run time). :func:`synthetic_clicks` draws ``fields`` categorical features whose values follow a
Zipf law (a long tail, as in Criteo / Avazu), and clicks from a hidden logistic model with first-order weights
and low-rank pairwise interactions (a factorisation machine with latent dimension ``latent``), so a DeepFM can
learn it and an AUC measures how much of it a compressed model keeps.

:class:`DeepFM` (Guo et al., 2017): one embedding table shared by all fields (offsets per field), a first-order
term, the FM pairwise term ``½((Σe)² − Σe²)`` and an MLP on the concatenated embeddings; the logit is their sum.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Clicks(NamedTuple):
    """Feature ids ``[n, fields]`` (already offset into one table) and 0/1 clicks ``[n]``."""

    ids: Tensor
    clicks: Tensor


def synthetic_clicks(
    n: int, *, fields: int = 8, vocab: int = 200, latent: int = 4, seed: int = 0, truth: int = 0, zipf: float = 1.1
) -> tuple[Clicks, int]:
    """``(data, table size)``: ``n`` impressions of ``fields`` features with ``vocab`` values each (see the module
    docstring), drawn with ``seed``; the hidden click model is drawn with ``truth`` (keep it for every split)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = (ranks**-zipf) / (ranks**-zipf).sum()
    values = torch.multinomial(probs.float(), n * fields, replacement=True, generator=g).reshape(n, fields)
    ids = values + torch.arange(fields) * vocab
    size = fields * vocab
    hidden = torch.Generator().manual_seed(truth)
    first = torch.randn(size, generator=hidden) * 0.5
    factors = torch.randn(size, latent, generator=hidden) * 0.5
    e = factors[ids]
    logit = first[ids].sum(1) + 0.5 * (e.sum(1).square() - e.square().sum(1)).sum(1) - 1.5
    clicks = torch.bernoulli(torch.sigmoid(logit), generator=g)
    return Clicks(ids, clicks), size


class DeepFM(nn.Module):
    """DeepFM over one shared embedding table of ``size`` rows and dimension ``dim`` (see the module docstring)."""

    def __init__(self, size: int, fields: int, dim: int = 16, hidden: tuple[int, ...] = (128, 128)) -> None:
        super().__init__()
        self.fields = fields
        self.embedding = nn.Embedding(size, dim)
        self.first = nn.Embedding(size, 1)
        layers: list[nn.Module] = []
        width = fields * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        nn.init.normal_(self.embedding.weight, std=0.05)
        nn.init.zeros_(self.first.weight)

    def forward(self, ids: Tensor) -> Tensor:
        e = self.embedding(ids)  # [n, fields, dim]
        fm = 0.5 * (e.sum(1).square() - e.square().sum(1)).sum(1)
        return self.first(ids).sum((1, 2)) + fm + self.mlp(e.flatten(1)).squeeze(-1)


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (Mann–Whitney; ties get the average rank)."""
    order = scores.double().argsort()
    ranks = torch.empty_like(order, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique()[scores.unique(return_counts=True)[1] > 1]:  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def evaluate(model: nn.Module, data: Clicks, batch_size: int = 4096) -> dict[str, float]:
    """``{"auc", "logloss"}`` of ``model`` on ``data``."""
    model.eval()
    logits = torch.cat([model(data.ids[i : i + batch_size]) for i in range(0, len(data.ids), batch_size)])
    loss = float(F.binary_cross_entropy_with_logits(logits, data.clicks))
    return {"auc": auc(logits, data.clicks), "logloss": loss}


def train(model: nn.Module, data: Clicks, *, epochs: int = 2, lr: float = 2e-3, batch_size: int = 256,
          seed: int = 0) -> None:  # fmt: skip
    """Adam on the binary cross-entropy of the clicks, shuffled with ``seed``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.ids), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(data.ids[idx]), data.clicks[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
