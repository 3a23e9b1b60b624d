"""An AdaptedModel trains under Hugging Face ``transformers.Trainer`` (tiny BERT, a few steps)."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tiny_bert

import peftkit as pk

transformers = pytest.importorskip("transformers")


def examples(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (n, 8), generator=g)
    labels = (ids[:, 0] >= 34).long()  # the first token (what the pooler reads) decides the label
    return [
        # "idx" is not a forward argument: the Trainer must drop it (remove_unused_columns, default True).
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": label, "idx": torch.tensor(i)}
        for i, (row, label) in enumerate(zip(ids, labels))
    ]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    batch = {k: torch.stack([d[k] for d in data]) for k in ("input_ids", "attention_mask", "labels")}
    return model(**batch).loss.item()


def test_adapted_model_trains_under_hf_trainer(tmp_path) -> None:
    cfg = pk.LoRAConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"], seed=0)
    model = pk.adapt(tiny_bert(num_labels=2), cfg)
    assert {"input_ids", "attention_mask", "labels"} <= set(inspect.signature(model.forward).parameters)
    data = examples()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before = mean_loss(model, data)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=24,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    assert args.remove_unused_columns  # left at its default
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()

    after = mean_loss(model, data)
    assert after < before - 0.05, (before, after)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
        else:
            assert not torch.equal(p, adapter[n]), f"adapter weight {n} did not train"
    assert set(adapter) == {n for n, p in model.named_parameters() if p.requires_grad}
