"""Multi-process LoRA training of SmolLM2-135M-Instruct on CPU: 2-process DDP and FSDP2 vs one process.

Every configuration trains the same LoRA (r=8, alpha=16 on ``q_proj`` / ``v_proj`` of all 30 layers, dropout 0)
with peftkit's ``Trainer`` at the same **global** batch (``--batch`` sequences of ``--seq`` tokens, packed from
Rotten Tomatoes snippets, so every sequence has the same number of tokens) for ``--steps`` optimizer steps
(AdamW, lr 5e-4), each in fresh processes (spawned; gloo on CPU):

* ``single-1t``: one process, 1 intra-op thread, batch B;
* ``single-2t``: one process, 2 threads (the whole machine for one process), batch B;
* ``ddp``: 2 processes x 1 thread, B/2 each (``DistributedDataParallel`` over the adapter parameters);
* ``fsdp``: 2 processes x 1 thread, B/2 each (FSDP2: each LoRA module, each block, the root sharded).

Reported per configuration: the median step time after the first (warm-up) step, measured by rank 0 between
``on_step_end`` callbacks, and the **throughput** in tokens/s of the global batch; the ratio to ``single-1t``
and to ``single-2t``; each rank's **peak RSS** (``ru_maxrss``: includes loading the full model, which FSDP2
then shards; freed memory the allocator keeps still counts), its RSS after loading and at the end of training
(VmRSS), the **parameter bytes it holds** while training (FSDP2: its shards), and the losses (which must agree
across configurations: the same global batches).

On a 2-core machine shared with other work the processes compete with each other and with everything else:
expect little or no speed-up (the gloo all-reduce / all-gather of every step is pure overhead on one host). The
point of the multi-process path is exactness and memory per rank (FSDP2), not speed on a laptop-sized CPU.

    python benchmarks/bench_distributed.py [--steps 6] [--batch 8] [--seq 64] [--configs single-1t,ddp,fsdp]

Results: ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.multiprocessing as mp

CONFIGS = {  # name: (processes, threads per process, FSDP2)
    "single-1t": (1, 1, False),
    "single-2t": (1, 2, False),
    "ddp": (2, 1, False),
    "fsdp": (2, 1, True),
}


def rss_mib() -> float:
    """This process's resident set now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def blocks(tokenizer: Any, count: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """``count`` sequences of ``seq`` tokens packed from Rotten Tomatoes snippets (labels = inputs)."""
    from peftkit.assets import rotten_tomatoes

    stream: list[int] = []
    for text, _ in rotten_tomatoes(seed=0).train:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= count * seq:
            break
    ids = torch.tensor(stream[: count * seq]).view(count, seq)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def worker(rank: int, name: str, port: int, options: dict[str, Any], out: str) -> None:
    world, threads, fsdp = CONFIGS[name]
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(threads)
    import peftkit as pk
    from peftkit.assets import load_smollm2
    from peftkit.train import Callback, TrainConfig, Trainer
    from peftkit.train.build import labelled_tokens
    from peftkit.train.distributed import session

    rss_start = rss_mib()
    model, tokenizer = load_smollm2()
    torch.manual_seed(0)
    adapted = pk.adapt(model, pk.LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"], dropout=0.0))
    data = blocks(tokenizer, options["batch"] * options["steps"], options["seq"])
    rss_loaded = rss_mib()
    stamps: list[float] = []

    class Timer(Callback):
        def on_train_begin(self, trainer: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
            stamps.append(time.perf_counter())

    with session(fsdp=fsdp) as group:
        config = TrainConfig(epochs=1, batch_size=options["batch"] // world, lr=5e-4, max_steps=options["steps"],
                             seed=0, progress=False, shuffle=False, divergence_factor=None)  # fmt: skip
        trainer = Trainer(adapted, config, data, collate_fn=collate, distributed=group, loss_weight=labelled_tokens,
                          callbacks=[Timer()], log=lambda m: None)  # fmt: skip
        # The parameters this rank holds (FSDP2: its shards; bitsandbytes-free fp32 model here), in MiB.
        held = [p.to_local() if hasattr(p, "to_local") else p for p in adapted.parameters()]
        param_mib = sum(t.numel() * t.element_size() for t in held) / 2**20
        result = trainer.fit()
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    record = {
        "rank": rank,
        "step_seconds": steps,
        "loss": [h["loss"] for h in result.history],
        "param_mib": param_mib,
        "rss_start_mib": rss_start,
        "rss_loaded_mib": rss_loaded,
        "rss_end_mib": rss_mib(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(out, f"{name}-rank{rank}.json").write_text(json.dumps(record))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(name: str, options: dict[str, Any], scratch: Path) -> dict[str, Any]:
    world = CONFIGS[name][0]
    env = {"OMP_NUM_THREADS": str(CONFIGS[name][1])}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the spawned processes' OpenMP at start-up
    try:
        mp.start_processes(worker, args=(name, free_port(), options, str(scratch)), nprocs=world, start_method="spawn")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ranks = [json.loads((scratch / f"{name}-rank{r}.json").read_text()) for r in range(world)]
    timed = ranks[0]["step_seconds"][1:] or ranks[0]["step_seconds"]  # the first step warms up
    median = statistics.median(timed)
    return {
        "processes": world,
        "threads_per_process": CONFIGS[name][1],
        "fsdp": CONFIGS[name][2],
        "per_rank_batch": options["batch"] // world,
        "median_step_s": median,
        "tokens_per_s": options["batch"] * options["seq"] / median,
        "ranks": ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--configs", default="single-1t,single-2t,ddp,fsdp")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distributed.json")
    args = parser.parse_args()
    options = {"steps": args.steps, "batch": args.batch, "seq": args.seq}
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    import tempfile

    start, load_start = time.perf_counter(), os.getloadavg()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            results[name] = run_config(name, options, Path(scratch))
            r = results[name]
            peaks = ", ".join(f"{x['peak_rss_mib']:.0f}" for x in r["ranks"])
            params = ", ".join(f"{x['param_mib']:.0f}" for x in r["ranks"])
            print(f"{name:10s} {r['tokens_per_s']:8.1f} tokens/s  median step {r['median_step_s']:.2f} s  "
                  f"peak RSS per rank {peaks} MiB  parameters held per rank {params} MiB", flush=True)  # fmt: skip
    for base in ("single-1t", "single-2t"):
        if base in results:
            for r in results.values():
                r[f"throughput_vs_{base}"] = r["tokens_per_s"] / results[base]["tokens_per_s"]
    reference = results[names[0]]["ranks"][0]["loss"]
    for r in results.values():
        loss = torch.tensor(r["ranks"][0]["loss"], dtype=torch.float64)
        r["max_rel_loss_diff_vs_first"] = float(((loss - torch.tensor(reference)).abs() / loss.abs()).max())
    report = {
        "benchmark": "bench_distributed",
        "model": "SmolLM2-135M-Instruct (float32), LoRA r=8 alpha=16 on q_proj,v_proj",
        "settings": options,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "seconds": time.perf_counter() - start,
        "configs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for name, r in results.items():
        ratios = "  ".join(
            f"{k[len('throughput_vs_') :]}: {v:.2f}x" for k, v in r.items() if k.startswith("throughput_vs")
        )
        print(f"{name:10s} throughput vs {ratios}  loss rel diff vs {names[0]}: {r['max_rel_loss_diff_vs_first']:.1e}")
    print(f"({report['seconds']:.0f} s; load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}; {args.out})")


if __name__ == "__main__":
    main()
