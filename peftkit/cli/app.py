"""The ``peftkit`` typer app: one-line errors (``--debug`` for the traceback), and what several commands share."""

from __future__ import annotations

import os
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
def check_output_dir(path: Path, hint: str, inside: dict[str, bool] | None = None) -> None:
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


def metrics_line(metrics: dict[str, float], count: int) -> str:
    """``held-out accuracy: 0.7470, eval_loss: 0.5213 on 1000 examples`` (the task's main metric first)."""
    order = ["accuracy", "perplexity", "exact_match", "eval_loss"]
    keys = sorted(metrics, key=lambda k: order.index(k) if k in order else len(order))
    shown = ", ".join(f"{k}: {metrics[k]:.4f}" for k in keys) or "no metrics (no held-out examples)"
    return f"held-out {shown} on {count} examples"


def log(message: str) -> None:
    """A log line of a run, printed above its progress bar (``tqdm.write``), not into it."""
    from tqdm.auto import tqdm

    tqdm.write(message)


def check_model(model: str | None) -> None:
    """A ``--model`` that names a path (not a Hub id) must exist: a usage error before any work."""
    from peftkit.train.build import resolve_model

    if model is None:
        return
    try:
        resolve_model(model, "classify")
    except OSError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--model'") from None


def main() -> None:
    """Entry point of the ``peftkit`` script."""
    app()
