"""``peftkit compress``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftkit.cli.app import app, check_model, check_output_dir, log


@app.command()
def compress(
    method: Annotated[str, typer.Option(help="eora, lord, pela or loraprune.")],
    model: Annotated[str, typer.Option(help="Causal LM folder or Hub id (LLaMA layout: q/k/v/o, gate/up/down).")],
    output_dir: Annotated[Path, typer.Option(help="Output folder: model/, adapter/ (EoRA), compress.json.")],
    ratio: Annotated[
        float | None,
        typer.Option(
            help="Fraction removed, in (0, 1): parameters (lord, pela), structured sparsity "
            "(loraprune), sparsity of --compressor magnitude (eora)."
        ),
    ] = None,
    calib: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Causal-lm data file (eora, loraprune; pela).")
    ] = None,
    rank: Annotated[int, typer.Option(help="EoRA's compensation rank.")] = 32,
    compressor: Annotated[str, typer.Option(help="EoRA's base: hqq4, hqq3, hqq2, 2:4 or magnitude.")] = "hqq4",
    steps: Annotated[
        int | None, typer.Option(min=0, help="Training steps (loraprune: 20; pela distils if > 0).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (loraprune 3e-4, pela 1e-4).")] = None,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per calibration block.")] = 128,
    n_samples: Annotated[int, typer.Option(min=1, help="Calibration blocks.")] = 16,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Compress a causal LM with low-rank factors (EoRA, LoRD, PELA, LoRAPrune); see peftkit.compress.cli."""
    from peftkit.compress.cli import ADAPTER_DIR, MODEL_DIR, SUMMARY_FILE
    from peftkit.compress.cli import compress as run_compress

    check_model(model)
    check_output_dir(output_dir, "'--output-dir'", {MODEL_DIR: True, ADAPTER_DIR: True, SUMMARY_FILE: False})
    run_compress(method, model, output_dir, ratio=ratio, calib=calib, rank=rank, compressor=compressor, steps=steps,
                 lr=lr, seq_len=seq_len, n_samples=n_samples, progress=progress, log=log)  # fmt: skip
