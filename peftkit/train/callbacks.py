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
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from peftkit.core.model import AdaptedModel
from peftkit.train.trainer import Callback

if TYPE_CHECKING:
    from peftkit.train.trainer import Trainer

__all__ = ["GrowthCallback", "ParameterSchedule", "add_param_groups", "step_adapters"]


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


def __getattr__(name: str) -> Any:
    # ``HFAdapterCallback`` subclasses ``transformers.TrainerCallback``: built (and transformers imported) on
    # first access only, so importing this module never needs transformers.
    if name == "HFAdapterCallback":
        return _hf_adapter_callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
