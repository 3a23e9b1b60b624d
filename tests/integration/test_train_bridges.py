"""Rank schedules run the same under our Trainer and under ``transformers.Trainer`` (HFAdapterCallback);
rank reports and their plot."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

import peftkit as pk
from peftkit.train import TrainConfig, Trainer
from peftkit.train.callbacks import add_param_groups
from peftkit.train.ranks import plot_ranks, rank_report

transformers = pytest.importorskip("transformers")


def examples(n: int = 48) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (n, 8), generator=g)
    labels = (ids[:, 0] >= 34).long()
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": y} for r, y in zip(ids, labels)]


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def dylora_model() -> tuple[pk.AdaptedModel, list[int]]:
    cfg = pk.get_config("dylora", r=4, alpha=8.0, targets=["query", "value"], seed=3)
    model = pk.adapt(tiny_bert(num_labels=2), cfg)
    seen: list[int] = []
    first = next(iter(model.adapter_modules("default").values()))
    first.register_forward_hook(lambda m, args, out: seen.append(m.rank) if m.training else None)
    return model, seen


def test_dylora_schedule_is_the_same_under_both_trainers(tmp_path) -> None:
    from peftkit.train.callbacks import HFAdapterCallback

    steps = 7
    ours, seen_ours = dylora_model()
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=1e-2, progress=False, shuffle=False, epochs=5)
    Trainer(ours, cfg, examples(), collate_fn=collate).fit()

    hf, seen_hf = dylora_model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_steps=100,
    )
    transformers.Trainer(model=hf, args=args, train_dataset=examples(), callbacks=[HFAdapterCallback()]).train()

    assert len(seen_ours) == len(seen_hf) == steps
    assert seen_ours == seen_hf
    assert seen_ours[0] == 1 and len(set(seen_ours)) > 1  # step(0) draws the first rank (seed 3: 1), then the rest


def test_sora_proximal_step_runs_under_hf_trainer(tmp_path) -> None:
    from peftkit.train.callbacks import HFAdapterCallback

    cfg = pk.get_config("sora", r=4, alpha=8.0, prox_lambda=100.0, targets=["query", "value"], seed=0)
    model = pk.adapt(tiny_bert(num_labels=2), cfg)
    assert set(rank_report(model).values()) == {4}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=examples(), callbacks=[HFAdapterCallback()]).train()
    assert set(rank_report(model).values()) == {0}  # λ₂ ≥ max|g|: every gate is exactly zero


def test_rank_report_and_plot(tmp_path) -> None:
    model = pk.adapt(tiny_bert(), pk.get_config("dylora", r=4, targets=["query", "value"]))
    want = {
        "encoder.layer.0.attention.self.query": 1,
        "encoder.layer.0.attention.self.value": 2,
        "encoder.layer.1.attention.self.query": 3,
        "encoder.layer.1.attention.self.value": 4,
    }
    for path, m in model.adapter_modules("default").items():
        m.set_rank(want[path])
    report = rank_report(model)
    assert report == want
    lora = pk.adapt(tiny_bert(), pk.LoRAConfig(r=3, targets=["query"]))
    assert set(rank_report(lora).values()) == {3}
    png = plot_ranks(report, tmp_path / "ranks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_report_skips_methods_without_rank() -> None:
    model = pk.adapt(tiny_bert(), pk.get_config("full", targets=["query"]))
    assert rank_report(model) == {}


def test_add_param_groups_extends_the_scheduler() -> None:
    p0 = torch.nn.Parameter(torch.zeros(3, 3))
    opt = torch.optim.AdamW([p0], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    new = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    assert add_param_groups(opt, new, weight_decay=0.1, lr_scheduler=sched) == 2
    assert add_param_groups(opt, new) == 0  # already there
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups[1:]] == [0.1, 0.0]
