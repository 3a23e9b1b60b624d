"""Reversible model merging for low-rank updates (after "Towards Reversible Model Merging For Low-rank Weights";
no public code was found: the algorithm below is inferred from the paper's description).

Instead of one merged adapter, keep ``k < n`` shared "model equivalents" (a basis) and per-task coefficients, so
each task's update can be reconstructed (reverted) on demand. Per module, each task is a vector ``x_i`` and
``X = [x_1 … x_n]`` (``D × n``); the closed-form, data-free optimum of ``min ‖X − Φ C‖_F`` over a rank-``k`` basis is
the truncated SVD ``X ≈ U_k S_k V_kᵀ``, ``Φ = U_k S_k`` (``D × k``), ``C = V_kᵀ`` (``k × n``; Eckart & Young, 1936),
with error ``√(Σ_{m>k} σ_m²)``. Task ``j`` is reverted as ``x̂_j = Φ c_j``.

* ``space="factors"`` (default, the paper's setting): ``x_i`` are a LoRA's factors, ``vec(s_i A_i)`` and
  ``vec(B_i)`` fitted separately with their own coefficients (``joint=True``: one fit of ``[vec(s_i A_i); vec(B_i)]``,
  shared coefficients). Needs a low-rank form of equal rank for every task on the module. A reverted task is a
  LoRA of that rank, ``ΔŴ_j = B̂_j Â_j``.
* ``space="delta"``: ``x_i = vec(ΔW_i)`` (with a bias change appended): the exact-product reference, any mergeable
  method; the basis holds ``k`` dense matrices per module.

Storage (floats): ``k`` times one task's tensors plus ``k · n`` coefficients, per module and fit; the ``n`` separate
adapters take ``n`` times one task's tensors. ``k = n`` reverts every task exactly (to float precision).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from peftkit.core.model import AdaptedModel
from peftkit.lowrank import from_dense, from_factors

from .errors import MergeError, MergeOptionError
from .merge import Merged
from .sources import Source, check_request, collect, refuse_unmergeable

__all__ = ["ReversibleMerge", "rmm", "rmm_report"]

FILE = "rmm.safetensors"


@dataclass
class Fit:
    """One fitted side of one module: ``X ≈ basis @ coeffs``; ``sv`` all singular values of ``X``."""

    basis: Tensor  # [D, k] float64
    coeffs: Tensor  # [k, n] float64
    sv: Tensor  # [min(D, n)]

    @classmethod
    def of(cls, x: Tensor, k: int) -> Fit:
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        k = min(k, s.numel())
        return cls(u[:, :k] * s[:k], vh[:k], s)

    def column(self, j: int) -> Tensor:
        return self.basis @ self.coeffs[:, j]

    @property
    def tail(self) -> float:
        """``‖X − basis · coeffs‖_F``: the root of the discarded singular values' squares."""
        return float(self.sv[self.coeffs.shape[0] :].square().sum().sqrt())


@dataclass
class Layer:
    """One module's fits: ``"down"`` and ``"up"`` (factors), ``"joint"`` (factors, ``joint=True``) or ``"delta"``."""

    shape: tuple[int, int]  # (out, cols): cols = fan_in (+1 with a bias column in delta space)
    rank: int  # the tasks' rank in factor space, 0 in delta space
    fits: dict[str, Fit] = field(default_factory=dict)
    bias: bool = False  # delta space: the last column is the bias change


