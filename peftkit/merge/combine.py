"""Element-wise merges of stacked task tensors: task arithmetic, TIES, DARE and magnitude pruning as one
generalised task arithmetic (sparsify each task, weight it, optionally elect a sign and keep the agreeing entries).

``stack`` holds one row per task (``[n, N]``: a module's flattened ``ΔW``, or every module's concatenated, see
``scope`` in :mod:`peftkit.merge.merge`); the result is one row ``[N]``. With ``w`` the weights:

* task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic"): ``Σ_i w_i τ_i``.
* magnitude pruning (PEFT's ``magnitude_prune``): keep the ``int(density · N)`` entries of largest ``|τ_i|`` of each
  task (``torch.topk``, as PEFT), then ``Σ_i w_i τ̂_i``.
* TIES (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models"; official code
  prateeksr/ties-merging): trim as above, elect a sign per entry ``γ = sign(Σ_i τ̂_i)`` (``sign="total"``) or
  ``sign(Σ_i sign(τ̂_i))`` (``"frequency"``), ``γ = 0`` counting as ``+1``; keep the entries whose sign is ``γ``
  (pruned zeros never count) and take their disjoint mean ``Σ_{i∈A} w_i τ̂_i / max(1, |A|)``
  (``normalize="count"``: PEFT's ``merge_utils.ties``, the sign elected on the unweighted trimmed tasks). With
  ``normalize="weights"`` the sign is elected on the weighted tasks and the sum is divided by ``Σ_{i∈A} w_i``
  (mergekit's TIES, ``normalize=True``: with equal weights both are the paper's mean); ``"none"`` elects on the
  weighted tasks and divides by nothing (mergekit with ``normalize=False``, its ``dare_ties`` default).
* DARE (Yu et al., 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
  Lunch"): drop each entry with probability ``1 − density`` (``torch.bernoulli``, one mask per task in order)
  and rescale the kept ones by ``1 / density`` (``rescale="density"``, the paper and PEFT; ``"l1"`` restores each
  task's L1 norm instead, as mergekit; ``"none"``), then task arithmetic (``dare_linear``) or TIES' sign election
  and disjoint merge (``dare_ties``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import MergeOptionError

__all__ = ["ELEMENTWISE", "Options", "combine", "parse_options"]

#: The element-wise methods and the options each one reads.
ELEMENTWISE: dict[str, tuple[str, ...]] = {
    "task_arithmetic": (),
    "magnitude_prune": ("density", "scope"),
    "ties": ("density", "sign", "normalize", "scope"),
    "dare_linear": ("density", "rescale", "seed"),
    "dare_ties": ("density", "rescale", "seed", "sign", "normalize"),
}
# Defaults of density: TIES keeps the top 20% (the paper's k = 20); DARE drops 10% (KnOTS's LoRA configs, p = 0.1).
DEFAULT_DENSITY = {"magnitude_prune": 0.2, "ties": 0.2, "dare_linear": 0.9, "dare_ties": 0.9}
_CHOICES = {
    "sign": ("total", "frequency"),
    "normalize": ("count", "weights", "none"),
    "rescale": ("density", "l1", "none"),
    "scope": ("module", "model"),
}


@dataclass(frozen=True)
class Options:
    """The options of an element-wise merge (see the module docstring).

    Attributes:
        density: share of each task's entries kept, in ``(0, 1]`` (TIES / magnitude: by magnitude; DARE: at random).
        sign: how TIES elects the sign: ``"total"`` (sign of the sum) or ``"frequency"`` (sign of the sign count).
        normalize: TIES' disjoint mean: ``"count"`` (PEFT), ``"weights"`` (mergekit) or ``"none"``.
        rescale: DARE's rescaling of the kept entries: ``"density"`` (``1/density``), ``"l1"`` or ``"none"``.
        seed: seed of DARE's masks (``None``: torch's global generator).
        scope: where trimming ranks entries: per ``"module"`` (PEFT, mergekit) or over the whole ``"model"`` (the
            TIES paper, KnOTS).
    """

    density: float = 1.0
    sign: Literal["total", "frequency"] = "total"
    normalize: Literal["count", "weights", "none"] = "count"
    rescale: Literal["density", "l1", "none"] = "density"
    seed: int | None = 0
    scope: Literal["module", "model"] = "module"


def parse_options(method: str, options: dict[str, Any], extra: tuple[str, ...] = ()) -> Options:
    """Check ``options`` for element-wise ``method`` and fill in the defaults.

    Args:
        extra: further option names the caller reads itself (accepted here, not checked).

    Raises:
        MergeOptionError: an unknown method, an option the method does not read, or a value out of range.
    """
    if method not in ELEMENTWISE:
        raise MergeOptionError(f"unknown merge {method!r}; element-wise merges: {', '.join(ELEMENTWISE)}")
    allowed = ELEMENTWISE[method]
    unknown = sorted(set(options) - set(allowed) - set(extra))
    if unknown:
        valid = ", ".join(allowed + extra) or "none"
        raise MergeOptionError(
            f"method {method!r} takes no option {', '.join(map(repr, unknown))}; its options: {valid}"
        )
    picked = {k: v for k, v in options.items() if k in allowed}
    result = replace(Options(density=DEFAULT_DENSITY.get(method, 1.0)), **picked)
    density = result.density
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise MergeOptionError(f"density must lie in (0, 1], got {density!r}")
    for name, choices in _CHOICES.items():
        if getattr(result, name) not in choices:
            raise MergeOptionError(
                f"{name} must be one of {', '.join(map(repr, choices))}, got {getattr(result, name)!r}"
            )
    if result.seed is not None and (isinstance(result.seed, bool) or not isinstance(result.seed, int)):
        raise MergeOptionError(f"seed must be an int or None, got {result.seed!r}")
    return result


def _magnitude(stack: Tensor, density: float) -> Tensor:
    """Keep the ``int(density · N)`` entries of largest magnitude of each row (PEFT's ``magnitude_based_pruning``)."""
    if density >= 1.0:
        return stack
    k = int(density * stack.shape[1])
    mask = torch.zeros_like(stack)
    if k > 0:
        mask.scatter_(1, stack.abs().topk(k, dim=1).indices, 1.0)
    return stack * mask


def _random(stack: Tensor, options: Options, generator: torch.Generator | None) -> Tensor:
    """DARE: a Bernoulli(density) mask per row (drawn row after row), then the rescaling ``options.rescale``."""
    if options.density >= 1.0:
        return stack
    rows = []
    for row in stack:
        kept = row * torch.bernoulli(torch.full_like(row, options.density), generator=generator)
        if options.rescale == "density":
            kept = kept / options.density
        elif options.rescale == "l1":  # mergekit's rescaled_masked_tensor(norm=l1), same eps
            before, after = row.abs().sum(), kept.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
        rows.append(kept)
    return torch.stack(rows)


def combine(
    stack: Tensor, weights: Tensor, method: str, options: Options, generator: torch.Generator | None = None
) -> Tensor:
    """Merge the rows of ``stack`` (``[n, N]``, one task per row) with ``weights`` (``[n]``) by ``method`` (a key
    of :data:`ELEMENTWISE`); returns ``[N]``. Computed in ``stack``'s dtype."""
    if method in ("ties", "magnitude_prune"):
        stack = _magnitude(stack, options.density)
    elif method in ("dare_linear", "dare_ties"):
        stack = _random(stack, options, generator)
    weighted = stack * weights.to(stack)[:, None]
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    elect = stack if options.normalize == "count" else weighted  # PEFT elects on the unweighted tasks, mergekit not
    votes = elect.sum(0) if options.sign == "total" else elect.sign().sum(0)
    gamma = torch.where(votes >= 0, 1.0, -1.0).to(stack)
    agree = elect.sign() == gamma  # pruned (zero) entries never agree
    merged = (weighted * agree).sum(0)
    if options.normalize == "count":
        return merged / agree.sum(0).clamp(min=1).to(stack)
    if options.normalize == "weights":
        divisor = (weights.to(stack)[:, None] * agree).sum(0)
        return merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged
