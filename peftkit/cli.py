"""``peftkit`` on the command line: list methods, train / resume / evaluate / merge / export runs, merge several
runs' adapters (``merge-adapters``), serve.

``peftkit train --model DIR_OR_HUB_ID --data FILE --task causal-lm|classify --method NAME --output-dir RUN``
trains an adapter on a user's data (:mod:`peftkit.train.run`; without ``--data``, the built-in demo: the
packaged all-MiniLM-L6-v2 with a new classification head on Rotten Tomatoes, split by movie). Any setting can
be given with ``--set key=value`` or ``--config FILE.json|yaml`` (:mod:`peftkit.train.settings`). A run folder::

    RUN/run.json             every setting (base model, task, data file and split, seeds), then the metrics
    RUN/metrics.jsonl        one JSON object per logged step
    RUN/checkpoints/step-N/  full checkpoints: 'peftkit train --resume RUN' continues exactly
    RUN/adapter/             the trained adapter

Errors: a bad option is a usage error (exit code 2, typer's display); a failure while running (peftkit's
errors, ``ValueError``, ``OSError``: bad data, a non-finite or diverging loss, an adapter that cannot merge or
export, a path that cannot be read or written) prints one line ``error: <message>`` on stderr and exits with
code 1. Ctrl-C / SIGTERM during training write a checkpoint and exit with 130 / 143 after one line naming it.
``peftkit --debug <command>`` (or ``PEFTKIT_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import gc
import math
import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

DEBUG_ENV = "PEFTKIT_DEBUG"


def _is_user_error(exc: BaseException) -> bool:
    """Errors that come from the input or the environment (not from a bug): one line, no traceback."""
    from peftkit.errors import PeftkitError

    return isinstance(exc, (PeftkitError, ValueError, OSError)) and not isinstance(exc, click.ClickException)


def _describe(exc: BaseException) -> str:
    """One line for an error: OSErrors as ``<reason>: <path>`` (``str`` would add ``[Errno N]`` and quotes)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        return f"{exc.strerror}: {target}"
    return " ".join(str(exc).split()) or type(exc).__name__


