"""What a merge reads from the model: the modules the adapters share, checked, and each adapter's update there.

Only the protocol is used: ``model.adapter_modules(name)``, ``model.base_view(path)``, and each adapter module's
``delta_weight`` / ``delta_bias`` / ``lowrank``. A module an adapter trains whole (``modules_to_save``: the core's
dense :class:`~peftkit.core.dense.Full`) is a *saved* module: it is merged as a dense delta and kept dense.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from peftkit.core.base import BaseView
from peftkit.core.dense import Full, FullConfig
from peftkit.core.errors import NotMergeableError
from peftkit.core.model import AdaptedModel
from peftkit.core.protocol import Adapter

from .errors import MergeError, MergeWeightsError, TargetMismatchError

__all__ = ["Source", "check_request", "collect", "refuse_unmergeable"]


@dataclass
class Source:
    """One module of a merge: its path, base view, the adapters' modules there (in the order of ``names``) and
    whether it is a saved (``modules_to_save``) module."""

    path: str
    base: BaseView
    adapters: list[Adapter]
    saved: bool

    @property
    def fan_in(self) -> int:
        return self.base.in_features * math.prod(self.base.kernel_size)

    def factors(self) -> list[tuple[Tensor, Tensor]] | None:
        """``[(up_i, s_i · down_i)]`` (float32, ``down_i`` flattened to ``[r_i, fan_in]``): ``ΔW_i = up_i s_i down_i``;
        ``None`` unless every adapter has a low-rank form (:meth:`Adapter.lowrank`) and none changes the bias."""
        forms = [a.lowrank(self.base) for a in self.adapters]
        if any(f is None for f in forms) or any(a.delta_bias(self.base) is not None for a in self.adapters):
            return None
        return [
            (f.up.detach().float(), f.scale * f.down.detach().reshape(f.down.shape[0], -1).float()) for f in forms if f
        ]

    def lowrank(self, weights: Sequence[float]) -> tuple[Tensor, Tensor] | None:
        """``(up, down)`` with ``up · down = Σ_i w_i ΔW_i``: the factors concatenated, ``up = [up_1 … up_n]``,
        ``down = [w_1 s_1 down_1; …]`` (PEFT's ``cat``); ``None`` where :meth:`factors` is."""
        forms = self.factors()
        if forms is None:
            return None
        return torch.cat([u for u, _ in forms], dim=1), torch.cat([w * d for w, (_, d) in zip(weights, forms)])

    def deltas(self) -> tuple[list[Tensor], list[Tensor] | None] | None:
        """``([ΔW_i [out, fan_in]], [Δb_i] or None)`` in float32 (``Δb_i`` zero for an adapter without a bias
        change when another has one); ``None`` if an adapter has no weight-space update here."""
        weights, biases = [], []
        for adapter in self.adapters:
            delta = adapter.delta_weight(self.base)
            if delta is None:
                return None
            weights.append(delta.detach().reshape(delta.shape[0], -1).float())
            bias = adapter.delta_bias(self.base)
            biases.append(None if bias is None else bias.detach().float())
        if all(b is None for b in biases):
            return weights, None
        return weights, [torch.zeros(w.shape[0], device=w.device) if b is None else b for w, b in zip(weights, biases)]

    def unmergeable(self, names: Sequence[str]) -> list[str]:
        """The names of the adapters without a weight-space update on this module."""
        return [n for n, a in zip(names, self.adapters) if a.delta_weight(self.base) is None]


def check_request(
    model: AdaptedModel, names: Sequence[str], weights: Sequence[float] | None, new_name: str
) -> list[float]:
    """Check the adapters, the weights and the new name of a merge; returns the weights (default 1 each).

    Raises:
        TypeError: ``model`` is not an :class:`AdaptedModel`.
        MergeError: no adapter, or one named twice.
        AdapterNotFoundError: a name the model does not hold.
        MergeWeightsError: ``weights`` of another length than ``names``, or not finite numbers.
        AdapterNameError: ``new_name`` is not a valid name; AdapterExistsError: it is in use.
    """
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"merging needs an AdaptedModel (pk.adapt / pk.load), got {type(model).__name__}")
    if isinstance(names, str) or not names:
        raise MergeError(f"give a list of adapter names to merge, got {names!r}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise MergeError(f"adapters named more than once: {repeated} (give each adapter once, with its weight)")
    for name in names:
        model.require(name)
    if weights is None:
        weights = [1.0] * len(names)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise MergeWeightsError(f"weights must be a sequence of numbers, got {weights!r}")
    if len(weights) != len(names):
        raise MergeWeightsError(f"{len(weights)} weights for {len(names)} adapters {list(names)}: give one per adapter")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise MergeWeightsError(f"weights must be finite numbers, got {list(weights)}")
    if new_name:  # ("" from callers that add no adapter)
        model.check_new_name(new_name)
    return [float(w) for w in weights]


def collect(model: AdaptedModel, names: Sequence[str]) -> list[Source]:
    """The modules of a merge, in the first adapter's order.

    Raises:
        TargetMismatchError: the adapters do not adapt the same modules (names what each one lacks).
    """
    modules = [model.adapter_modules(n) for n in names]
    every = set().union(*modules)
    lacking = [(n, sorted(every - set(m))) for n, m in zip(names, modules) if every - set(m)]
    if lacking:
        said = "; ".join(f"{n!r} lacks {_listed(paths)}" for n, paths in lacking)
        raise TargetMismatchError(
            f"the adapters adapt different modules ({said}): a weight-space merge needs every adapter on the same "
            "modules"
        )
    sources = []
    for path in modules[0]:
        adapters = [m[path] for m in modules]
        saved = all(
            isinstance(a, Full) and not isinstance(model.configs[n], FullConfig) for n, a in zip(names, adapters)
        )
        sources.append(Source(path, model.base_view(path), adapters, saved))
    return sources


def refuse_unmergeable(model: AdaptedModel, names: Sequence[str], failed: dict[str, list[str]]) -> None:
    """Raise :class:`NotMergeableError` listing each adapter (method) without a weight-space update and where.

    Args:
        failed: adapter name -> module paths where it has no ``delta_weight``.
    """
    if not failed:
        return
    said = "; ".join(
        f"{n!r} (method {type(model.configs[n]).method!r}) on {_listed(paths)}" for n, paths in failed.items()
    )
    raise NotMergeableError(
        f"a weight-space merge needs every adapter's update as a weight delta; these have none: {said}"
    )


def _listed(paths: list[str], most: int = 4) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")
