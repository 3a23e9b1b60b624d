"""A small training loop for adapted models (nanoGPT style: one readable ``fit``).

trainer = Trainer(model, TrainConfig(lr=1e-3, epochs=1), train_data, collate_fn=collate, eval_fn=evaluate)
result = trainer.fit()          # result.history: one dict per optimizer step; result.epochs: one per epoch

What it does: AdamW over the trainable parameters only (weight decay on matrices, not on biases / norms /
vectors), linear warmup then a cosine, linear or constant schedule, gradient accumulation, gradient-norm
clipping, evaluation after every epoch, a seeded run (``random``, ``numpy``, ``torch`` and the data order),
a tqdm bar with loss and samples/s, an adapter checkpoint per epoch (``model.save``: only the adapter),
callbacks, and the adapters' ``step(global_step)`` hook once before the first optimizer step and after every
one. Three checks stop a run with a clear error instead of training on garbage: a non-finite loss
(:class:`NonFiniteLossError`), non-finite gradients behind a finite loss (:class:`NonFiniteGradientError`,
checked before ``optimizer.step``, so the bad update is never applied) and a diverging loss
(:class:`TrainingDivergedError`).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from peftkit.core.model import AdaptedModel
from peftkit.train.errors import NonFiniteGradientError, NonFiniteLossError, TrainingDivergedError

Batch = Any
LossFn = Callable[[nn.Module, Batch], Tensor]
EvalFn = Callable[[nn.Module], Mapping[str, float]]

# Names of the parameters with non-finite gradients listed in NonFiniteGradientError (the rest are counted).
_NAMES_SHOWN = 3


@dataclass
class TrainConfig:
    """Settings of :class:`Trainer`.

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
        max_steps: stop after this many optimizer steps (``None``: run every epoch).
        seed: seeds ``random``, ``numpy``, ``torch`` and the order of the data.
        shuffle: shuffle the training data every epoch.
        output_dir: if set, the adapter is saved to ``output_dir/epoch-<n>`` after every epoch. The folder is
            created (and checked: not a file, writable) before the first step.
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
    output_dir: str | Path | None = None
    device: str | torch.device | None = None
    progress: bool = True
    divergence_factor: float | None = 10.0
    divergence_window: int = 10
    divergence_patience: int = 3

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


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Call the model on the batch (``**dict``, ``*tuple`` or one tensor) and take its ``loss``."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if getattr(out, "loss", None) is not None:
        return out.loss
    if isinstance(out, Tensor) and out.dim() == 0:
        return out
    raise TypeError("the model's output has no 'loss' (pass labels in the batch, or give Trainer a loss_fn)")


def batch_size_of(batch: Batch) -> int:
    """Number of rows in a batch (the first dimension of its first tensor)."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    return next((int(t.shape[0]) for t in items if isinstance(t, Tensor) and t.dim() > 0), 0)


def to_device(batch: Batch, device: str | torch.device | None) -> Batch:
    """Move every tensor of a batch (dict, tuple, list or tensor) to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def prepare_output_dir(path: str | Path, epochs: int = 0) -> Path:
    """Create the checkpoint folder ``path`` before training, so that a path that cannot hold the checkpoints
    fails now rather than after the first epoch: a file, a folder that is not writable, or an
    ``epoch-<n>`` (``n <= epochs``) inside it that is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir {path} is a file, not a folder: the checkpoints cannot be written there")
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir {path} is not writable")
    for n in range(1, epochs + 1):
        if (path / f"epoch-{n}").is_file():
            raise NotADirectoryError(f"{path / f'epoch-{n}'} is a file: the checkpoint of epoch {n} cannot go there")
    return path


def grad_norm(params: Sequence[Tensor]) -> float:
    """The global L2 norm of the gradients of ``params`` (``None`` gradients skipped): NaN or inf exactly when
    a gradient entry is. Computed as ``clip_grad_norm_`` does, except that finite gradients whose squares
    overflow the gradient dtype (entries above ~1e19 in float32) are measured again in float64 rather than
    reported as an infinite norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0].device
    norms = torch._foreach_norm(grads)  # one kernel per device/dtype group, as clip_grad_norm_ uses
    total = float(torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms])))
    if math.isinf(total) and all(bool(torch.isfinite(g).all()) for g in grads):
        norms = [torch.linalg.vector_norm(g, dtype=torch.float64).to(device) for g in grads]
        total = float(torch.linalg.vector_norm(torch.stack(norms)))
    return total


class _DivergenceCheck:
    """The rule of ``TrainConfig.divergence_*``: the mean loss of ``patience`` consecutive windows of ``window``
    steps each above ``factor`` times the first step's loss."""

    def __init__(self, config: TrainConfig) -> None:
        self.factor, self.window, self.patience = (
            config.divergence_factor,
            config.divergence_window,
            config.divergence_patience,
        )
        self.lr = config.lr
        self.reference: float | None = None
        self.losses: list[float] = []
        self.windows_above = 0

    def update(self, step: int, loss: float) -> None:
        """Record optimizer step ``step``'s loss; raise :class:`TrainingDivergedError` when the rule fires."""
        if self.factor is None:
            return
        if self.reference is None:
            self.reference = loss
        if self.reference <= 0:
            return
        self.losses.append(loss)
        if len(self.losses) < self.window:
            return
        mean = sum(self.losses) / len(self.losses)
        self.losses.clear()
        self.windows_above = self.windows_above + 1 if mean > self.factor * self.reference else 0
        if self.windows_above >= self.patience:
            first = step - self.patience * self.window + 1
            raise TrainingDivergedError(
                f"training diverged: the mean loss of each of the {self.patience} windows of {self.window} steps "
                f"from step {first} to step {step} stayed above {self.factor:g}x the first step's loss "
                f"({self.reference:.4g}); the last window's mean is {mean:.4g}. Stopped at step {step}. Lower the "
                f"learning rate (peak lr {self.lr:g}) and keep max_grad_norm set; TrainConfig(divergence_factor=None) "
                "turns this check off."
            )


class Callback:
    """Hooks the trainer calls; override the ones you need. Set ``trainer.should_stop = True`` to stop."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first step."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """After every optimizer step; ``logs`` has step, epoch, loss, lr, grad_norm (before clipping),
        samples_per_s."""

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """After every epoch's evaluation and checkpoint; ``logs`` has epoch, train_loss and the eval metrics."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the last step."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        history: one dict per optimizer step (step, epoch, loss, lr, grad_norm, samples_per_s).
        epochs: one dict per epoch (epoch, train_loss, seconds and the eval metrics).
        global_step: optimizer steps taken.
        seconds: wall time of the run.
        checkpoints: folders of the adapter checkpoints written.
        stopped_early: a callback or ``max_steps`` ended the run before the last epoch finished.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    global_step: int = 0
    seconds: float = 0.0
    checkpoints: list[Path] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def metrics(self) -> dict[str, float]:
        """The last epoch's logs (train loss and eval metrics)."""
        return dict(self.epochs[-1]) if self.epochs else {}


