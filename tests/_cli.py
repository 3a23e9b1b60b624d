"""The ``peftkit`` command run in process, as the CLI tests call it."""

from __future__ import annotations

from typer.testing import CliRunner

from peftkit.cli import app

# Wide terminal: typer draws errors in a box that wraps long messages (long tmp paths would split them).
runner = CliRunner(env={"COLUMNS": "200"})


def invoke(*args: object) -> str:
    """``peftkit ARGS...``; its output, after checking it exited with 0."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.output}\n{result.exception!r}"
    return result.output
