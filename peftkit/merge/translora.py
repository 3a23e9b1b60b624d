"""Trans-LoRA (Wang et al., "Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning", NeurIPS
2024): move a task adapter from a source base model to a target base model without the task data, by
distillation on synthetic inputs filtered by a discriminator. The paper's models are LLMs; here every model-
specific step is a callable, so the pipeline runs on any models (details inferred where the paper leaves them
open):

1. **Discriminator** (:func:`fit_discriminator`, trained on the source side while the task data was available):
   an adapter (e.g. a classification LoRA with a 2-way head) trained with cross-entropy to tell real task inputs
   (class 1) from generated ones (class 0).
2. **Synthetic data** (:func:`synthesize`): a generator (the paper prompts an instruction-tuned LLM with the task
   instruction and a few seed examples; here any ``generate(n, rng)``) proposes candidates in rounds; only those
   the discriminator calls real (``p_real > threshold``, 0.5) are kept, until ``count`` are kept (rejection
   sampling) or ``max_rounds`` rounds are spent. The acceptance rate is reported.
3. **Labels**: the teacher (source base + source adapter; any ``teacher(inputs)``) labels every kept input.
4. **Distillation** (:func:`trans_lora`): a fresh adapter on the target model (standard init, LoRA's ``B = 0``, so
   target + adapter = target at step 0) trained on (input, teacher label) with ``loss_fn`` (next-token / class
   cross-entropy: sequence-level knowledge distillation) by AdamW; the result is an ordinary, mergeable adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from peftkit.core.model import AdaptedModel

from .errors import MergeOptionError

__all__ = ["SyntheticData", "TransLoRAResult", "fit_discriminator", "synthesize", "trans_lora"]


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeOptionError(f"{name} must be a positive int, got {value!r}")


def _train(
    model: AdaptedModel,
    name: str,
    inputs: Tensor,
    loss_of: Callable[[Tensor, Tensor], Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> list[float]:
    """AdamW on adapter ``name`` (made the only active adapter), minibatches of row indices drawn with ``seed``;
    ``loss_of(rows, index)`` gives the loss of those rows. The active adapters and train mode are restored."""
    previous, was_training = model.active_adapters, model.training
    model.set_adapter(name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for _ in range(steps):
            index = torch.randint(0, len(inputs), (min(batch_size, len(inputs)),), generator=g)
            opt.zero_grad()
            loss = loss_of(inputs[index], index)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        if previous:
            model.set_adapter(previous)
    return losses


def fit_discriminator(
    model: AdaptedModel,
    name: str,
    real: Tensor,
    synthetic: Tensor,
    logits: Callable[[AdaptedModel, Tensor], Tensor],
    *,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> Callable[[Tensor], Tensor]:
    """Train adapter ``name`` of ``model`` as the real-vs-synthetic discriminator (``logits(model, x)`` ``[n, 2]``,
    class 1 = real) and return ``p_real(x)`` (no gradients; ``logits`` gets ``model`` with ``name`` as its only active
    adapter, the active adapters and train mode restored afterwards).

    Raises:
        MergeOptionError: empty ``real`` / ``synthetic``, inputs of different shapes, ``steps`` or ``batch_size`` < 1.
    """
    model.require(name)
    _positive("steps", steps)
    _positive("batch_size", batch_size)
    if len(real) == 0 or len(synthetic) == 0 or real.shape[1:] != synthetic.shape[1:]:
        shapes = f"{tuple(real.shape)}, {tuple(synthetic.shape)}"
        raise MergeOptionError(f"need real and synthetic inputs of one shape, got {shapes}")
    inputs = torch.cat([real, synthetic])
    labels = torch.cat([torch.ones(len(real), dtype=torch.long), torch.zeros(len(synthetic), dtype=torch.long)])
    _train(
        model,
        name,
        inputs,
        lambda x, index: F.cross_entropy(logits(model, x), labels[index]),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )

    def p_real(x: Tensor) -> Tensor:
        # The discriminator is made the only active adapter while it scores (and the previous state restored), so
        # ``logits`` gets the model itself, as in training: it may run other forward passes of other sizes (e.g.
        # class-prompt embeddings), which fixed per-row ``adapter_ids`` would reject.
        previous, was_training = model.active_adapters, model.training
        model.set_adapter(name)
        model.eval()
        try:
            with torch.no_grad():
                return torch.softmax(logits(model, x), -1)[:, 1]
        finally:
            model.train(was_training)
            if previous:
                model.set_adapter(previous)

    return p_real


@dataclass
class SyntheticData:
    """The kept inputs (at most the ``count`` asked for), how many candidates were generated, how many of them
    were kept (used), and ``acceptance = kept / generated`` (a lower bound where the last round kept more than
    needed)."""

    inputs: Tensor
    generated: int
    kept: int

    @property
    def acceptance(self) -> float:
        return self.kept / self.generated if self.generated else 0.0


def synthesize(
    generate: Callable[[int, torch.Generator], Tensor],
    p_real: Callable[[Tensor], Tensor] | None,
    count: int,
    *,
    per_round: int = 64,
    max_rounds: int = 100,
    threshold: float = 0.5,
    seed: int = 0,
) -> SyntheticData:
    """Rejection sampling of ``count`` synthetic inputs (see the module docstring); ``p_real=None`` keeps every
    candidate (the unfiltered ablation). Fewer than ``count`` are returned when ``max_rounds`` runs out.

    Raises:
        MergeOptionError: ``count``, ``per_round`` or ``max_rounds`` < 1, ``threshold`` outside ``[0, 1)``.
    """
    for key, value in (("count", count), ("per_round", per_round), ("max_rounds", max_rounds)):
        _positive(key, value)
    if not (math.isfinite(threshold) and 0 <= threshold < 1):
        raise MergeOptionError(f"threshold must be in [0, 1), got {threshold}")
    g = torch.Generator().manual_seed(seed)
    kept: list[Tensor] = []
    generated = n_kept = 0
    for _ in range(max_rounds):
        candidates = generate(per_round, g)
        generated += len(candidates)
        if p_real is not None:
            candidates = candidates[p_real(candidates) > threshold]
        kept.append(candidates)
        n_kept += len(candidates)
        if n_kept >= count:
            break
    inputs = torch.cat(kept)[:count]
    return SyntheticData(inputs, generated, len(inputs))


@dataclass
class TransLoRAResult:
    """The target adapter's name, the synthetic data used, the teacher's labels and the training losses."""

    name: str
    data: SyntheticData
    labels: Tensor
    losses: list[float] = field(default_factory=list)


def trans_lora(
    target: AdaptedModel,
    name: str,
    config: Any,
    data: SyntheticData,
    teacher: Callable[[Tensor], Tensor],
    loss_fn: Callable[[AdaptedModel, Tensor, Tensor], Tensor],
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> TransLoRAResult:
    """Distil the teacher into a new adapter ``name`` (built from ``config``, standard init) of ``target`` on the
    synthetic inputs ``data`` (see the module docstring); ``loss_fn(model, inputs, teacher_labels)``. The new
    adapter is left in the model, not active unless it was the first.

    Raises:
        MergeOptionError: no synthetic inputs, ``steps`` or ``batch_size`` < 1.
        plus :meth:`AdaptedModel.add_adapter`'s errors (an existing name, a config that fits no module).
    """
    _positive("steps", steps)
    _positive("batch_size", batch_size)
    if len(data.inputs) == 0:
        raise MergeOptionError("no synthetic inputs to distil on (the discriminator kept none)")
    with torch.no_grad():
        labels = teacher(data.inputs)
    target.add_adapter(name, config)
    try:
        losses = _train(
            target,
            name,
            data.inputs,
            lambda x, index: loss_fn(target, x, labels[index]),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
        )
    except BaseException:
        target.delete_adapter(name)
        raise
    return TransLoRAResult(name, data, labels, losses)
