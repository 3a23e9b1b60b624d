"""LoRA on the real all-MiniLM-L6-v2 for Rotten Tomatoes sentiment (``make demo``), on CPU in a few minutes.

The ``classify`` task of ``peftkit train`` from Python, on the Hugging Face classes: the packaged MiniLM
loaded as ``BertForSequenceClassification`` (its encoder and pooler, plus a new ``classifier`` head drawn from
the seed), the review snippets split by movie. Steps: measure held-out accuracy with the untrained head,
train LoRA (r=8 on query and value) together with the head (``modules_to_save``) for one epoch, measure
again, save the adapter, reload it into a freshly built base and check that the predictions are identical;
with Hugging Face PEFT installed, also export the adapter and check that plain ``PeftModel.from_pretrained``
gives the same logits.

    python examples/demo.py [--train 3000] [--held-out 1000] [--epochs 1] [--lr 2e-3]

The same run from the command line (a run folder, resumable, evaluable): ``peftkit train``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import peftkit as pk
from peftkit.train import Trainer
from peftkit.train.build import build, load_base
from peftkit.train.run import settings_from


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits


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
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices between PEFT and transformers

    t0, c0 = time.perf_counter(), time.process_time()
    spec = settings_from(
        r=args.r, alpha=2 * args.r, targets="query,value", lr=args.lr, epochs=args.epochs,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        max_train_samples=args.train, max_eval_samples=args.held_out, overrides={"log_every": None},
    )  # fmt: skip
    built = build(spec)  # packaged MiniLM + Rotten Tomatoes split by movie, tokenised
    print(f"data: {len(built.train)} train / {len(built.held_out)} held-out snippets (split by movie)")
    for note in built.notes:
        print(note)
    model = pk.adapt(built.model, built.adapter_config)
    report = model.trainable_parameters()
    print(f"trainable parameters: {report.trainable:,} of {report.total:,} ({report.percent:.2f}%)")

    t = time.perf_counter()
    before = built.evaluate(model)["accuracy"]
    print(f"held-out accuracy, untrained head: {before:.3f}  ({time.perf_counter() - t:.0f} s)")

    result = Trainer(model, spec.train_config(), built.train, collate_fn=built.collate).fit()
    print(f"trained {result.global_step} steps in {result.seconds:.0f} s, last loss {result.history[-1]['loss']:.3f}")

    t = time.perf_counter()
    after = built.evaluate(model)["accuracy"]
    print(f"held-out accuracy, after LoRA + head: {after:.3f}  ({time.perf_counter() - t:.0f} s)")

    probe = built.collate(built.held_out[:64])
    expected = logits(model, probe)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save(args.out or Path(tmp) / "adapter")
        size = sum(f.stat().st_size for f in Path(path).iterdir())
        fresh, _, _ = load_base(spec, progress=False)  # the same base and seeded head, rebuilt
        same = torch.equal(expected, logits(pk.load(fresh, path), probe))
        assert same, "the adapter reloaded into a fresh base predicts differently"
        print(f"adapter saved to {path} ({size / 1e6:.2f} MB); reloaded into a fresh base: identical logits")
        if importlib.util.find_spec("peft") is not None:
            from peft import PeftModel
            from transformers import AutoModelForSequenceClassification
            from transformers.utils import logging

            logging.set_verbosity_error()  # its load report of the (replaced) random head

            pk.export_peft(model, Path(tmp) / "peft", task_type="SEQ_CLS")
            base = AutoModelForSequenceClassification.from_pretrained(fresh.config.name_or_path, num_labels=2)
            peft_logits = logits(PeftModel.from_pretrained(base, Path(tmp) / "peft"), probe)
            gap = float((peft_logits - expected).abs().max())
            assert gap < 1e-4, f"plain PEFT gives other logits (max difference {gap:.2g})"
            print(f"exported to PEFT; plain PeftModel.from_pretrained gives the same logits (max diff {gap:.1e})")
    assert after > before + 0.1, f"training did not help enough: {before:.3f} -> {after:.3f}"
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"total time: {wall:.0f} s wall, {cpu:.0f} s CPU on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
