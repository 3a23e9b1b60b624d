"""CMLoRA (Zou et al., "Cached Multi-LoRA Composition for Multi-Concept Image Generation", ICLR 2025; official
code Yqcca/CMLoRA, ``LoRA_Cache/pipelines/stable_diffusion/pipeline_async.py``, ``compose_async.py``): LoRA
Composite (:mod:`peftkit.merge.composition`) with a frequency order of the LoRAs, a dominant LoRA per phase and
non-uniform caching of each LoRA's deep denoiser features.

1. **Frequency order** (:func:`frequency_order`): LoRAs that amplify high-frequency content first, low-frequency
   ones (backgrounds) last. The official code hard-codes the partition by LoRA category; here the order is by a
   score per LoRA, e.g. :func:`high_frequency_share` of what each LoRA generates (the paper's FFT-amplitude
   profiling; the radius cutoff is our choice).
2. **Dominant LoRA** (:func:`dominant_weights`): with ``N`` LoRAs, ``c = N − 0.5``, ``w_non = N / (c + N − 1)``,
   ``w_dom = c · w_non`` (the weights sum to ``N``, so the Composite mean ``(1/N) Σ w_i ε^(i)`` is convex). An
   ``indicator`` starts at 0 and increments at steps ``20, 40, …, 200``; the dominant LoRA is
   ``(indicator − 1) mod N``, so the LAST LoRA in the order dominates steps 0–19. The released code decays ``c`` at
   those steps without recomputing the weights (no effect); ``recompute_dominant_weights=True`` recomputes them
   with ``c = (N − 0.5) · 0.5^indicator`` (our reading of the paper's decaying dominant weight: inferred).
3. **Caching** (DeepCache-style): each LoRA keeps the output of a deep block (``cache_module``, a module path of
   the base model: the part of the denoiser below the outermost skip connection) from its last full pass; a
   cached pass recomputes everything else and reuses that output, without running the block. Every LoRA runs a
   full pass at step 0; afterwards LoRA ``i`` refreshes at step ``t`` only if ``t`` is in the refresh schedule
   (:func:`refresh_steps`) and ``i = indicator mod N``. ``cache_interval=1`` is no caching (every pass full: the
   weighted Composite exactly).

Not mergeable (output-level composition). The paper's Switch variant (cycling over the high-frequency group, then
the low-frequency one) and the quadratic refresh schedule are not implemented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.core.model import AdaptedModel

from .composition import (
    DDIM,
    CompositionResult,
    Denoise,
    Guidance,
    Sampler,
    _check,
    _guide,
    default_denoise,
    guided_predictions,
    lora_composite,
    sample,
    weighted_mean,
)
from .errors import MergeOptionError

__all__ = [
    "CMLoRAResult",
    "cmlora",
    "dominant_index",
    "dominant_weights",
    "frequency_order",
    "high_frequency_share",
    "indicator",
    "refresh_steps",
]


def high_frequency_share(images: Tensor, cutoff: float = 0.25) -> Tensor:
    """Per image (``[..., H, W]``), the share of the 2-D FFT amplitude at spatial frequencies of radius above
    ``cutoff`` cycles per pixel (the largest radius is ``0.5·√2``), summed over the leading channel dims."""
    amp = torch.fft.fft2(images.double()).abs()
    fy = torch.fft.fftfreq(images.shape[-2], dtype=torch.float64)
    fx = torch.fft.fftfreq(images.shape[-1], dtype=torch.float64)
    high = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff
    total = amp.flatten(-2).sum(-1)
    share = (amp * high).flatten(-2).sum(-1) / total.clamp_min(1e-300)
    return share.reshape(images.shape[0], -1).mean(-1) if images.dim() > 3 else share


def frequency_order(names: Sequence[str], scores: Sequence[float]) -> list[str]:
    """``names`` ordered by decreasing high-frequency ``scores`` (stable for ties)."""
    if len(scores) != len(names):
        raise MergeOptionError(f"need one score per name ({len(names)}), got {len(scores)}")
    return [n for _, n in sorted(zip(scores, names), key=lambda p: -p[0])]


def indicator(step: int, every: int = 20, until: int = 200) -> int:
    """The official ``indicator`` at step ``step``: incremented at steps ``every, 2·every, …, until``."""
    return min(step // every, until // every)


def dominant_index(step: int, n: int, every: int = 20, until: int = 200) -> int:
    """The dominant LoRA at ``step``: ``(indicator − 1) mod n`` (Python modulo)."""
    return (indicator(step, every, until) - 1) % n


def dominant_weights(
    n: int, step: int, every: int = 20, until: int = 200, recompute_dominant_weights: bool = False
) -> list[float]:
    """The ``n`` Composite weights at ``step`` (see the module docstring); they sum to ``n``."""
    k = indicator(step, every, until)
    c = n - 0.5
    if recompute_dominant_weights:
        c *= 0.5**k
    w_non = n / (c + n - 1)
    w = [w_non] * n
    w[(k - 1) % n] = c * w_non
    return w


def refresh_steps(total: int, cache_interval: int = 0) -> list[int]:
    """The steps (of ``total``) at which a cache may refresh. ``0``: non-uniform, every 2 steps on ``[0, 0.375T)``,
    every 3 on ``[0.375T, 0.875T)``, every 2 on ``[0.875T, T)`` (walking from step 0; the exact phase of each
    stride is inferred); ``1``: every step (no caching); ``c > 1``: every ``c`` steps."""
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 0:
        raise MergeOptionError(f"cache_interval must be a non-negative int, got {cache_interval!r}")
    if cache_interval > 0:
        return list(range(0, total, cache_interval))
    out, t = [], 0
    while t < total:
        out.append(t)
        t += 3 if 0.375 * total <= t < 0.875 * total else 2
    return out


@dataclass
class CMLoRAResult(CompositionResult):
    """:class:`CompositionResult` plus the cached passes per LoRA (``passes`` counts the full ones) and the
    dominant LoRA at each step."""

    cached: dict[str, int] = field(default_factory=dict)
    dominant: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _deep(module: nn.Module, cached: Any, store: list[Any]) -> Iterator[None]:
    """Run ``module`` as cached (its output replaced by ``cached`` without running it) or record its output."""
    if cached is not None:
        module.forward = lambda *args, **kwargs: cached  # instance attribute: the block is skipped
        try:
            yield
        finally:
            del module.forward
    else:
        hook = module.register_forward_hook(lambda m, args, out: store.append(out))
        try:
            yield
        finally:
            hook.remove()


def cmlora(
    model: AdaptedModel,
    names: Sequence[str],
    noise: Tensor,
    guidance: Guidance,
    *,
    cache_module: str | None = None,
    cache_interval: int = 0,
    every: int = 20,
    until: int = 200,
    recompute_dominant_weights: bool = False,
    sampler: Sampler | None = None,
    denoise: Denoise = default_denoise,
) -> CMLoRAResult:
    """CMLoRA sampling with the LoRAs ``names`` in frequency order (see the module docstring; order them with
    :func:`frequency_order`).

    Args:
        cache_module: the deep block whose output each LoRA caches (a module path of the base model); needed
            unless ``cache_interval=1``.
        cache_interval: :func:`refresh_steps`' schedule (official default 0, non-uniform; 1 = no caching).
        every, until: the dominant LoRA changes every ``every`` steps up to step ``until`` (official 20, 200).

    Raises:
        MergeOptionError: no names, repeated names, a bad ``cache_interval`` / ``every`` / ``until``, caching without
            ``cache_module``, or a ``cache_module`` the base model does not have.
        AdapterNotFoundError: a name the model does not hold.
    """
    names = _check(model, names)
    for key, value in (("every", every), ("until", until)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MergeOptionError(f"{key} must be a positive int, got {value!r}")
    sampler = sampler or DDIM()
    total = len(sampler.timesteps)
    refresh = set(refresh_steps(total, cache_interval))
    caching = cache_interval != 1
    block: nn.Module | None = None
    if caching:
        if cache_module is None:
            raise MergeOptionError("caching (cache_interval != 1) needs cache_module, the deep block to cache")
        try:
            block = model.get_base_model().get_submodule(cache_module)
        except AttributeError:
            raise MergeOptionError(f"cache_module {cache_module!r} is not a module of the base model") from None
    n = len(names)

    def weights(i: int) -> list[float]:
        return dominant_weights(n, i, every, until, recompute_dominant_weights)

    dominant = [names[dominant_index(i, n, every, until)] for i in range(total)]
    if not caching:
        done = lora_composite(model, names, noise, guidance, weights=weights, sampler=sampler, denoise=denoise)
        return CMLoRAResult(done.samples, done.steps, done.passes, done.weights, dict.fromkeys(names, 0), dominant)
    assert block is not None
    cache: dict[str, Any] = {}
    used: list[list[str]] = []
    per_step: list[list[float]] = []
    full = dict.fromkeys(names, 0)
    cached = dict.fromkeys(names, 0)

    def predict(x: Tensor, t: Tensor, i: int) -> Tensor:
        refreshing = names[indicator(i, every, until) % n] if i in refresh else None
        preds = []
        for name in names:
            reuse = None if name not in cache or name == refreshing else cache[name]
            store: list[Any] = []
            with _deep(block, reuse, store):
                preds.append(guided_predictions(model, [name], x, t, guidance, denoise)[0])
            if reuse is None:
                full[name] += 1
                cache[name] = store[-1]
            else:
                cached[name] += 1
        w = weights(i)
        used.append(list(names))
        per_step.append(w)
        return _guide(*weighted_mean(preds, w), guidance)

    samples = sample(model, noise, predict, sampler)
    return CMLoRAResult(samples, used, full, per_step, cached, dominant)
