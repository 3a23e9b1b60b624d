"""Decode-shaped mixed-adapter batches (issue 19): one token per row, every row naming its own adapter.

Shared by ``bench_core.py --only decode`` (a 6 x Linear(1024, 1024) MLP and MiniLM) and ``bench_serve.py
--decode-only`` (the Llama decode step). Each case times, interleaved round by round (base, peftkit, ...), the bare
base model, peftkit's ``adapter_ids`` forward through the C++ kernel, the same peftkit model through the PyTorch
gather path it used before (``peftkit.core.bank.KERNEL = False``), and PEFT's ``adapter_names`` forward. Every
figure is a ratio to the base model **of the same round**, reduced to its median; the spread is the 10th-90th
percentile of those per-round ratios. Both wall-clock time (``vs_base``) and the CPU time of the process
(``cpu_vs_base``: the work done, less sensitive to other jobs on a shared machine at one thread; at two threads it
includes OpenMP's spin-waiting) are recorded, and the load average before and after each case.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import peftkit as pk
import peftkit.core.bank as bank
from peftkit.core import bgmv

WIDTH, DEPTH = 1024, 6  # the MLP: 6 Linear(1024, 1024) layers
ROWS = [64, 256]
ADAPTERS = [8, 32, 128]
MIXED_RANKS = [4, 8, 16, 64]  # "different ranks": adapter i has rank MIXED_RANKS[i % 4]
# (rows, adapters, different ranks, share of base rows) measured besides every ROWS x ADAPTERS at rank 8
EXTRA_CASES = [(256, 32, True, 0.0), (256, 32, False, 0.25)]


# ------------------------------------------------------------------------------------------------- timing
def rounds(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and CPU seconds (this process, all its threads) of each call, ``repeats`` rounds; each round
    calls every function once, in order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - start)
            cpu[k].append(time.process_time() - start_cpu)
    return wall, cpu


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ratios(times: dict[str, list[float]], ref: str = "base") -> dict[str, dict[str, float]]:
    """Per function: the median of its per-round ratio to ``ref`` and the 10th / 90th percentiles."""
    out: dict[str, dict[str, float]] = {}
    for key, values in times.items():
        if key == ref:
            continue
        per_round = [v / r for v, r in zip(values, times[ref])]
        out[key] = {
            "median": statistics.median(per_round),
            "p10": quantile(per_round, 0.1),
            "p90": quantile(per_round, 0.9),
        }
    return out


def load() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------------- models
def mlp(depth: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth or DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def mlp_targets(depth: int | None = None) -> list[str]:
    return [str(2 * i) for i in range(depth or DEPTH)]


def rank_of(i: int, mixed: bool) -> int:
    return MIXED_RANKS[i % len(MIXED_RANKS)] if mixed else 8


def peftkit_model(base: nn.Module, targets: list[str] | str, n: int, mixed_ranks: bool) -> pk.AdaptedModel:
    """``n`` LoRA adapters ``a0..`` (alpha 16, seeded init, ``B`` drawn non-zero so every adapter changes the
    output) on a copy of ``base``."""

    def config(i: int) -> pk.LoRAConfig:
        return pk.LoRAConfig(r=rank_of(i, mixed_ranks), alpha=16, targets=targets, seed=i)

    model = pk.adapt(copy.deepcopy(base), config(0), name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config(i))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, pk.Adapter):
                m.B.normal_(std=0.02)
    model.set_static_adapters()  # as the serving engine does
    return model.eval()


def peft_model(base: nn.Module, targets: list[str] | str, n: int, mixed_ranks: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    def config(i: int) -> LoraConfig:
        return LoraConfig(r=rank_of(i, mixed_ranks), lora_alpha=16, target_modules=targets, init_lora_weights=False)

    model = get_peft_model(copy.deepcopy(base), config(0), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config(i))
    return model.eval()


def row_ids(rows: int, n: int, base_share: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Adapter id of each row, uniform over ``n``; a share ``base_share`` of the rows gets -1 (the base)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n, (rows,), generator=g)
    if base_share:
        ids[torch.rand(rows, generator=g) < base_share] = -1
    return ids


def paths(
    ours: nn.Module, theirs: nn.Module | None, base: nn.Module, call: Callable[..., torch.Tensor], ids: torch.Tensor
) -> dict[str, Callable[[], torch.Tensor]]:
    """The functions timed for one case: ``base``, ``peftkit`` (kernel), ``peftkit_gather``, ``peft``."""
    names = ["__base__" if i < 0 else f"a{i}" for i in ids.tolist()]

    def kernel() -> torch.Tensor:
        bank.KERNEL = True
        return call(ours, adapter_ids=ids)

    def gather() -> torch.Tensor:
        bank.KERNEL = False
        try:
            return call(ours, adapter_ids=ids)
        finally:
            bank.KERNEL = True

    fns = {"base": lambda: call(base), "peftkit": kernel, "peftkit_gather": gather}
    if theirs is not None:
        fns["peft"] = lambda: call(theirs, adapter_names=names)
    return fns


def case(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, **meta: object) -> dict[str, object]:
    """Time ``fns`` interleaved; check that the kernel and the gather path agree (max |Δ| / max |out|)."""
    with torch.no_grad():
        before = load()
        kernel, gather = fns["peftkit"](), fns["peftkit_gather"]()
        rel = float((kernel - gather).abs().max() / gather.abs().max())
        times, cpu = rounds(fns, repeats)
    entry = {
        **meta,
        "vs_base": ratios(times),
        "cpu_vs_base": ratios(cpu),
        "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
        "kernel_vs_gather_max_rel_diff": rel,
        "load_avg_1min": [before, load()],
    }
    r, c = entry["vs_base"], entry["cpu_vs_base"]
    print(
        f"  {meta}: peftkit {r['peftkit']['median']:.3f}x [{r['peftkit']['p10']:.2f}-{r['peftkit']['p90']:.2f}]"
        f" (cpu {c['peftkit']['median']:.3f}x)  gather {r['peftkit_gather']['median']:.3f}x"
        + (f"  peft {r['peft']['median']:.3f}x" if "peft" in r else "")
        + f"  base {entry['median_ms']['base']:.1f} ms  rel.diff {rel:.1e}  load {before:.1f}",
        flush=True,
    )
    return entry


# -------------------------------------------------------------------------------------------------- cases
def bench_mlp(repeats: int, with_peft: bool = True) -> dict[str, object]:
    """The issue's shape: 6 x Linear(1024, 1024) (+ ReLU), every Linear adapted, one token per row."""
    base = mlp()
    out: dict[str, object] = {"model": f"{DEPTH} x Linear({WIDTH}, {WIDTH}) + ReLU", "targets": "all 6 Linear"}
    plans = [(rows, n, False, 0.0) for n in ADAPTERS for rows in ROWS] + EXTRA_CASES
    models: dict[tuple[int, bool], tuple[nn.Module, nn.Module | None]] = {}
    cases = []
    for rows, n, mixed, base_share in plans:
        if (n, mixed) not in models:
            models.clear()  # one adapter set in memory at a time
            theirs = peft_model(base, mlp_targets(), n, mixed) if with_peft else None
            models[n, mixed] = (peftkit_model(base, mlp_targets(), n, mixed), theirs)
        ours, theirs = models[n, mixed]
        x = torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(rows))
        ids = row_ids(rows, n, base_share, seed=n)
        label = {"rows": rows, "adapters": n, "ranks": MIXED_RANKS if mixed else 8, "base_rows": base_share}
        cases.append(case(paths(ours, theirs, base, lambda m, x=x, **kw: m(x, **kw), ids), repeats, **label))
    out["cases"] = cases
    return out


