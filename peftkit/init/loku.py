"""LoKU (Cha et al., 2025, "Towards Robust and Parameter-Efficient Knowledge Unlearning for LLMs"): the FILA
initialisation and the inverted hinge loss.

FILA: Fisher diagonals over one pass of the forget set and of the
retain set, ``F_f = Σ_batches (∂L/∂W)²·n_tok`` (``n_tok``: the batch's non-ignored label tokens), likewise
``F_r``; relative importance ``I = (F_f/f_cnt) / (1e-5 + F_r/r_cnt)``; row weights ``w = √(Σ_j I_ij)``;
``U, S, V = svd_lowrank(diag(w) W, q=r)``; ``S ← S/s``; ``A = (V√S)ᵀ``, ``B = diag(1/(w + 1e-5)) U√S``; the
residual offset ``B₀A₀ = BA`` keeps the model unchanged at init (frozen offset, base untouched: see
:mod:`peftkit.methods.lora`). Train with ``IHL(forget) + NLL(retain)`` (:func:`inverted_hinge_loss`).
Decisions (inferred): the Fisher passes run on the adapter's target weights only (the official code measures
all parameters but uses only the targets); singular pairs follow the spec's sign convention.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import InvalidConfigError
from peftkit.core.protocol import require_positive_int
from peftkit.init._calibration import LossFn, per_batch_gradients, seeded, target_layers, token_count
from peftkit.methods.lora import fix_signs

if TYPE_CHECKING:
    from peftkit.core.model import AdaptedModel

FISHER_EPS = 1e-5  # official: I = (F_f/f_cnt) / (1e-5 + F_r/r_cnt)
ROW_EPS = 1e-5  # official: B = diag(1/(w + 1e-5)) U √S


def inverted_hinge_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """LoKU's inverted hinge loss, ``mean over tokens of max(0, 1 + p_y − max_{v≠y} p_v)`` with
    ``p = softmax(logits)``: it pushes the true token's probability down and the runner-up's up, so the model
    forgets the target without the unbounded growth of gradient ascent. Values lie in ``[0, 2]``.

    Args:
        logits: ``[..., vocab]``, aligned with ``labels`` (shift causal-LM logits first).
        labels: ``[...]`` token ids; ``ignore_index`` entries do not count.
    """
    probs = logits.float().softmax(dim=-1)
    mask = labels != ignore_index
    target = labels.masked_fill(~mask, 0).unsqueeze(-1)
    p_true = probs.gather(-1, target).squeeze(-1)
    p_other = probs.scatter(-1, target, -1.0).amax(dim=-1)  # probabilities are >= 0, so -1 is never the max
    loss = (1.0 + p_true - p_other).clamp_min(0.0)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


@torch.no_grad()
def fila_factors(
    weight: Tensor, importance: Tensor, r: int, scale: float, *, niter: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """FILA's ``A [r, in]``, ``B [out, r]`` for one layer from ``W [out, in]`` and its relative importance
    ``I [out, in]`` (see the module docstring). ``niter``: subspace iterations of ``torch.svd_lowrank``
    (its default 2, as the official call)."""
    w = importance.float().sum(dim=1).clamp_min(0).sqrt()  # [out]
    with seeded(seed, weight.device):
        u, s, v = torch.svd_lowrank(w[:, None] * weight.detach().float(), q=r, niter=niter)
    u, vh = fix_signs(u, v.T)
    root = (s / scale).sqrt()
    return root[:, None] * vh, (1.0 / (w + ROW_EPS))[:, None] * (u * root)


class LoKU:
    """FILA initialiser for unlearning: ``init=pk.init.LoKU(forget_batches, retain_batches)``.

    Args:
        forget_batches: batches of the forget set (one Fisher pass).
        retain_batches: batches of the retain set (one Fisher pass).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss`` (the NLL).
        niter: subspace iterations of the randomised SVD (default 2, official).
        seed: seed of the randomised SVDs.
    """

    def __init__(
        self,
        forget_batches: Iterable[Any],
        retain_batches: Iterable[Any],
        loss_fn: LossFn | None = None,
        niter: int = 2,
        seed: int = 0,
    ) -> None:
        require_positive_int("niter", niter)
        self.forget_batches, self.retain_batches, self.loss_fn = forget_batches, retain_batches, loss_fn
        self.niter, self.seed = niter, seed

    def prepare(self, config: AdapterConfig) -> AdapterConfig:
        from peftkit.init.pissa import residual_config

        return residual_config(config, "loku")

    def fisher(self, model: AdaptedModel, name: str, batches: Iterable[Any], desc: str) -> dict[str, Tensor]:
        """``{module path: F / token count}``: the token-normalised diagonal Fisher of the target weights."""
        total: dict[str, Tensor] = {}
        tokens = 0
        for batch, grads in per_batch_gradients(model, name, batches, self.loss_fn, desc):
            n = token_count(batch)
            for path, g in grads.items():
                sq = g.square() * n
                total[path] = total[path] + sq if path in total else sq
            tokens += n
        if tokens == 0:
            raise InvalidConfigError(f"LoKU: {desc} got no batches (or no label tokens)")
        return {path: f / tokens for path, f in total.items()}

    def importance(self, model: AdaptedModel, name: str) -> dict[str, Tensor]:
        """``{module path: I}`` with ``I = (F_f/f_cnt) / (1e-5 + F_r/r_cnt)``."""
        forget = self.fisher(model, name, self.forget_batches, "LoKU Fisher (forget)")
        retain = self.fisher(model, name, self.retain_batches, "LoKU Fisher (retain)")
        return {path: forget[path] / (FISHER_EPS + retain[path]) for path in forget}

    @torch.no_grad()
    def apply(self, model: AdaptedModel, name: str) -> None:
        importance = self.importance(model, name)
        for path, (layer, adapter) in target_layers(model, name).items():
            weight = layer.base.weight.reshape(layer.base.out_features, -1)
            a, b = fila_factors(
                weight, importance[path], adapter.config.r, adapter.scale, niter=self.niter, seed=self.seed
            )
            adapter.set_factors(a, b)
