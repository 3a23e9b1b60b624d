"""``peftkit compress --method eora|lord|pela|loraprune --model DIR --ratio R --calib FILE --output-dir OUT``: the
work behind the command (registered in :mod:`peftkit.cli`; heavy imports stay inside the function).

What the output folder holds, and what loads it:

* ``eora``: ``OUT/model/``, the compressed base (pruned or quantised-then-dequantised weights, the original
  shapes) with the tokenizer: ``transformers.AutoModelForCausalLM.from_pretrained(OUT/model)`` loads it; and
  ``OUT/adapter/``, the compensation as an ordinary LoRA adapter: ``pk.load(base, OUT/adapter)``. ``--ratio`` is
  the sparsity of ``--compressor magnitude`` (the other compressors, ``2:4`` and ``hqq4/3/2``, take none).
* ``lord``, ``pela``, ``loraprune``: ``OUT/model/`` with factorised Linears (LoRD, PELA) or blocks with fewer
  heads and channels (LoRAPrune), shapes the architecture's configuration cannot express, so ``Auto*`` classes
  cannot build them: load with ``peftkit.compress.saving.load_compressed(OUT/model)``. ``--ratio`` is the
  fraction of the projections' parameters removed (LoRD, PELA) or the structured sparsity (LoRAPrune).
* ``OUT/compress.json``: the settings and what the method reported (parameters before / after, errors, losses).

``--calib`` is a ``peftkit train --task causal-lm`` data file; EoRA calibrates on it, LoRAPrune trains on it
(the LM loss), PELA distils on it when ``--steps`` > 0. LoRD's default weight-SVD needs none.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

METHODS = ("eora", "lord", "pela", "loraprune")
MODEL_DIR, ADAPTER_DIR, SUMMARY_FILE = "model", "adapter", "compress.json"


def compress(
    method: str,
    model_dir: str,
    output_dir: Path,
    *,
    ratio: float | None = None,
    calib: Path | None = None,
    rank: int = 32,
    compressor: str = "hqq4",
    steps: int | None = None,
    lr: float | None = None,
    seq_len: int = 128,
    n_samples: int = 16,
    batch_size: int = 4,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compress the causal LM at ``model_dir`` with ``method`` and write ``output_dir`` (see the module
    docstring); returns the summary written to ``compress.json``.

    Raises:
        CompressOptionError: an unknown method, or options the method needs missing (``--ratio``, ``--calib``).
        RatioError, RankError, CalibrationError, HeadPruneError, UnknownArchitectureError, CompressorError.
    """
    from peftkit.compress.errors import CompressOptionError, check_fraction

    if method not in METHODS:
        raise CompressOptionError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    needs_ratio = method != "eora" or compressor == "magnitude"
    if needs_ratio and ratio is None:
        raise CompressOptionError(f"--method {method} needs --ratio in (0, 1)")
    if ratio is not None:
        check_fraction("--ratio", ratio)
    if method in ("eora", "loraprune") and calib is None:
        raise CompressOptionError(f"--method {method} needs calibration data: --calib FILE (a causal-lm data file)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.compress import data as cdata
    from peftkit.compress.saving import save_compressed

    torch.manual_seed(0)
    log(f"loading {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    batches = None
    if calib is not None:
        batches = cdata.read_calibration(calib, tokenizer, seq_len=seq_len, n_samples=n_samples, batch_size=batch_size)
        cdata.check_calibration(model, batches, tokenizer)
        log(f"calibration: {sum(len(b['input_ids']) for b in batches)} blocks of {seq_len} tokens from {calib}")
    params_before = sum(p.numel() for p in model.parameters())
    summary: dict[str, Any] = {
        "method": method, "model": str(model_dir), "ratio": ratio, "calib": str(calib) if calib is not None else None,
        "params_before": params_before,
    }  # fmt: skip
    out = Path(output_dir)
    if method == "eora":
        from peftkit.compress.eora import eora

        result = eora(
            model, batches, compress=compressor, rank=rank, ratio=ratio, tokenizer=tokenizer, progress=progress
        )
        before, after = result.report.before, result.report.after
        summary.update(compressor=compressor, rank=rank,
                       weighted_error_before=sum(before.values()) / max(len(before), 1),
                       weighted_error_after=sum(after.values()) / max(len(after), 1))  # fmt: skip
        result.model.save(out / ADAPTER_DIR)
        base = result.model.unload()
        base.save_pretrained(out / MODEL_DIR)
        tokenizer.save_pretrained(out / MODEL_DIR)
        summary.update(params_after=params_before, load_model="transformers.AutoModelForCausalLM",
                       load_adapter="peftkit.load(model, OUT/adapter)")  # fmt: skip
        log(f"EoRA over {compressor}: activation-weighted error {summary['weighted_error_before']:.4f} -> "
            f"{summary['weighted_error_after']:.4f} (mean over layers, relative)")  # fmt: skip
    else:
        if method == "lord":
            from peftkit.compress.lord import lord

            plan = lord(model, ratio=ratio, progress=progress)
            summary.update(projection_params_before=plan.params_before, projection_params_after=plan.params_after,
                           dense_layers=sum(k is None for k in plan.ranks.values()))  # fmt: skip
        elif method == "pela":
            from peftkit.compress.pela import Distiller, distill, pela

            teacher, plan = pela(model, ratio=float(ratio), omit=("lm_head", "embed", "norm"), progress=progress)
            summary.update(projection_params_before=plan.params_before, projection_params_after=plan.params_after)
            if batches is not None and (steps or 0) > 0:
                labelled = [dict(b, labels=b["input_ids"]) for b in batches]
                losses = distill(
                    Distiller(model, teacher), labelled, steps=int(steps), lr=lr or 1e-4, progress=progress
                )
                summary.update(steps=steps, loss_first=losses[0], loss_last=losses[-1])
            del teacher
        else:
            from peftkit.compress.loraprune import loraprune

            labelled = [dict(b, labels=b["input_ids"]) for b in batches or []]
            n = steps or 20
            model, losses = loraprune(model, labelled, ratio=float(ratio), steps=n, lr=lr or 3e-4,
                                      prune_freq=max(1, n // 10), progress=progress)  # fmt: skip
            summary.update(steps=n, loss_first=losses[0], loss_last=losses[-1])
        save_compressed(model, out / MODEL_DIR, tokenizer, method=method, info={"ratio": ratio})
        summary.update(params_after=sum(p.numel() for p in model.parameters()),
                       load_model="peftkit.compress.saving.load_compressed(OUT/model)")  # fmt: skip
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    log(f"{method}: {summary['params_before']:,} -> {summary['params_after']:,} parameters; written to {out}")
    return summary
