"""``peftkit federate``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from peftkit.cli.app import Task, app, check_model, check_output_dir, log, metrics_line


class Engine(str, Enum):
    """Where ``peftkit federate`` runs its clients."""

    simulation = "simulation"
    inprocess = "inprocess"


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
    engine: Annotated[
        Engine,
        typer.Option(help="simulation: Flower's simulation engine (Ray); inprocess: the same clients in this process."),
    ] = Engine.simulation,
) -> None:
    """Fine-tune an adapter with federated learning on Flower (one client per data shard, on its simulation
    engine or in this process) and report held-out accuracy per round and the bytes communicated."""
    from peftkit.federated.privacy import PrivacySettings, UserPrivacy
    from peftkit.federated.run import ADAPTER_DIR, METRICS_FILE, SETTINGS_FILE
    from peftkit.federated.run import federate as run_federation

    check_model(model)
    check_output_dir(output_dir, "'--output-dir'", {ADAPTER_DIR: True, METRICS_FILE: False, SETTINGS_FILE: False})
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
        overrides=set_ or None, progress=progress, log=log, engine=engine.value,
        **{k: v for k, v in options.items() if v is not None},
    )  # fmt: skip
    last = result.rounds[-1]
    typer.echo(f"{metrics_line(result.metrics, result.settings['num_eval'])} after {rounds} rounds; "
               f"{last['upload_bytes_per_client']:,.0f} bytes sent per client per round, "
               f"{last['cumulative_bytes']:,.0f} in all; adapter: {result.output_dir / ADAPTER_DIR}")  # fmt: skip
