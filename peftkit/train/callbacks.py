"""Training-loop bridges: rank schedules and growing methods under our :class:`~peftkit.train.Trainer` and
under Hugging Face ``transformers.Trainer``.

Per-step schedules live in the adapters (:meth:`peftkit.Adapter.step`: DyLoRA's rank draw, SoRA's proximal
step, IncreLoRA's importance EMA); ``step(s)`` prepares the optimizer step that follows ``s`` done steps, so a
trainer calls ``model.step_adapters(global_step)`` once before the first optimizer step (``step(0)``: DyLoRA
draws the first step's rank) and then right after every ``optimizer.step()``. Our Trainer does it itself;
:class:`HFAdapterCallback` does it for ``transformers.Trainer`` (``on_train_begin``, then ``on_step_end``,
which runs right after the optimizer step with ``state.global_step`` already counting it, as ours). So both
trainers see the same schedule.

Model-level schedules that *create parameters* (IncreLoRA's allocator) are objects with
``step(global_step) -> list[nn.Parameter]`` (:class:`ParameterSchedule`); the new parameters are handed to
the optimizer as new param groups: :class:`GrowthCallback` for our Trainer (via
:meth:`Trainer.add_parameters`), ``HFAdapterCallback(schedules=[...])`` for transformers.

Checkpoints under transformers: ``transformers.Trainer`` calls ``save_pretrained`` only on ``PreTrainedModel`` /
``PeftModel`` instances and saves any other module's whole ``state_dict()`` with safetensors, which refuses
the shared tensors of tied-weight causal LMs (GPT-2, Llama/SmolLM2: "Some tensors share memory") and would
write the frozen base weights anyway. :class:`HFAdapterTrainer` (a ``transformers.Trainer`` subclass, or
:class:`AdapterTrainerMixin` on a Trainer subclass of your own) saves the adapters only, through
``AdaptedModel.save_pretrained`` as PEFT does for a ``PeftModel``, and resumes from them
(:func:`restore_adapters`); optimizer, scheduler, RNG and trainer state are saved and restored by the Trainer
as usual.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from peftkit.core import io
from peftkit.core.errors import AdapterFileError
from peftkit.core.model import AdaptedModel
from peftkit.core.state import check_fingerprint
from peftkit.train.trainer import Callback

if TYPE_CHECKING:
    from peftkit.train.trainer import Trainer

__all__ = [
    "AdapterTrainerMixin",
    "GrowthCallback",
    "ParameterSchedule",
    "add_param_groups",
    "find_adapted",
    "is_adapter_checkpoint",
    "restore_adapters",
    "step_adapters",
]


class ParameterSchedule(Protocol):
    """A model-level schedule run once per optimizer step that may create new trainable parameters."""

    def step(self, global_step: int) -> list[nn.Parameter]:
        """Advance to ``global_step``; return the parameters created (empty when none)."""
        ...


def step_adapters(model: nn.Module, global_step: int) -> None:
    """Call ``step_adapters(global_step)`` on every :class:`AdaptedModel` inside ``model`` (itself included)."""
    for m in model.modules():
        if isinstance(m, AdaptedModel):
            m.step_adapters(global_step)


def add_param_groups(
    optimizer: Any, params: Iterable[nn.Parameter], weight_decay: float = 0.0, lr_scheduler: Any = None
) -> int:
    """Add ``params`` to a torch optimizer as new param groups (matrices with ``weight_decay``, vectors
    without), at the learning rate of the first group. A ``LambdaLR``-style scheduler (``transformers``'
    schedules) gets the new groups too, so they follow the same schedule. Returns the number added."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    known = {id(p) for g in opt.param_groups for p in g["params"]}
    new = [p for p in dict.fromkeys(params) if p.requires_grad and id(p) not in known]
    first = opt.param_groups[0]
    base_lr = first.get("initial_lr", first["lr"])
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)
    for group, wd in (([p for p in new if p.dim() >= 2], weight_decay), ([p for p in new if p.dim() < 2], 0.0)):
        if not group:
            continue
        opt.add_param_group({"params": group, "weight_decay": wd, "lr": first["lr"], "initial_lr": base_lr})
        if sched is not None and hasattr(sched, "base_lrs"):
            sched.base_lrs.append(base_lr)
            if hasattr(sched, "lr_lambdas"):
                sched.lr_lambdas.append(sched.lr_lambdas[0])
    return len(new)


class GrowthCallback(Callback):
    """Run :class:`ParameterSchedule` objects after every optimizer step of our Trainer and train what they
    create (:meth:`Trainer.add_parameters`). Adapter ``step`` hooks have already run by then."""

    def __init__(self, *schedules: ParameterSchedule, weight_decay: float | None = None) -> None:
        self.schedules = list(schedules)
        self.weight_decay = weight_decay

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        for schedule in self.schedules:
            new = schedule.step(trainer.global_step)
            if new:
                trainer.add_parameters(new, weight_decay=self.weight_decay)