def bench_minilm(make_base: Callable[[], nn.Module], repeats: int, with_peft: bool = True) -> dict[str, object]:
    """MiniLM with one token per row (a decode-sized batch through an encoder), LoRA r=8 on query/value or on
    every linear layer."""
    base = make_base().eval()
    out: dict[str, object] = {"model": "all-MiniLM-L6-v2, 1 token per row"}
    for label, targets in [("qv", ["query", "value"]), ("all_linear", "all-linear")]:
        cases = []
        for n in ADAPTERS:
            ours = peftkit_model(base, targets, n, False)
            theirs = peft_model(base, targets, n, False) if with_peft else None
            for rows in ROWS:
                g = torch.Generator().manual_seed(rows)
                batch = {"input_ids": torch.randint(1000, 20000, (rows, 1), generator=g)}

                def call(m: nn.Module, b: dict = batch, **kw: object) -> torch.Tensor:
                    return m(**b, **kw).last_hidden_state

                fns = paths(ours, theirs, base, call, row_ids(rows, n, seed=n))
                cases.append(case(fns, repeats, targets=label, rows=rows, adapters=n))
            del ours, theirs
        out[label] = cases
    return out


# (rows, tokens per row) of the kernel-vs-gather sweep: decode (1 token) to prefill-like rows (512 tokens)
SHAPES = [(256, 1), (64, 1), (16, 1), (8, 1), (2, 1), (64, 4), (16, 16), (8, 64), (4, 128), (2, 512)]


