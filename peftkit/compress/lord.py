"""LoRD (Kaushal et al., 2023, "LORD: Low Rank Decomposition Of Monolingual Code LLMs For One-Shot
Compression"; no public code found, details inferred): every chosen Linear ``W [out, in]`` is replaced by two
Linears ``W ≈ W₂W₁`` (:class:`~peftkit.compress.arch.FactoredLinear`, both trainable, so the model can be
fine-tuned further, with LoRA on either factor), in one shot.

Factors (``mode``):

* ``"weight_svd"`` (default): the truncated SVD ``W = USVᵀ``, ``W₂ = U_kS_k^{1/2}``, ``W₁ = S_k^{1/2}V_kᵀ`` (bias on
  ``W₂``); by Eckart–Young ``‖W − W₂W₁‖_F² = Σ_{i>k}σ_i²``. The SVD is :mod:`peftkit.lowrank`'s (float64).
* ``"feature"``: activation-aware, the leading eigenvectors of the layer's *output* covariance on calibration
  data, exactly as AFM (:func:`peftkit.compress.afm.linear_factors`).

Ranks come from a parameter budget (the paper picks per-layer ranks to hit a target parameter count):
``ratio`` is the fraction of the targeted layers' parameters to remove. Each layer's components are worth their
share of that layer's energy (``σ_i² / ‖W‖_F²``, or the output-covariance eigenvalue share in ``feature`` mode)
and cost ``in + out`` parameters; components are taken greedily by worth per parameter until the budget is spent
(inferred: the paper does not publish its rank search). A layer whose rank reaches the break-even
``⌊in·out / (in + out)⌋`` stays dense. ``allocation="uniform"`` gives every layer the same fraction instead,
``k = ⌊(1 − ratio)·in·out / (in + out)⌋`` (PELA's formula with ``c = 1/(1 − ratio)``): the plain-SVD baseline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from peftkit.compress import arch
from peftkit.compress.afm import linear_factors
from peftkit.compress.data import check_calibration
from peftkit.compress.errors import CompressOptionError, check_fraction, check_rank
from peftkit.init._calibration import module_statistics
from peftkit.lowrank import dense_svd, truncate

MODES = ("weight_svd", "feature")
ALLOCATIONS = ("budget", "uniform")


class Plan(NamedTuple):
    """Per-layer ranks (``None``: the layer stays dense) and the parameter counts before / after."""

    ranks: dict[str, int | None]
    params_before: int
    params_after: int


def break_even(d_in: int, d_out: int) -> int:
    """The largest rank at which two factors are not larger than the dense weight."""
    return d_in * d_out // (d_in + d_out)


def uniform_rank(d_in: int, d_out: int, keep: float) -> int:
    """``⌊keep·in·out / (in + out)⌋`` (at least 1): the factors hold about ``keep`` of the dense parameters."""
    return max(1, int(keep * d_in * d_out / (d_in + d_out)))


def allocate(spectra: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]], ratio: float) -> Plan:
    """Greedy budgeted ranks (see the module docstring) from each layer's descending component energies."""
    check_fraction("ratio", ratio)
    before = sum(o * i for o, i in shapes.values())
    budget = (1.0 - ratio) * before
    candidates = []
    for path, energy in spectra.items():
        o, i = shapes[path]
        share = (energy.double().clamp(min=0) / energy.double().clamp(min=0).sum().clamp(min=1e-300)).tolist()
        candidates += [(s / (o + i), path) for s in share[1 : break_even(i, o) - 1]]
    ranks = dict.fromkeys(spectra, 1)  # every layer keeps at least rank 1
    spent = sum(o + i for o, i in shapes.values())
    for _, path in sorted(candidates, key=lambda c: -c[0]):
        o, i = shapes[path]
        if spent + o + i <= budget:
            ranks[path] += 1
            spent += o + i
    plan: dict[str, int | None] = dict(ranks)
    # a layer that took every factored component it could stays dense if the rest of the budget pays for it
    for path, k in sorted(ranks.items(), key=lambda item: shapes[item[0]][0] * shapes[item[0]][1]):
        o, i = shapes[path]
        extra = o * i - k * (o + i)
        if k >= break_even(i, o) - 1 and spent + extra <= budget:
            plan[path] = None
            spent += extra
    after = sum(o * i if plan[p] is None else plan[p] * (o + i) for p, (o, i) in shapes.items())
    return Plan(plan, before, after)