class _Commands(TyperGroup):
    """Every command runs through :meth:`invoke`, so this is the one place that turns the errors a user can
    act on into ``error: <message>`` and exit code 1 (usage errors keep click's display and code 2)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if ctx.params.get("debug") or not _is_user_error(exc):  # --debug / PEFTKIT_DEBUG=1: the traceback
                raise
            typer.echo(f"error: {_describe(exc)}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Commands,
    help="peftkit: parameter-efficient fine-tuning from the command line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", envvar=DEBUG_ENV, help="Show the full traceback of an error.")
    ] = False,
) -> None:
    """peftkit: parameter-efficient fine-tuning from the command line."""


DEMO_OUTPUT = Path("runs/minilm-rt")
# Exit codes of a run stopped by a signal (128 + the signal's number, as shells report them).
SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


class Task(str, Enum):
    """Tasks ``peftkit train`` runs."""

    classify = "classify"
    causal_lm = "causal-lm"


class ExportFormat(str, Enum):
    """Formats ``peftkit export`` writes."""

    peft = "peft"


# ------------------------------------------------------------------------------------------------- helpers
def _check_output_dir(path: Path, hint: str, inside: dict[str, bool] | None = None) -> None:
    """Refuse, before any work, an output folder that cannot be written: ``path`` (or the nearest folder above
    it, when ``path`` does not exist yet) is a file or not writable, or an entry ``inside`` it (name -> whether
    it must be a folder) has the wrong kind or is not writable. An existing folder holding other files is
    fine: peftkit writes only its own files into it. ``hint`` names the option in the usage error."""
    entries = [(path, True)] + [(path / name, folder) for name, folder in (inside or {}).items()]
    for entry, folder in entries:
        if entry.exists() and entry.is_dir() != folder:
            kind = "a file, not a folder" if folder else "a folder, not a file"
            raise typer.BadParameter(f"{entry} is {kind}", param_hint=hint)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise typer.BadParameter(f"{existing} is a file, so the folder {path} cannot be created", param_hint=hint)
    for entry, folder in [(existing, True), *entries[1:]]:
        if entry.exists() and not os.access(entry, os.W_OK | (os.X_OK if folder else 0)):
            raise typer.BadParameter(f"{entry} is not writable", param_hint=hint)


def _metrics_line(metrics: dict[str, float], count: int) -> str:
    """``held-out accuracy: 0.7470, eval_loss: 0.5213 on 1000 examples`` (the task's main metric first)."""
    order = ["accuracy", "perplexity", "exact_match", "eval_loss"]
    keys = sorted(metrics, key=lambda k: order.index(k) if k in order else len(order))
    shown = ", ".join(f"{k}: {metrics[k]:.4f}" for k in keys) or "no metrics (no held-out examples)"
    return f"held-out {shown} on {count} examples"


def _log(message: str) -> None:
    """A log line of a run, printed above its progress bar (``tqdm.write``), not into it."""
    from tqdm.auto import tqdm

    tqdm.write(message)


def _check_model(model: str | None) -> None:
    """A ``--model`` that names a path (not a Hub id) must exist: a usage error before any work."""
    from peftkit.train.build import resolve_model

    if model is None:
        return
    try:
        resolve_model(model, "classify")
    except OSError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--model'") from None


# ------------------------------------------------------------------------------------------------ commands
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
    r: Annotated[int | None, typer.Option(min=1, help="Rank, for methods that have one (default: 8).")] = None,
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
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Fine-tune an adapter on your data (or the built-in sentiment demo) and report held-out metrics."""
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
    }  # fmt: skip
    if optim is not None:
        from peftkit.optim import OptimizerError, check_optimizer

        try:
            check_optimizer(optim)
        except OptimizerError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--optim'") from None
    values = {k: v for k, v in values.items() if v is not None}
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise typer.BadParameter(f"the learning rate must be a positive number, got {lr}", param_hint="'--lr'")
    if alpha is not None and not math.isfinite(alpha):
        raise typer.BadParameter(f"alpha must be a finite number, got {alpha}", param_hint="'--alpha'")
    _check_model(model)
    start = time.perf_counter()
    try:
        if resume is not None:
            given = [k for k in values if k != "model"] + ["set"] * bool(set_) + ["config"] * bool(config)
            given += ["output_dir"] * bool(output_dir) + ["task"] * (task is not Task.classify)
            if given or method != "lora":
                raise typer.BadParameter(
                    f"--resume continues a run with its own settings (its {RUN_FILE}); drop "
                    + ", ".join("--" + k.replace("_", "-") for k in given or ["method"]),
                    param_hint="'--resume'",
                )
            result = resume_run(resume, model=model, progress=progress, log=_log)
        else:
            if output_dir is None:
                if data is not None or model is not None:
                    raise typer.BadParameter("name the run folder", param_hint="'--output-dir'")
                output_dir = DEMO_OUTPUT
            inside = {"adapter": True, "checkpoints": True, RUN_FILE: False, "metrics.jsonl": False}
            _check_output_dir(output_dir, "'--output-dir'", inside)
            result = train_run(
                output_dir, task=task.value, method=method, config=config, overrides=set_ or None,
                progress=progress, log=_log, **values,
            )  # fmt: skip
    except TrainingInterrupted as stop:
        run = resume if resume is not None else output_dir
        where = (
            f"checkpoint {stop.checkpoint}; continue with: peftkit train --resume {run}"
            if stop.checkpoint
            else "no checkpoint"
        )
        typer.echo(f"interrupted ({stop.signal_name}): {where}", err=True)
        raise typer.Exit(SIGNAL_EXIT.get(stop.signal_name, 130)) from None
    typer.echo(_metrics_line(result.metrics, result.num_eval))
    typer.echo(f"{result.train_result.global_step} steps, {time.perf_counter() - start:.0f} s; "
               f"adapter: {result.output_dir / 'adapter'}")  # fmt: skip


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

    _check_model(model)
    metrics, count = evaluate_run(
        run, model=model, data=data, max_eval_samples=max_eval_samples, batch_size=batch_size, progress=progress
    )
    typer.echo(_metrics_line(metrics, count))


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

    _check_output_dir(out, "'OUT'")
    _check_model(model)
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
    _check_output_dir(output_dir, "'--output-dir'")
    _check_model(model)
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

    _check_output_dir(out, "'OUT'")
    _check_model(model)
    adapted, _, spec = load_trained(run, model)
    pk.export_peft(adapted, out, task_type=task_module(spec.task).PEFT_TASK_TYPE)
    typer.echo(f"exported in {format.value} format to {out}")


@app.command()
def serve(
    base: Annotated[Path, typer.Option(help="Folder of the base causal LM (save_pretrained: model + tokenizer).")],
    adapters: Annotated[
        Path,
        typer.Option(
            help="Adapters to serve: a folder of adapter folders (name = folder), a training run folder from "
            "'peftkit train' or a folder of such runs (name = run), or a model.save folder of several adapters."
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    name: Annotated[str, typer.Option(help="The 'model' name that selects the base model alone.")] = "base",
    api_key: Annotated[
        str | None, typer.Option(envvar="PEFTKIT_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    max_loras: Annotated[int, typer.Option(help="Adapters held in the model at once.")] = 8,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together.")] = 16,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before answering 429.")] = 256,
    cache_mb: Annotated[float, typer.Option(help="CPU memory for loaded adapters (MiB, LRU).")] = 512.0,
    max_rank: Annotated[int, typer.Option(help="Largest adapter rank accepted (larger: 422).")] = 64,
    svd_rank: Annotated[
        int | None, typer.Option(help="Serve adapters without a low-rank form as rank-k SVDs of their delta.")
    ] = None,
    embedder: Annotated[
        str | None,
        typer.Option(help="Encoder for /v1/embeddings: a model folder, or 'minilm' for the packaged MiniLM."),
    ] = None,
    embedder_name: Annotated[str, typer.Option(help="The 'model' name of the embedder.")] = "embedding",
    embedder_adapters: Annotated[
        Path | None, typer.Option(help="Adapters for the embedder, in any layout --adapters takes.")
    ] = None,
    max_body_kb: Annotated[int, typer.Option(help="Largest request body (KiB; larger: 413).")] = 1024,
) -> None:
    """Serve the base model and every adapter in ADAPTERS over an OpenAI-compatible HTTP API (the adapter of a
    training run is served under the run folder's name)."""
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.serve.cache import AdapterCache
    from peftkit.serve.engine import Engine
    from peftkit.serve.server import create_app

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(base)
    cache = AdapterCache(int(cache_mb * 2**20), root=adapters)
    found = cache.register_dir(adapters)
    engine = Engine(
        model,
        tokenizer,
        cache,
        max_loras=max_loras,
        max_batch=max_batch,
        max_queue=max_queue,
        max_rank=max_rank,
        svd_rank=svd_rank,
    )
    encoder = None
    if embedder is not None:
        from peftkit.assets import load_minilm

        enc_model, enc_tokenizer = load_minilm(None if embedder == "minilm" else embedder)
        enc_cache = AdapterCache(int(cache_mb * 2**20), root=embedder_adapters)
        if embedder_adapters is not None:
            enc_cache.register_dir(embedder_adapters)
        encoder = Engine(enc_model, enc_tokenizer, enc_cache, max_loras=max_loras, max_rank=max_rank)
    typer.echo(f"serving {name!r} and {len(found)} adapters on http://{host}:{port}/v1")
    app_ = create_app(
        engine,
        base_name=name,
        api_key=api_key,
        embedder=encoder,
        embedder_name=embedder_name,
        max_body_bytes=max_body_kb * 1024,
    )
    # Everything alive now (the model, the libraries) lives as long as the process: keep it out of the cyclic
    # garbage collector's full passes, which otherwise stall every request for ~0.2 s each (vLLM does the same).
    gc.collect()
    gc.freeze()
    # timeout_graceful_shutdown: open connections get this long to finish on Ctrl-C / SIGTERM.
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)


@app.command()
def federate(
    output_dir: Annotated[
        Path, typer.Option(help="Output folder: federation.json, metrics.jsonl, metrics.png, adapter/.")
    ],
    strategy: Annotated[
        str, typer.Option(help="fedsb (Fed-SB), fedavg (FedAvg-LoRA / FedIT), ffa (FFA-LoRA) or fedex (FedEx-LoRA).")
    ] = "fedsb",
    clients: Annotated[int, typer.Option(min=1, help="Simulated clients, one data shard each.")] = 10,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 3,
    split: Annotated[str, typer.Option(help="iid, shards (contiguous) or dirichlet:ALPHA (label skew).")] = (
        "dirichlet:0.5"
    ),
    model: Annotated[
        str | None, typer.Option(help="Model folder or Hub id (default: the packaged all-MiniLM-L6-v2, classify).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="JSONL or CSV data (default: Rotten Tomatoes, classify)."),
    ] = None,
    task: Annotated[Task, typer.Option(help="classify or causal-lm.")] = Task.classify,
    r: Annotated[int | None, typer.Option(min=1, help="Rank (default 8).")] = None,
    alpha: Annotated[float | None, typer.Option(help="Scale numerator (default: 2r; Fed-SB: r).")] = None,
    targets: Annotated[str | None, typer.Option(help="Modules to adapt (default: query,value).")] = None,
    lr: Annotated[float | None, typer.Option(help="Local learning rate (AdamW).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Local batch size.")] = None,
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 1,
    local_steps: Annotated[int | None, typer.Option(min=1, help="At most this many local steps per round.")] = None,
    max_length: Annotated[int | None, typer.Option(min=1, help="Truncate examples to this many tokens.")] = None,
    max_train_samples: Annotated[int | None, typer.Option(min=1, help="Training examples (all clients).")] = None,
    max_eval_samples: Annotated[int | None, typer.Option(min=1, help="Held-out examples.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the split, the init and the local training.")] = None,
    weighted: Annotated[bool, typer.Option(help="Weight clients by their example counts (default: equal).")] = False,
    fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of clients sampled per round.")] = 1.0,
    dp_epsilon: Annotated[
        float | None, typer.Option(help="DP-SGD on every client (Opacus) reaching this epsilon over the run.")
    ] = None,
    dp_noise: Annotated[float | None, typer.Option(help="DP-SGD with this noise multiplier instead.")] = None,
    dp_delta: Annotated[float | None, typer.Option(help="DP delta (default 1 / client examples).")] = None,
    dp_clip: Annotated[float, typer.Option(help="DP-SGD per-example clipping norm.")] = 0.1,
    user_dp_noise: Annotated[
        float | None, typer.Option(help="User-level DP on the server (Flower) with this noise multiplier.")
    ] = None,
    user_dp_clip: Annotated[
        float | None, typer.Option(help="User-level DP: fixed clipping norm (default: adaptive clipping).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any 'peftkit train' setting, KEY=VALUE (repeatable).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars while loading.")] = False,
) -> None:
    """Fine-tune an adapter with federated learning on Flower's simulation engine (one virtual client per data
    shard) and report held-out accuracy per round and the bytes communicated."""
    from peftkit.federated.privacy import PrivacySettings, UserPrivacy
    from peftkit.federated.run import ADAPTER_DIR, METRICS_FILE, SETTINGS_FILE
    from peftkit.federated.run import federate as run_federation

    _check_model(model)
    _check_output_dir(output_dir, "'--output-dir'", {ADAPTER_DIR: True, METRICS_FILE: False, SETTINGS_FILE: False})
    options: dict[str, Any] = {
        "model": model, "data": str(data) if data is not None else None, "task": task.value, "r": r, "alpha": alpha,
        "targets": targets, "lr": lr, "batch_size": batch_size, "max_length": max_length,
        "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples, "seed": seed,
    }  # fmt: skip
    privacy = None
    if dp_epsilon is not None or dp_noise is not None:
        privacy = PrivacySettings(epsilon=dp_epsilon, noise_multiplier=dp_noise, delta=dp_delta, max_grad_norm=dp_clip)
    user = None
    if user_dp_noise is not None:
        user = UserPrivacy(user_dp_noise, clipping_norm=user_dp_clip, adaptive=user_dp_clip is None)
    result = run_federation(
        output_dir, strategy=strategy, clients=clients, rounds=rounds, split=split, local_epochs=local_epochs,
        local_steps=local_steps, weighted=weighted, fraction=fraction, privacy=privacy, user_privacy=user,
        overrides=set_ or None, progress=progress, log=_log, **{k: v for k, v in options.items() if v is not None},
    )  # fmt: skip
    last = result.rounds[-1]
    typer.echo(f"{_metrics_line(result.metrics, result.settings['num_eval'])} after {rounds} rounds; "
               f"{last['upload_bytes_per_client']:,.0f} bytes sent per client per round, "
               f"{last['cumulative_bytes']:,.0f} in all; adapter: {result.output_dir / ADAPTER_DIR}")  # fmt: skip


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

    _check_model(model)
    _check_output_dir(output_dir, "'--output-dir'", {MODEL_DIR: True, ADAPTER_DIR: True, SUMMARY_FILE: False})
    run_compress(method, model, output_dir, ratio=ratio, calib=calib, rank=rank, compressor=compressor, steps=steps,
                 lr=lr, seq_len=seq_len, n_samples=n_samples, progress=progress, log=_log)  # fmt: skip


def main() -> None:
    """Entry point of the ``peftkit`` script."""
    app()


if __name__ == "__main__":
    main()
