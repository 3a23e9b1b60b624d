"""PELA (Guo et al., 2023, "PELA: Learning Parameter-Efficient Models with Low-Rank Approximation"; official
code guoyang9/PELA ``low_rank.py``, ``engine.py``).

1. Every ``nn.Linear`` whose path contains none of the ``omit`` names and with at least 10 outputs becomes
   ``Linear(in → k, no bias)`` then ``Linear(k → out, bias)`` with ``k = ⌊in·out / (c·(in + out))⌋`` (the factors
   hold about ``1/c`` of the dense parameters), initialised by the truncated SVD with the singular values split
   evenly (the same factors as LoRD's ``weight_svd``: :func:`peftkit.compress.lord.factorize`). Here ``ratio``
   is the fraction of parameters removed, ``c = 1 / (1 − ratio)`` (the paper's default ``c = 2`` is
   ``ratio = 0.5``).
2. Intermediate training of the low-rank student against the frozen original (teacher):
   ``L = task + kd_alpha·L_fm + kd_beta·L_sr + inf_norm_weight·L_wp`` with feature distillation
   ``L_fm = (1/L)Σ_l MSE(h_l^s, h_l^t)`` over the outputs of every block, logit mimicking
   ``L_sr = MSE(logits_s, logits_t)`` and the weight-perturbation regulariser of the official code
   (``inf_norm``): ``L_wp = mean_l (max_ij |(W₂W₁ − W_teacher)_ij| − ε)²``. Defaults follow the DeiT recipe
   (``kd_alpha = 1``, ``kd_beta = 0``), with ``inf_norm_weight = 1``, ``ε = 0`` (the Swin setting) so the
   regulariser is on.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.compress import arch
from peftkit.compress.errors import UnknownArchitectureError, check_fraction
from peftkit.compress.loop import adamw_steps
from peftkit.compress.lord import Plan, factorize, uniform_rank
from peftkit.init._calibration import call

OMIT = ("lm_head", "embed", "norm", "head", "patch_embed", "downsample")
MIN_OUT = 10


def pela_rank(d_in: int, d_out: int, ratio: float) -> int:
    """``k = ⌊in·out / (c·(in + out))⌋`` with ``c = 1/(1 − ratio)`` (at least 1)."""
    return uniform_rank(d_in, d_out, 1.0 - check_fraction("ratio", ratio))


def chosen(model: nn.Module, omit: Sequence[str] = OMIT) -> dict[str, nn.Linear]:
    """The Linears PELA factorises: no ``omit`` name in the path, at least 10 outputs.

    Raises:
        UnknownArchitectureError: none.
    """
    found = {
        p: m
        for p, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features >= MIN_OUT and not any(o in p for o in omit)
    }
    if not found:
        raise UnknownArchitectureError("PELA", [f"nn.Linear modules with >= {MIN_OUT} outputs outside {list(omit)}"])
    return found


@torch.no_grad()
def pela(
    model: nn.Module, ratio: float = 0.5, omit: Sequence[str] = OMIT, *, progress: bool = False
) -> tuple[nn.Module, Plan]:
    """Factorise ``model`` **in place** (step 1) and return ``(teacher, plan)``: the teacher is a frozen copy of
    the model as it was."""
    check_fraction("ratio", ratio)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    layers = chosen(model, omit)
    ranks = {p: pela_rank(m.in_features, m.out_features, ratio) for p, m in layers.items()}
    factorize(model, layers, ranks, progress=progress)
    before = sum(m.weight.numel() for m in layers.values())
    after = sum(k * (layers[p].in_features + layers[p].out_features) for p, k in ranks.items())
    return teacher, Plan(dict(ranks), before, after)


def inf_norm(student: nn.Module, teacher: nn.Module, eps: float = 0.0) -> Tensor:
    """``L_wp``: the mean over factorised layers of ``(max|W₂W₁ − W_teacher| − ε)²`` (teacher weights detached)."""
    terms = [
        (module.weight_product() - teacher.get_submodule(path).weight.detach()).abs().max().sub(eps).square()
        for path, module in student.named_modules()
        if isinstance(module, arch.FactoredLinear)
    ]
    return torch.stack(terms).mean() if terms else torch.zeros(())


class _Outputs:
    """Forward hooks collecting the outputs of ``blocks`` (a tensor, or a tuple's first element)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.values: list[Tensor] = []
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.values.append(output[0] if isinstance(output, tuple) else output)

    def close(self) -> list[Tensor]:
        for h in self.handles:
            h.remove()
        return self.values


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(arch.decoder_blocks(model, "PELA")[1])


@dataclass
class Distiller:
    """PELA's intermediate-training loss for ``student`` against ``teacher`` (see the module docstring).

    ``blocks`` picks the modules whose outputs are distilled (default: LLaMA-style decoder blocks of each model).
    """

    student: nn.Module
    teacher: nn.Module
    kd_alpha: float = 1.0
    kd_beta: float = 0.0
    inf_norm_weight: float = 1.0
    eps: float = 0.0
    task: bool = True

    def losses(self, batch: Any, blocks: tuple[Sequence[nn.Module], Sequence[nn.Module]] | None = None) -> dict:
        """``{"task", "fm", "sr", "wp", "total"}`` for one batch (the task loss is the model's own ``loss``)."""
        s_blocks, t_blocks = blocks or (_blocks(self.student), _blocks(self.teacher))
        hooks_s, hooks_t = _Outputs(s_blocks), _Outputs(t_blocks)
        try:
            out_s = call(self.student, batch)
            with torch.no_grad():
                out_t = call(self.teacher, {k: v for k, v in batch.items() if k != "labels"})
        finally:
            hs, ht = hooks_s.close(), hooks_t.close()
        fm = torch.stack([F.mse_loss(a, b.detach()) for a, b in zip(hs, ht)]).mean()
        logits_s, logits_t = getattr(out_s, "logits", out_s), getattr(out_t, "logits", out_t)
        sr = F.mse_loss(logits_s, logits_t.detach())
        wp = inf_norm(self.student, self.teacher, self.eps)
        task = getattr(out_s, "loss", None) if self.task else None
        total = self.kd_alpha * fm + self.kd_beta * sr + self.inf_norm_weight * wp
        total = total + task if task is not None else total
        return {"task": task, "fm": fm, "sr": sr, "wp": wp, "total": total}


def distill(
    distiller: Distiller, batches: Iterable[Any], *, steps: int, lr: float = 5e-4, weight_decay: float = 0.05,
    progress: bool = False,
) -> list[float]:  # fmt: skip
    """``steps`` AdamW steps of the student on ``distiller``'s total loss, cycling through ``batches``; returns
    the losses. The teacher is never updated."""
    return adamw_steps(
        distiller.student, batches, steps=steps, lr=lr, weight_decay=weight_decay,
        loss_fn=lambda model, batch: distiller.losses(batch)["total"], desc="PELA distillation", progress=progress,
    )  # fmt: skip