def bench_shapes(counts: list[int], depth: int = 2, max_rounds: int = 21) -> dict[str, object]:
    """Where does the gather path beat the kernel? ``depth`` x Linear(1024, 1024), LoRA r=8 on each, ``counts``
    adapters, every (rows, tokens per row) of :data:`SHAPES` (ids uniform, at least two distinct, so the mixed
    path runs): the median over interleaved rounds of the per-round ratio kernel / gather (whole forward, base
    included), with the 10th-90th percentiles. Rounds: ``max_rounds``, fewer (down to 5) for the largest batches."""
    base = mlp(depth)
    cases = []
    for n in counts:
        ours = peftkit_model(base, mlp_targets(depth), n, False)
        for rows, per_row in SHAPES:
            x = torch.randn(rows, per_row, WIDTH, generator=torch.Generator().manual_seed(rows * per_row))
            ids = row_ids(rows, n, seed=n)
            if rows > 1 and len(set(ids.tolist())) == 1:
                ids[0] = (ids[0] + 1) % n
            fns = paths(ours, None, base, lambda m, x=x, **kw: m(x, **kw), ids)
            del fns["base"]
            repeats = max(min(5, max_rounds), min(max_rounds, 20_000 // (rows * per_row)))
            before = load()
            with torch.no_grad():
                times, _ = rounds(fns, repeats)
            r = ratios(times, ref="peftkit_gather")["peftkit"]
            cases.append(
                {
                    "adapters": n,
                    "rows": rows,
                    "tokens_per_row": per_row,
                    "kernel_over_gather": r,
                    "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
                    "repeats": repeats,
                    "load_avg_1min": [before, load()],
                }
            )
            print(
                f"  {n:>3} adapters {rows:>3} rows x {per_row:>3} tokens: kernel / gather {r['median']:.3f} "
                f"[{r['p10']:.2f}-{r['p90']:.2f}]  load {before:.1f}",
                flush=True,
            )
        del ours
    return {"model": f"{depth} x Linear({WIDTH}, {WIDTH}) + ReLU, LoRA r=8 on each", "cases": cases}


# ------------------------------------------------------------------------------------------- serving model
def decode_step_times(engine: Any, peft: Any, n: int, repeats: int, rows: int = 32) -> dict[str, Any]:
    """The adapter path alone, without either system's scheduling: one decode step (``rows`` rows, one new token
    each, on a KV cache of 24 prompt tokens; row i uses adapter ``a{k_i}``, k_i drawn uniformly from ``n``)
    through peftkit's model (``adapter_ids``; the C++ kernel), the same model on the PyTorch gather path it used
    before (``peftkit_gather``), PEFT's (``adapter_names``) and peftkit's model without adapter ids (the base).
    ``repeats`` interleaved rounds: median seconds of each, and each one's median per-round ratio to the base
    (with the 10th / 90th percentiles)."""
    g = torch.Generator().manual_seed(n)
    names = [f"a{i}" for i in torch.randint(0, n, (rows,), generator=g).tolist()]
    for name in dict.fromkeys(names):
        engine.slots.install(engine.cache.get(name), in_use=())
        engine.slots.adapter_id(name)  # marks it recently used, so installing the next one does not evict it
    ids = torch.tensor([engine.model.adapter_names.index(name) for name in names])
    prompt = torch.randint(1000, 30000, (rows, 24), generator=g)
    token = torch.randint(1000, 30000, (rows, 1), generator=g)
    ours, theirs = engine.model, peft

    def gather(cache: Any) -> Any:
        bank.KERNEL = False
        try:
            return ours(input_ids=token, adapter_ids=ids, past_key_values=cache)
        finally:
            bank.KERNEL = True

    with torch.no_grad():
        caches = {
            "peftkit": ours(input_ids=prompt, adapter_ids=ids, use_cache=True).past_key_values,
            "base": ours(input_ids=prompt, use_cache=True).past_key_values,
        }
        caches["peftkit_gather"] = caches["peftkit"]
        calls = {
            "base": lambda cache: ours(input_ids=token, past_key_values=cache),
            "peftkit": lambda cache: ours(input_ids=token, adapter_ids=ids, past_key_values=cache),
            "peftkit_gather": gather,
        }
        if theirs is not None:
            caches["peft"] = theirs(input_ids=prompt, adapter_names=names, use_cache=True).past_key_values
            calls["peft"] = lambda cache: theirs(input_ids=token, adapter_names=names, past_key_values=cache)
        kernel = calls["peftkit"](copy.deepcopy(caches["peftkit"])).logits
        rel = float((kernel - gather(copy.deepcopy(caches["peftkit"])).logits).abs().max() / kernel.abs().max())
        times: dict[str, list[float]] = {key: [] for key in calls}
        for _ in range(repeats):
            for key, call in calls.items():
                cache = copy.deepcopy(caches[key])  # a step appends to its cache: each call gets its own copy
                start = time.perf_counter()
                call(cache)
                times[key].append(time.perf_counter() - start)
    return {
        "rows": rows,
        "distinct_adapters": len(set(names)),
        **{key: statistics.median(t) for key, t in times.items()},
        "vs_base": ratios(times),
        "kernel_vs_gather_max_rel_diff_logits": rel,
    }


def serve_decode(args: Any, bench: Any) -> None:
    """``bench_serve.py --decode-only``: the decode step alone for LoRA on q/v and on all seven linears, ``--counts``
    adapters, ``--decode-rows`` rows; one engine per target set holding every adapter. ``bench``: the
    ``bench_serve`` module (its model, adapters, PEFT model). Writes ``results/serve_decode.json``."""
    counts = [int(c) for c in args.counts.split(",")]
    report: dict[str, Any] = {
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
        "machine": "shared 2-core CPU, torch.set_num_threads(1)",
        "model": "Llama 6 layers, hidden 384, 6 heads / 2 KV, MLP 1024, vocab 30522, random weights",
        "env": environment(),
        "repeats": args.repeats_decode,
        "cases": [],
    }
    for label, targets in [("qv", ["q_proj", "v_proj"]), ("all_linear", bench.ALL_LINEAR)]:
        bench.TARGETS[:] = targets
        tmp = Path(tempfile.mkdtemp(prefix="peftkit-bench-decode-"))
        try:
            weights = bench.write_adapters(tmp, max(counts))
            cache = bench.AdapterCache(max_bytes=1 << 30, root=tmp)
            cache.register_dir(tmp)
            engine = bench.Engine(
                bench.make_base(), bench.tokenizer(), cache, max_loras=max(counts), max_batch=bench.BATCH
            )
            for n in counts:
                theirs = (
                    bench.peft_model(bench.make_base(), weights, [f"a{i}" for i in range(n)])
                    if n <= args.peft_max
                    else None
                )
                for rows in [int(r) for r in args.decode_rows.split(",")]:
                    before = os.getloadavg()[0]
                    step = decode_step_times(engine, theirs, n, args.repeats_decode, rows)
                    entry = {"targets": label, "adapters": n, **step, "load_avg_1min": [before, os.getloadavg()[0]]}
                    report["cases"].append(entry)
                    r = step["vs_base"]
                    print(
                        f"{label:>10} N={n:<4} rows={rows:<4} peftkit {r['peftkit']['median']:.3f}x "
                        f"[{r['peftkit']['p10']:.2f}-{r['peftkit']['p90']:.2f}]  "
                        f"gather {r['peftkit_gather']['median']:.3f}x"
                        + (f"  peft {r['peft']['median']:.3f}x" if "peft" in r else "")
                        + f"  base {step['base'] * 1e3:.1f} ms  load {before:.1f}",
                        flush=True,
                    )
                del theirs
            engine.cache.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out = bench.RESULTS / "serve_decode.json" if args.out == str(bench.RESULTS / "serve.json") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


def environment() -> dict[str, object]:
    return {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "kernel": bgmv.status() if bgmv.available() else {"ok": False, **bgmv.status()},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
