"""CoLoRA (inferred; no official code found): "Contribution-based Low-Rank Adaptation with Pre-training Model
for Real Image Restoration".

A LoRA whose rank differs per layer, from each layer's *contribution* to adapting the task:

* contribution (spec decision, inferred): from a short pilot full fine-tuning,
  ``c_l = ||W_l^ft − W_l^0||_F / ||W_l^0||_F`` (:func:`weight_contributions`, :func:`pilot_contributions`);
  option ``mode="grad_norm"``: the proxy ``E ||∂L/∂W_l||_F`` over the pilot batches;
* ranks: ``r_l = max(1, round(R_total · c_l / Σ c))`` with ``R_total = r_avg × L`` (:func:`colora_ranks`);
* per layer: ``y = base(x) + s_l · B_l A_l drop(x)``, ``A_l [r_l, in]``, ``B_l [out, r_l]``, ``s_l = 1``
  (``alpha = r_l``, spec default) or ``alpha / r_l``; init as LoRA (``B = 0``: identity), exact merge.
  Linear, Conv2d (LoRA's conv form) and GPT-2 Conv1D. PROD pre-training is a data pipeline: out of scope.

Per-layer ranks are per-module config :attr:`~peftkit.core.protocol.AdapterConfig.overrides`
(``{module path: {"r": r_l}}``), so each layer allocates exactly ``r_l`` components and a saved adapter reloads
with the same shapes; :func:`add_colora` builds that config from ``{module path: r_l}``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import AdaptedModel, BaseView, InvalidConfigError, PositiveInt, find_targets, register

from .lora import LoRA, LoRAConfig


@dataclass(kw_only=True)
class CoLoRAConfig(LoRAConfig):
    """Settings of CoLoRA (inferred defaults: ``r_avg = 8``, ``s = 1``).

    Attributes:
        r: rank of the layers without an override (per-layer ranks: ``overrides={path: {"r": r_l}}``, which
            :func:`add_colora` writes).
        alpha: ``None`` (default): ``s_l = 1`` (``alpha = r_l``); a number: ``s_l = alpha / r_l``.
        r_avg: average rank the ranks were computed for (``R_total = r_avg × L``); informational.
        dropout, init: as LoRA. ``bias`` and ``rslora`` are not supported.
    """

    alpha: float | None = None  # type: ignore[assignment]
    r_avg: PositiveInt = 8

    def validate(self) -> None:
        if self.bias or self.rslora:
            raise InvalidConfigError("CoLoRA supports neither bias nor rslora")
        super().validate()

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r

    tiny_fields: ClassVar[dict] = {"r": 2}
    variant_fields: ClassVar[list[dict]] = [{"r": 3, "alpha": 6.0, "dropout": 0.1}]


@register("colora", CoLoRAConfig)
class CoLoRA(LoRA):
    """LoRA whose rank (and scale ``alpha / r_l``, or 1) is set per layer; see the module docstring."""

    config: CoLoRAConfig  # narrows LoRA.config


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
    pilot = copy.deepcopy(model)
    pilot.train()
    paths = find_targets(pilot, CoLoRAConfig(targets=targets), CoLoRA)
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


def add_colora(model: AdaptedModel, name: str, ranks: dict[str, int], **config: Any) -> CoLoRAConfig:
    """Add a CoLoRA adapter with per-layer ``ranks`` (``{module path: r_l}``, e.g. from :func:`colora_ranks`)
    to an ``AdaptedModel``: targets are exactly those paths, each with its own rank. Returns the config."""
    targets = "|".join(rf"(?:^|.*\.){re.escape(p)}$" if "." not in p else rf"^{re.escape(p)}$" for p in ranks)
    overrides = {p: {"r": int(r)} for p, r in ranks.items()}
    cfg = CoLoRAConfig(targets=targets, overrides=overrides, **config)
    model.add_adapter(name, cfg)
    return cfg
