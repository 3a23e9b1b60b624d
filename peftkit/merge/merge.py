"""``pk.merge_adapters``: merge adapters of a model into a new LoRA adapter, in weight space.

Every merge works on each adapter's dense update ``ΔW_i`` (:meth:`Adapter.delta_weight`, scale included; any
mergeable method, any ranks), so there is no cross-term error: ``task_arithmetic`` gives ``Σ_i w_i ΔW_i`` to float
precision, where PEFT's ``add_weighted_adapter(combination_type="linear")`` combines the A and B factors separately
and adds the cross terms ``B_i A_j``. The result is a LoRA with scale 1 (``alpha = r`` per module):

* ``task_arithmetic`` on adapters that all have a low-rank form: the concatenation of their factors (PEFT's
  ``cat``), exact at rank ``Σ r_i``;
* ``knots``: exact at the rank ``k ≤ Σ r_i`` of the shared basis (:mod:`peftkit.merge.knots`);
* otherwise (an update without a low-rank form, a bias change, a sparsified merge: ``ties``, ``dare_*``,
  ``magnitude_prune``) the SVD of the merged ``ΔW`` at its numerical rank (exact to float precision; a sparsified
  update is usually of full rank).

``rank=k`` truncates every module to at most ``k`` by SVD (Eckart–Young optimal); the relative error
``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` per module and overall is returned in :class:`MergeResult` and logged (logger
``peftkit.merge``). Modules the adapters train whole (``modules_to_save``) are merged by the same method and kept
dense. The element-wise methods and their options are described in :mod:`peftkit.merge.combine`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from peftkit.core import inject
from peftkit.core.model import AdaptedModel
from peftkit.interop.configs import exact_targets
from peftkit.lowrank import Factors, from_dense, from_factors
from peftkit.methods.lora import LoRAConfig

from . import knots
from .combine import ELEMENTWISE, Options, combine, parse_options
from .errors import MergeOptionError
from .sources import Source, check_request, collect, refuse_unmergeable

__all__ = ["METHODS", "MergeResult", "Merged", "merge_adapters", "merged_lora"]

logger = logging.getLogger("peftkit.merge")

#: The merge methods of :func:`merge_adapters`.
METHODS = (*ELEMENTWISE, "knots")


@dataclass
class MergeResult:
    """What :func:`merge_adapters` added.

    Attributes:
        name: the new adapter's name.
        method: the merge method (for ``knots``: ``"knots+<merge>"``).
        weights: one per source adapter.
        ranks: the LoRA rank of each module (saved dense modules are not listed).
        errors: per module, the relative Frobenius error of the LoRA against the method's merged ``ΔW`` (0 where
            exact; see :mod:`peftkit.lowrank`).
        error: the same over all modules together: ``√(Σ_p e_p² ‖ΔW_p‖²) / √(Σ_p ‖ΔW_p‖²)``.
        seconds: wall time of the merge.
        config: the new adapter's config.
    """

    name: str
    method: str
    weights: list[float]
    ranks: dict[str, int]
    errors: dict[str, float]
    error: float
    seconds: float
    config: LoRAConfig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: everything but the config, plus the config as ``config.to_dict()``."""
        out = {k: v for k, v in asdict(self).items() if k != "config"}
        return {**out, "config": self.config.to_dict()}


