"""Training at scale on one CPU process (issue 15 item 5): quantised frozen bases, GaLore's optimizer state, LoRA+.

``python benchmarks/bench_scale.py [--quick] [--threads 2] [--only memory,timing,galore,loraplus]`` writes
``benchmarks/results/bench_scale.json`` (``bench_scale_quick.json`` with ``--quick``). Three parts:

1. **QLoRA memory and step time** (``memory``, ``timing``): SmolLM2-135M (:func:`peftkit.assets.load_smollm2`,
   float32) with LoRA (``r`` 8, ``alpha`` 16, on the seven attention and MLP projections of every block) trained
   by AdamW on a fixed batch of token ids, over the float32 base and over the base quantised by
   :func:`peftkit.quantize.quantize` (``nf4``: bitsandbytes nf4 with double quantisation, ``int8``: bitsandbytes
   LLM.int8() weights, ``hqq4``: hqq 4-bit in groups of 64; the tied embedding / LM head stays float32, as in
   QLoRA).

   *Memory* is measured from the kernel's resident-set counters, each configuration in a **fresh subprocess**
   (peak RSS is process-wide and freed memory stays in the allocator, so peaks of configurations run in one
   process would mix). The worker imports everything first (torch, transformers, peftkit, bitsandbytes, hqq: the
   same in every configuration), returns freed heap to the OS (``malloc_trim``) and reads ``VmRSS`` as its
   baseline; then it loads, quantises and adapts the model, runs warm-up steps (AdamW's moments and autograd's
   buffers are allocated there), trims again, resets the peak counter (``/proc/self/clear_refs`` ← 5) and runs
   the measured steps. ``peak_mib = VmHWM − baseline`` is the training footprint (weights, adapters, optimizer
   state, and at its peak the activations saved for backward and the gradients); ``resident_mib`` the same
   between steps; ``model_mib`` the base alone after loading (and quantising). ``tracemalloc`` is not used: it sees
   Python's allocator only, not torch's tensor memory (and torch has no allocator statistics on CPU).

   *Step time* ratios are measured side by side in **one process** (``timing``): the four adapted models are
   built, then one optimizer step of each in turn, in a new random order every round, medians over the rounds
   after one warm-up round, so load drift on the shared machine hits every configuration alike. (The memory
   workers' own step times are recorded too, but they run minutes apart.)

2. **GaLore optimizer state** (``galore``): a 2048 × 2048 weight with a random gradient, one step of
   ``torch.optim.AdamW`` and of :class:`peftkit.optim.GaLoreAdamW` at rank 128 (32-bit and 8-bit moments); the
   bytes of every tensor in the optimizer state (moments, projector, step counters, 8-bit block scales). GaLore
   (Zhao et al., 2024) keeps ``mr + 2nr`` numbers for an ``m × n`` weight against Adam's ``2mn``; the issue's target
   is ``≤ r(m + n)/(2mn) + 5 %`` of AdamW's bytes (printed with the measured ratio).

3. **LoRA+ vs LoRA** (``loraplus``) on the demo task (``benchmarks/demo_task.py``: the packaged MiniLM with a
   seeded classifier head on Rotten Tomatoes snippets split by movie, LoRA ``r`` 8 on query / value, the head
   trained whole): the same model, data order and schedule, trained with AdamW (LoRA) and with LoRA+ (Hayou et
   al., 2024: ``B``'s learning rate ``ratio`` × ``A``'s; :func:`peftkit.optim.loraplus`, ``ratio`` 16). Held-out
   accuracy, the mean training loss of the last 10 steps, and the optimizer steps each needs until its training
   loss averaged over the last 10 steps first reaches each of ``--target-losses`` (0.65, 0.6; batches of 16
   snippets make single-step losses too noisy to read). ``--only loraplus`` (any subset) reruns those parts and
   keeps the others' results in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from demo_task import reset_peak_rss, run_worker, status_kib, trim_heap
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCHEMES = ("fp32", "nf4", "int8", "hqq4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARTS = ("memory", "timing", "galore", "loraplus")


@dataclasses.dataclass
class LMSetting:
    """The SmolLM2 LoRA training step every configuration runs."""

    batch: int = 2
    seq: int = 64
    r: int = 8
    lr: float = 1e-4
    warmup: int = 2
    steps: int = 6
    rounds: int = 6  # interleaved timing rounds (after one warm-up round)
    checkpointing: bool = False
    threads: int = 2
    schemes: tuple[str, ...] = SCHEMES


# ------------------------------------------------------------------------------------------- measurement
def trim() -> None:
    gc.collect()
    trim_heap()


def reset_peak() -> None:
    gc.collect()
    reset_peak_rss()


def quiet() -> None:
    """Silence the backends' per-call warnings (bitsandbytes' int8 matmul casts to float16 on every call)."""
    warnings.simplefilter("ignore")
    import logging

    for name in ("bitsandbytes", "kernels", "torchao", "hqq", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def import_everything() -> None:
    """The imports every configuration needs, before the memory baseline (so none is counted in a footprint)."""
    import transformers  # noqa: F401

    import peftkit  # noqa: F401
    from peftkit.core.quant_backends import import_backend

    import_backend("bitsandbytes")
    import_backend("hqq.core.quantize")


def build_lm(scheme: str, setting: LMSetting) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, float]:
    """SmolLM2-135M (quantised by ``scheme`` unless fp32) with LoRA, its AdamW and the batch; also the seconds
    that loading and quantising took."""
    import peftkit as pk
    from peftkit.assets import load_smollm2
    from peftkit.quantize import quantize

    t = time.perf_counter()
    model, _ = load_smollm2()
    with torch.no_grad():  # own the weights: loaded ones are views of the memory-mapped file, whose touched pages
        for tensor in [*model.parameters(), *model.buffers()]:  # count in RSS for as long as any tensor maps it
            tensor.data = tensor.data.clone()
    if scheme != "fp32":
        quantize(model, scheme)
    built = time.perf_counter() - t
    if setting.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = pk.adapt(model, pk.LoRAConfig(r=setting.r, alpha=2 * setting.r, targets=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=setting.lr)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.model.config.vocab_size, (setting.batch, setting.seq), generator=g)
    return model, opt, ids, built


def train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def memory_worker(scheme: str, setting: LMSetting) -> dict[str, Any]:
    """One configuration's footprint (run in a fresh process: see the module docstring)."""
    import_everything()
    from peftkit.assets import load_smollm2, smollm2_dir

    smollm2_dir(quiet=True)  # converted once into the cache, outside the measurement
    # one load thrown away first: the tokenizer, transformers' lazily imported modules and caches are then part of
    # the baseline, so model_mib is the model's own memory
    model, tokenizer = load_smollm2()
    del model, tokenizer
    trim()
    baseline = status_kib("VmRSS")
    model, opt, ids, built = build_lm(scheme, setting)
    trim()
    model_kib = status_kib("VmRSS") - baseline
    losses = [train_step(model, opt, ids) for _ in range(setting.warmup)]
    reset_peak()
    resident = status_kib("VmRSS")
    times = []
    for _ in range(setting.steps):
        t = time.perf_counter()
        losses.append(train_step(model, opt, ids))
        times.append(time.perf_counter() - t)
    peak = status_kib("VmHWM")
    return {
        "status": "ok",
        "model_mib": model_kib / 1024,
        "resident_mib": (resident - baseline) / 1024,
        "peak_mib": (peak - baseline) / 1024,
        "step_added_mib": (peak - resident) / 1024,
        "baseline_mib": baseline / 1024,
        "step_ms_own_run": 1000 * sorted(times)[len(times) // 2],
        "load_quantise_s": built,
        "losses": losses,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def spawn_memory(scheme: str, setting: LMSetting, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", scheme, "--setting", json.dumps(dataclasses.asdict(setting))]
    threads = str(setting.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads}
    # a fixed mmap threshold: glibc otherwise raises it after large frees, and freed tensors then stay in the heap
    # (counted in RSS) instead of going back to the OS
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return run_worker(cmd, env, timeout, error_chars=400)


def memory(setting: LMSetting, timeout: float) -> dict[str, Any]:
    rows = {}
    for scheme in setting.schemes:
        print(f"[memory] {scheme} ...", flush=True)
        rows[scheme] = spawn_memory(scheme, setting, timeout)
        print(f"[memory] {scheme}: {json.dumps(rows[scheme])[:300]}", flush=True)
    ref = rows.get("fp32", {})
    for r in rows.values():
        if r.get("status") == "ok" and ref.get("status") == "ok":
            for key in ("peak_mib", "resident_mib", "model_mib"):
                r[f"{key.removesuffix('_mib')}_vs_fp32"] = r[key] / ref[key]
    return rows


def timing(setting: LMSetting) -> dict[str, Any]:
    """Step times of the four configurations side by side in this process (see the module docstring)."""
    import_everything()
    models = {}
    for scheme in setting.schemes:
        print(f"[timing] building {scheme} ...", flush=True)
        models[scheme] = build_lm(scheme, setting)[:3]
    times: dict[str, list[float]] = {s: [] for s in setting.schemes}
    order = list(setting.schemes)
    shuffle = random.Random(0).shuffle
    for i in range(1 + setting.rounds):
        shuffle(order)
        for scheme in order:
            t = time.perf_counter()
            train_step(*models[scheme])
            if i > 0:
                times[scheme].append(time.perf_counter() - t)
    med = {s: sorted(ts)[len(ts) // 2] for s, ts in times.items()}
    return {
        s: {"step_ms": 1000 * med[s], "step_vs_fp32": med[s] / med["fp32"], "rounds": len(times[s])}
        for s in setting.schemes
    }


# ------------------------------------------------------------------------------------------------ GaLore
def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )


def galore(m: int = 2048, n: int = 2048, rank: int = 128) -> dict[str, Any]:
    """Optimizer-state bytes after one step on an ``m × n`` weight (see the module docstring)."""
    from peftkit.optim import GaLoreAdamW

    g = torch.Generator().manual_seed(0)
    start = 0.02 * torch.randn(m, n, generator=g)
    grad = torch.randn(m, n, generator=g)
    out: dict[str, Any] = {"shape": [m, n], "rank": rank}

    def one_step(make: Any) -> tuple[int, float]:
        w = nn.Parameter(start.clone())
        opt = make(w)
        w.grad = grad.clone()
        t = time.perf_counter()
        opt.step()
        return state_bytes(opt), time.perf_counter() - t

    adamw, t_adamw = one_step(lambda w: torch.optim.AdamW([w], lr=1e-3))
    out["adamw_bytes"] = adamw
    out["adamw_step_ms"] = 1000 * t_adamw
    for label, bits in (("galore", 32), ("galore_8bit", 8)):
        got, t = one_step(
            lambda w, bits=bits: GaLoreAdamW(
                [{"params": [w], "rank": rank, "update_proj_gap": 200}], lr=1e-3, state_bits=bits
            )
        )
        out[f"{label}_bytes"] = got
        out[f"{label}_vs_adamw"] = got / adamw
        out[f"{label}_step_ms"] = 1000 * t  # a projector step (SVD of the gradient): every update_proj_gap steps
    bound = rank * (m + n) / (2 * m * n)
    out["target_vs_adamw"] = bound + 0.05
    out["target_formula"] = "r(m+n)/(2mn) + 0.05"
    out["paper_formula_vs_adamw"] = (m * rank + 2 * n * rank) / (2 * m * n)  # (mr + 2nr) / 2mn, GaLore's Table 1
    out["meets_target"] = out["galore_vs_adamw"] <= out["target_vs_adamw"]
    out["saving_pct"] = 100 * (1 - out["galore_vs_adamw"])
    return out


# ------------------------------------------------------------------------------------------------ LoRA+
def smoothed(losses: list[float], window: int) -> list[float]:
    return [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]


def steps_to(curve: list[float], level: float) -> int | None:
    """The first optimizer step (1-based) whose averaged loss is at or below ``level``; ``None`` if never."""
    return next((i + 1 for i, v in enumerate(curve) if v <= level), None)


def loraplus(quick: bool, ratio: float, targets: list[float], window: int = 10) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from demo_task import Budget, Run, build_model, config_of, load_context

    from peftkit.train import Trainer
    from peftkit.train.tasks import accuracy

    budget = Budget(train=320, held_out=200) if quick else Budget()
    ctx = load_context(budget)
    runs = {
        "lora": ("adamw", {}),
        "loraplus": ("loraplus", {"ratio": ratio}),
    }
    out: dict[str, Any] = {"budget": dataclasses.asdict(budget), "ratio": ratio, "window": window}
    for label, (optim, options) in runs.items():
        print(f"[loraplus] {label} ...", flush=True)
        model = build_model(Run(label, config_of("lora", r=8)), budget, ctx)
        config = dataclasses.replace(ctx.train_config, optim=optim, optim_options=options)
        t = time.perf_counter()
        result = Trainer(model, config, ctx.train, collate_fn=ctx.collate).fit()
        losses = [h["loss"] for h in result.history]
        out[label] = {
            "optim": optim,
            "options": options,
            "steps": len(losses),
            "seconds": time.perf_counter() - t,
            "accuracy": accuracy(model, ctx.held_out, ctx.collate),
            "losses": losses,
            "last_mean_loss": smoothed(losses, window)[-1],
        }
    out["target_losses"] = targets
    for label in runs:
        curve = smoothed(out[label]["losses"], window)
        out[label]["steps_to"] = {str(level): steps_to(curve, level) for level in targets}
    return out


# -------------------------------------------------------------------------------------------------- main
def env_info(threads: int) -> dict[str, Any]:
    import transformers

    import peftkit

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peftkit": peftkit.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
    }


def summary(res: dict[str, Any]) -> list[str]:
    lines = []
    mem = res.get("memory", {})
    for s in SCHEMES:
        r = mem.get(s, {})
        if r.get("status") == "ok":
            lines.append(
                f"memory {s:5s}: peak {r['peak_mib']:7.1f} MiB ({r.get('peak_vs_fp32', float('nan')):.2f}x fp32), "
                f"resident {r['resident_mib']:7.1f} MiB ({r.get('resident_vs_fp32', float('nan')):.2f}x), "
                f"base {r['model_mib']:6.1f} MiB ({r.get('model_vs_fp32', float('nan')):.2f}x)"
            )
        elif r:
            lines.append(f"memory {s}: {r.get('status')}: {r.get('error')}")
    for s, r in res.get("timing", {}).items():
        lines.append(f"step   {s:5s}: {r['step_ms']:7.0f} ms ({r['step_vs_fp32']:.2f}x fp32, interleaved)")
    gl = res.get("galore")
    if gl:
        lines.append(
            f"galore: AdamW {gl['adamw_bytes'] / 2**20:.1f} MiB, "
            f"GaLore r{gl['rank']} {gl['galore_bytes'] / 2**20:.2f} MiB "
            f"= {gl['galore_vs_adamw']:.4f}x (target <= {gl['target_vs_adamw']:.4f}x: "
            f"{'met' if gl['meets_target'] else 'NOT met'}; {gl['saving_pct']:.1f}% less), "
            f"8-bit {gl['galore_8bit_vs_adamw']:.4f}x"
        )
    lp = res.get("loraplus")
    if lp:
        for label in ("lora", "loraplus"):
            r = lp[label]
            reach = ", ".join(f"{level}: {step}" for level, step in r["steps_to"].items())
            lines.append(
                f"{label:8s}: acc {r['accuracy']:.3f}, mean loss of the last {lp['window']} steps "
                f"{r['last_mean_loss']:.3f}; steps until the {lp['window']}-step mean loss reaches {reach} "
                f"(of {r['steps']})"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps and a small demo split (a few minutes)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (every part, every worker)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    ap.add_argument(
        "--schemes", default=None, help=f"bases to compare (default: {','.join(SCHEMES)}; --quick: no hqq4)"
    )
    ap.add_argument("--batch", type=int, default=LMSetting.batch, help="SmolLM2 batch (sequences)")
    ap.add_argument("--seq", type=int, default=LMSetting.seq, help="SmolLM2 tokens per sequence")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every configuration")
    ap.add_argument("--ratio", type=float, default=16.0, help="LoRA+ ratio of B's to A's learning rate")
    ap.add_argument("--target-losses", default="0.65,0.6", help="LoRA+ vs LoRA: steps to these averaged losses")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per memory worker")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/bench_scale[_quick].json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    if args.worker:
        setting = LMSetting(**{**json.loads(args.setting), "schemes": ()})
        torch.set_num_threads(setting.threads)
        print("RESULT " + json.dumps(memory_worker(args.worker, setting)), flush=True)
        return
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {PARTS}")
    default_schemes = "fp32,nf4" if args.quick else ",".join(SCHEMES)  # hqq's solver: ~4 min for SmolLM2
    schemes = tuple(s for s in (args.schemes or default_schemes).split(",") if s)
    if "fp32" not in schemes or not set(schemes) <= set(SCHEMES):
        ap.error(f"--schemes: fp32 (the reference) and any of {SCHEMES}")
    setting = LMSetting(
        batch=args.batch, seq=args.seq, checkpointing=args.checkpointing, threads=args.threads, schemes=schemes
    )
    if args.quick:
        setting = dataclasses.replace(setting, batch=1, seq=32, warmup=1, steps=2, rounds=2)
    else:  # the 4-bit CPU matmuls dequantise every weight in every call: ~25 s a step on this machine
        setting = dataclasses.replace(setting, warmup=1, steps=3, rounds=3)
    out_path = args.out or RESULTS / ("bench_scale_quick.json" if args.quick else "bench_scale.json")
    res: dict[str, Any] = {"env": env_info(args.threads), "quick": args.quick, "setting": dataclasses.asdict(setting)}
    if set(parts) != set(PARTS) and out_path.is_file():  # a partial rerun replaces its parts of the saved results
        res = {
            **json.loads(out_path.read_text()),
            **res,
            "env_of_earlier_parts": json.loads(out_path.read_text())["env"],
        }
    t0 = time.perf_counter()
    if "galore" in parts:
        res["galore"] = galore()
    if "memory" in parts:
        res["memory"] = memory(setting, args.timeout)
    if "timing" in parts:
        res["timing"] = timing(setting)
    if "loraplus" in parts:
        res["loraplus"] = loraplus(args.quick, args.ratio, [float(v) for v in args.target_losses.split(",")])
    res["seconds"] = time.perf_counter() - t0
    res["summary"] = summary(res)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps(res, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)) + "\n"
    )
    print("\n".join(res["summary"]))
    print(f"wrote {out_path} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
