"""Settings of :class:`~peftkit.train.Trainer` (:class:`TrainConfig`) and its learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

# Fields a run folder fills in itself (paths, the device, the display): not part of a run's saved settings.
RUNTIME_FIELDS = ("output_dir", "metrics_file", "device", "progress")


@dataclass
class TrainConfig:
    """Settings of :class:`~peftkit.train.Trainer`.

    Attributes:
        epochs: passes over the training data.
        batch_size: examples per micro-batch (one forward/backward).
        grad_accum: micro-batches per optimizer step (effective batch = ``batch_size * grad_accum``).
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay, applied to parameters with two or more dimensions.
        betas: AdamW ``(beta1, beta2)``.
        eps: AdamW epsilon.
        schedule: learning-rate shape after warmup: ``"cosine"``, ``"linear"`` (both decay to
            ``min_lr_ratio * lr`` at the last step) or ``"constant"``.
        warmup_steps: optimizer steps of linear warmup from ``lr / warmup_steps`` to ``lr``.
        warmup_ratio: warmup as a share of all steps (used when ``warmup_steps`` is 0).
        min_lr_ratio: final learning rate of the decaying schedules, as a share of ``lr``.
        max_grad_norm: clip the global gradient norm to this value; ``None`` turns clipping off (the norm is
            computed and checked for NaN / inf either way).
        max_steps: stop after this many optimizer steps (``None``: run every epoch). The schedule spans
            ``min(max_steps, steps of all epochs)`` steps.
        seed: seeds ``random``, ``numpy``, ``torch`` and the order of the data.
        shuffle: shuffle the training data every epoch.
        eval_every: also evaluate (``eval_fn``) after every ``eval_every`` optimizer steps (``None``: only at
            the end of each epoch).
        save_every: with ``output_dir``, also write a full checkpoint every ``save_every`` optimizer steps
            (``None``: only at the end of each epoch and on SIGINT / SIGTERM).
        keep_checkpoints: keep the newest this many checkpoints in ``output_dir`` (``None``: keep all).
        log_every: log (print one line, and append it to ``metrics_file``) every ``log_every`` optimizer steps;
            steps with evaluation metrics and the last step are always logged (``None``: only those, and only
            when ``metrics_file`` is set).
        metrics_file: append one JSON object per logged step (``step``, ``epoch``, ``loss``, ``lr``,
            ``grad_norm`` and the evaluation metrics when computed) to this file.
        save_on_signal: with ``output_dir``, SIGINT (Ctrl-C) and SIGTERM finish the current optimizer step,
            write a checkpoint and raise :class:`~peftkit.train.TrainingInterrupted` naming it (only where
            signal handlers can be installed: the main thread).
        output_dir: if set, a full checkpoint (adapter, optimizer, RNG states, data order and position, step:
            what :meth:`Trainer.fit` ``(resume_from=...)`` continues from exactly) is written to
            ``output_dir/step-<n>`` at the end of every epoch, every ``save_every`` steps and on a signal. The
            folder is created (and checked: not a file, writable) before the first step.
        device: move every batch to this device (the model is the caller's to place).
        progress: show a tqdm progress bar.
        divergence_factor: stop with :class:`TrainingDivergedError` when the mean loss of each of
            ``divergence_patience`` consecutive windows of ``divergence_window`` optimizer steps exceeds
            ``divergence_factor`` times the loss of the run's first step. The first step is the reference
            because its loss is the only one computed before any update: with a far too large learning rate
            the loss explodes from the second step on, so any later reference is already inflated (choice of
            this library; the rule is a heuristic). The check is skipped when that first loss is not positive;
            ``None`` turns it off. Runs shorter than ``divergence_window * divergence_patience`` steps are
            never stopped by it.
        divergence_window: optimizer steps per window of the divergence check.
        divergence_patience: consecutive windows above the limit that stop the run.
        optim: the optimizer, by name (:mod:`peftkit.optim`): ``"adamw"`` (default), ``"adamw8bit"``
            (bitsandbytes), ``"galore"``, ``"lorapro"``, ``"loraplus"``, ``"allora"`` or ``"sst"``. ``lr``,
            ``weight_decay``, ``betas`` and ``eps`` are its settings; the schedule scales every param group's own
            starting learning rate (LoRA+'s fast ``B`` group keeps its ratio).
        optim_options: the optimizer's other settings (GaLore's ``rank``, ``update_proj_gap``, ``scale`` ...;
            LoRA+'s ``ratio``; ALLoRA's ``eta``), e.g. ``{"rank": 64, "update_proj_gap": 200}``.
    """

    epochs: int = 1
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    seed: int = 0
    shuffle: bool = True
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int | None = 3
    log_every: int | None = None
    metrics_file: str | Path | None = None
    save_on_signal: bool = True
    output_dir: str | Path | None = None
    device: str | torch.device | None = None
    progress: bool = True
    divergence_factor: float | None = 10.0
    divergence_window: int = 10
    divergence_patience: int = 3
    optim: str = "adamw"
    optim_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("epochs, batch_size and grad_accum must be at least 1")
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise ValueError(f"divergence_factor must be above 1 or None, got {self.divergence_factor}")
        if self.divergence_window < 1 or self.divergence_patience < 1:
            raise ValueError("divergence_window and divergence_patience must be at least 1")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must lie in [0, 1], got {self.warmup_ratio}")
        for name in ("max_steps", "eval_every", "save_every", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1 or None, got {value!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        from peftkit.optim import check_optimizer  # here, not at import: peftkit.optim imports the methods

        if not isinstance(self.optim_options, dict):
            raise ValueError(f"optim_options must be a mapping of option names to values, got {self.optim_options!r}")
        check_optimizer(self.optim, self.optim_options)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values, without the run-time ones (paths, device, display)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUNTIME_FIELDS}
        out["betas"] = list(self.betas)
        out["optim_options"] = dict(self.optim_options)
        return out


def train_fields() -> list[str]:
    """Names of the :class:`TrainConfig` settings a run stores (all but :data:`RUNTIME_FIELDS`)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUNTIME_FIELDS]


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` for optimizer step ``step`` (0-based) of ``total``."""
    warmup = config.warmup_steps or round(config.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape
