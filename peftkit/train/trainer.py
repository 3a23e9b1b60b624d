"""A small training loop for adapted models (nanoGPT style: one readable ``fit``).

trainer = Trainer(model, TrainConfig(lr=1e-3, epochs=1), train_data, collate_fn=collate, eval_fn=evaluate)
result = trainer.fit()          # result.history: one dict per optimizer step; result.epochs: one per epoch
result = trainer.fit(resume_from="ckpt/step-40")   # continues exactly where that checkpoint left off

What it does: AdamW over the trainable parameters only (weight decay on matrices, not on biases / norms /
vectors; or another optimizer of :mod:`peftkit.optim`, chosen by ``TrainConfig.optim``), linear warmup then a
cosine, linear or constant schedule, gradient accumulation, gradient-norm clipping, evaluation after every
epoch (and every ``eval_every`` steps), a seeded run (``random``, ``numpy``, ``torch`` and the data order), a
tqdm bar with loss and samples/s, log lines mirrored to a JSONL file, full checkpoints
(:mod:`peftkit.train.checkpoint`: adapter, optimizer, RNG states, data order and position) that
:meth:`Trainer.fit` resumes from exactly, a checkpoint on SIGINT / SIGTERM, callbacks, and the adapters'
``step(global_step)`` hook once before the first optimizer step and after every one. Three checks stop a run
with a clear error instead of training on garbage: a non-finite loss (:class:`NonFiniteLossError`),
non-finite gradients behind a finite loss (:class:`NonFiniteGradientError`, checked before
``optimizer.step``, so the bad update is never applied) and a diverging loss (:class:`TrainingDivergedError`).

The data order is drawn as ``torch.utils.data.DataLoader(shuffle=True, generator=torch.Generator()
.manual_seed(seed))`` draws it (per epoch one 64-bit draw, then ``randperm``), so runs keep the order of the
DataLoader this loop used before; the loop indexes the data itself so that the order and the position within
the epoch can be saved and restored.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from peftkit.core import io
from peftkit.core.model import AdaptedModel
from peftkit.optim import build_optimizer, trainable
from peftkit.train import checkpoint as ckpt
from peftkit.train import distributed as parallel
from peftkit.train.config import TrainConfig, lr_factor
from peftkit.train.distributed import LOCAL, Distributed
from peftkit.train.errors import CheckpointError, NonFiniteLossError, TrainingInterrupted
from peftkit.train.guards import DivergenceCheck, non_finite_gradients
from peftkit.train.helpers import (
    SignalFlag,
    batch_size_of,
    default_loss,
    prepare_output_dir,
    seed_everything,
    to_device,
)

__all__ = [
    "Callback",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "batch_size_of",
    "default_loss",
    "lr_factor",
    "prepare_output_dir",
    "seed_everything",
    "to_device",
]

Batch = Any
LossFn = Callable[[nn.Module, Batch], Tensor]
EvalFn = Callable[[nn.Module], Mapping[str, float]]

# Settings that may differ between a checkpoint and the run resuming it: they change what is evaluated, saved
# or shown, never the trained numbers.
_FREE_ON_RESUME = ("eval_every", "save_every", "keep_checkpoints", "log_every", "save_on_signal")


class Callback:
    """Hooks the trainer calls; override the ones you need. Set ``trainer.should_stop = True`` to stop."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first step."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """After every optimizer step; ``logs`` has step, epoch, loss, lr, grad_norm (before clipping),
        samples_per_s, and the evaluation metrics on the steps of ``eval_every``."""

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """After every epoch's evaluation and checkpoint; ``logs`` has epoch, train_loss and the eval metrics."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the last step."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        history: one dict per optimizer step of this call (step, epoch, loss, lr, grad_norm, samples_per_s).
        epochs: one dict per epoch finished in this call (epoch, train_loss, seconds and the eval metrics).
        global_step: optimizer steps taken in the whole run (a resumed run counts the steps before it too).
        seconds: wall time of this call.
        checkpoints: folders of the checkpoints written.
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


@dataclass
class _Position:
    """Where the run stands inside an epoch (what a checkpoint records besides the weights and optimizer)."""

    epoch: int = 1
    done: int = 0  # micro-batches of this epoch already trained on
    order: list[int] | None = None  # this epoch's data order, drawn at its start
    losses: list[float] = field(default_factory=list)
    samples: int = 0


class Trainer:
    """Train the trainable parameters of ``model`` (an :class:`AdaptedModel` or any ``nn.Module``).

    Args:
        model: the model; parameters with ``requires_grad=False`` are never touched.
        config: a :class:`TrainConfig`.
        train_data: a map-style dataset or a sequence of examples.
        collate_fn: turns a list of examples into a batch (``torch.utils.data.default_collate`` if ``None``).
        eval_fn: ``eval_fn(model) -> {"metric": value}``, called after every epoch and every ``eval_every``
            steps (the model is put back in train mode afterwards).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; by default the model's own ``loss`` output.
        callbacks: :class:`Callback` instances, called in order.
        log: where log lines go (default ``tqdm.write``, which keeps the progress bar intact).
        distributed: this process's place in a ``torch.distributed`` group (:mod:`peftkit.train.distributed`):
            the model is trained under DDP or FSDP2, ``batch_size`` is per process, each rank trains on its share
            of every global batch, and only rank 0 logs and writes files; ``None``: one process.
        loss_weight: ``loss_weight(batch)``: how many items ``loss_fn``'s mean is over (default: the rows), so that
            processes holding different numbers of them weight their losses as one batch would (a causal LM's
            loss averages over its labelled tokens).
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
        log: Callable[[str], None] | None = None,
        distributed: Distributed | None = None,
        loss_weight: Callable[[Batch], float] | None = None,
    ) -> None:
        self.model = model
        self.dist = distributed or LOCAL
        self.loss_weight = loss_weight or batch_size_of
        # What the loss calls: a DDP wrapper, or the model sharded in place by FSDP2 (whose parameters become
        # shards, so the optimizer is built after this).
        self.train_model = self.dist.wrap(model, config.optim)
        self.config = config
        self.train_data = train_data
        self.collate_fn = collate_fn or default_collate
        self.eval_fn = eval_fn
        self.loss_fn = loss_fn
        self.callbacks = list(callbacks)
        self.log = log or tqdm.write
        self.global_step = 0
        self.epoch = 0
        self.should_stop = False
        self.params = trainable(model)  # NoTrainableParametersError (a ValueError) when there are none
        self.optimizer = build_optimizer(
            config.optim, model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps,
            **config.optim_options,
        )  # fmt: skip
        self._divergence = DivergenceCheck(config)
        self._generator = torch.Generator().manual_seed(config.seed)
        self._position = _Position()
        self._signal = SignalFlag()
        # Files written into every checkpoint besides the state (name -> content): a run's settings, say.
        self.checkpoint_files: dict[str, bytes] = {}

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
        factor = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("base_lr", self.config.lr)
        for group, wd in (([p for p in new if p.dim() >= 2], decay), ([p for p in new if p.dim() < 2], 0.0)):
            if group:
                self.optimizer.add_param_group(
                    {"params": group, "weight_decay": wd, "lr": self.config.lr * factor, "base_lr": self.config.lr}
                )

    # ------------------------------------------------------------------------------------------ the schedule
    def _micro_batches(self) -> int:
        global_batch = self.config.batch_size * self.dist.world_size
        return math.ceil(len(self.train_data) / global_batch)  # type: ignore[arg-type]

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (the length of the learning-rate schedule)."""
        cfg = self.config
        total = math.ceil(self._micro_batches() / cfg.grad_accum) * cfg.epochs
        return min(total, cfg.max_steps) if cfg.max_steps is not None else total

    def _epoch_order(self) -> list[int]:
        # DataLoader draws a base seed from its generator when an epoch's iterator starts, then RandomSampler
        # draws the permutation: the same two draws keep the order of the former DataLoader-based loop.
        n = len(self.train_data)  # type: ignore[arg-type]
        torch.empty((), dtype=torch.int64).random_(generator=self._generator)
        return torch.randperm(n, generator=self._generator).tolist() if self.config.shuffle else list(range(n))

    def _batch(self, order: list[int], index: int) -> tuple[Batch, int, bool]:
        """``(this process's batch, examples in the global batch, whether this process's share is empty)``."""
        size = self.config.batch_size * self.dist.world_size
        examples = [self.train_data[i] for i in order[index * size : (index + 1) * size]]
        mine, empty = self.dist.share(examples)
        return self.collate_fn(mine), len(examples), empty

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, root: str | Path | None = None) -> Path:
        """Write the full state after the current optimizer step to ``root/step-<global_step>`` (default root:
        ``config.output_dir``); the oldest checkpoints beyond ``keep_checkpoints`` are deleted."""
        root = Path(root if root is not None else self.config.output_dir)  # type: ignore[arg-type]
        pos = self._position
        if pos.done >= self._micro_batches():  # the epoch is complete: the next one starts afresh
            pos = _Position(epoch=pos.epoch + 1)
        rng_values, tensors = ckpt.rng_state()
        if self.dist.active:  # every rank's RNG states (rank r resumes with its own); the optimizer goes to dcp/
            ranks = self.dist.gather((rng_values, tensors))
            rng_values = {"ranks": [values for values, _ in ranks]}
            tensors = {f"rank{r}.{k}": t for r, (_, ts) in enumerate(ranks) for k, t in ts.items()}
            opt_values: dict[str, Any] = {"sharded": True}
        else:
            opt_values, opt_tensors = ckpt.optimizer_state(self.optimizer)
            tensors.update(opt_tensors)
        tensors["data.generator"] = self._generator.get_state()
        if pos.order is not None:
            tensors["data.order"] = torch.tensor(pos.order, dtype=torch.int64)
        state = {
            "step": self.global_step,
            "total_steps": self.total_steps(),
            "epoch": pos.epoch,
            "micro_batches_done": pos.done,
            "num_examples": len(self.train_data),  # type: ignore[arg-type]
            "epoch_losses": pos.losses,
            "epoch_samples": pos.samples,
            "divergence": self._divergence.state_dict(),
            "optimizer": opt_values,
            "rng": rng_values,
            "config": self.config.to_dict(),
            "world_size": self.dist.world_size,
        }

        def write_state(folder: Path) -> None:
            if self.checkpoint_files:
                io.write_files(folder, list(self.checkpoint_files.items()))
            ckpt.write_state(folder, state, tensors)

        def write(folder: Path) -> None:
            ckpt.save_model(self.model, folder)
            write_state(folder)

        if self.dist.active:
            path = parallel.write_checkpoint(root, self.global_step, self.dist, self.train_model, self.optimizer,
                                                ckpt.save_model, write_state)  # fmt: skip
        else:
            path = ckpt.write_checkpoint(root, self.global_step, write)
        if self.dist.is_main:
            ckpt.prune(root, self.config.keep_checkpoints)
        return path

    def _restore(self, folder: str | Path) -> None:
        """Load checkpoint ``folder`` into this trainer and its model (see :meth:`fit`)."""
        folder = Path(folder)
        state, tensors = ckpt.read_state(folder)
        n = len(self.train_data)  # type: ignore[arg-type]
        if state["num_examples"] != n:
            raise CheckpointError(
                f"{folder} was written for {state['num_examples']} training examples, this run has {n}: "
                "resuming on other data would not continue the run"
            )
        # Settings added since a checkpoint was written (e.g. optim) count as their defaults there.
        saved, now = {**TrainConfig().to_dict(), **state["config"]}, self.config.to_dict()
        changed = [k for k in now if k not in _FREE_ON_RESUME and saved.get(k) != now[k]]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise CheckpointError(f"{folder} was written with other training settings ({diffs})")
        if state.get("world_size", 1) != self.dist.world_size:
            raise CheckpointError(
                f"{folder} was written by {state.get('world_size', 1)} process(es), this run has "
                f"{self.dist.world_size}: the global batch (processes x batch_size) would differ; resume with "
                f"--nproc {state.get('world_size', 1)}"
            )
        if self.dist.active:
            parallel.load_sharded(folder / parallel.DCP_DIR, self.train_model, self.optimizer)
            prefix = f"rank{self.dist.rank}."
            mine = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
            ckpt.set_rng_state(state["rng"]["ranks"][self.dist.rank], mine)
        else:
            ckpt.load_model(self.model, folder)
            ckpt.load_optimizer_state(self.optimizer, state["optimizer"], tensors, str(folder))
            ckpt.set_rng_state(state["rng"], tensors)
        self._generator.set_state(tensors["data.generator"])
        order = tensors["data.order"].tolist() if "data.order" in tensors else None
        self._position = _Position(
            state["epoch"], state["micro_batches_done"], order, list(state["epoch_losses"]), state["epoch_samples"]
        )
        self._divergence.load_state_dict(state["divergence"])
        self.global_step = state["step"]

    # -------------------------------------------------------------------------------------------- logging
    def _emit(self, logs: dict[str, float], total: int, force: bool) -> None:
        """Print one log line and append it to ``metrics_file`` when this step is logged."""
        cfg = self.config
        step = int(logs["step"])
        if not self.dist.is_main:
            return
        due = force or (cfg.log_every is not None and (step % cfg.log_every == 0 or step == total))
        if not due:
            return
        if cfg.metrics_file is not None:
            with open(cfg.metrics_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({k: v for k, v in logs.items() if k != "samples_per_s"}) + "\n")
        if cfg.log_every is not None:
            shown = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in logs.items()
                if k not in ("step", "epoch", "grad_norm", "samples_per_s")
            )
            self.log(f"step {step}/{total}  {shown}")

    def _truncate_metrics(self) -> None:
        """Drop the lines of ``metrics_file`` logged after the checkpoint being resumed (they are logged again),
        so the file of a resumed run reads as that of an uninterrupted one."""
        path = self.config.metrics_file
        if path is None or not self.dist.is_main or not Path(path).is_file():
            return
        kept = []
        for line in Path(path).read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                step = json.loads(line).get("step", 0)
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut short by a kill
            if step <= self.global_step:
                kept.append(line)
        Path(path).write_text("".join(kept), encoding="utf-8")

    def _evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        metrics = dict(self.eval_fn(self.model))
        self.model.train()
        return metrics

    # ------------------------------------------------------------------------------------------- training
    def fit(self, resume_from: str | Path | None = None) -> TrainResult:
        """Run the training loop; returns a :class:`TrainResult`.

        Args:
            resume_from: a checkpoint folder (``step-<n>``) written by a trainer with the same model, data and
                settings: its adapter, optimizer, RNG states, data order and position are restored, and the run
                continues as if it had never stopped (the same updates, up to floating-point determinism).

        Raises:
            NonFiniteLossError: the loss became NaN/inf (the message names the step); no update is applied.
            NonFiniteGradientError: the loss is finite but gradients are NaN/inf (the message names the step and
                the parameters); checked before ``optimizer.step``, so no update is applied.
            TrainingDivergedError: the loss stayed far above its first value (``TrainConfig.divergence_*``).
            TrainingInterrupted: SIGINT / SIGTERM arrived; the run stopped after the current optimizer step and
                wrote a checkpoint (with ``output_dir``), whose folder the exception names.
            CheckpointError: ``resume_from`` does not fit this model, data or settings.
            NotADirectoryError, PermissionError: ``output_dir`` cannot hold the checkpoints (raised before the
                first step).
        """
        cfg = self.config
        if cfg.output_dir is not None:
            prepare_output_dir(cfg.output_dir)
        seed_everything(cfg.seed)
        self._generator.manual_seed(cfg.seed)
        self._position = _Position()
        self._divergence = DivergenceCheck(cfg)
        if resume_from is not None:
            self._restore(resume_from)
            self._truncate_metrics()
        self._signal.name = None
        with self._signal.installed(cfg.save_on_signal and cfg.output_dir is not None):
            return self._run()

    def _run(self) -> TrainResult:
        cfg, model = self.config, self.model
        micro_batches, total = self._micro_batches(), self.total_steps()
        steps_per_epoch = math.ceil(micro_batches / cfg.grad_accum)
        adapted = [m for m in model.modules() if isinstance(m, AdaptedModel)]
        was_training = model.training
        result = TrainResult(global_step=self.global_step)
        start = time.perf_counter()
        for cb in self.callbacks:
            cb.on_train_begin(self)
        # ``step(g)`` prepares the optimizer step after ``g`` steps: call it before the first step too, so
        # that per-step schedules (DyLoRA's rank draw, DV-LoRA's phase) already hold for that step.
        for m in adapted:
            m.step_adapters(self.global_step)

        pos = self._position
        while pos.epoch <= cfg.epochs and self.global_step < total and not self.should_stop:
            self.epoch = pos.epoch
            model.train()
            if pos.order is None:
                pos.order = self._epoch_order()
            epoch_start = time.perf_counter()
            done_steps = math.ceil(pos.done / cfg.grad_accum)
            bar = tqdm(total=steps_per_epoch, initial=done_steps, desc=f"epoch {pos.epoch}/{cfg.epochs}",
                       disable=not (cfg.progress and self.dist.is_main))  # fmt: skip
            try:
                last_logs = self._train_epoch(pos, micro_batches, total, adapted, bar, epoch_start, result)
            finally:
                bar.close()
            metrics = self._evaluate()
            if last_logs is not None:
                last_logs.update(metrics)
                self._emit(last_logs, total, force=bool(metrics) or self.global_step >= total)
            epoch_logs: dict[str, float] = {
                "epoch": pos.epoch,
                "train_loss": float(np.mean(pos.losses)) if pos.losses else 0.0,
            }
            epoch_logs.update(metrics)
            if cfg.output_dir is not None:
                result.checkpoints.append(self.save_checkpoint())
            epoch_logs["seconds"] = time.perf_counter() - epoch_start
            result.epochs.append(epoch_logs)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch_logs)
            self._check_signal(result)
            if pos.done >= micro_batches:
                pos = self._position = _Position(epoch=pos.epoch + 1)
        result.stopped_early = self.should_stop or (self.global_step >= total and pos.epoch <= cfg.epochs)
        model.train(was_training)
        result.global_step = self.global_step
        result.seconds = time.perf_counter() - start
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    def _check_signal(self, result: TrainResult) -> None:
        name = self._signal.name
        if self.dist.any(name is not None):  # a signal that reached one process stops them all, after one step
            name = name or "SIGTERM"
        if name is None:
            return
        path = None
        if self.config.output_dir is not None:
            path = Path(self.config.output_dir) / ckpt.checkpoint_name(self.global_step)
            if not ckpt.is_checkpoint(path):
                path = self.save_checkpoint()
            result.checkpoints.append(path)
        where = f"; checkpoint: {path}" if path is not None else ""
        raise TrainingInterrupted(f"{name}: stopped after step {self.global_step}{where}", path, name)

    def _train_epoch(
        self,
        pos: _Position,
        micro_batches: int,
        total: int,
        adapted: list[AdaptedModel],
        bar: Any,
        epoch_start: float,
        result: TrainResult,
    ) -> dict[str, float] | None:
        """The optimizer steps of one epoch from ``pos.done``; returns the last step's logs (logged by the
        caller, after the epoch's evaluation) or ``None`` when no step was taken."""
        cfg, model = self.config, self.model
        assert pos.order is not None
        logs = None
        while pos.done < micro_batches:
            # One optimizer step over k micro-batches; each loss is divided by k so the gradient is the mean
            # over the window, as if it were one batch.
            k = min(cfg.grad_accum, micro_batches - pos.done)
            step_loss = 0.0
            for i in range(k):
                batch, count, empty = self._batch(pos.order, pos.done + i)
                batch = to_device(batch, cfg.device)
                loss = self.loss_fn(self.train_model, batch)
                # One process: the loss as it is. Several: weighted as one global batch (distributed.reduce_loss).
                weight = 0.0 if empty else (float(self.loss_weight(batch)) if self.dist.active else 1.0)
                loss, value = self.dist.reduce_loss(loss, weight)
                if not math.isfinite(value):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(
                        f"training loss is {value} at step {self.global_step + 1} (epoch {pos.epoch}, "
                        f"micro-batch {pos.done + i + 1} of {micro_batches}); stopped before this update. "
                        "Lower the learning rate, keep max_grad_norm set, or check the inputs."
                    )
                (loss / k).backward()
                step_loss += value / k
                pos.samples += count if self.dist.active else batch_size_of(batch)
            # The loss can be finite while its gradients are not (sqrt or log at 0, float16 overflow): check the
            # norm before the step, so a NaN update never reaches the parameters.
            norm = self.dist.grad_norm(self.params)
            if not math.isfinite(norm):
                error = non_finite_gradients(model, self.params, norm, step_loss, self.global_step + 1, pos.epoch)
                self.optimizer.zero_grad(set_to_none=True)
                raise error
            if cfg.max_grad_norm is not None and norm > cfg.max_grad_norm:
                # As torch.nn.utils.clip_grad_norm_ (same coefficient), from the norm computed above.
                self.dist.clip(self.params, cfg.max_grad_norm / (norm + 1e-6))
            factor = lr_factor(self.global_step, total, cfg)
            lr = cfg.lr * factor
            for group in self.optimizer.param_groups:  # each group's own start (LoRA+'s B group: ratio · lr)
                group["lr"] = group.get("base_lr", cfg.lr) * factor
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            pos.done += k
            pos.losses.append(step_loss)
            for m in adapted:
                m.step_adapters(self.global_step)

            throughput = pos.samples / max(time.perf_counter() - epoch_start, 1e-9)
            logs = {"step": self.global_step, "epoch": pos.epoch, "loss": step_loss, "lr": lr, "grad_norm": norm,
                    "samples_per_s": throughput}  # fmt: skip
            last = pos.done >= micro_batches or self.global_step >= total
            evaluated = not last and cfg.eval_every is not None and self.global_step % cfg.eval_every == 0
            if evaluated:
                logs.update(self._evaluate())
            result.history.append(logs)
            bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{throughput:.1f}", refresh=False)
            bar.update()
            for cb in self.callbacks:
                cb.on_step_end(self, logs)
            self._divergence.update(self.global_step, step_loss)
            if last or self.should_stop:
                return logs  # the epoch's end evaluates, logs this step and writes the checkpoint
            self._emit(logs, total, force=evaluated)
            if cfg.output_dir is not None and cfg.save_every is not None and self.global_step % cfg.save_every == 0:
                result.checkpoints.append(self.save_checkpoint())
            self._check_signal(result)
        return logs
