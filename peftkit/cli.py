"""``peftkit`` on the command line: list methods, train / evaluate / merge / export the demo task.

The task: a sentence classifier (encoder + mean pooling + linear head, :mod:`peftkit.train.tasks`) on the
Rotten Tomatoes review snippets, by default on the packaged all-MiniLM-L6-v2. A run folder looks like::

    RUN/adapter/             the trained adapter (adapter.json + adapter.safetensors)
    RUN/checkpoints/epoch-N/ the adapter after each epoch
    RUN/task.json            base model, max length, head seed, data seed and the final metrics

Errors: a bad option is a usage error (exit code 2, typer's display); a failure while running (peftkit's
errors, ``ValueError``, ``OSError``: a non-finite or diverging loss, an adapter that cannot merge or export, a
path that cannot be read or written) prints one line ``error: <message>`` on stderr and exits with code 1.
``peftkit --debug <command>`` (or ``PEFTKIT_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
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


TASK_FILE = "task.json"
ADAPTER_DIR = "adapter"


class ExportFormat(str, Enum):
    """Formats ``peftkit export`` writes."""

    peft = "peft"


# ------------------------------------------------------------------------------------------------- helpers
def _load_base(model_dir: Path | None, head_seed: int) -> tuple[Any, Any]:
    """A fresh :class:`SentenceClassifier` (head from ``head_seed``) and its tokenizer."""
    from peftkit.assets import load_minilm
    from peftkit.train.tasks import SentenceClassifier

    encoder, tokenizer = load_minilm(model_dir)
    return SentenceClassifier(encoder, num_labels=2, head_seed=head_seed), tokenizer


def _resolve_run(path: Path) -> tuple[Path, dict[str, Any]]:
    """``(adapter folder, task settings)`` from a run folder or an adapter folder."""
    if (path / "adapter.json").is_file():
        adapter, task_file = path, path.parent / TASK_FILE
    else:
        adapter, task_file = path / ADAPTER_DIR, path / TASK_FILE
    if not (adapter / "adapter.json").is_file():
        raise typer.BadParameter(f"{path} is neither a run folder (from 'peftkit train') nor an adapter folder")
    try:
        task = json.loads(task_file.read_text()) if task_file.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{task_file} is not valid JSON ({exc}): rewrite it, or pass the adapter folder") from None
    if not isinstance(task, dict):
        raise ValueError(f"{task_file} does not hold the settings of a run (a JSON object)")
    return adapter, task


def _load_run(path: Path, model_dir: Path | None) -> tuple[Any, Any, dict[str, Any]]:
    import peftkit as pk

    adapter, task = _resolve_run(path)
    if model_dir is None and task.get("base_model"):
        model_dir = Path(task["base_model"])
        if not model_dir.is_dir():  # transformers would take the path for a Hub repo id and say so, confusingly
            raise FileNotFoundError(
                errno.ENOENT, "the base model this run was trained on is gone (pass --model)", str(model_dir)
            )
    base, tokenizer = _load_base(model_dir, task.get("head_seed", 0))
    return pk.load(base, adapter), tokenizer, task


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


def _held_out(task: dict[str, Any], max_eval_samples: int | None) -> list[tuple[str, int]]:
    from peftkit.assets import rotten_tomatoes

    n = max_eval_samples if max_eval_samples is not None else task.get("max_eval_samples", 1000)
    return rotten_tomatoes(seed=task.get("seed", 0), max_held_out=n).held_out


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
    output_dir: Annotated[Path, typer.Option(help="Run folder: adapter/, checkpoints/epoch-N/ and task.json.")] = Path(
        "runs/minilm-rt"
    ),
    model: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Hugging Face encoder folder (default: the packaged all-MiniLM-L6-v2).",
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="Adapter method (see 'peftkit methods').")] = "lora",
    r: Annotated[int, typer.Option(min=1, help="Rank, for methods that have one.")] = 8,
    alpha: Annotated[float, typer.Option(help="Scaling numerator: the update is scaled by alpha / r.")] = 16.0,
    targets: Annotated[
        str, typer.Option(help="Comma-separated module names to adapt (suffixes, e.g. query,value) or 'all-linear'.")
    ] = "query,value",
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warmup then cosine decay).")] = 2e-3,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training snippets.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Snippets per optimizer step.")] = 32,
    max_length: Annotated[int, typer.Option(min=1, help="Truncate each snippet to this many tokens.")] = 64,
    max_train_samples: Annotated[int, typer.Option(min=1, help="Use at most this many training snippets.")] = 3000,
    max_eval_samples: Annotated[int, typer.Option(min=1, help="Held-out snippets (other movies) to score.")] = 1000,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay on matrices.")] = 0.0,
    warmup_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of steps spent in linear warmup.")
    ] = 0.06,
    seed: Annotated[int, typer.Option(help="Seed of the data split and order, the head and the adapter init.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Fine-tune an adapter plus a new linear head for Rotten Tomatoes sentiment; report held-out accuracy."""
    if not (math.isfinite(lr) and lr > 0):
        raise typer.BadParameter(f"the learning rate must be a positive number, got {lr}", param_hint="'--lr'")
    if not math.isfinite(alpha):
        raise typer.BadParameter(f"alpha must be a finite number, got {alpha}", param_hint="'--alpha'")
    _check_output_dir(output_dir, "'--output-dir'", {ADAPTER_DIR: True, "checkpoints": True, TASK_FILE: False})

    import peftkit as pk
    from peftkit.assets import rotten_tomatoes
    from peftkit.train import TrainConfig, Trainer
    from peftkit.train.tasks import TextCollator, accuracy

    start = time.perf_counter()
    try:
        config_class = pk.get_method(method).config_class
        names = {f.name for f in dataclasses.fields(config_class)}
        fields: dict[str, Any] = {
            "targets": targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        }
        fields.update({k: v for k, v in {"r": r, "alpha": alpha}.items() if k in names})
        config = config_class(**fields, modules_to_save=["head"], seed=seed)
        split = rotten_tomatoes(seed=seed, max_train=max_train_samples, max_held_out=max_eval_samples)
        base, tokenizer = _load_base(model, head_seed=seed)
        adapted = pk.adapt(base, config)
    except pk.errors.PeftkitError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"{method}: {adapted.trainable_parameters()}")

    collate = TextCollator(tokenizer, max_length=max_length)
    train_config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        seed=seed,
        output_dir=output_dir / "checkpoints",
        progress=progress,
    )
    trainer = Trainer(
        adapted,
        train_config,
        split.train,
        collate_fn=collate,
        eval_fn=lambda m: {"accuracy": accuracy(m, split.held_out, collate)},
    )
    result = trainer.fit()
    adapted.save(output_dir / ADAPTER_DIR)
    task = {
        "base_model": str(model.resolve()) if model is not None else None,
        "method": method,
        "max_length": max_length,
        "head_seed": seed,
        "seed": seed,
        "max_eval_samples": max_eval_samples,
        "metrics": result.metrics,
    }
    (output_dir / TASK_FILE).write_text(json.dumps(task, indent=2))
    acc = result.metrics.get("accuracy", float("nan"))
    typer.echo(f"held-out accuracy: {acc:.4f} on {len(split.held_out)} snippets")
    typer.echo(f"{result.global_step} steps, {time.perf_counter() - start:.0f} s; adapter: {output_dir / ADAPTER_DIR}")


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder from 'peftkit train', or an adapter folder.")],
    model: Annotated[
        Path | None,
        typer.Option(
            exists=True, file_okay=False, help="Base encoder folder (default: the one the run was trained on)."
        ),
    ] = None,
    max_eval_samples: Annotated[
        int | None, typer.Option(min=1, help="Held-out snippets to evaluate (default: as in training).")
    ] = None,
    max_length: Annotated[int | None, typer.Option(min=1, help="Token limit (default: as in training).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Snippets per forward pass.")] = 64,
) -> None:
    """Load the base model plus the adapter and report held-out accuracy."""
    from peftkit.train.tasks import TextCollator, accuracy

    adapted, tokenizer, task = _load_run(run, model)
    data = _held_out(task, max_eval_samples)
    collate = TextCollator(tokenizer, max_length=max_length or task.get("max_length", 64))
    acc = accuracy(adapted, data, collate, batch_size=batch_size)
    typer.echo(f"held-out accuracy: {acc:.4f} on {len(data)} snippets")


