"""LoRAPrune (Zhang et al., 2023, "LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning"; official
code aim-uofa/LoRAPrune ``loraprune/utils.py``): structured pruning of attention heads and MLP channels guided by
LoRA's weights and gradients only, while LoRA trains.

* LoRA (r = 8, α = 16, dropout 0.05) on q, k, v, o, gate, up, down; the base weights get no gradient.
* Every prunable unit has a 0/1 mask that multiplies the output of q, k, v (head groups) and gate, up (channels):
  ``y = (Wx + b + s·BAx) ⊙ mask``; o and down follow (a zero head / channel feeds them zeros). Masks start at 1.
* Each step, after the backward and before the optimiser step, the full gradient is estimated from LoRA's alone,
  ``Ĝ = g_B·A + B·g_A − g_B·g_A`` (``= BA − (B − g_B)(A − g_A)``), the element importance is
  ``I = |Ĝ ⊙ (W + s·BA)|``, grouped into unit scores (:func:`peftkit.compress.structured.unit_scores`), and an
  EMA ``S ← 0.9·S + 0.1·S_step`` is kept (a step with NaN is skipped). Whether the official code scales the
  LoRA gradients by ``s`` is not stated in the paper; we use them as autograd gives them (inferred).
* Sparsity follows a cubic schedule from ``init_ratio`` to ``ratio`` between the warm-up and cool-down fractions;
  every ``prune_freq`` steps the ``⌊p·n⌋`` lowest ``S ⊙ mask`` units of every prunable block are masked.
* :meth:`LoRAPrune.finalize` merges LoRA into the weights and removes the masked units physically
  (:func:`peftkit.compress.structured.apply`): the model shrinks, with outputs equal to the masked model's.

Grouped-query attention: the unit is one key/value head with its query heads (the official code assumes
multi-head attention with 32 heads; we read the layout from the model, see :mod:`peftkit.compress.arch`).
``metric="magnitude"`` scores by ``|W + s·BA|`` instead (the paper's baseline).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.compress import arch, structured
from peftkit.compress.errors import CompressOptionError, check_fraction
from peftkit.compress.loop import adamw_steps
from peftkit.core.model import AdaptedModel
from peftkit.methods.lora import LoRA, LoRAConfig

METRICS = ("lora", "magnitude")


def schedule(step: int, total: int, ratio: float, init_ratio: float = 0.0, warmup: float = 0.1,
             cooldown: float = 0.1) -> float:  # fmt: skip
    """The cubic sparsity schedule ``p(t)`` (see the module docstring)."""
    start, end = warmup * total, total - cooldown * total
    if step <= start:
        return init_ratio
    if step > end:
        return ratio
    return ratio + (init_ratio - ratio) * (1 - (step - start) / (end - start)) ** 3


def estimated_gradient(a: Tensor, b: Tensor, grad_a: Tensor, grad_b: Tensor) -> Tensor:
    """``Ĝ = g_B·A + B·g_A − g_B·g_A`` (``[out, in]``)."""
    return grad_b @ a + b @ grad_a - grad_b @ grad_a


def adapt(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.05, name: str = "loraprune"):
    """``model`` wrapped with the LoRA LoRAPrune trains (q, k, v, o, gate, up, down of every block)."""
    paths = list(arch.block_linears(model, "LoRAPrune"))
    adapted = AdaptedModel(model)
    adapted.add_adapter(name, LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=paths))
    return adapted


class LoRAPrune:
    """Masks, importance and schedule over an adapted LLaMA-style model (see the module docstring).

    Call :meth:`step` after every backward, before ``optimizer.step()``; :meth:`finalize` at the end.
    """

    def __init__(self, model: AdaptedModel, name: str, *, ratio: float = 0.5, total_steps: int,
                 init_ratio: float = 0.0, warmup: float = 0.1, cooldown: float = 0.1, prune_freq: int = 10,
                 metric: str = "lora", beta: float = 0.9) -> None:  # fmt: skip
        check_fraction("ratio", ratio)
        if metric not in METRICS:
            raise CompressOptionError(f"metric must be one of {METRICS}, got {metric!r}")
        if total_steps < 1 or prune_freq < 1:
            raise CompressOptionError("total_steps and prune_freq must be positive")
        self.model, self.name, self.ratio, self.total = model, name, ratio, total_steps
        self.init_ratio, self.warmup, self.cooldown, self.freq = init_ratio, warmup, cooldown, prune_freq
        self.metric, self.beta = metric, beta
        self.prefix, blocks = arch.decoder_blocks(model.get_base_model(), "LoRAPrune")
        self.blocks = structured.prunable(len(blocks))
        self.layouts = {i: arch.head_layout(blocks[i].self_attn) for i in self.blocks}
        self.masks = {i: [torch.ones(n) for n in arch.unit_count(blocks[i])] for i in self.blocks}
        self.scores: dict[int, list[Tensor]] = {
            i: [torch.zeros(n, dtype=torch.float64) for n in arch.unit_count(blocks[i])] for i in self.blocks
        }
        self.lora = model.modules_of(name, LoRA)
        self._handles = [self._mask_hook(i, p) for i in self.blocks for p in structured.OUTPUT_SIDE]

    def _path(self, i: int, name: str) -> str:
        return f"{self.prefix}.{i}.{'self_attn' if name in arch.ATTENTION else 'mlp'}.{name}"

    def _mask_hook(self, i: int, name: str) -> Any:
        layout = self.layouts[i]

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            heads, channels = self.masks[i]
            if name == "q_proj":
                mask = heads.repeat_interleave(layout.group * layout.head_dim)
            elif name in ("k_proj", "v_proj"):
                mask = heads.repeat_interleave(layout.head_dim)
            else:
                mask = channels
            return output * mask.to(output.dtype)

        return self.model.adapted_layer(self._path(i, name)).register_forward_hook(hook)

    def _importance(self, i: int) -> Any:
        def importance(name: str, linear: nn.Module) -> Tensor:
            lora = self.lora[self._path(i, name)]
            a, b, w = lora.A.detach(), lora.B.detach(), self.model.base_view(self._path(i, name)).weight.detach()
            merged = (w + lora.scale * b @ a).abs()
            if self.metric == "magnitude":
                return merged
            if lora.A.grad is None or lora.B.grad is None:
                return torch.full_like(w, float("nan"))
            return (estimated_gradient(a, b, lora.A.grad, lora.B.grad) * (w + lora.scale * b @ a)).abs()

        return importance

    def step_scores(self) -> dict[int, tuple[Tensor, Tensor]]:
        """This step's unit scores of every prunable block (from the LoRA gradients now present)."""
        blocks = arch.decoder_blocks(self.model.get_base_model(), "LoRAPrune")[1]
        return {i: structured.unit_scores(blocks[i], self._importance(i)) for i in self.blocks}

    @torch.no_grad()
    def step(self, global_step: int) -> float:
        """Update the importance EMA and, on pruning steps, the masks; returns the scheduled sparsity."""
        for i, (heads, channels) in self.step_scores().items():
            if torch.isnan(heads).any() or torch.isnan(channels).any():
                continue
            for s, new in zip(self.scores[i], (heads, channels)):
                s.mul_(self.beta).add_(new, alpha=1 - self.beta)
        p = schedule(global_step, self.total, self.ratio, self.init_ratio, self.warmup, self.cooldown)
        if p > self.init_ratio and global_step % self.freq == 0:
            self.prune_to(p)
        return p

    def prune_to(self, p: float) -> None:
        """Mask the ``⌊p·n⌋`` lowest ``S ⊙ mask`` units of each kind in every prunable block."""
        for i in self.blocks:
            self.masks[i] = [structured.lowest(s, p, m).float() for s, m in zip(self.scores[i], self.masks[i])]

    def sparsity(self) -> tuple[float, float]:
        """Fractions of head groups and of channels masked over the prunable blocks."""
        heads = torch.cat([self.masks[i][0] for i in self.blocks])
        channels = torch.cat([self.masks[i][1] for i in self.blocks])
        return 1 - float(heads.mean()), 1 - float(channels.mean())

    @torch.no_grad()
    def finalize(self) -> nn.Module:
        """Prune to the target ratio, merge LoRA, remove the masked units physically; returns the plain model."""
        self.prune_to(self.ratio)
        for handle in self._handles:
            handle.remove()
        plan = {i: tuple(m.nonzero().flatten() for m in self.masks[i]) for i in self.blocks}
        model = self.model.merge(self.name, unload=True)
        structured.apply(model, plan)  # type: ignore[arg-type]
        return model


def loraprune(
    model: nn.Module, batches: Iterable[Any], *, ratio: float = 0.5, steps: int, lr: float = 3e-4,
    r: int = 8, alpha: float = 16.0, prune_freq: int = 10, metric: str = "lora", progress: bool = False,
) -> tuple[nn.Module, list[float]]:  # fmt: skip
    """Train LoRA on ``model`` for ``steps`` AdamW steps on its own loss (batches with ``labels``), pruning as
    it goes, then finalise. Returns ``(pruned model, losses)``."""
    adapted = adapt(model, r, alpha)
    pruner = LoRAPrune(adapted, "loraprune", ratio=ratio, total_steps=steps, prune_freq=prune_freq, metric=metric)
    history = adamw_steps(adapted, batches, steps=steps, lr=lr, after_backward=pruner.step, desc="LoRAPrune",
                          progress=progress)  # fmt: skip
    return pruner.finalize().eval(), history