@dataclass
class ReversibleMerge:
    """A shared basis and per-task coefficients for adapters ``names`` (see the module docstring).

    Attributes:
        names: the tasks (source adapter names), in coefficient order.
        k: the number of basis elements per module and fit.
        space: ``"factors"`` or ``"delta"``.
        layers: per module path, its fits.
        errors: per task, ``‖ΔŴ_j − ΔW_j‖_F / ‖ΔW_j‖_F`` over all modules (of the reconstructed product).
        storage: floats stored (bases and coefficients); ``source_storage``: floats of the ``n`` task tensors fitted.
    """

    names: list[str]
    k: int
    space: Literal["factors", "delta"]
    layers: dict[str, Layer]
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def storage(self) -> int:
        return sum(f.basis.numel() + f.coeffs.numel() for layer in self.layers.values() for f in layer.fits.values())

    @property
    def source_storage(self) -> int:
        return sum(f.basis.shape[0] * len(self.names) for layer in self.layers.values() for f in layer.fits.values())

    def delta(self, task: str | int, path: str) -> tuple[Tensor, Tensor | None]:
        """Task ``task``'s reconstructed ``(ΔW [out, fan_in], Δb or None)`` on module ``path`` (float64)."""
        j = self._index(task)
        layer = self.layers[path]
        out, cols = layer.shape
        if self.space == "delta":
            x = layer.fits["delta"].column(j).reshape(out, cols)
            return (x[:, :-1], x[:, -1]) if layer.bias else (x, None)
        down, up = self._factors(j, layer)
        return up @ down, None

    def _factors(self, j: int, layer: Layer) -> tuple[Tensor, Tensor]:
        out, cols = layer.shape
        r = layer.rank
        if "joint" in layer.fits:
            x = layer.fits["joint"].column(j)
            return x[: r * cols].reshape(r, cols), x[r * cols :].reshape(out, r)
        return layer.fits["down"].column(j).reshape(r, cols), layer.fits["up"].column(j).reshape(out, r)

    def _index(self, task: str | int) -> int:
        if isinstance(task, int) and 0 <= task < len(self.names):
            return task
        if task in self.names:
            return self.names.index(task)  # type: ignore[arg-type]
        raise MergeError(f"no task {task!r} in this basis; its tasks: {self.names}")

    def add_to(self, model: AdaptedModel, task: str | int, new_name: str, *, activate: bool | None = None) -> None:
        """Add task ``task`` reverted from the basis to ``model`` as LoRA adapter ``new_name`` (scale 1; factor
        space: the reconstructed factors, exact rank ``r``; delta space: the SVD of ``ΔŴ`` at its numerical rank)."""
        j = self._index(task)
        built = Merged()
        for path, layer in self.layers.items():
            source = Source(path, model.base_view(path), [], saved=False)
            if self.space == "factors":
                down, up = self._factors(j, layer)
                built.lora(source, from_factors(up, down), None)
            else:
                weight, bias = self.delta(j, path)
                built.lora(source, from_dense(weight), bias)
        config, tensors = built.finish(model)
        model.load_tensors(
            new_name, config, tensors, activate=activate, source=f"task {self.names[j]!r} of an RMM basis"
        )

    def save(self, path: str | Path) -> Path:
        """Write the basis to ``path/rmm.safetensors`` (tensors in float32; settings in its metadata)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{p}.{side}.{part}": getattr(fit, part).float().contiguous()
            for p, layer in self.layers.items()
            for side, fit in layer.fits.items()
            for part in ("basis", "coeffs", "sv")
        }
        meta = {
            "names": self.names,
            "k": self.k,
            "space": self.space,
            "errors": self.errors,
            "layers": {
                p: {"shape": list(layer.shape), "rank": layer.rank, "bias": layer.bias}
                for p, layer in self.layers.items()
            },
        }
        save_file(tensors, str(folder / FILE), metadata={"rmm": json.dumps(meta)})
        return folder

    @classmethod
    def load(cls, path: str | Path) -> ReversibleMerge:
        """Read what :meth:`save` wrote."""
        from safetensors import safe_open

        file = Path(path) / FILE
        with safe_open(str(file), "pt") as fh:
            meta = json.loads(fh.metadata()["rmm"])
        tensors = load_file(str(file))
        layers = {}
        for p, info in meta["layers"].items():
            sides = {k.split(".")[-2] for k in tensors if k.startswith(p + ".") and k.count(".") == p.count(".") + 2}
            fits = {s: Fit(*(tensors[f"{p}.{s}.{part}"].double() for part in ("basis", "coeffs", "sv"))) for s in sides}
            layers[p] = Layer(tuple(info["shape"]), info["rank"], fits, info["bias"])
        return cls(meta["names"], meta["k"], meta["space"], layers, meta["errors"])


def rmm(
    model: AdaptedModel,
    names: Sequence[str],
    k: int,
    *,
    space: Literal["factors", "delta"] = "factors",
    joint: bool = False,
) -> ReversibleMerge:
    """Fit a reversible merge of adapters ``names`` with ``k`` basis elements per module (closed form, no data).

    Raises:
        MergeOptionError: ``k`` not in ``[1, n]``, an unknown ``space``.
        MergeError: factor space on a module where a task has no low-rank form or the ranks differ.
        plus the errors of :func:`~peftkit.merge.merge_adapters` for the names and modules.
    """
    check_request(model, names, None, new_name="")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(names):
        raise MergeOptionError(f"k must be an int in [1, {len(names)}] (the number of tasks), got {k!r}")
    if space not in ("factors", "delta"):
        raise MergeOptionError(f"space must be 'factors' or 'delta', got {space!r}")
    sources = collect(model, names)
    layers: dict[str, Layer] = {}
    failed: dict[str, list[str]] = {}
    for source in sources:
        if space == "factors":
            layers[source.path] = _factor_layer(source, k, joint)
            continue
        found = source.deltas()
        if found is None:
            for name in source.unmergeable(names):
                failed.setdefault(name, []).append(source.path)
            continue
        ws, bs = found
        cols = [torch.cat([w, b[:, None]], 1) if bs is not None else w for w, b in zip(ws, bs or ws)]
        x = torch.stack([c.reshape(-1) for c in cols], dim=1)
        shape = (cols[0].shape[0], cols[0].shape[1])
        layers[source.path] = Layer(shape, 0, {"delta": Fit.of(x, k)}, bias=bs is not None)
    refuse_unmergeable(model, names, failed)
    result = ReversibleMerge(list(names), k, space, layers)
    result.errors = _errors(result, sources)
    return result


def _factor_layer(source: Source, k: int, joint: bool) -> Layer:
    forms = source.factors()
    if forms is None:
        raise MergeError(
            f"{source.path!r}: a task has no low-rank form there (or changes the bias), so its factors cannot be "
            "fitted: "
            "use space='delta'"
        )
    ranks = sorted({d.shape[0] for _, d in forms})
    if len(ranks) > 1:
        raise MergeError(f"{source.path!r}: the tasks' ranks differ ({ranks}); factor space needs equal ranks: use "
                         "space='delta'")  # fmt: skip
    downs = torch.stack([d.reshape(-1) for _, d in forms], dim=1)
    ups = torch.stack([u.reshape(-1) for u, _ in forms], dim=1)
    out, cols = forms[0][0].shape[0], forms[0][1].shape[1]
    fits = {"joint": Fit.of(torch.cat([downs, ups]), k)} if joint else {"down": Fit.of(downs, k), "up": Fit.of(ups, k)}
    return Layer((out, cols), ranks[0], fits)


def _errors(merge: ReversibleMerge, sources: list[Source]) -> dict[str, float]:
    """Per task: the relative Frobenius error of the reconstructed updates over all modules."""
    errors = {}
    for j, name in enumerate(merge.names):
        num = den = 0.0
        for source in sources:
            if source.path not in merge.layers:
                continue
            adapter = source.adapters[j]
            want = adapter.delta_weight(source.base).detach().double().reshape(source.base.out_features, -1)
            bias = adapter.delta_bias(source.base)
            got, got_bias = merge.delta(j, source.path)
            num += float((got - want).square().sum())
            den += float(want.square().sum())
            if bias is not None or got_bias is not None:
                b = torch.zeros_like(got[:, 0]) if bias is None else bias.detach().double()
                num += float(((got_bias if got_bias is not None else 0) - b).square().sum())
                den += float(b.square().sum())
        errors[name] = (num / den) ** 0.5 if den > 0 else 0.0
    return errors


def rmm_report(
    model: AdaptedModel, names: Sequence[str], ks: Sequence[int] | None = None, **options: object
) -> list[dict[str, object]]:
    """Reconstruction error against storage for each ``k`` (default ``1 … n``): rows of ``k``, ``storage``,
    ``source_storage``, ``storage_ratio``, per-task ``errors`` and their ``mean_error``."""
    rows = []
    for k in ks or range(1, len(names) + 1):
        fit = rmm(model, names, k, **options)  # type: ignore[arg-type]
        rows.append(
            {
                "k": k,
                "storage": fit.storage,
                "source_storage": fit.source_storage,
                "storage_ratio": fit.storage / max(fit.source_storage, 1),
                "errors": fit.errors,
                "mean_error": sum(fit.errors.values()) / len(fit.errors),
            }
        )
    return rows
