"""Per-step adapter schedules already hold for the first optimizer step: both trainers call
``step_adapters(0)`` before it (DyLoRA draws the first step's rank), not only after each step."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

import peftkit as pk
from peftkit.train import TrainConfig, Trainer

transformers = pytest.importorskip("transformers")

STEPS = 5


def examples(n: int = 48) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (n, 8), generator=g)
    labels = (ids[:, 0] >= 34).long()
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": y} for r, y in zip(ids, labels)]


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def dylora() -> tuple[pk.AdaptedModel, list[int]]:
    """DyLoRA r=4 with seed 3, whose draw for step 0 is rank 1 (not r); records the rank of every training
    forward of one module."""
    cfg = pk.get_config("dylora", r=4, alpha=8.0, targets=["query", "value"], seed=3)
    model = pk.adapt(tiny_bert(num_labels=2), cfg)
    seen: list[int] = []
    first = next(iter(model.adapter_modules("default").values()))
    first.register_forward_hook(lambda m, args, out: seen.append(m.rank) if m.training else None)
    return model, seen


def drawn_ranks(n: int) -> list[int]:
    """The ranks ``step(0) .. step(n - 1)`` draw: the ranks of optimizer steps 1 .. n."""
    probe = next(iter(dylora()[0].adapter_modules("default").values()))
    ranks = []
    for step in range(n):
        probe.step(step)
        ranks.append(probe.train_rank)
    return ranks


def test_dylora_first_step_under_our_trainer() -> None:
    model, seen = dylora()
    cfg = TrainConfig(max_steps=STEPS, batch_size=8, lr=1e-2, progress=False, shuffle=False, epochs=5)
    Trainer(model, cfg, examples(), collate_fn=collate).fit()
    assert seen == drawn_ranks(STEPS)
    assert seen[0] == 1  # before the fix: 4 (= r, never drawn)


def test_dylora_first_step_under_hf_trainer(tmp_path) -> None:
    from peftkit.train.callbacks import HFAdapterCallback

    model, seen = dylora()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_steps=100,
    )
    transformers.Trainer(model=model, args=args, train_dataset=examples(), callbacks=[HFAdapterCallback()]).train()
    assert seen == drawn_ranks(STEPS)
    assert seen[0] == 1
