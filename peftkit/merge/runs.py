"""Merging the adapters of training runs (``peftkit merge-adapters RUN_A RUN_B ... --output-dir OUT``).

The first run's base model is loaded with its adapter (:func:`peftkit.train.run.load_trained`), the other runs'
adapters are loaded onto it (the saved fingerprint must match: same base modules), they are merged with
:func:`~peftkit.merge.merge_adapters`, and ``OUT`` becomes a run folder like any other: ``OUT/run.json`` (the first
run's settings, so ``peftkit eval OUT`` evaluates on its held-out split, plus ``merged_from`` and the merge's
ranks and errors) and ``OUT/adapter/`` (the merged LoRA), which ``peftkit eval / export / merge / serve`` read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.core import io

from .merge import MergeResult, merge_adapters

__all__ = ["merge_runs"]


def merge_runs(
    runs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    weights: Sequence[float] | None = None,
    method: str = "task_arithmetic",
    rank: int | None = None,
    model: str | None = None,
    **options: Any,
) -> MergeResult:
    """Merge the adapters of ``runs`` (run, checkpoint or adapter folders) into the run folder ``output_dir``.

    Args:
        weights, method, rank, options: as :func:`~peftkit.merge.merge_adapters`.
        model: the base model folder or Hub id (default: the first run's).

    Raises:
        BaseModelMismatch: a run's adapter was trained on other modules than the first run's base has.
        plus the errors of :func:`~peftkit.merge.merge_adapters` and of loading runs.
    """
    from peftkit.train.run import ADAPTER_DIR, RUN_FILE, load_trained, locate

    adapted, _, _ = load_trained(runs[0], model)
    first = adapted.adapter_names[0]
    adapted.rename_adapter(first, "run0")
    for i, run in enumerate(runs[1:], start=1):
        adapted.load_adapter(locate(run)[1], name=f"run{i}")
    names = [f"run{i}" for i in range(len(runs))]
    result = merge_adapters(adapted, names, weights, method, "merged", rank, **options)
    out = Path(output_dir)
    adapted.save(out / ADAPTER_DIR, "merged")
    record_dir = locate(runs[0])[0]
    record = json.loads((record_dir / RUN_FILE).read_text())
    merge = {k: v for k, v in result.to_dict().items() if k != "config"}
    record.update({"status": "merged", "merged_from": [str(Path(r).resolve()) for r in runs], "merge": merge})
    record.pop("metrics", None)  # the first run's metrics are not the merged adapter's
    io.write_files(out, [(RUN_FILE, json.dumps(record, indent=2).encode())])
    return result
