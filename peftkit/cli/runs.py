"""``methods, train, eval, merge, merge-adapters, export: the commands on run folders``."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from peftkit.cli.app import (
    DEMO_OUTPUT,
    SIGNAL_EXIT,
    ExportFormat,
    Task,
    app,
    check_model,
    check_output_dir,
    log,
    metrics_line,
)


@app.command()
def methods() -> None:
    """List the registered methods: name, whether they merge into the base weights, the layers they adapt."""
    from peftkit.core.registry import describe_methods

    rows = [(m.name, "yes" if m.mergeable else "no", ", ".join(m.layers) or "-") for m in describe_methods()]
    header = ("method", "mergeable", "supported layers")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@app.command()
def train(
    output_dir: Annotated[
        Path | None,
        typer.Option(help="Run folder: run.json, metrics.jsonl, checkpoints/step-N/, adapter/ (demo: runs/minilm-rt)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model folder or Hugging Face Hub id (default: the packaged all-MiniLM-L6-v2, classify)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="JSONL or CSV data (default: Rotten Tomatoes, classify)."),
    ] = None,
    task: Annotated[Task, typer.Option(help="classify (text + label columns) or causal-lm (JSONL).")] = Task.classify,
    method: Annotated[str, typer.Option(help="Adapter method (see 'peftkit methods').")] = "lora",
    r: Annotated[
        int | None,
        typer.Option(
            "--r", "--rank", min=1, help="Rank, for methods that have one (default: 8); --rank under torchrun."
        ),
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Scaling numerator: the update is scaled by alpha / r (default: 16).")
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated module names to adapt (suffixes, e.g. query,value) or 'all-linear' "
            "(default: the attention query and value projections)."
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate (AdamW, warmup, cosine) (default: classify 2e-3, causal-lm 2e-4)."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Passes over the training examples (default: 1).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Examples per optimizer step (default: classify 32, causal-lm 8).")
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(min=1, help="Truncate each example to this many tokens (default: classify 128, causal-lm 1024)."),
    ] = None,
    max_train_samples: Annotated[
        int | None, typer.Option(min=1, help="Use at most this many training examples (default: demo 3000).")
    ] = None,
    max_eval_samples: Annotated[
        int | None, typer.Option(min=1, help="Held-out examples to score (default: demo 1000).")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(min=0.0, help="AdamW weight decay on matrices (default: 0).")
    ] = None,
    warmup_ratio: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="Share of steps spent in linear warmup (default: classify 0.06, causal-lm 0.03)."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the split, the data order, the head and the adapter init (default: 0).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many optimizer steps.")] = None,
    eval_every: Annotated[
        int | None, typer.Option(min=1, help="Also evaluate every N steps (always: each epoch's end).")
    ] = None,
    save_every: Annotated[
        int | None, typer.Option(min=1, help="Also checkpoint every N steps (always: epoch ends, Ctrl-C).")
    ] = None,
    log_every: Annotated[
        int | None, typer.Option(min=1, help="Log a line (and to metrics.jsonl) every N steps (default: 10).")
    ] = None,
    optim: Annotated[
        str | None,
        typer.Option(
            help="Optimizer: adamw (default), adamw8bit, galore, lorapro, loraplus, allora or sst; its options "
            "with --set, e.g. --set 'optim_options={\"rank\": 64}'."
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Store the base's linear layers quantised (QLoRA-style): nf4, fp4, int8 or hqq4 "
            "(needs peftkit[quant]; the output head stays in full precision)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any setting, KEY=VALUE (repeatable): e.g. train.grad_accum=4, method.dropout=0.1, task.packing=true.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Settings file (.json or .yaml): keys as for --set."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Continue RUN (or RUN/checkpoints/step-N) exactly, with its own settings.",
        ),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            help="Train in N processes (torchrun; gloo on CPU, NCCL on GPU): each takes --batch-size examples of "
            "every global batch; only the first writes files. At most the CPU cores (GPUs with CUDA)."
        ),
    ] = None,
    fsdp: Annotated[
        bool, typer.Option("--fsdp", help="With --nproc N > 1: shard the model over the processes (FSDP2), not DDP.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Fine-tune an adapter on your data (or the built-in sentiment demo) and report held-out metrics."""
    from peftkit.train import distributed as parallel
    from peftkit.train.errors import TrainingInterrupted
    from peftkit.train.run import RUN_FILE
    from peftkit.train.run import resume as resume_run
    from peftkit.train.run import train as train_run

    values: dict[str, Any] = {
        "model": model, "data": str(data) if data is not None else None, "r": r, "alpha": alpha,
        "targets": targets, "lr": lr, "epochs": epochs, "batch_size": batch_size, "max_length": max_length,
        "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples,
        "weight_decay": weight_decay, "warmup_ratio": warmup_ratio, "seed": seed, "max_steps": max_steps,
        "eval_every": eval_every, "save_every": save_every, "log_every": log_every, "optim": optim,
        "quantize": quantize,
    }  # fmt: skip
    if optim is not None:
        from peftkit.optim import OptimizerError, check_optimizer

        try:
            check_optimizer(optim)
        except OptimizerError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--optim'") from None
    if quantize is not None:
        from peftkit.quantize import check_scheme

        try:
            check_scheme(quantize)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--quantize'") from None
    values = {k: v for k, v in values.items() if v is not None}
    if not parallel.under_torchrun():
        launch = _launch_processes(values, nproc, fsdp, resume)
        if launch is not None:  # torchrun ran the N processes of this command
            given = {"output_dir": output_dir, "task": task.value, "method": method, "set": set_, "config": config,
                     "resume": resume, "progress": progress, "fsdp": fsdp}  # fmt: skip
            raise typer.Exit(_run_torchrun(launch, values, given))
    elif nproc is not None and nproc != parallel.env_world_size():
        raise typer.BadParameter(
            f"this torchrun group has {parallel.env_world_size()} processes; drop --nproc (torchrun sets it)",
            param_hint="'--nproc'",
        )
    if fsdp and resume is None:
        values["fsdp"] = True
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise typer.BadParameter(f"the learning rate must be a positive number, got {lr}", param_hint="'--lr'")
    if alpha is not None and not math.isfinite(alpha):
        raise typer.BadParameter(f"alpha must be a finite number, got {alpha}", param_hint="'--alpha'")
    check_model(model)
    start = time.perf_counter()
    try:
        if resume is not None:
            given = [k for k in values if k not in ("model", "fsdp")] + ["set"] * bool(set_) + ["config"] * bool(config)
            given += ["output_dir"] * bool(output_dir) + ["task"] * (task is not Task.classify)
            if given or method != "lora":
                raise typer.BadParameter(
                    f"--resume continues a run with its own settings (its {RUN_FILE}); drop "
                    + ", ".join("--" + k.replace("_", "-") for k in given or ["method"]),
                    param_hint="'--resume'",
                )
            result = resume_run(resume, model=model, progress=progress, log=log)
        else:
            if output_dir is None:
                if data is not None or model is not None:
                    raise typer.BadParameter("name the run folder", param_hint="'--output-dir'")
                output_dir = DEMO_OUTPUT
            inside = {"adapter": True, "checkpoints": True, RUN_FILE: False, "metrics.jsonl": False}
            check_output_dir(output_dir, "'--output-dir'", inside)
            result = train_run(
                output_dir, task=task.value, method=method, config=config, overrides=set_ or None,
                progress=progress, log=log, **values,
            )  # fmt: skip
    except TrainingInterrupted as stop:
        if parallel.env_rank() != 0:
            raise typer.Exit(SIGNAL_EXIT.get(stop.signal_name, 130)) from None
        run = resume if resume is not None else output_dir
        where = (
            f"checkpoint {stop.checkpoint}; continue with: peftkit train --resume {run}"
            if stop.checkpoint
            else "no checkpoint"
        )
        typer.echo(f"interrupted ({stop.signal_name}): {where}", err=True)
        raise typer.Exit(SIGNAL_EXIT.get(stop.signal_name, 130)) from None
    if parallel.env_rank() != 0:
        return
    typer.echo(metrics_line(result.metrics, result.num_eval))
    typer.echo(f"{result.train_result.global_step} steps, {time.perf_counter() - start:.0f} s; "
               f"adapter: {result.output_dir / 'adapter'}")  # fmt: skip


