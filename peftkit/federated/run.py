"""A federated run (``peftkit federate``): the server side (:class:`Federation`) and Flower's simulation engine
(:func:`federate`).

The server builds the run as ``peftkit train`` does (:func:`peftkit.train.build.build`: base model, tokenised
data, held-out split, adapter config), splits the training examples over the clients
(:mod:`peftkit.federated.split`), initialises the global adapter (Fed-SB: the LoRA-SB initialisation on
``init_samples`` examples of the pooled training set, as the official simulation does; the others: LoRA's
seeded init), evaluates it on the held-out split before the first round and after every round, and writes::

    OUT/federation.json   the settings, the split's client sizes, the final metrics
    OUT/metrics.jsonl     one line per round (round 0: before training): held-out metrics, train loss, clients,
                          failures, bytes sent per client (up / down / one-time setup), cumulative bytes,
                          epsilon (DP), aggregation error (FedAvg-LoRA / FedEx-LoRA), seconds
    OUT/metrics.png       the main metric vs round and vs bytes communicated
    OUT/adapter/          the global adapter (FedEx-LoRA: and its residual as adapter 'fedex_residual');
                          ``pk.load(base, OUT/adapter)`` restores it

From Python::

    from peftkit.federated import federate
    result = federate("runs/fed", strategy="fedsb", clients=10, rounds=3, split="dirichlet:0.5", r=32)
    result.rounds[-1]["accuracy"], result.model
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from peftkit.core import io
from peftkit.core.model import AdaptedModel
from peftkit.core.version import __version__
from peftkit.federated.client import (
    ADAPTER,
    RESIDUAL,
    ClientJob,
    add_residual,
    freeze_for,
    heads,
    set_residual,
    split_state,
)
from peftkit.federated.errors import FederatedOptionError
from peftkit.federated.flower import PeftkitStrategy, client_app, from_record, to_record
from peftkit.federated.privacy import PrivacySettings, UserPrivacy, client_delta, noise_multiplier, sample_rate
from peftkit.federated.split import parse_split, partition
from peftkit.federated.strategies import get_strategy
from peftkit.train.trainer import Trainer

SETTINGS_FILE, METRICS_FILE, PLOT_FILE, ADAPTER_DIR = "federation.json", "metrics.jsonl", "metrics.png", "adapter"
# Options of peftkit train a federation passes on (the local training of every client, the data, the model).
RUN_OPTIONS = ("model", "data", "task", "r", "alpha", "targets", "lr", "batch_size", "max_length",
               "max_train_samples", "max_eval_samples", "weight_decay", "warmup_ratio", "seed")  # fmt: skip


@dataclass
class FederatedResult:
    """What :func:`federate` returns: the output folder, the global model (an :class:`AdaptedModel` on the
    server's base model), one dict per round (``metrics.jsonl``), the final held-out metrics, the settings and
    the Flower strategy (its ``rounds`` and last ``client_states``)."""

    output_dir: Path
    model: AdaptedModel
    rounds: list[dict[str, Any]]
    metrics: dict[str, float]
    settings: dict[str, Any]
    strategy: PeftkitStrategy
    notes: list[str] = field(default_factory=list)


class Federation:
    """The server side of a federated run (see the module docstring). ``options`` are ``peftkit train``'s
    (:data:`RUN_OPTIONS`, ``overrides`` as ``--set``).

    Raises:
        UnknownStrategyError, EmptyClientError, PrivacyBudgetError, FederatedOptionError: bad settings, before
            any training.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        strategy: str = "fedsb",
        clients: int = 10,
        rounds: int = 3,
        split: str = "dirichlet:0.5",
        local_epochs: int = 1,
        local_steps: int | None = None,
        weighted: bool = False,
        fraction: float = 1.0,
        privacy: PrivacySettings | None = None,
        user_privacy: UserPrivacy | None = None,
        init_samples: int = 64,
        drop: dict[int, int] | None = None,
        overrides: dict[str, Any] | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
        **options: Any,
    ) -> None:
        from peftkit.train.build import build
        from peftkit.train.run import settings_from

        self.spec = get_strategy(strategy)
        unknown = sorted(set(options) - set(RUN_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; options: {sorted(RUN_OPTIONS)}")
        if not isinstance(rounds, int) or rounds < 1 or not 0 < fraction <= 1:
            raise FederatedOptionError(f"need rounds >= 1 and 0 < fraction <= 1, got {rounds!r} and {fraction!r}")
        if user_privacy is not None and self.spec.folds_residual:
            raise FederatedOptionError(
                "user-level DP noises the averaged factors, but FedEx-LoRA's residual is formed from the clients' "
                "unnoised factors: use fedsb, fedavg or ffa with user-level DP"
            )
        parse_split(split)
        self.output_dir = Path(output_dir)
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.rounds_total, self.privacy, self.init_samples = rounds, privacy, init_samples
        self.started = time.perf_counter()
        if self.spec.method == "lorasb" and options.get("alpha") is None and options.get("r") is not None:
            options["alpha"] = float(options["r"])  # LoRA-SB's scale is 1 (alpha = r), not the run default 2r
        if self.spec.method == "lorasb" and options.get("r") is None:
            options.setdefault("r", 8)
            options.setdefault("alpha", 8.0)
        values = {k: v for k, v in options.items() if v is not None}
        run = settings_from(method=self.spec.method, epochs=local_epochs, max_steps=local_steps,
                            overrides=overrides, **values)  # fmt: skip
        run.train["log_every"] = None  # clients log nothing per step; the server logs each round
        if privacy is not None:
            run.train["max_grad_norm"] = None  # DP-SGD clips per example
        self.built = build(run, progress=progress)
        labels = [e.label for e in self.built.train] if self.built.spec.task == "classify" else None
        self.shards = partition(len(self.built.train), clients, split, labels=labels, seed=run.seed)
        self.model = AdaptedModel(self.built.model)
        self.model.add_adapter(ADAPTER, self.built.adapter_config, init=self._initializer())
        state = self.model.adapter_state_dict(ADAPTER)
        self.heads = heads(self.model, ADAPTER)
        self.trained, frozen = split_state(state, self.spec, self.heads)
        modules = self.model.adapter_modules(ADAPTER)
        self.lowrank = [p for p in modules if p not in self.heads and {"A", "B"} <= set(modules[p].state_dict())]
        scales = {p: float(modules[p].lowrank(self.model.base_view(p)).scale) for p in self.lowrank}
        if self.spec.folds_residual:
            add_residual(self.model, self.lowrank)
        freeze_for(self.model, self.spec)  # so the log below counts what each client trains, not FedEx's residual
        sigmas = self._noise() if privacy is not None else None
        train = {k: v for k, v in self.built.spec.train.items() if k != "seed"}
        self.job = ClientJob(
            spec=self.built.spec.to_dict(), strategy=self.spec.name, shards=self.shards,
            model_digest=self.built.model_digest, rounds=rounds, train=train, privacy=privacy, sigmas=sigmas,
            lowrank=self.lowrank, drop=dict(drop or {}),
        )  # fmt: skip
        self.strategy = PeftkitStrategy(self.spec, self.job, frozen, scales=scales, weighted=weighted,
                                        fraction=fraction)  # fmt: skip
        self.server_strategy = user_privacy.wrap(self.strategy, len(self.strategy.job.shards)) if user_privacy \
            else self.strategy  # fmt: skip
        self.settings = {
            "format": "peftkit-federation", "format_version": 1, "peftkit_version": __version__,
            "strategy": self.spec.name, "clients": clients, "rounds": rounds, "split": str(parse_split(split)),
            "local_epochs": local_epochs, "local_steps": local_steps, "weighted": weighted, "fraction": fraction,
            "init_samples": init_samples, "privacy": vars(privacy) if privacy else None,
            "user_privacy": vars(user_privacy) if user_privacy else None, "noise_multipliers": sigmas,
            "client_sizes": [len(s) for s in self.shards], "run": self.built.spec.to_dict(),
            "model_digest": self.built.model_digest, "num_train": len(self.built.train),
            "num_eval": len(self.built.held_out),
        }  # fmt: skip
        self.rows: list[dict[str, Any]] = []
        self.cumulative = 0
        self.log(f"{self.spec.title}: {clients} clients ({split}: {min(map(len, self.shards))}-"
                 f"{max(map(len, self.shards))} examples each), {rounds} rounds, "
                 f"{self.model.trainable_parameters()}")  # fmt: skip

    # ----------------------------------------------------------------------------------------------- setup
    def _local_steps(self, size: int) -> int:
        """Optimizer steps a client with ``size`` examples takes per round (as its Trainer counts them)."""
        cfg = self.built.spec.train_config(progress=False)
        return Trainer.total_steps(_Steps(cfg, size))  # type: ignore[arg-type]

    def _initializer(self) -> Any:
        if self.spec.method != "lorasb":
            return None
        from peftkit.init import LoRASB

        cfg = self.built.spec.train_config(progress=False)
        rng = random.Random(self.built.spec.seed)
        n = min(self.init_samples, len(self.built.train))
        picked = [self.built.train[i] for i in sorted(rng.sample(range(len(self.built.train)), n))]
        batches = [self.built.collate(picked[i : i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]
        steps = max(1, self.rounds_total * max(self._local_steps(len(s)) for s in self.shards))
        # LoRA-SB's first-step size needs a warm-up share; a run without warm-up uses the paper's 0.02 (inferred)
        return LoRASB(batches, total_steps=steps, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio or 0.02)

    def _noise(self) -> list[float]:
        """Each client's noise multiplier for the whole run (checked here, before any training)."""
        assert self.privacy is not None
        cfg = self.built.spec.train_config(progress=False)
        out = []
        for shard in self.shards:
            steps = self.rounds_total * self._local_steps(len(shard))
            rate, delta = sample_rate(len(shard), cfg.batch_size), client_delta(self.privacy, len(shard))
            out.append(noise_multiplier(self.privacy, rate, steps, delta))
        return out

    # ------------------------------------------------------------------------------------------ evaluation
    def load_global(self, arrays: ArrayRecord | dict[str, torch.Tensor]) -> None:
        """Put the global adapter (``arrays``: its trained tensors) and FedEx-LoRA's residual into the server's
        model."""
        trained = from_record(arrays) if isinstance(arrays, ArrayRecord) else dict(arrays)
        self.model.assign_tensors(ADAPTER, {**self.strategy.frozen, **trained}, source="the global adapter")
        if self.spec.folds_residual:
            set_residual(self.model, self.strategy.residual)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's ``evaluate_fn``: held-out metrics of the global adapter, logged with the round's traffic."""
        self.load_global(arrays)
        metrics = self.built.evaluate(self.model, show=False)
        info = self.strategy.rounds.get(server_round, {})
        up, down, setup = (info.get(k, {}) for k in ("upload", "download", "setup"))
        self.cumulative += sum(up.values()) + sum(down.values()) + sum(setup.values())
        row: dict[str, Any] = {"round": server_round, **{k: float(v) for k, v in metrics.items()}}
        row.update(
            clients=len(up), failures=info.get("failures", []),
            upload_bytes_per_client=_mean(up.values()), download_bytes_per_client=_mean(down.values()),
            setup_bytes=sum(setup.values()), cumulative_bytes=self.cumulative,
            seconds=round(time.perf_counter() - self.started, 2),
        )  # fmt: skip
        for key in ("train_loss", "epsilon"):
            if key in info:
                row[key] = info[key]
        if "aggregation_error" in info:
            row["aggregation_error"] = info["aggregation_error"]
        self.rows.append(row)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        shown = ", ".join(f"{k} {row[k]:.4f}" for k in ("accuracy", "eval_loss") if k in row)
        failed = "".join(f"; client node {f['node']} failed: {f['reason']}" for f in row["failures"])
        self.log(f"round {server_round}: {shown}; {row['clients']} clients, "
                 f"{row['upload_bytes_per_client']:.0f} B up per client{failed}")  # fmt: skip
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    # ----------------------------------------------------------------------------------------------- running
    def run_server(self, grid: Grid, timeout: float = 3600.0) -> None:
        """Run every round through ``grid`` (Flower's link to the clients)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / METRICS_FILE).unlink(missing_ok=True)
        self.rows, self.cumulative = [], 0
        original = self.strategy.aggregate_train

        def aggregate(server_round: int, replies: Any) -> Any:
            arrays, metrics = original(server_round, replies)
            info = self.strategy.rounds.setdefault(server_round, {})
            if metrics is not None:
                info["train_loss"] = float(metrics["train-loss"])
                if "epsilon" in metrics:
                    info["epsilon"] = float(metrics["epsilon"])
            return arrays, metrics

        self.strategy.aggregate_train = aggregate  # type: ignore[method-assign]
        result = self.server_strategy.start(
            grid=grid, initial_arrays=to_record(self.trained), num_rounds=self.rounds_total,
            train_config=ConfigRecord({}), evaluate_fn=self.evaluate, timeout=timeout,
        )  # fmt: skip
        self.final_arrays = result.arrays if len(result.arrays) else to_record(self.trained)

    def server_app(self) -> ServerApp:
        """A ``ServerApp`` running :meth:`run_server`."""
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            self.run_server(grid)

        return app

    def finish(self) -> FederatedResult:
        """Save the global adapter, the settings and the plot; the result."""
        self.load_global(self.final_arrays)
        self.model.eval()
        names = [ADAPTER, RESIDUAL] if self.spec.folds_residual else [ADAPTER]
        self.model.save(self.output_dir / ADAPTER_DIR, names=names)
        final = {k: v for k, v in self.rows[-1].items() if k in ("accuracy", "eval_loss", "perplexity",
                                                                  "exact_match")} if self.rows else {}  # fmt: skip
        self.settings.update(metrics=final, status="complete")
        io.write_files(self.output_dir, [(SETTINGS_FILE, json.dumps(self.settings, indent=2).encode())])
        plot_rounds(self.rows, self.output_dir / PLOT_FILE, title=self.spec.title)
        return FederatedResult(self.output_dir, self.model, self.rows, final, self.settings, self.strategy,
                               list(self.built.notes))  # fmt: skip


@dataclass
class _Steps:
    """Just enough of a Trainer for :meth:`Trainer.total_steps` (config and data length)."""

    config: Any
    size: int

    @property
    def train_data(self) -> range:
        return range(self.size)

    def _micro_batches(self) -> int:
        return math.ceil(self.size / self.config.batch_size)


def _mean(values: Any) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def plot_rounds(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """The main held-out metric (accuracy, else eval loss) against the round and the cumulative bytes
    communicated, as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    key = "accuracy" if rows and "accuracy" in rows[0] else "eval_loss"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    y = [r.get(key, math.nan) for r in rows]
    axes[0].plot([r["round"] for r in rows], y, marker="o")
    axes[0].set_xlabel("round")
    axes[1].plot([max(r["cumulative_bytes"], 1) for r in rows], y, marker="o")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("bytes communicated (all clients, both ways)")
    for ax in axes:
        ax.set_ylabel(f"held-out {key}")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def federate(output_dir: str | Path, *, engine: str = "simulation", backend_config: dict[str, Any] | None = None,
             **settings: Any) -> FederatedResult:  # fmt: skip
    """Run a federation: ``settings`` as for :class:`Federation`, one client per shard, each a peftkit Trainer on
    its shard.

    Args:
        engine: ``"simulation"``: Flower's simulation engine (Ray; one virtual SuperNode per client, clients in
            parallel worker processes, one torch thread each). ``"inprocess"``: the same strategy and the same
            ``ClientApp`` in this process, clients one after the other
            (:class:`~peftkit.federated.inprocess.InProcessGrid`; no Ray start-up, for benchmarks and tests).
        backend_config: Flower's simulation backend settings (default: one CPU per client).

    Raises:
        UnknownStrategyError, EmptyClientError, PrivacyBudgetError, FederatedOptionError, AdapterMismatchError,
        and the errors of ``peftkit train`` (bad data, model or settings).
    """
    if engine not in ("simulation", "inprocess"):
        raise FederatedOptionError(f"unknown engine {engine!r}; engines: simulation, inprocess")
    federation = Federation(output_dir, **settings)
    if engine == "inprocess":
        from peftkit.federated.inprocess import InProcessGrid, server_identity

        with server_identity():
            federation.run_server(InProcessGrid(client_app, len(federation.shards)))
        return federation.finish()
    from flwr.simulation import run_simulation

    federation.job.threads = 1
    config = backend_config or {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, min(len(federation.shards), os.cpu_count() or 1))},
    }
    run_simulation(server_app=federation.server_app(), client_app=client_app, num_supernodes=len(federation.shards),
                   backend_config=config)  # fmt: skip
    if not hasattr(federation, "final_arrays"):
        raise RuntimeError("the federation stopped before its first round (see Flower's log above)")
    return federation.finish()
