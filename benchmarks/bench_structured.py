"""Structured, sparse, frequency-domain and Kronecker adapters on the demo task (issue 5), next to LoRA, each in
a fresh process (see ``benchmarks/demo_task.py``), plus two side-by-side measurements in one process:

* SHiRA adapter switch (scatter of its indices + values into the base weights and out again) versus LoRA's
  fuse / unfuse (``merge(unload=False)`` / ``unmerge()``), on MiniLM's attention linears;
* PaCA versus LoRA at equal trainable parameters on every linear layer of MiniLM: interleaved step time and
  the bytes of tensors saved for backward (``saved_tensors_hooks``).

    python benchmarks/bench_structured.py            # all methods + both measurements (~15-45 min)
    python benchmarks/bench_structured.py --quick    # smoke run
    python benchmarks/bench_structured.py --only LoRA,SHiRA --no-extras

Writes ``benchmarks/results/structured.{json,md,png}``. Every method adapts MiniLM's ``query`` and ``value``
and trains the head through ``modules_to_save``; size knobs are set so the update budget is close to LoRA
r=8 (6,144 parameters per 384×384 layer) where the method has one, and stated in the table.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_task import Context, Run, config_of, main

import peftkit as pk
from peftkit.train import Callback, Trainer

ATTENTION = ["query", "key", "value", "attention.output.dense"]


class SNELLAReallocation(Callback):
    """SNELLA's across-layer competition (``reallocate``), every ``every`` optimizer steps: the official code
    calls it once per epoch; this benchmark trains one epoch, so it runs it within the epoch (decision)."""

    def __init__(self, model: nn.Module, total: int, every: int) -> None:
        from peftkit.methods.snell import SNELLA

        self.adapters = [m for m in model.adapter_modules("default").values() if isinstance(m, SNELLA)]
        self.total, self.every = total, every

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        from peftkit.methods.snell import reallocate

        if trainer.global_step % self.every == 0:
            reallocate(self.adapters, trainer.global_step, self.total)


def snella_callbacks(model: nn.Module, ctx: Context) -> list[Callback]:
    return [SNELLAReallocation(model, ctx.budget.steps, max(1, ctx.budget.steps // 6))]


RUNS: list[Run] = [
    Run("LoRA", config_of("lora", r=8, alpha=16), "r=8, α=16"),
    # the floor: only the head trains (full fine-tuning of the 770 head parameters, encoder frozen)
    Run("head only", config_of("full", targets=["head"], modules_to_save=[]), "the head alone, encoder frozen"),
    Run("SHiRA", config_of("shira", r=8), "r=8: 6,144 random entries/layer"),
    Run("PaCA", config_of("paca", r=16, alpha=16), "16 input columns (6,144/layer)"),
    Run("RandLoRA", config_of("randlora", r=32), "r=32 bases (defaults)"),
    Run("FourierFT", config_of("fourierft", n_frequency=6144), "6,144 frequencies, scaling 150"),
    Run("LoCA", config_of("loca", n_frequency=6144, total_steps=lambda b: b.steps), "6,144 DCT coefs + locations"),
    Run("WaRA", config_of("wara", r=16, alpha=32), "r=16, α=32 (half-size factors)"),
    Run("QWHA", config_of("qwha", n_frequency=6144), "6,144 WHT coefs (float base)"),
    Run("Bone", config_of("miss", r=16, mode="bat"), "MiSS mode=bat, 16×16 blocks"),
    Run("MiSS", config_of("miss", r=16), "r=16 (16×384 shard)"),
    Run("KronA", config_of("krona"), "near-square factors (default)"),
    Run("DiffuseKronA", config_of("diffusekrona"), "a1=64, a2=8 (default)"),
    Run("SoKA", config_of("soka"), "k_max=8, τ=0.9 (default)"),
    Run("TLoRA", config_of("tlora"), "3 cores, ranks 4/8 (default)"),
    Run("SNELL", config_of("snell", low_rank_dim=8), "q=8 kernel factors"),
    Run(
        "SNELLA",
        config_of("snella", low_rank_dim=8),
        "q=8, target sparsity 0.3, reallocate 6×",
        callbacks=snella_callbacks,
    ),
    Run("SST", config_of("sst", r=8, round_steps=lambda b: max(1, b.steps // 3)), "r=8 vectors, 3 rounds"),
    Run("LoKr", config_of("lokr", r=8, alpha=16), "r=8, α=16"),
    Run("LoHa", config_of("loha", r=4, alpha=8), "r=4 (two pairs), α=8"),
]


# ------------------------------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, called in turn (A, B, A, B, ...) so load drifts hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _minilm() -> nn.Module:
    from peftkit.assets import load_minilm

    torch.manual_seed(0)
    return load_minilm()[0]


@torch.no_grad()
def bench_switch(repeats: int) -> dict[str, Any]:
    """SHiRA switch vs LoRA fuse/unfuse on MiniLM's 24 attention linears (384×384), one thread.

    * LoRA r=8: ``merge(unload=False)`` (``W += s·B A`` per layer) then ``unmerge()``.
    * SHiRA r=8 (6,144 entries per layer, the same count as LoRA r=8): the core's ``merge(unload=False)`` /
      ``unmerge()`` (through ``sparse_delta``: only the masked entries are written), and the bare switch the
      paper describes: ``W.index_put_(idx, ±values, accumulate=True)`` on the stored indices, nothing dense.
    """
    encoder = _minilm()
    lora = pk.adapt(copy.deepcopy(encoder), pk.LoRAConfig(r=8, alpha=16, targets=ATTENTION))
    shira = pk.adapt(copy.deepcopy(encoder), pk.get_config("shira", r=8, init="randn", targets=ATTENTION))
    for p in lora.parameters():
        if p.requires_grad:
            p.normal_()  # B = 0 at init: give the fuse real values (the timing does not depend on them)
    pairs = []
    for path, adapter in shira.adapter_modules("default").items():
        view = shira.base_view(path)  # view.weight is the base module's weight itself ([out, in] for a Linear)
        delta = adapter.sparse_delta(view)  # the stored indices and scaled values: what a SHiRA switch scatters
        pairs.append((view.weight, delta.positions, delta.values.detach()))

    def lora_fuse() -> None:
        lora.merge(unload=False)
        lora.unmerge()

    def shira_core() -> None:
        shira.merge(unload=False)
        shira.unmerge()

    def shira_scatter() -> None:
        for weight, index, values in pairs:
            weight.index_put_(index, values, accumulate=True)
        for weight, index, values in pairs:
            weight.index_put_(index, -values, accumulate=True)

    before = [w.clone() for w, _, _ in pairs]
    med = interleaved(
        {"lora_fuse_unfuse": lora_fuse, "shira_core_merge_unmerge": shira_core, "shira_scatter": shira_scatter},
        repeats,
    )
    drift = max(float((w - b).abs().max()) for (w, _, _), b in zip(pairs, before))
    return {
        "layers": len(pairs),
        "adapter_entries_per_layer": int(pairs[0][2].numel()),
        "repeats": repeats,
        "ms": {k: 1000 * v for k, v in med.items()},
        "shira_scatter_vs_lora": med["shira_scatter"] / med["lora_fuse_unfuse"],
        "shira_core_vs_lora": med["shira_core_merge_unmerge"] / med["lora_fuse_unfuse"],
        "scatter_roundtrip_max_abs_error": drift,
    }


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``fn()`` (activations and weights)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(storages.values())


def bench_paca(repeats: int, rows: int, tokens: int) -> dict[str, Any]:
    """PaCA vs LoRA r=8 on every linear of MiniLM's encoder layers (attention and FFN, 36 layers), with PaCA's
    column count set so the totals match (PaCA trains ``r·d_out`` per layer, LoRA ``r·(d_in + d_out)``):
    interleaved step time (forward, backward, AdamW) and the bytes autograd saves for backward."""
    if "paca" not in pk.list_methods():
        return {"status": "missing", "error": "method 'paca' is not registered"}
    encoder = _minilm()
    linears = [
        (n, m) for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and ".layer." in n
    ]  # the 36 encoder linears (not the pooler)
    targets = "|".join(rf"^{n}$" for n, _ in linears)
    lora_total = sum(8 * (m.in_features + m.out_features) for _, m in linears)
    paca_r = round(lora_total / sum(m.out_features for _, m in linears))
    models = {
        "lora": pk.adapt(copy.deepcopy(encoder), pk.LoRAConfig(r=8, alpha=16, targets=targets)),
        "paca": pk.adapt(copy.deepcopy(encoder), pk.get_config("paca", r=paca_r, alpha=paca_r, targets=targets)),
    }
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (rows, tokens), generator=g),
        "attention_mask": torch.ones(rows, tokens, dtype=torch.long),
    }
    steps = {}
    saved = {}
    for name, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def loss(model: nn.Module = model) -> torch.Tensor:
            return model(**batch).last_hidden_state.pow(2).mean()

        def step(loss: Callable[[], torch.Tensor] = loss, opt: torch.optim.Optimizer = opt) -> None:
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
        saved[name] = _saved_bytes(loss)
        opt.zero_grad(set_to_none=True)
    med = interleaved(steps, repeats)
    return {
        "status": "ok",
        "layers": len(linears),
        "batch": [rows, tokens],
        "lora_r": 8,
        "paca_r": paca_r,
        "trainable": {k: m.trainable_parameters().trainable for k, m in models.items()},
        "step_ms": {k: 1000 * v for k, v in med.items()},
        "paca_step_vs_lora": med["paca"] / med["lora"],
        "saved_for_backward_mib": {k: v / 2**20 for k, v in saved.items()},
        "paca_saved_vs_lora": saved["paca"] / saved["lora"],
        "repeats": repeats,
    }


def extras(args: Any) -> dict[str, Any]:
    if args.no_extras:
        return {}
    reps = 5 if args.quick else 21
    out: dict[str, Any] = {"switch": bench_switch(reps)}
    print(f"switch: {out['switch']['ms']}", flush=True)
    out["paca_vs_lora"] = bench_paca(3 if args.quick else 9, 4 if args.quick else 16, 16 if args.quick else 64)
    print(f"paca: {out['paca_vs_lora']}", flush=True)
    return out


def extras_markdown(ex: dict[str, Any]) -> str:
    lines: list[str] = []
    sw = ex.get("switch")
    if sw:
        ms = sw["ms"]
        lines += [
            f"## Adapter switch, MiniLM attention linears ({sw['layers']} × 384×384, "
            f"{sw['adapter_entries_per_layer']:,} entries / LoRA r=8 per layer; median of {sw['repeats']}, "
            "interleaved, one thread)",
            "",
            "| switch (in + out) | ms | vs LoRA fuse/unfuse |",
            "|---|---:|---:|",
            f"| LoRA `merge(unload=False)` + `unmerge()` | {ms['lora_fuse_unfuse']:.2f} | 1.00x |",
            f"| SHiRA `merge(unload=False)` + `unmerge()` (dense ΔW built by scatter) "
            f"| {ms['shira_core_merge_unmerge']:.2f} | {sw['shira_core_vs_lora']:.2f}x |",
            f"| SHiRA scatter `index_put_(±values)` on the stored indices | {ms['shira_scatter']:.2f} "
            f"| {sw['shira_scatter_vs_lora']:.2f}x |",
            "",
            f"(scatter in + out leaves the weights within {sw['scatter_roundtrip_max_abs_error']:.1e} of the "
            "original: float32 rounding of w + v − v)",
        ]
    pc = ex.get("paca_vs_lora")
    if pc:
        lines += [""]
        if pc.get("status") != "ok":
            lines += [f"## PaCA vs LoRA: {pc.get('status')} ({pc.get('error')})"]
        else:
            t = pc["trainable"]
            lines += [
                f"## PaCA vs LoRA at equal trainable parameters (MiniLM, {pc['layers']} encoder linears, batch "
                f"{pc['batch'][0]}×{pc['batch'][1]}, median of {pc['repeats']} interleaved steps)",
                "",
                "| | trainable | step ms | saved for backward MiB |",
                "|---|---:|---:|---:|",
                f"| LoRA r=8 | {t['lora']:,} | {pc['step_ms']['lora']:.0f} | "
                f"{pc['saved_for_backward_mib']['lora']:.1f} |",
                f"| PaCA r={pc['paca_r']} columns | {t['paca']:,} | {pc['step_ms']['paca']:.0f} | "
                f"{pc['saved_for_backward_mib']['paca']:.1f} |",
                f"| PaCA / LoRA | {t['paca'] / t['lora']:.2f}x | {pc['paca_step_vs_lora']:.2f}x | "
                f"{pc['paca_saved_vs_lora']:.2f}x |",
            ]
    return "\n".join(lines)


if __name__ == "__main__":
    # --no-extras is this script's own flag; the shared parser (demo_task.parse_args) does not know it
    no_extras = "--no-extras" in sys.argv
    if no_extras:
        sys.argv.remove("--no-extras")

    def run_extras(args: Any) -> dict[str, Any]:
        args.no_extras = no_extras
        return extras(args)

    main("structured", RUNS, (__doc__ or "").splitlines()[0], extras=run_extras, extras_markdown=extras_markdown)