class Trainer:
    """Train the trainable parameters of ``model`` (an :class:`AdaptedModel` or any ``nn.Module``).

    Args:
        model: the model; parameters with ``requires_grad=False`` are never touched.
        config: a :class:`TrainConfig`.
        train_data: a map-style dataset or a sequence of examples.
        collate_fn: turns a list of examples into a batch (the ``DataLoader`` default if ``None``).
        eval_fn: ``eval_fn(model) -> {"metric": value}``, called after every epoch (the model is put back in
            train mode afterwards).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; by default the model's own ``loss`` output.
        callbacks: :class:`Callback` instances, called in order.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: Dataset | Sequence[Any],
        *,
        collate_fn: Callable[[list[Any]], Batch] | None = None,
        eval_fn: EvalFn | None = None,
        loss_fn: LossFn = default_loss,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.model = model
        self.config = config
        self.train_data = train_data
        self.collate_fn = collate_fn
        self.eval_fn = eval_fn
        self.loss_fn = loss_fn
        self.callbacks = list(callbacks)
        self.global_step = 0
        self.epoch = 0
        self.should_stop = False
        if config.output_dir is not None and not hasattr(model, "save"):
            raise TypeError("output_dir needs a model with .save(path) (an AdaptedModel) to write adapter checkpoints")
        self.params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
        if not self.params:
            raise ValueError("the model has no trainable parameters (is an adapter active?)")
        matrices = [p for p in self.params if p.dim() >= 2]
        vectors = [p for p in self.params if p.dim() < 2]
        groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.eps
        )

    def add_parameters(self, params: Sequence[nn.Parameter], weight_decay: float | None = None) -> None:
        """Train parameters created after the trainer was built (methods that grow, e.g. IncreLoRA).

        They join the optimizer as new param groups (matrices with ``weight_decay``, default the config's;
        vectors without), are clipped with the others, and follow the learning-rate schedule. Parameters
        already trained, or with ``requires_grad=False``, are skipped.
        """
        known = {id(p) for p in self.params}
        new = [p for p in dict.fromkeys(params) if p.requires_grad and id(p) not in known]
        if not new:
            return
        self.params.extend(new)
        decay = self.config.weight_decay if weight_decay is None else weight_decay
        lr = self.optimizer.param_groups[0]["lr"]
        for group, wd in (([p for p in new if p.dim() >= 2], decay), ([p for p in new if p.dim() < 2], 0.0)):
            if group:
                self.optimizer.add_param_group({"params": group, "weight_decay": wd, "lr": lr})

    def _adapted_models(self) -> list[AdaptedModel]:
        return [m for m in self.model.modules() if isinstance(m, AdaptedModel)]

    def _non_finite_gradients(self, norm: float, loss: float, epoch: int) -> NonFiniteGradientError:
        names = {id(p): n for n, p in self.model.named_parameters()}
        bad = [
            names.get(id(p), f"<parameter {i}>")
            for i, p in enumerate(self.params)
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        step = self.global_step + 1
        where = f"at step {step} (epoch {epoch}) although the loss is finite ({loss:.4g})"
        kept = f"stopped before this update: the parameters are those after step {step - 1}"
        if not bad:  # float64 gradients whose norm overflows even in float64
            return NonFiniteGradientError(
                f"the gradient norm is {norm} {where}: every gradient entry is finite, but so large that their norm "
                f"overflows; {kept}. Likely cause: exploding gradients (lower the learning rate)."
            )
        shown = ", ".join(bad[:_NAMES_SHOWN]) + (
            f" and {len(bad) - _NAMES_SHOWN} more" if len(bad) > _NAMES_SHOWN else ""
        )
        return NonFiniteGradientError(
            f"gradients are NaN or infinite {where}, in {len(bad)} of {len(self.params)} trained tensors: {shown}; "
            f"{kept}. Likely causes: an operation whose gradient is undefined at these values in the loss or the "
            "model (sqrt or a power below 1 at 0, log of 0, a division by 0, the norm of a zero vector), a float16 "
            "overflow, or a NaN produced in a custom backward; torch.autograd.set_detect_anomaly(True) names the "
            "operation."
        )

    def fit(self) -> TrainResult:
        """Run the training loop; returns a :class:`TrainResult`.

        Raises:
            NonFiniteLossError: the loss became NaN/inf (the message names the step); no update is applied.
            NonFiniteGradientError: the loss is finite but gradients are NaN/inf (the message names the step and
                the parameters); checked before ``optimizer.step``, so no update is applied.
            TrainingDivergedError: the loss stayed far above its first value (``TrainConfig.divergence_*``).
            NotADirectoryError, PermissionError: ``output_dir`` cannot hold the checkpoints (raised before the
                first step).
        """
        cfg, model = self.config, self.model
        if cfg.output_dir is not None:
            prepare_output_dir(cfg.output_dir, cfg.epochs)
        seed_everything(cfg.seed)
        loader = DataLoader(
            self.train_data,  # type: ignore[arg-type]
            batch_size=cfg.batch_size,
            shuffle=cfg.shuffle,
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        micro_batches = len(loader)
        steps_per_epoch = math.ceil(micro_batches / cfg.grad_accum)
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        adapted = self._adapted_models()
        was_training = model.training
        result = TrainResult()
        divergence = _DivergenceCheck(cfg)
        start = time.perf_counter()
        for cb in self.callbacks:
            cb.on_train_begin(self)
        # ``step(g)`` prepares the optimizer step after ``g`` steps: call it before the first step too, so
        # that per-step schedules (DyLoRA's rank draw, DV-LoRA's phase) already hold for that step.
        for m in adapted:
            m.step_adapters(self.global_step)

        for epoch in range(1, cfg.epochs + 1):
            self.epoch = epoch
            model.train()
            epoch_start, samples, losses = time.perf_counter(), 0, []
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress)
            batches = iter(loader)
            for first in range(0, micro_batches, cfg.grad_accum):
                # One optimizer step over k micro-batches; each loss is divided by k so the gradient is the
                # mean over the window, as if it were one batch.
                k = min(cfg.grad_accum, micro_batches - first)
                step_loss = 0.0
                for i in range(k):
                    batch = to_device(next(batches), cfg.device)
                    loss = self.loss_fn(model, batch)
                    if not torch.isfinite(loss.detach()).all():
                        self.optimizer.zero_grad(set_to_none=True)
                        bar.close()
                        raise NonFiniteLossError(
                            f"training loss is {loss.item()} at step {self.global_step + 1} (epoch {epoch}, "
                            f"micro-batch {first + i + 1} of {micro_batches}); stopped before this update. "
                            "Lower the learning rate, keep max_grad_norm set, or check the inputs."
                        )
                    (loss / k).backward()
                    step_loss += loss.item() / k
                    samples += batch_size_of(batch)
                # The loss can be finite while its gradients are not (sqrt or log at 0, float16 overflow): check
                # the norm before the step, so a NaN update never reaches the parameters.
                norm = grad_norm(self.params)
                if not math.isfinite(norm):
                    error = self._non_finite_gradients(norm, step_loss, epoch)  # reads the gradients: first
                    self.optimizer.zero_grad(set_to_none=True)
                    bar.close()
                    raise error
                if cfg.max_grad_norm is not None and norm > cfg.max_grad_norm:
                    # As torch.nn.utils.clip_grad_norm_ (same coefficient), from the norm computed above.
                    grads = [p.grad for p in self.params if p.grad is not None]
                    torch._foreach_mul_(grads, cfg.max_grad_norm / (norm + 1e-6))
                lr = cfg.lr * lr_factor(self.global_step, total, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                for m in adapted:
                    m.step_adapters(self.global_step)

                throughput = samples / max(time.perf_counter() - epoch_start, 1e-9)
                logs = {
                    "step": self.global_step,
                    "epoch": epoch,
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": norm,
                    "samples_per_s": throughput,
                }
                result.history.append(logs)
                losses.append(step_loss)
                bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{throughput:.1f}", refresh=False)
                bar.update()
                for cb in self.callbacks:
                    cb.on_step_end(self, logs)
                try:
                    divergence.update(self.global_step, step_loss)
                except TrainingDivergedError:
                    bar.close()
                    raise
                if self.should_stop or self.global_step >= total:
                    break
            bar.close()

            epoch_logs: dict[str, float] = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else 0.0}
            if self.eval_fn is not None:
                epoch_logs.update(self.eval_fn(model))
                model.train()
            if cfg.output_dir is not None:
                path = Path(cfg.output_dir) / f"epoch-{epoch}"
                model.save(path)  # type: ignore[operator]
                result.checkpoints.append(path)
            epoch_logs["seconds"] = time.perf_counter() - epoch_start
            result.epochs.append(epoch_logs)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch_logs)
            if self.should_stop or self.global_step >= total:
                result.stopped_early = self.should_stop or epoch < cfg.epochs
                break

        model.train(was_training)
        result.global_step = self.global_step
        result.seconds = time.perf_counter() - start
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result
