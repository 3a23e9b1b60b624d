"""CoLoRA (inferred; no official code found): "Contribution-based Low-Rank Adaptation with Pre-training Model
for Real Image Restoration".

A LoRA whose rank differs per layer, from each layer's *contribution* to adapting the task:

* contribution (spec decision, inferred): from a short pilot full fine-tuning,
  ``c_l = ||W_l^ft − W_l^0||_F / ||W_l^0||_F`` (:func:`weight_contributions`, :func:`pilot_contributions`);
  option ``mode="grad_norm"``: the proxy ``E ||∂L/∂W_l||_F`` over the pilot batches;
* ranks: ``r_l = max(1, round(R_total · c_l / Σ c))`` with ``R_total = r_avg × L`` (:func:`colora_ranks`);
* per layer: ``y = base(x) + s_l · B_l A_l drop(x)``, ``A_l = A[:r_l]``, ``B_l = B[:, :r_l]``, ``s_l = 1``
  (``alpha = r_l``, spec default) or ``alpha / r_l``; init as LoRA (``B = 0``: identity), exact merge.
  Linear, Conv2d (LoRA's conv form) and GPT-2 Conv1D. PROD pre-training is a data pipeline: out of scope.

Per-layer ranks without path-aware construction: adapters are built from the config alone, so every layer
allocates ``r = max r_l`` components and keeps its own rank in a persistent buffer ``rank`` (saved, so
``pk.load`` restores it); components ``≥ r_l`` are never used (zero gradient, not merged, not in
:meth:`lowrank`). :func:`add_colora` adds the adapter and sets each layer's rank from ``config.ranks``
(``{module path or suffix: r_l}``); :func:`apply_ranks` does it for an adapter added with ``add_adapter``.
Deviation (stated): the trainable count is ``r·(in+out)`` per layer, not ``r_l·(in+out)``.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.base import BaseView
from peftkit.core.errors import InvalidConfigError
from peftkit.core.protocol import AdapterConfig, LowRank, add_lowrank
from peftkit.core.registry import register

from .lora import LoRA, LoRAConfig


@dataclass(kw_only=True)
class CoLoRAConfig(LoRAConfig):
    """Settings of CoLoRA (inferred defaults: ``r_avg = 8``, ``s = 1``).

    Attributes:
        r: components allocated per layer (the largest per-layer rank; :func:`add_colora` sets it).
        alpha: ``None`` (default): ``s_l = 1`` (``alpha = r_l``); a number: ``s_l = alpha / r_l``.
        ranks: ``{module path or suffix: r_l}``; layers not named use ``r``.
        r_avg: average rank the ranks were computed for (``R_total = r_avg × L``); informational.
        dropout, init: as LoRA. ``bias`` and ``rslora`` are not supported.
    """

    r: int = 8
    alpha: float | None = None  # type: ignore[assignment]
    ranks: dict[str, int] = field(default_factory=dict)
    r_avg: int = 8

    def validate(self) -> None:
        if self.bias or self.rslora:
            raise InvalidConfigError("CoLoRA supports neither bias nor rslora")
        super().validate()
        for key, v in self.ranks.items():
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= self.r:
                raise InvalidConfigError(f"ranks[{key!r}] must lie in [1, r={self.r}], got {v!r}")
        if self.r_avg <= 0:
            raise InvalidConfigError(f"r_avg must be positive, got {self.r_avg!r}")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r

    @classmethod
    def tiny(cls) -> CoLoRAConfig:
        return cls(r=2)

    @classmethod
    def tiny_variants(cls) -> list[AdapterConfig]:
        return [cls.tiny(), cls(r=3, alpha=6.0, dropout=0.1)]

    def rank_for(self, path: str) -> int:
        """``r_l`` of the module at ``path`` (exact path first, then the longest matching suffix)."""
        if path in self.ranks:
            return self.ranks[path]
        hits = [k for k in self.ranks if path.endswith("." + k)]
        return self.ranks[max(hits, key=len)] if hits else self.r


@register("colora", CoLoRAConfig)
class CoLoRA(LoRA):
    """LoRA with a per-layer rank (first ``rank`` components of ``A``, ``B``); see the module docstring."""

    config: CoLoRAConfig

    def __init__(self, base: BaseView, config: CoLoRAConfig) -> None:
        super().__init__(base, config)
        self.register_buffer("rank", torch.tensor(config.r))
        self._k = config.r

    def set_rank(self, k: int) -> None:
        """Use the first ``k`` components (``1 ≤ k ≤ r``)."""
        if not 1 <= int(k) <= self.config.r:
            raise ValueError(f"rank must lie in [1, {self.config.r}], got {k}")
        self._k = int(k)
        self.rank.fill_(self._k)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._k = int(self.rank)

    def _rank(self) -> int:
        k = int(self.rank)  # pk.load copies into the buffer directly: read it (a cheap scalar)
        self._k = k
        return k

    def layer_scale(self, k: int) -> float:
        return 1.0 if self.config.alpha is None else self.config.alpha / k

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        k = self._rank()
        hidden = base.apply(self.dropout(x), self.A[:k])
        if self.kind == "conv2d":
            return base_out + self.layer_scale(k) * F.conv2d(hidden, self.B[:, :k, None, None])
        return add_lowrank(base_out, hidden, self.B[:, :k], self.layer_scale(k))

    def delta_weight(self, base: BaseView) -> Tensor:
        k = self._rank()
        return (self.layer_scale(k) * (self.B[:, :k] @ self.A[:k].reshape(k, -1))).reshape(base.weight_shape)

    def delta_bias(self, base: BaseView) -> Tensor | None:
        return None

    def lowrank(self, base: BaseView) -> LowRank | None:
        if self.kind != "linear":
            return None
        k = self._rank()
        return LowRank(self.A[:k], self.B[:, :k], self.layer_scale(k))

    def effective_rank(self) -> int:
        return self._rank()

    @classmethod
    def expected_trainable(cls, base: BaseView, config: CoLoRAConfig) -> int:
        return config.r * (base.in_features * math.prod(base.kernel_size) + base.out_features)


# --------------------------------------------------------------------------------------------- ranks
def colora_ranks(contributions: dict[str, float], r_avg: int = 8) -> dict[str, int]:
    """``r_l = max(1, round(R_total · c_l / Σ c))``, ``R_total = r_avg × L`` (uniform ``r_avg`` if Σ c = 0)."""
    if not contributions:
        raise ValueError("no contributions")
    total_c = sum(contributions.values())
    budget = r_avg * len(contributions)
    if total_c <= 0:
        return dict.fromkeys(contributions, r_avg)
    return {p: max(1, round(budget * c / total_c)) for p, c in contributions.items()}


def weight_contributions(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, float]:
    """``c_l = ||W_l^ft − W_l^0||_F / ||W_l^0||_F`` for every key of ``before``."""
    return {
        p: float(torch.linalg.norm((after[p] - w0).float()) / torch.linalg.norm(w0.float()).clamp_min(1e-12))
        for p, w0 in before.items()
    }


def pilot_contributions(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    targets: list[str] | str = "all-linear",
    *,
    lr: float = 1e-4,
    mode: Literal["weight_delta", "grad_norm"] = "weight_delta",
) -> dict[str, float]:
    """Contributions from a short pilot full fine-tuning of the target layers' weights (on a copy of
    ``model``; the original is untouched): one AdamW step per batch. ``mode="grad_norm"`` averages
    ``||∂L/∂W_l||_F`` over the batches instead (no update)."""
    from peftkit.core import inject

    pilot = copy.deepcopy(model)
    pilot.train()
    paths = inject.find_targets(pilot, CoLoRAConfig(targets=targets), CoLoRA)
    weights = {p: BaseView(pilot.get_submodule(p)).module.weight for p in paths}
    for p in pilot.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    before = {p: w.detach().clone() for p, w in weights.items()}
    grad_sum = dict.fromkeys(paths, 0.0)
    opt = torch.optim.AdamW(list(weights.values()), lr=lr, weight_decay=0.0)
    n = 0
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(pilot, batch).backward()
        for p, w in weights.items():
            grad_sum[p] += float(torch.linalg.norm(w.grad)) if w.grad is not None else 0.0
        if mode == "weight_delta":
            opt.step()
        n += 1
    if mode == "grad_norm":
        return {p: g / max(n, 1) for p, g in grad_sum.items()}
    return weight_contributions(before, {p: w.detach() for p, w in weights.items()})


def apply_ranks(model: nn.Module, name: str) -> dict[str, int]:
    """Set each layer of CoLoRA adapter ``name`` to its rank from the adapter's ``config.ranks``."""
    config: CoLoRAConfig = model.configs[name]
    out = {}
    for path, module in model.adapter_modules(name).items():
        if isinstance(module, CoLoRA):
            module.set_rank(config.rank_for(path))
            out[path] = module.effective_rank()
    return out


def add_colora(model: nn.Module, name: str, ranks: dict[str, int], **config: Any) -> CoLoRAConfig:
    """Add a CoLoRA adapter with per-layer ``ranks`` (``{module path: r_l}``, e.g. from :func:`colora_ranks`)
    to an ``AdaptedModel``: targets are exactly those paths, ``r = max r_l``. Returns the config."""
    targets = "|".join(rf"(?:^|.*\.){re.escape(p)}$" if "." not in p else rf"^{re.escape(p)}$" for p in ranks)
    cfg = CoLoRAConfig(r=max(ranks.values()), ranks=dict(ranks), targets=targets, **config)
    model.add_adapter(name, cfg)
    apply_ranks(model, name)
    return cfg