def _launch_processes(values: dict[str, Any], nproc: int | None, fsdp: bool, resume: Path | None) -> int | None:
    """The number of processes to start with torchrun (``None``: train in this process). A resumed run starts as
    many as it was trained with.

    Raises:
        typer.BadParameter: more processes than the machine has, or ``--fsdp`` on one process.
    """
    from peftkit.train import distributed as parallel

    if resume is not None and nproc is None:
        from peftkit.train.run import recorded_processes

        nproc, recorded_fsdp = recorded_processes(resume)
        fsdp = fsdp or recorded_fsdp
    try:
        n = parallel.check_launch(nproc, fsdp, None)
    except parallel.DistributedError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--nproc'" if nproc else "'--fsdp'") from None
    return n if n > 1 else None


def _run_torchrun(nproc: int, values: dict[str, Any], given: dict[str, Any]) -> int:
    """Run this ``peftkit train`` command in ``nproc`` processes under torchrun; its exit code."""
    import subprocess

    from peftkit.train import distributed as parallel

    args = ["train"]
    for key, value in values.items():  # --rank, not --r: torchrun's parser reads --r as its own --rdzv-* / --role
        args += ["--rank" if key == "r" else f"--{key.replace('_', '-')}", str(value)]
    for key in ("output_dir", "config", "resume"):
        if given[key] is not None:
            args += [f"--{key.replace('_', '-')}", str(given[key])]
    if given["resume"] is None:
        args += ["--task", given["task"], "--method", given["method"]]
    for item in given["set"] or []:
        args += ["--set", item]
    args += ["--fsdp"] * bool(given["fsdp"] and given["resume"] is None) + ["--no-progress"] * (not given["progress"])
    log(f"starting {nproc} processes: torchrun --nproc-per-node {nproc} --standalone -m peftkit.cli {' '.join(args)}")
    return subprocess.call(parallel.launch_command(nproc, args))


