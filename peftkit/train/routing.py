"""Routing reports: the learned task-to-module weights of task-routed adapters, and a plot of them.

An adapter module takes part when it answers ``routing_weights()`` with its eval-mode mixing weights
``[T, Q, S]`` (tasks × routing heads × modules of its inventory), as :class:`peftkit.methods.poly.Poly` does;
no method name is looked at here (the :class:`Routed` protocol).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor, nn

from peftkit.core.model import AdaptedModel

__all__ = ["Routed", "plot_routing", "routing_report"]


@runtime_checkable
class Routed(Protocol):
    """An adapter module with a learned router: ``routing_weights()`` gives ``[T, Q, S]`` (each ``[q]`` row of
    a task sums to 1)."""

    def routing_weights(self, task_id: int | None = None) -> Tensor: ...


def _adapted(model: nn.Module) -> AdaptedModel:
    if isinstance(model, AdaptedModel):
        return model
    found = next((m for m in model.modules() if isinstance(m, AdaptedModel)), None)
    if found is None:
        raise ValueError("routing_report needs an AdaptedModel (pk.adapt(...))")
    return found


def routing_report(model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """``{module path: mixing weights [T, Q, S]}`` of one adapter's routed modules, in module order.

    Raises:
        ValueError: no AdaptedModel in ``model``, or no module of the adapter has a router.
    """
    adapted = _adapted(model)
    name = adapter or adapted._single_active()
    modules = adapted.adapter_modules(name)
    position = {path: i for i, (path, _) in enumerate(adapted.model.named_modules())}  # model order, not target order
    report = {
        p: modules[p].routing_weights().detach().cpu()
        for p in sorted(modules, key=lambda p: position.get(p, len(position)))
        if isinstance(modules[p], Routed)
    }
    if not report:
        raise ValueError(f"adapter {name!r} has no routed modules (no module answers routing_weights())")
    return report


def plot_routing(
    model: nn.Module, path: str | Path, *, adapter: str | None = None, max_tasks: int = 8, title: str | None = None
) -> Path:
    """Draw the learned routing as a PNG: one heat map per task (the first ``max_tasks``), rows = adapted
    layers, columns = (head, module) pairs, colour = mixing weight in [0, 1].

    Needs matplotlib (``pip install 'peftkit[plot]'``). Returns the written path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - optional extra
        raise ImportError("plot_routing needs matplotlib: pip install 'peftkit[plot]'") from exc
    report = routing_report(model, adapter)
    layers = list(report)
    n_tasks = min(max_tasks, min(w.shape[0] for w in report.values()))
    heads, skills = next(iter(report.values())).shape[1:]
    columns = [f"h{q}·m{s}" if heads > 1 else f"m{s}" for q in range(heads) for s in range(skills)]
    fig, axes = plt.subplots(
        1, n_tasks, figsize=(1.2 + 0.45 * len(columns) * n_tasks, 1.5 + 0.3 * len(layers)), squeeze=False
    )
    image = None
    for t, ax in enumerate(axes[0]):
        grid = np.stack([report[p][t].reshape(-1).numpy() for p in layers])
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
        ax.set_title(f"task {t}", fontsize=9)
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        ax.set_yticks(range(len(layers)), [_short(p) for p in layers] if t == 0 else [], fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mixing weight")
    fig.suptitle(title or "learned task-to-module routing", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _short(path: str, keep: int = 4) -> str:
    parts = path.split(".")
    return ".".join(parts[-keep:])
