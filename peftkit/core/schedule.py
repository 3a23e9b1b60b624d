"""Warning when adapters with a per-step schedule train without it.

A method that overrides :meth:`Adapter.step` adjusts itself once per optimizer step (DyLoRA samples a rank,
SoRA sparsifies its gates, IncreLoRA grows, DV-LoRA switches phase); trainers call
``AdaptedModel.step_adapters(global_step)`` for it. A plain PyTorch loop that never calls it would train such an
adapter silently without its schedule. An optimizer step shows as a changed version of an adapter parameter
between two training forwards; if no ``step_adapters`` call came in between, the model warns once.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from .protocol import Adapter


class ScheduleWatch:
    """The per-model state of that check (one probe parameter per scheduled adapter)."""

    def __init__(self) -> None:
        self.probes: dict[str, Tensor | None] = {}  # adapter -> a parameter of a scheduled module (None: none)
        self.seen: dict[str, tuple[int, int]] = {}  # adapter -> (its version, steps) at the last training forward
        self.steps = 0  # step_adapters calls so far
        self.warned = False

    def stepped(self) -> None:
        self.steps += 1

    def forget(self, name: str) -> None:
        self.probes.pop(name, None)
        self.seen.pop(name, None)

    def check(self, model: Any) -> None:
        """Called at each training forward of ``model`` (an ``AdaptedModel``) with gradients enabled."""
        if self.warned:
            return
        for name in model.routing.active:
            if name not in self.probes:  # found once per adapter (its methods do not change)
                self.probes[name] = next(
                    (
                        p
                        for a in model.adapter_modules(name).values()
                        if type(a).step is not Adapter.step
                        for p in a.parameters()
                    ),
                    None,
                )
            probe = self.probes[name]
            if probe is None or not probe.requires_grad:
                continue
            seen = self.seen.get(name)
            self.seen[name] = (probe._version, self.steps)
            if seen is not None and probe._version != seen[0] and self.steps == seen[1]:
                self.warned = True
                warnings.warn(
                    f"adapter {name!r} (method {model.configs[name].method!r}) adjusts itself once per optimizer step "
                    "through model.step_adapters(global_step), and this training loop stepped the optimizer "
                    "without calling it: the adapter trains without its schedule. Call "
                    "model.step_adapters(step) after each optimizer.step() (peftkit's Trainer does).",
                    UserWarning,
                    stacklevel=4,
                )
                return