@app.command()
def merge(
    run: Annotated[Path, typer.Argument(help="Run folder from 'peftkit train', or an adapter folder.")],
    out: Annotated[Path, typer.Argument(help="Folder for the merged model (save_pretrained, safetensors).")],
    model: Annotated[
        Path | None,
        typer.Option(
            exists=True, file_okay=False, help="Base encoder folder (default: the one the run was trained on)."
        ),
    ] = None,
) -> None:
    """Fold the adapter into the base weights and save a plain model (encoder + head + tokenizer)."""
    _check_output_dir(out, "'OUT'")
    adapted, tokenizer, _ = _load_run(run, model)
    merged = adapted.merge()
    merged.save_pretrained(out, tokenizer=tokenizer)
    typer.echo(f"merged model saved to {out}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder from 'peftkit train', or an adapter folder.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the exported adapter to.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="Output format: 'peft' (Hugging Face PEFT).")] = (
        ExportFormat.peft
    ),
    model: Annotated[
        Path | None,
        typer.Option(
            exists=True, file_okay=False, help="Base encoder folder (default: the one the run was trained on)."
        ),
    ] = None,
) -> None:
    """Convert the adapter to another library's format (Hugging Face PEFT: adapter_model.safetensors)."""
    import peftkit as pk

    _check_output_dir(out, "'OUT'")
    adapted, _, _ = _load_run(run, model)
    pk.export_peft(adapted, out)
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


def main() -> None:
    """Entry point of the ``peftkit`` script."""
    app()


if __name__ == "__main__":
    main()