@app.command("eval")
def evaluate(
    run: Annotated[
        Path, typer.Argument(help="Run folder from 'peftkit train', a checkpoint in it, or an adapter folder.")
    ],
    model: Annotated[str | None, typer.Option(help="Base model folder or Hub id (default: the run's).")] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="Evaluate on all of this file (default: the run's held-out split)."
        ),
    ] = None,
    max_eval_samples: Annotated[
        int | None, typer.Option(min=1, help="Held-out examples to evaluate (default: as in training).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Examples per forward pass.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Rebuild the run's base model, data split and settings, load the adapter and report held-out metrics."""
    from peftkit.train.run import evaluate as evaluate_run

    check_model(model)
    metrics, count = evaluate_run(
        run, model=model, data=data, max_eval_samples=max_eval_samples, batch_size=batch_size, progress=progress
    )
    typer.echo(metrics_line(metrics, count))


@app.command()
def merge(
    run: Annotated[
        Path, typer.Argument(help="Run folder from 'peftkit train', a checkpoint in it, or an adapter folder.")
    ],
    out: Annotated[Path, typer.Argument(help="Folder for the merged model (save_pretrained, safetensors).")],
    model: Annotated[str | None, typer.Option(help="Base model folder or Hub id (default: the run's).")] = None,
) -> None:
    """Fold the adapter into the base weights and save a plain Hugging Face model folder (with the tokenizer)."""
    from peftkit.train.run import load_trained

    check_output_dir(out, "'OUT'")
    check_model(model)
    adapted, tokenizer, spec = load_trained(run, model)
    merged = adapted.merge()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    auto = "AutoModelForSequenceClassification" if spec.task == Task.classify.value else "AutoModelForCausalLM"
    typer.echo(f"merged model saved to {out} (load it with transformers.{auto}.from_pretrained)")


@app.command("merge-adapters")
def merge_adapters(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders from 'peftkit train' (or checkpoint / adapter folders) to merge.")
    ],
    output_dir: Annotated[Path, typer.Option(help="Run folder for the merged adapter: run.json and adapter/.")],
    method: Annotated[
        str, typer.Option(help="task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune or knots.")
    ] = "task_arithmetic",
    weights: Annotated[str | None, typer.Option(help="One weight per run, comma-separated (default 1 each).")] = None,
    rank: Annotated[int | None, typer.Option(min=1, help="Truncate the merged LoRA to this rank (default exact).")] = (
        None
    ),
    density: Annotated[float | None, typer.Option(help="Share of entries kept (ties, dare_*, magnitude_prune).")] = (
        None
    ),
    seed: Annotated[int | None, typer.Option(help="Seed of DARE's random masks.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model folder or Hub id (default: the first run's).")] = None,
) -> None:
    """Merge the adapters of several runs into one LoRA adapter (peftkit.merge_adapters), saved as a run folder."""
    from peftkit.merge.runs import merge_runs

    try:
        parsed = None if weights is None else [float(w) for w in weights.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{weights!r} is not a comma-separated list of numbers", param_hint="'--weights'"
        ) from None
    check_output_dir(output_dir, "'--output-dir'")
    check_model(model)
    options = {k: v for k, v in {"density": density, "seed": seed}.items() if v is not None}
    result = merge_runs(runs, output_dir, weights=parsed, method=method, rank=rank, model=model, **options)
    ranks = sorted(set(result.ranks.values()))
    typer.echo(
        f"merged {len(runs)} adapters by {result.method} into {output_dir} (rank {ranks[0]}-{ranks[-1]}, relative "
        f"error {result.error:.2e}); evaluate, export or serve it like any run"
    )


@app.command()
def export(
    run: Annotated[
        Path, typer.Argument(help="Run folder from 'peftkit train', a checkpoint in it, or an adapter folder.")
    ],
    out: Annotated[Path, typer.Argument(help="Folder to write the exported adapter to.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="Output format: 'peft' (Hugging Face PEFT).")] = (
        ExportFormat.peft
    ),
    model: Annotated[str | None, typer.Option(help="Base model folder or Hub id (default: the run's).")] = None,
) -> None:
    """Convert the adapter to another library's format (Hugging Face PEFT: adapter_model.safetensors)."""
    import peftkit as pk
    from peftkit.train.build import task_module
    from peftkit.train.run import load_trained

    check_output_dir(out, "'OUT'")
    check_model(model)
    adapted, _, spec = load_trained(run, model)
    pk.export_peft(adapted, out, task_type=task_module(spec.task).PEFT_TASK_TYPE)
    typer.echo(f"exported in {format.value} format to {out}")