@functools.cache
def _hf_adapter_callback() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:  # pragma: no cover - transformers is an optional extra
        raise ImportError("HFAdapterCallback needs transformers: pip install 'peftkit[hf]'") from exc

    class HFAdapterCallback(TrainerCallback):
        """A ``transformers.TrainerCallback`` that runs peftkit's per-step schedules under
        ``transformers.Trainer``.

        ``on_train_begin`` calls ``model.step_adapters(state.global_step)`` on every :class:`AdaptedModel` in
        the model (the schedules of the first step: DyLoRA's first rank draw); ``on_step_end`` (after each
        optimizer step) calls it again with the new step, then each of ``schedules``; parameters a schedule
        creates join the optimizer (and the LR scheduler) as new param groups with ``args.weight_decay``.

        Example:
            ``Trainer(model=adapted, args=args, train_dataset=ds, callbacks=[HFAdapterCallback()])``
        """

        def __init__(self, schedules: Sequence[ParameterSchedule] = ()) -> None:
            self.schedules = list(schedules)

        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
        ) -> None:
            if model is not None:
                step_adapters(model, int(state.global_step))

        def on_step_end(
            self,
            args: Any,
            state: Any,
            control: Any,
            model: nn.Module | None = None,
            optimizer: Any = None,
            lr_scheduler: Any = None,
            **kwargs: Any,
        ) -> None:
            if model is None:
                return
            step = int(state.global_step)
            step_adapters(model, step)
            for schedule in self.schedules:
                new = schedule.step(step)
                if new:
                    if optimizer is None:
                        raise RuntimeError("a schedule created parameters but the Trainer passed no optimizer")
                    add_param_groups(
                        optimizer,
                        new,
                        weight_decay=float(getattr(args, "weight_decay", 0.0)),
                        lr_scheduler=lr_scheduler,
                    )

    HFAdapterCallback.__module__ = __name__
    return HFAdapterCallback


