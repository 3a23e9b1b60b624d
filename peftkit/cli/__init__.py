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

from peftkit.cli import runs, serve, federate, compress  # noqa: F401, I001  (each registers its commands, in this order)
from peftkit.cli.app import app, main

__all__ = ["app", "main"]