class Merged:
    """A merged adapter being built module by module: its tensors, and each LoRA module's factors (rank, error)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.factors: dict[str, Factors] = {}
        self.biases: dict[str, Tensor | None] = {}
        self.bases: dict[str, Source] = {}
        self.saved: list[str] = []

    def lora(self, source: Source, factors: Factors, bias: Tensor | None) -> None:
        self.factors[source.path], self.biases[source.path], self.bases[source.path] = factors, bias, source

    def dense(self, source: Source, delta: Tensor, bias: Tensor | None, rank: int | None) -> None:
        """A merged dense ``[out, fan_in]`` update: kept dense on a saved module, else as SVD factors."""
        if not source.saved:
            self.lora(source, from_dense(delta, rank), bias)
            return
        self.saved.append(source.path)
        self.tensors[f"{source.path}.weight_delta"] = delta.float().reshape(source.base.weight_shape)
        if source.base.bias is not None:
            zero = torch.zeros(source.base.out_features, device=delta.device)
            self.tensors[f"{source.path}.bias_delta"] = zero if bias is None else bias.float()

    def finish(self, model: AdaptedModel) -> tuple[LoRAConfig, dict[str, Tensor]]:
        ranks = {p: f.down.shape[0] for p, f in self.factors.items()}
        r = max(ranks.values(), default=1)
        biased = any(b is not None for b in self.biases.values())
        overrides: dict[str, dict[str, Any]] = {}
        for path, f in self.factors.items():
            base = self.bases[path].base
            self.tensors[f"{path}.A"] = f.down.reshape(f.down.shape[0], *base.weight_shape[1:])
            self.tensors[f"{path}.B"] = f.up
            if ranks[path] != r:
                overrides[path] = {"r": ranks[path], "alpha": float(ranks[path])}
            bias = self.biases[path]
            if biased and bias is None:
                overrides.setdefault(path, {})["bias"] = False
            elif bias is not None:
                self.tensors[f"{path}.bias"] = bias.float()
        config = LoRAConfig(
            r=r,
            alpha=float(r),
            bias=biased,
            targets=exact_targets(sorted(self.factors), dict(inject.base_modules(model.model))),
            modules_to_save=sorted(self.saved),
            overrides=overrides,
        )
        return config, self.tensors

    def error(self) -> float:
        num = sum((f.error * f.norm) ** 2 for f in self.factors.values())
        den = sum(f.norm**2 for f in self.factors.values())
        return (num / den) ** 0.5 if den > 0 else 0.0


def _resolve(method: str, options: dict[str, Any]) -> tuple[str, Options]:
    """``(element-wise method, options)`` of a request; for ``knots`` the ``merge`` option names the element-wise
    merge of the aligned updates (default ``"ties"``) and ``scope`` defaults to ``"model"``."""
    if method not in METHODS:
        raise MergeOptionError(f"unknown merge method {method!r}; methods: {', '.join(METHODS)}")
    if method != "knots":
        return method, parse_options(method, options)
    options = dict(options)
    inner = options.pop("merge", "ties")
    scope = options.pop("scope", "model")
    if inner not in ELEMENTWISE:
        raise MergeOptionError(f"knots merges the aligned updates by one of {', '.join(ELEMENTWISE)}, got {inner!r}")
    parsed = parse_options(inner, options)
    if scope not in ("module", "model"):
        raise MergeOptionError(f"scope must be one of 'module', 'model', got {scope!r}")
    return inner, replace(parsed, scope=scope)


def merged_lora(
    model: AdaptedModel,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    method: str = "task_arithmetic",
    rank: int | None = None,
    **options: Any,
) -> tuple[LoRAConfig, dict[str, Tensor], Merged]:
    """The merged adapter as ``(config, tensors, details)`` without adding it (:func:`merge_adapters` adds it;
    LoraHub re-merges with new weights into one adapter). Arguments and errors as :func:`merge_adapters`."""
    weights = check_request(model, names, weights, new_name="")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeOptionError(f"rank must be a positive int or None, got {rank!r}")
    inner, opts = _resolve(method, options)
    sources = collect(model, names)
    built = Merged()
    failed: dict[str, list[str]] = {}

    def deltas(source: Source) -> tuple[list[Tensor], list[Tensor] | None] | None:
        found = source.deltas()
        if found is None:
            for name in source.unmergeable(names):
                failed.setdefault(name, []).append(source.path)
        return found

    w = torch.tensor(weights, dtype=torch.float64)
    generator = None
    if opts.seed is not None and sources:
        generator = torch.Generator(device=sources[0].base.device).manual_seed(opts.seed)
    if method == "task_arithmetic":
        for source in sources:
            cat = None if source.saved else source.lowrank(weights)
            if cat is not None:
                built.lora(source, from_factors(*cat, rank), None)
            elif (found := deltas(source)) is not None:
                ws, bs = found
                total = sum(wi * d.double() for wi, d in zip(weights, ws))
                bias = None if bs is None else sum(wi * b.double() for wi, b in zip(weights, bs))
                built.dense(source, total, bias, rank)
    elif method == "knots":
        aligned = {}
        for source in (s for s in sources if not s.saved):
            found = knots.align(source)
            if found is None:
                deltas(source)  # records the adapters without an update
            else:
                aligned[source.path] = (source, found)
        groups = [list(aligned)] if opts.scope == "model" else [[p] for p in aligned]
        for group in groups:
            merged = _combine([aligned[p][1].z for p in group], w, inner, opts, generator)
            for path, z in zip(group, merged):
                source, a = aligned[path]
                cols = source.fan_in
                built.lora(source, from_factors(a.u, z[:, :cols], rank), a.u @ z[:, cols] if a.bias else None)
        _elementwise([s for s in sources if s.saved], "module", w, inner, opts, generator, deltas, built, rank)
    else:
        _elementwise(sources, opts.scope, w, inner, opts, generator, deltas, built, rank)
    refuse_unmergeable(model, names, failed)
    config, tensors = built.finish(model)
    return config, tensors, built


def _combine(
    tensors: list[Tensor], weights: Tensor, method: str, opts: Options, generator: torch.Generator | None
) -> list[Tensor]:
    """Merge a group of per-module task tensors (each ``[n, ...]``) as one flat vector per task; split back."""
    if not tensors:  # every module of the group failed (reported as not mergeable)
        return []
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
    merged = combine(flat, weights, method, opts, generator)
    return [m.reshape(t.shape[1:]) for m, t in zip(merged.split([t[0].numel() for t in tensors]), tensors)]


def _elementwise(
    sources: list[Source],
    scope: str,
    weights: Tensor,
    method: str,
    opts: Options,
    generator: torch.Generator | None,
    deltas: Callable[[Source], tuple[list[Tensor], list[Tensor] | None] | None],
    built: Merged,
    rank: int | None,
) -> None:
    """Element-wise ``method`` on the dense updates (a bias change as a last column), per module or over all."""
    stacks: dict[str, tuple[Source, Tensor, bool]] = {}
    for source in sources:
        found = deltas(source)
        if found is None:
            continue
        ws, bs = found
        rows = [torch.cat([d, b[:, None]], dim=1) for d, b in zip(ws, bs)] if bs is not None else ws
        stacks[source.path] = (source, torch.stack(rows), bs is not None)
    groups = [list(stacks)] if scope == "model" else [[p] for p in stacks]
    for group in groups:
        merged = _combine([stacks[p][1] for p in group], weights, method, opts, generator)
        for path, m in zip(group, merged):
            source, _, biased = stacks[path]
            cols = source.fan_in
            built.dense(source, m[:, :cols], m[:, cols] if biased else None, rank)


def merge_adapters(
    model: AdaptedModel,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    method: str = "task_arithmetic",
    new_name: str = "merged",
    rank: int | None = None,
    *,
    activate: bool | None = None,
    **options: Any,
) -> MergeResult:
    """Merge adapters ``names`` of ``model`` with ``weights`` into a new LoRA adapter ``new_name`` (see the module
    docstring); the model keeps the source adapters.

    Args:
        names: the adapters to merge (any mergeable methods and ranks, on the same modules).
        weights: one per adapter (default 1 each: the sum, or TIES' mean of the agreeing entries).
        method: ``"task_arithmetic"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` or
            ``"knots"``.
        new_name: the new adapter's name.
        rank: truncate each module of the result to at most this rank by SVD (default: exact).
        activate: make the new adapter active (default: only if no adapter is active, as ``add_adapter``).
        options: ``density``, ``sign``, ``normalize``, ``rescale``, ``seed``, ``scope``
            (:class:`peftkit.merge.combine.Options`, as each method reads them); ``knots`` also takes ``merge``,
            the element-wise merge of the aligned updates (default ``"ties"``).

    Returns:
        :class:`MergeResult` (ranks, relative errors, time).

    Raises:
        AdapterNotFoundError: a name the model does not hold. AdapterExistsError: ``new_name`` is in use.
        MergeWeightsError: weights of the wrong length or not finite. TargetMismatchError: the adapters adapt
        different modules (named). NotMergeableError: adapters without a weight-space update (listed).
        MergeOptionError: an unknown method or option, ``density`` outside ``(0, 1]``, ``rank < 1``.
    """
    start = time.perf_counter()
    check_request(model, names, weights, new_name)
    config, tensors, built = merged_lora(model, names, weights, method, rank, **options)
    model.load_tensors(new_name, config, tensors, activate=activate, source=f"the merge of {list(names)}")
    seconds = time.perf_counter() - start
    label = method if method != "knots" else f"knots+{options.get('merge', 'ties')}"
    ranks = {p: f.down.shape[0] for p, f in built.factors.items()}
    errors = {p: f.error for p, f in built.factors.items()}
    result = MergeResult(
        new_name,
        label,
        [float(x) for x in (weights or [1.0] * len(names))],
        ranks,
        errors,
        built.error(),
        seconds,
        config,
    )
    if ranks:
        worst = max(errors, key=errors.__getitem__)
        logger.info(
            "merged %s by %s into %r: ranks %d-%d, relative error %.3g (largest %.3g on %s), %.2f s",
            list(names), label, new_name, min(ranks.values()), max(ranks.values()), result.error, errors[worst], worst,
            seconds,
        )  # fmt: skip
    return result