def find_adapted(model: Any) -> AdaptedModel | None:
    """``model`` itself if it is an :class:`AdaptedModel`, or the one inside a ``.module`` wrapper (DDP,
    ``DataParallel``); ``None`` otherwise."""
    while not isinstance(model, AdaptedModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model if isinstance(model, AdaptedModel) else None


def is_adapter_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds adapters saved by :meth:`AdaptedModel.save` (one adapter or an index)."""
    folder = Path(folder)
    return (folder / io.CONFIG_FILE).is_file() or (folder / io.INDEX_FILE).is_file()


def restore_adapters(model: AdaptedModel, folder: str | Path) -> list[str]:
    """Overwrite the adapters ``model`` holds with the values saved in ``folder`` (what
    :meth:`AdaptedModel.save` wrote there: one adapter, or several with their index), in place: the parameter
    objects stay the same, so an optimizer built on them keeps working (resuming a run).

    Every saved adapter must exist in ``model`` under its saved name with the same config, on the same base
    modules. All or nothing: everything is read and checked before the first tensor is written, and if
    writing fails the adapters get their previous values back.

    Returns:
        The names of the restored adapters.

    Raises:
        AdapterFileError: ``folder`` holds no adapter, or an adapter the model lacks or has with another config;
            tensor names or shapes that do not match.
        BaseModelMismatch: an adapter was saved for other base modules.
    """
    folder = Path(folder)
    if not is_adapter_checkpoint(folder):
        raise AdapterFileError(f"{folder} holds no peftkit adapter ({io.CONFIG_FILE} or {io.INDEX_FILE})")
    if (folder / io.CONFIG_FILE).is_file():
        folders = [folder]
    else:
        folders = [folder / name for name in io.read_index(folder)["adapters"]]
    saved: list[tuple[str, dict[str, torch.Tensor], str]] = []
    for sub in folders:
        meta = io.read_meta(sub)
        name = meta["name"]
        if name not in model.configs:
            raise AdapterFileError(
                f"{sub} holds adapter {name!r}, which the model does not have (it has {model.adapter_names}): "
                "resuming restores the values of adapters built the same way; add it first"
            )
        # compared as JSON, the form it was saved in (tuples become lists)
        if json.loads(json.dumps(model.configs[name].to_dict())) != meta["config"]:
            raise AdapterFileError(
                f"{sub}: adapter {name!r} was saved with the config {meta['config']}, "
                f"but the model's adapter has {model.configs[name].to_dict()}"
            )
        check_fingerprint(model.model, meta["base_fingerprint"])
        saved.append((name, io.read_tensors(sub, meta), str(sub)))
    previous = {
        name: {k: t.detach().clone() for k, t in model.adapter_state_dict(name).items()} for name, _, _ in saved
    }
    done: list[str] = []
    try:
        for name, tensors, source in saved:
            done.append(name)
            model.assign_tensors(name, tensors, source=source)
    except BaseException:
        for name in done:
            model.assign_tensors(name, previous[name], source="the values before restoring")
        raise
    return [name for name, _, _ in saved]


class AdapterTrainerMixin:
    """What a ``transformers.Trainer`` (sub)class needs to train an :class:`AdaptedModel` well: put it first in
    the bases, ``class MyTrainer(AdapterTrainerMixin, SomeTrainer)`` (:class:`HFAdapterTrainer` is
    ``AdapterTrainerMixin`` + ``transformers.Trainer``).

    * Checkpoints hold the adapters only: ``_save`` (every ``save_steps``, ``save_model``) writes
      ``model.save_pretrained(dir)`` in peftkit's format (``pk.load(base, dir)`` reads a checkpoint), plus the
      tokenizer / processor and ``training_args.bin`` as the Trainer does; never the base weights, so tied
      embeddings are no problem.
    * Resuming (``train(resume_from_checkpoint=...)``) and ``load_best_model_at_end`` put the saved values back
      into the adapters in place (:func:`restore_adapters`).
    * Label names come from the base model's ``forward`` (the Trainer reads them from the model's class, which
      for an :class:`AdaptedModel` shows none: evaluation then computed no ``eval_loss`` and passed no labels
      to ``compute_metrics``), unless ``args.label_names`` sets them.
    * :class:`HFAdapterCallback` is added unless ``callbacks`` holds one (per-step adapter schedules).

    Models that are not an :class:`AdaptedModel`, and checkpoints without peftkit adapters, take the Trainer's
    own path. Single-process and DDP training; DeepSpeed ZeRO-3 / FSDP shard the parameters and are not covered.
    """

    model: Any
    args: Any
    processing_class: Any
    data_collator: Any
    state: Any
    label_names: list[str]
    can_return_loss: bool

    def __init__(self, *args: Any, callbacks: Sequence[Any] | None = None, **kwargs: Any) -> None:
        callback_type = _hf_adapter_callback()
        callbacks = list(callbacks or [])
        if not any(isinstance(c, callback_type) or c is callback_type for c in callbacks):
            callbacks.append(callback_type())
        super().__init__(*args, callbacks=callbacks, **kwargs)  # type: ignore[call-arg]
        adapted = find_adapted(self.model)
        if adapted is not None:
            from transformers.utils import can_return_loss, find_labels

            base = type(adapted.get_base_model())
            if self.args.label_names is None:
                self.label_names = find_labels(base)
            self.can_return_loss = can_return_loss(base)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        adapted = find_adapted(self.model)
        if adapted is None:
            super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]
            return
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        adapted.save_pretrained(output_dir)
        # the rest as transformers.Trainer._save does it
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        from transformers.trainer import TRAINING_ARGS_NAME

        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        adapted = find_adapted(self.model if model is None else model)
        if adapted is None or not is_adapter_checkpoint(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        restore_adapters(adapted, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        adapted = find_adapted(self.model)
        best = self.state.best_model_checkpoint
        if adapted is None or best is None or not is_adapter_checkpoint(best):
            super()._load_best_model()  # type: ignore[misc]
            return
        restore_adapters(adapted, best)


@functools.cache
def _hf_adapter_trainer() -> type:
    try:
        from transformers import Trainer
    except ImportError as exc:  # pragma: no cover - transformers is an optional extra
        raise ImportError("HFAdapterTrainer needs transformers: pip install 'peftkit[hf]'") from exc

    class HFAdapterTrainer(AdapterTrainerMixin, Trainer):
        """``transformers.Trainer`` for an :class:`AdaptedModel` (:class:`AdapterTrainerMixin`): adapter-only
        checkpoints that resume (tied-weight causal LMs save fine), label names of the base model, per-step
        adapter schedules. Takes the Trainer's arguments.

        Example:
            ``HFAdapterTrainer(model=adapted, args=TrainingArguments(..., save_steps=50), train_dataset=ds)``
        """

    HFAdapterTrainer.__module__ = __name__
    return HFAdapterTrainer


def __getattr__(name: str) -> Any:
    # ``HFAdapterCallback`` / ``HFAdapterTrainer`` subclass transformers classes: built (and transformers
    # imported) on first access only, so importing this module never needs transformers.
    if name == "HFAdapterCallback":
        return _hf_adapter_callback()
    if name == "HFAdapterTrainer":
        return _hf_adapter_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
