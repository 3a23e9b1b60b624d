"""LoraHub (Huang et al., COLM 2024, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition";
official code sail-sg/lorahub, ``lorahub/algorithm.py``): compose existing LoRAs for a new task from a few
examples, by a gradient-free search of the composition weights.

Objective (``get_score``): ``L(w) = mean loss on the examples + l1 · mean_i |w_i|`` (``l1 = 0.05``), searched in
``[−1.5, 1.5]^n`` from ``w = 0`` with a budget of 40 evaluations. The official code uses nevergrad's ``NGOpt``; we use
our own CMA-ES (:mod:`peftkit.merge.cma`; the issue allows either), initial step ``σ = 0.5`` (a sixth of the box, a
decision). Composition:

* ``compose="factors"`` (default, as released): ``A = Σ w_i A_i``, ``B = Σ w_i B_i`` (each LoRA's scale split as
  ``√s_i`` over both factors, so a one-hot ``w`` gives that LoRA exactly; with equal scales this is the official
  ``s (Σ w_i B_i)(Σ w_i A_i)``). Its update is quadratic in ``w`` (it has cross terms ``w_i w_j B_i A_j``) and needs
  equal ranks.
* ``compose="delta"``: ``Σ_i w_i ΔW_i`` exactly (the concatenated factors, rank ``Σ r_i``; :func:`merge_adapters`'
  task arithmetic).

``w = 0`` is the base model. The composed adapter is built once and its tensors rewritten for each evaluation
(``AdaptedModel.assign_tensors``); it stays in the model with the best weights found.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from peftkit.core.model import AdaptedModel
from peftkit.lowrank import Factors

from .cma import cma_es
from .errors import MergeError, MergeOptionError
from .merge import Merged
from .sources import Source, check_request, collect

__all__ = ["LoraHubResult", "compose", "lorahub"]


@dataclass
class LoraHubResult:
    """The composed adapter ``name``, its ``weights`` per source, the objective ``value`` there, the base model's
    objective (``w = 0``), every evaluation's objective in order, and the search's wall time."""

    name: str
    weights: dict[str, float]
    value: float
    base_value: float
    history: list[float]
    seconds: float


def compose(
    model: AdaptedModel, names: Sequence[str], weights: Sequence[float], how: Literal["factors", "delta"] = "factors"
) -> tuple[Any, dict[str, Tensor]]:
    """The LoraHub composition of adapters ``names`` with ``weights`` as ``(LoRAConfig, tensors)`` (see the module
    docstring); saved modules (``modules_to_save``) are summed densely with the weights.

    Raises:
        MergeError: a module where an adapter has no low-rank form (or changes the bias), or, for ``"factors"``,
            where the ranks differ.
    """
    built = Merged()
    for source in collect(model, names):
        if source.saved:
            found = source.deltas()
            assert found is not None  # a saved module is the core's dense delta
            total = sum(w * d.double() for w, d in zip(weights, found[0]))
            bias = None if found[1] is None else sum(w * b.double() for w, b in zip(weights, found[1]))
            built.dense(source, total, bias, None)
            continue
        up, down = _composed(source, weights, how)
        built.lora(source, Factors(down, up, 0.0, 0.0), None)
    return built.finish(model)


def _composed(source: Source, weights: Sequence[float], how: str) -> tuple[Tensor, Tensor]:
    forms = [a.lowrank(source.base) for a in source.adapters]
    if any(f is None for f in forms) or any(a.delta_bias(source.base) is not None for a in source.adapters):
        raise MergeError(f"{source.path!r}: LoraHub composes LoRA factors, and an adapter there has none")
    if how == "delta":
        found = source.lowrank(weights)
        assert found is not None
        return found
    ranks = sorted({f.down.shape[0] for f in forms if f is not None})
    if len(ranks) > 1:
        raise MergeError(f"{source.path!r}: compose='factors' needs equal ranks, got {ranks} (use compose='delta')")
    up = sum(w * math.sqrt(f.scale) * f.up.detach().float() for w, f in zip(weights, forms) if f is not None)
    down = sum(
        w * math.sqrt(f.scale) * f.down.detach().reshape(f.down.shape[0], -1).float()
        for w, f in zip(weights, forms)
        if f is not None
    )
    return up, down  # type: ignore[return-value]


def _default_loss(model: AdaptedModel, batch: dict[str, Any]) -> Tensor:
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def lorahub(
    model: AdaptedModel,
    names: Sequence[str],
    batches: Iterable[dict[str, Any]],
    *,
    loss_fn: Callable[[AdaptedModel, dict[str, Any]], Tensor] | None = None,
    new_name: str = "lorahub",
    compose_with: Literal["factors", "delta"] = "factors",
    budget: int = 40,
    l1: float = 0.05,
    bound: float = 1.5,
    seed: int | None = 42,
    activate: bool = True,
) -> LoraHubResult:
    """Search the weights composing adapters ``names`` for the task of ``batches`` (a few labelled examples) and
    add the composition as adapter ``new_name``.

    Args:
        batches: the few-shot examples as model inputs (with labels); re-read at each evaluation.
        loss_fn: ``loss_fn(model, batch)`` (default: the model's ``loss`` output for the batch).
        compose_with: ``"factors"`` (official) or ``"delta"`` (see the module docstring).
        budget: evaluations of the objective in the search (official: 40), plus one at ``w = 0`` (the base).
            l1: the L1 coefficient (official: 0.05).
        bound: the search box ``[−bound, bound]^n`` (official: 1.5). seed: the search's seed (official: 42).
        activate: leave the new adapter as the only active one (else restore the active adapters).

    Raises:
        MergeOptionError: ``budget < 1``, ``bound <= 0``, ``l1 < 0``, an unknown ``compose_with``.
        plus :func:`compose`'s errors and those of :func:`~peftkit.merge.merge_adapters` for names and new name.
    """
    start = time.perf_counter()
    check_request(model, names, None, new_name)
    if compose_with not in ("factors", "delta"):
        raise MergeOptionError(f"compose_with must be 'factors' or 'delta', got {compose_with!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise MergeOptionError(f"budget must be a positive int, got {budget!r}")
    if not (math.isfinite(bound) and bound > 0) or not (math.isfinite(l1) and l1 >= 0):
        raise MergeOptionError(f"bound must be positive and l1 non-negative, got bound={bound}, l1={l1}")
    batches = list(batches)
    loss_fn = loss_fn or _default_loss
    previous, was_training = model.active_adapters, model.training
    config, tensors = compose(model, names, [0.0] * len(names), compose_with)
    model.load_tensors(new_name, config, tensors, activate=False, source="the LoraHub composition")
    model.set_adapter(new_name)
    model.eval()

    def objective(w: np.ndarray) -> float:
        model.assign_tensors(new_name, compose(model, names, w.tolist(), compose_with)[1], source="LoraHub")
        with torch.no_grad():
            losses = [(float(loss_fn(model, b)), _rows(b)) for b in batches]
        total = sum(n for _, n in losses) or 1
        return sum(v * n for v, n in losses) / total + l1 * float(np.abs(w).mean())

    try:
        base_value = objective(np.zeros(len(names)))
        found = cma_es(objective, np.zeros(len(names)), bound / 3, lower=-bound, upper=bound, budget=budget, seed=seed)
        best = found.x if found.value < base_value else np.zeros(len(names))
        model.assign_tensors(new_name, compose(model, names, best.tolist(), compose_with)[1], source="LoraHub")
    except BaseException:
        model.delete_adapter(new_name)
        raise
    finally:
        model.train(was_training)
        if not activate and previous:
            model.set_adapter(list(previous))
    return LoraHubResult(
        new_name,
        {n: float(x) for n, x in zip(names, best)},
        min(found.value, base_value),
        base_value,
        [base_value, *found.history],
        time.perf_counter() - start,
    )


def _rows(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1