def factorize(
    model: nn.Module, layers: Mapping[str, nn.Linear], ranks: Mapping[str, int | None], *, progress: bool = False
) -> None:
    """Replace each Linear in ``layers`` by its rank-``k`` truncated-SVD :class:`FactoredLinear` (in place;
    ``None`` keeps it dense)."""
    for path, layer in tqdm(layers.items(), desc="factorising", unit="layer", disable=not progress, leave=False):
        k = ranks[path]
        if k is None:
            continue
        check_rank(k, tuple(layer.weight.shape), path)
        f = truncate(dense_svd(layer.weight), k, cut_at_numerical_rank=False)
        bias = layer.bias.detach() if layer.bias is not None else None
        module = arch.FactoredLinear.from_factors(f.down, f.up, bias).to(layer.weight.dtype)
        arch.replace(model, path, module.to(layer.weight.device))


@torch.no_grad()
def lord(
    model: nn.Module,
    *,
    ratio: float | None = None,
    ranks: Mapping[str, int] | None = None,
    mode: str = "weight_svd",
    allocation: str = "budget",
    targets: Sequence[str] | None = None,
    calibration: Iterable[Any] | None = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> Plan:
    """Factorise ``model``'s Linears **in place** (see the module docstring) and return the plan.

    Args:
        ratio: fraction of the targeted parameters to remove, in ``(0, 1)``; or give ``ranks`` (``{path: k}``).
        mode: ``"weight_svd"`` or ``"feature"`` (needs ``calibration``).
        allocation: ``"budget"`` (greedy, per layer) or ``"uniform"`` (same fraction everywhere).
        targets: Linear name suffixes (default: LLaMA's q, k, v, o, gate, up, down projections).
        progress: show progress bars (spectra, factorisation).

    Raises:
        RatioError, RankError, CalibrationError, UnknownArchitectureError, CompressOptionError.
    """
    if mode not in MODES or allocation not in ALLOCATIONS:
        raise CompressOptionError(f"mode must be one of {MODES} and allocation one of {ALLOCATIONS}")
    layers = arch.linears(model, targets, "LoRD")
    shapes = {p: (m.out_features, m.in_features) for p, m in layers.items()}
    stats = None
    if mode == "feature":
        data = check_calibration(model, calibration if calibration is not None else [], tokenizer)
        model.eval()
        stats = module_statistics(model, layers, data, side="output", desc="LoRD statistics")
    if ranks is not None:
        plan = {p: ranks.get(p) for p in layers}
        for p, k in plan.items():
            if k is not None:
                check_rank(k, shapes[p], p)
        before = sum(o * i for o, i in shapes.values())
        after = sum(o * i if plan[p] is None else plan[p] * (o + i) for p, (o, i) in shapes.items())
        result = Plan(plan, before, after)
    elif allocation == "uniform":
        keep = 1.0 - check_fraction("ratio", ratio)
        plan = {p: uniform_rank(i, o, keep) for p, (o, i) in shapes.items()}
        after = sum(k * (o + i) for k, (o, i) in zip(plan.values(), shapes.values()))
        result = Plan(plan, sum(o * i for o, i in shapes.values()), after)
    else:
        check_fraction("ratio", ratio)
        if stats is not None:
            spectra = {p: torch.linalg.eigvalsh(s.covariance).flip(0) for p, s in stats.items()}
        else:
            items = tqdm(layers.items(), desc="LoRD spectra", unit="layer", disable=not progress, leave=False)
            spectra = {p: spectrum(m.weight) for p, m in items}
        result = allocate(spectra, shapes, ratio)  # type: ignore[arg-type]
    if stats is None:
        factorize(model, layers, result.ranks, progress=progress)
        return result
    for path, layer in layers.items():
        k = result.ranks[path]
        if k is None:
            continue
        down, down_bias, up, up_bias = linear_factors(layer.weight, layer.bias, stats[path], k)
        arch.replace(model, path, arch.FactoredLinear.from_factors(down, up, up_bias, down_bias=down_bias))
    return result


def spectrum(weight: Tensor) -> Tensor:
    """Squared singular values of ``weight`` (descending, float64)."""
    return dense_svd(weight).s.square()
