"""LoRA on the real all-MiniLM-L6-v2 for Rotten Tomatoes sentiment (``make demo``), on CPU in a few minutes.

Steps: load the packaged MiniLM and the review snippets (train / held-out split by movie), add a linear head
(built from a fixed seed), measure held-out accuracy with the untrained head, train LoRA (r=8 on query and
value) together with the head (``modules_to_save``) for one epoch, measure again, save the adapter, reload it
into a freshly built base and check that the predictions are identical.

    python examples/demo.py [--train 3000] [--held-out 1000] [--epochs 1] [--lr 2e-3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import peftkit as pk
from peftkit.assets import load_minilm, rotten_tomatoes
from peftkit.train import TrainConfig, Trainer
from peftkit.train.tasks import SentenceClassifier, TextCollator, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=3000, help="training snippets")
    parser.add_argument("--held-out", type=int, default=1000, help="held-out snippets (other movies)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per snippet (truncation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="adapter folder (default: a temporary folder)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress lines appear in order

    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)
    split = rotten_tomatoes(seed=args.seed, max_train=args.train, max_held_out=args.held_out)
    encoder, tokenizer = load_minilm()
    collate = TextCollator(tokenizer, max_length=args.max_length)
    print(f"data: {len(split.train)} train / {len(split.held_out)} held-out snippets (split by movie)")

    config = pk.LoRAConfig(r=args.r, alpha=2 * args.r, targets=["query", "value"], modules_to_save=["head"])
    model = pk.adapt(SentenceClassifier(encoder, num_labels=2, head_seed=args.seed), config)
    report = model.trainable_parameters()
    print(f"trainable parameters: {report.trainable:,} of {report.total:,} ({report.percent:.2f}%)")

    t = time.perf_counter()
    labels = torch.tensor([label for _, label in split.held_out])
    before = (predict(model, split.held_out, collate) == labels).float().mean().item()
    print(f"held-out accuracy, untrained head: {before:.3f}  ({time.perf_counter() - t:.0f} s)")

    train_config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.06, seed=args.seed
    )
    result = Trainer(model, train_config, split.train, collate_fn=collate).fit()
    print(f"trained {result.global_step} steps in {result.seconds:.0f} s, last loss {result.history[-1]['loss']:.3f}")

    t = time.perf_counter()
    preds = predict(model, split.held_out, collate)
    after = (preds == labels).float().mean().item()
    print(f"held-out accuracy, after LoRA + head: {after:.3f}  ({time.perf_counter() - t:.0f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        path = model.save(args.out or Path(tmp) / "adapter")
        size = sum(f.stat().st_size for f in Path(path).iterdir())
        fresh_encoder, _ = load_minilm()
        reloaded = pk.load(SentenceClassifier(fresh_encoder, num_labels=2, head_seed=args.seed), path)
        same = torch.equal(preds, predict(reloaded, split.held_out, collate))
    assert same, "the adapter reloaded into a fresh base predicts differently"
    print(f"adapter saved to {path} ({size / 1e6:.2f} MB); reloaded into a fresh base: identical predictions")
    assert after > before + 0.1, f"training did not help enough: {before:.3f} -> {after:.3f}"
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"total time: {wall:.0f} s wall, {cpu:.0f} s CPU on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
