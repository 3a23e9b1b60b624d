"""Inference-time composition of LoRAs in diffusion sampling: LoRA Merge, LoRA Switch and LoRA Composite
(Zhong et al., 2024, "Multi-LoRA Composition for Image Generation"; official code
maszhongming/Multi-LoRA-Composition, ``callbacks.py``, ``pipeline/pipeline_0.26.3.py``).

Each LoRA adds one concept to a denoiser ``ε_θ(x_t, t, c)``. The three methods differ in which adapters a denoiser
call sees at each denoising step ``t = 0 … S−1`` (in sampling order), all with classifier-free guidance
``ε = ε_u + g (ε_c − ε_u)``:

* **Merge** (baseline): one adapter ``Σ_i s ΔW_i`` (``s = lora_scale``, official 0.8), built exactly by
  :func:`~peftkit.merge.merge_adapters` (task arithmetic), active at every step.
* **Switch**: one LoRA per step, cycling every ``τ`` steps (``switch_step``, official 5). The official callback
  switches at the end of step ``i`` when ``i > 0`` and ``i mod τ = 0``, so the LoRA at step ``t`` is ``0`` for
  ``t = 0`` and ``((t − 1) div τ) mod N`` after (the first LoRA runs ``τ + 1`` steps): :func:`switch_index`.
  Cost: one denoiser pass per step.
* **Composite**: every step runs the denoiser once per LoRA (only that LoRA active), for both guidance branches,
  and averages: ``ε_u = (1/N) Σ_i w_i ε_u^(i)``, ``ε_c`` likewise (``w_i = 1``; CMLoRA's weighted variant passes
  other weights, :mod:`peftkit.merge.cmlora`). Cost: ``N`` passes per step; not mergeable.

The per-step routing uses the model's per-row ``adapter_ids`` (``docs/design.md``, mixed batches): Switch names
one adapter for all rows of the step, Composite runs the ``N`` LoRAs' rows in one forward (rows ``[LoRA 1: u, c;
LoRA 2: u, c; …]``), exactly as ``N`` separate forwards compute them. The model's active adapters are not changed.

The sampler is a deterministic DDIM (η = 0, linear β schedule) so results are reproducible given the initial
noise; the official pipelines use DPM-Solver++ (any ``step(x, ε, i)`` object can be passed). The adapters are used
at their own scale: the official ``lora_scale`` of Switch and Composite corresponds to the adapter's ``alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from peftkit.core.model import AdaptedModel

from .errors import MergeOptionError
from .merge import merge_adapters

__all__ = [
    "DDIM",
    "CompositionResult",
    "Denoise",
    "Guidance",
    "default_denoise",
    "guided_predictions",
    "lora_composite",
    "lora_merge",
    "lora_switch",
    "sample",
    "switch_index",
]

#: ``denoise(model, x, t, cond, adapter_ids) -> ε``: one denoiser call on the rows of ``x`` (``t`` one timestep
#: per row, ``cond`` the rows' conditioning), routed per row by ``adapter_ids`` (names; ``None`` = the base).
Denoise = Callable[[AdaptedModel, Tensor, Tensor, Any, Sequence[str | None]], Tensor]


def default_denoise(model: AdaptedModel, x: Tensor, t: Tensor, cond: Any, adapter_ids: Sequence[str | None]) -> Tensor:
    """``model(x, t, cond, adapter_ids=...)``; a Hugging Face ``diffusers`` output's ``.sample`` is unwrapped
    (``UNet2DModel(sample, timestep, class_labels)``, ``UNet2DConditionModel(sample, timestep,
    encoder_hidden_states)``)."""
    out = model(x, t, cond, adapter_ids=list(adapter_ids))
    return out.sample if hasattr(out, "sample") else out


class Sampler(Protocol):
    timesteps: Tensor

    def step(self, x: Tensor, eps: Tensor, i: int) -> Tensor: ...


class DDIM:
    """Deterministic DDIM (Song et al., 2021; η = 0) on the linear β schedule of DDPM (``train_steps`` = 1000,
    ``β`` from 1e-4 to 0.02), ``steps`` sampling steps evenly spaced (``timesteps[i]``, decreasing).

    ``x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t``, ``x_{t'} = √ᾱ_{t'} x̂_0 + √(1−ᾱ_{t'}) ε`` (``ᾱ = 1`` after the last step).
    """

    def __init__(self, steps: int = 50, train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if not (isinstance(steps, int) and 1 <= steps <= train_steps):
            raise MergeOptionError(f"steps must be an int in [1, train_steps={train_steps}], got {steps!r}")
        betas = torch.linspace(beta_start, beta_end, train_steps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1 - betas, 0)
        self.timesteps = torch.linspace(train_steps - 1, 0, steps, dtype=torch.float64).round().long()

    def step(self, x: Tensor, eps: Tensor, i: int) -> Tensor:
        a = float(self.alpha_bar[self.timesteps[i]])
        prev = float(self.alpha_bar[self.timesteps[i + 1]]) if i + 1 < len(self.timesteps) else 1.0
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return math.sqrt(prev) * x0 + math.sqrt(1 - prev) * eps


@dataclass
class Guidance:
    """Classifier-free guidance: ``cond`` and ``uncond`` (one entry per sample row, batched like ``x``; ``uncond``
    ``None``: no guidance, ``ε = ε_c``) and the scale ``g``."""

    cond: Any
    uncond: Any = None
    scale: float = 7.5


@dataclass
class CompositionResult:
    """The final samples, the adapters each step used (per step: names, or ``[merged name]``), the denoiser passes
    per adapter (one pass = one adapter's rows of one step, both guidance branches), and the weights per step
    where a weighted composite was used."""

    samples: Tensor
    steps: list[list[str]]
    passes: dict[str, int]
    weights: list[list[float]] = field(default_factory=list)


def _cat(a: Any, b: Any) -> Any:
    return torch.cat([a, b]) if isinstance(a, Tensor) else [*a, *b]


def _repeat(a: Any, n: int) -> Any:
    return torch.cat([a] * n) if isinstance(a, Tensor) else list(a) * n


def guided_predictions(
    model: AdaptedModel,
    names: Sequence[str | None],
    x: Tensor,
    t: Tensor,
    guidance: Guidance,
    denoise: Denoise = default_denoise,
) -> list[tuple[Tensor, Tensor]]:
    """``(ε_u^(i), ε_c^(i))`` for each adapter of ``names`` on the rows ``x`` at timestep ``t``, in one denoiser
    call (rows ``[names[0]: uncond, cond; names[1]: …]``, routed by ``adapter_ids``). Without guidance
    (``uncond=None``) ``ε_u = ε_c``."""
    rows = x.shape[0]
    cond = guidance.cond if guidance.uncond is None else _cat(guidance.uncond, guidance.cond)
    branches = 1 if guidance.uncond is None else 2
    xs = torch.cat([x] * (branches * len(names)))
    ts = torch.full((xs.shape[0],), int(t), dtype=torch.long, device=x.device)
    ids = [n for n in names for _ in range(branches * rows)]
    eps = denoise(model, xs, ts, _repeat(cond, len(names)), ids)
    out = []
    for i in range(len(names)):
        block = eps[i * branches * rows : (i + 1) * branches * rows]
        out.append((block, block) if branches == 1 else (block[:rows], block[rows:]))
    return out


def _guide(eps_u: Tensor, eps_c: Tensor, guidance: Guidance) -> Tensor:
    return eps_c if guidance.uncond is None else eps_u + guidance.scale * (eps_c - eps_u)


def sample(
    model: AdaptedModel,
    noise: Tensor,
    predict: Callable[[Tensor, Tensor, int], Tensor],
    sampler: Sampler | None = None,
) -> Tensor:
    """Run ``sampler`` (default ``DDIM()``) from ``noise``, with ``predict(x, t, i) -> ε`` at step ``i``, under
    ``no_grad`` with the model in eval mode (restored afterwards)."""
    sampler = sampler or DDIM()
    was_training = model.training
    model.eval()
    try:
        x = noise
        with torch.no_grad():
            for i, t in enumerate(sampler.timesteps):
                x = sampler.step(x, predict(x, t, i), i)
        return x
    finally:
        model.train(was_training)


def _check(model: AdaptedModel, names: Sequence[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise MergeOptionError("give at least one adapter to compose")
    if len(set(names)) != len(names):
        raise MergeOptionError(f"adapter names repeat: {names}")
    for n in names:
        model.require(n)
    return names


def switch_index(step: int, n: int, switch_step: int) -> int:
    """The LoRA LoRA Switch uses at denoising step ``step`` (0-based): ``0`` at step 0, then
    ``((step − 1) div τ) mod n`` (the official callback switches after steps ``τ, 2τ, …``)."""
    return 0 if step == 0 else ((step - 1) // switch_step) % n


def lora_switch(
    model: AdaptedModel,
    names: Sequence[str],
    noise: Tensor,
    guidance: Guidance,
    *,
    switch_step: int = 5,
    sampler: Sampler | None = None,
    denoise: Denoise = default_denoise,
) -> CompositionResult:
    """LoRA Switch (see the module docstring): one LoRA per step, the LoRA of :func:`switch_index`.

    Raises:
        MergeOptionError: no names, repeated names, ``switch_step < 1``.
        AdapterNotFoundError: a name the model does not hold.
    """
    names = _check(model, names)
    if isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 1:
        raise MergeOptionError(f"switch_step must be a positive int, got {switch_step!r}")
    used: list[list[str]] = []
    passes = dict.fromkeys(names, 0)

    def predict(x: Tensor, t: Tensor, i: int) -> Tensor:
        name = names[switch_index(i, len(names), switch_step)]
        used.append([name])
        passes[name] += 1
        ((eps_u, eps_c),) = guided_predictions(model, [name], x, t, guidance, denoise)
        return _guide(eps_u, eps_c, guidance)

    return CompositionResult(sample(model, noise, predict, sampler), used, passes)


def lora_composite(
    model: AdaptedModel,
    names: Sequence[str],
    noise: Tensor,
    guidance: Guidance,
    *,
    weights: Callable[[int], Sequence[float]] | None = None,
    batched: bool = True,
    sampler: Sampler | None = None,
    denoise: Denoise = default_denoise,
) -> CompositionResult:
    """LoRA Composite (see the module docstring): at each step the mean over the LoRAs of their guidance
    branches, ``ε_u = (1/N) Σ_i w_i ε_u^(i)``, ``ε_c`` likewise, then guidance.

    Args:
        weights: ``weights(step)`` gives the ``w_i`` of that step (default all 1: the official Composite).
        batched: all LoRAs' rows in one forward (mixed batch); ``False``: one forward per LoRA.

    Raises:
        MergeOptionError: no names, repeated names, weights of the wrong length or not finite.
        AdapterNotFoundError: a name the model does not hold.
    """
    names = _check(model, names)
    used: list[list[str]] = []
    per_step: list[list[float]] = []
    passes = dict.fromkeys(names, 0)

    def predict(x: Tensor, t: Tensor, i: int) -> Tensor:
        w = [1.0] * len(names) if weights is None else [float(v) for v in weights(i)]
        if len(w) != len(names) or not all(math.isfinite(v) for v in w):
            raise MergeOptionError(f"step {i}: need {len(names)} finite weights, got {w}")
        if batched:
            preds = guided_predictions(model, names, x, t, guidance, denoise)
        else:
            preds = [guided_predictions(model, [n], x, t, guidance, denoise)[0] for n in names]
        used.append(list(names))
        per_step.append(w)
        for n in names:
            passes[n] += 1
        return _guide(*weighted_mean(preds, w), guidance)

    return CompositionResult(sample(model, noise, predict, sampler), used, passes, per_step)


def weighted_mean(preds: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``((1/N) Σ_i w_i ε_u^(i), (1/N) Σ_i w_i ε_c^(i))``."""
    n = len(preds)
    eps_u = sum(w * u for w, (u, _) in zip(weights, preds)) / n
    eps_c = sum(w * c for w, (_, c) in zip(weights, preds)) / n
    return eps_u, eps_c  # type: ignore[return-value]


def lora_merge(
    model: AdaptedModel,
    names: Sequence[str],
    noise: Tensor,
    guidance: Guidance,
    *,
    lora_scale: float = 0.8,
    merged_name: str = "lora_merge",
    keep: bool = False,
    sampler: Sampler | None = None,
    denoise: Denoise = default_denoise,
) -> CompositionResult:
    """LoRA Merge (the paper's baseline): the adapter ``Σ_i lora_scale · ΔW_i`` (exact task arithmetic,
    :func:`~peftkit.merge.merge_adapters`) at every step; it is deleted afterwards unless ``keep``.

    Raises:
        MergeOptionError: no names, repeated names; plus :func:`merge_adapters`' errors (an existing
            ``merged_name``, adapters that cannot be merged, a non-finite scale).
    """
    names = _check(model, names)
    merge_adapters(model, names, [lora_scale] * len(names), new_name=merged_name, activate=False)
    used: list[list[str]] = []
    try:

        def predict(x: Tensor, t: Tensor, i: int) -> Tensor:
            used.append([merged_name])
            ((eps_u, eps_c),) = guided_predictions(model, [merged_name], x, t, guidance, denoise)
            return _guide(eps_u, eps_c, guidance)

        samples = sample(model, noise, predict, sampler)
    finally:
        if not keep:
            model.delete_adapter(merged_name)
    return CompositionResult(samples, used, {merged_name: len(used)})
