"""Rank reports: the learned / effective rank of every adapted layer, and a plot of it.

Methods answer through the optional :meth:`peftkit.Adapter.effective_rank` (LoRA: ``r``; DyLoRA: the eval
rank; SoRA: nonzero gates; IncreLoRA: active components; CoLoRA: the layer's rank; DiffoRA: ``r`` or 0 for a
pruned module). No method name is looked at here; layers whose method has no notion of rank are left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from peftkit.core.model import AdaptedModel

__all__ = ["plot_ranks", "rank_report"]


def rank_report(model: nn.Module, adapter: str | None = None) -> dict[str, int]:
    """``{module path: effective rank}`` of one adapter, in module order.

    Args:
        model: an :class:`AdaptedModel` (or a module holding one).
        adapter: the adapter's name; default: the single active adapter.

    Raises:
        ValueError: no AdaptedModel in ``model``, or the adapter is ambiguous.
    """
    adapted = (
        model
        if isinstance(model, AdaptedModel)
        else next((m for m in model.modules() if isinstance(m, AdaptedModel)), None)
    )
    if adapted is None:
        raise ValueError("rank_report needs an AdaptedModel (pk.adapt(...))")
    name = adapter or adapted._single_active()
    report: dict[str, int] = {}
    for path, module in adapted.adapter_modules(name).items():
        rank = module.effective_rank()
        if rank is not None:
            report[path] = int(rank)
    return report


def plot_ranks(
    report: dict[str, int], path: str | Path, *, title: str = "effective rank per layer", max_rank: int | None = None
) -> Path:
    """Draw a rank report as a PNG: a horizontal bar per layer (rank written at the bar's end) and, when the
    paths look like ``...<block>.<index>.<sub>...``, a heat map of blocks x sub-modules beside it.

    Needs matplotlib (``pip install 'peftkit[plot]'``). Returns the written path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - optional extra
        raise ImportError("plot_ranks needs matplotlib: pip install 'peftkit[plot]'") from exc
    if not report:
        raise ValueError("the rank report is empty (no layer has a rank)")
    path = Path(path)
    names, ranks = list(report), list(report.values())
    grid = _grid(report)
    width = 13 if grid else 8
    fig = plt.figure(figsize=(width, max(2.5, 0.28 * len(names) + 1.2)))
    ax = fig.add_subplot(1, 2 if grid else 1, 1)
    ax.barh(range(len(names)), ranks, color="tab:blue")
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=8)
    ax.invert_yaxis()
    top = max_rank or max(ranks)
    ax.set_xlim(0, top * 1.15 + 1e-9)
    for i, r in enumerate(ranks):
        ax.text(r + top * 0.01, i, str(r), va="center", fontsize=7)
    ax.set_xlabel("rank")
    ax.set_title(f"{title} (total {sum(ranks)})", fontsize=10)
    if grid:
        rows, cols, values = grid
        hm = fig.add_subplot(1, 2, 2)
        im = hm.imshow(np.ma.masked_less(np.array(values), 0), aspect="auto", cmap="viridis", vmin=0, vmax=top)
        hm.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
        hm.set_yticks(range(len(rows)), rows, fontsize=8)
        hm.set_xlabel("module")
        hm.set_ylabel("block")
        for i in range(len(rows)):
            for j in range(len(cols)):
                if values[i][j] >= 0:
                    hm.text(j, i, str(values[i][j]), ha="center", va="center", color="w", fontsize=7)
        fig.colorbar(im, ax=hm, label="rank")
        hm.set_title("rank by block and module", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(name: str, keep: int = 48) -> str:
    return name if len(name) <= keep else "…" + name[-keep + 1 :]


def _grid(report: dict[str, int]) -> tuple[list[str], list[str], list[list[int]]] | None:
    """Split paths at their first numeric part: block = prefix + index, module = the rest (paths without an
    index are left out). ``None`` if fewer than two blocks."""
    rows: dict[str, dict[str, str]] = {}
    cols: dict[str, None] = {}
    for n in report:
        parts = n.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is None or idx == len(parts) - 1:
            continue  # a layer outside the repeated blocks (pooler, head): in the bar chart only
        row, col = ".".join(parts[: idx + 1]), ".".join(parts[idx + 1 :])
        rows.setdefault(row, {})[col] = n
        cols[col] = None
    if len(rows) < 2:
        return None
    values = [[report[row[c]] if c in row else -1 for c in cols] for row in rows.values()]
    return list(rows), list(cols), values
