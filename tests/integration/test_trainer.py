"""peftkit.train.Trainer on a tiny model built in code (fast, no assets)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_net
from safetensors.torch import load_file

import peftkit as pk
from peftkit.train import Callback, NonFiniteLossError, TrainConfig, Trainer, TrainResult, lr_factor


def dataset(n: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token sequences; the label says whether the mean token id is high (learnable through mean pooling)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, 6), generator=g)
    return [(row, (row.float().mean() > 19.5).long()) for row in ids]


def loss_fn(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    ids, labels = batch
    return F.cross_entropy(model(ids), labels)


def adapted() -> pk.AdaptedModel:
    cfg = pk.LoRAConfig(r=4, alpha=8, targets=["fc1", "fc2"], modules_to_save=["head"], seed=0)
    return pk.adapt(make_tiny_net(), cfg)


def fit(model: pk.AdaptedModel, **kw: Any) -> TrainResult:
    data = kw.pop("data", None) or dataset()
    loss = kw.pop("loss", loss_fn)
    kw.setdefault("progress", False)
    kw.setdefault("lr", 1e-2)
    return Trainer(model, TrainConfig(**kw), data, loss_fn=loss).fit()


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_decreases_and_only_adapter_params_change() -> None:
    model = adapted()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = trainable(model)
    result = fit(model, epochs=8, batch_size=16, lr=3e-2)
    assert result.global_step == 8 * 4
    assert result.epochs[-1]["train_loss"] < 0.7 * result.epochs[0]["train_loss"]
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    changed = [n for n, p in model.named_parameters() if n in start and not torch.equal(p, start[n])]
    assert changed and len(changed) == len(start)


def test_gradient_accumulation_matches_the_big_batch() -> None:
    a, b = adapted(), adapted()
    fit(a, batch_size=16, grad_accum=1, epochs=2, max_grad_norm=None)
    fit(b, batch_size=4, grad_accum=4, epochs=2, max_grad_norm=None)
    for (n, pa), pb in zip(trainable(a).items(), trainable(b).values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=n)


def test_partial_accumulation_window_at_epoch_end() -> None:
    # 10 micro-batches with grad_accum=4: steps of 4, 4 and 2 micro-batches.
    result = fit(adapted(), data=dataset(40), batch_size=4, grad_accum=4)
    assert result.global_step == 3


def test_gradients_are_clipped() -> None:
    model = adapted()
    trainer = Trainer(model, TrainConfig(lr=1e-2, max_grad_norm=1e-3, progress=False), dataset(), loss_fn=loss_fn)
    norms: list[float] = []
    step = trainer.optimizer.step

    def checked_step(*args, **kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params])).item())
        return step(*args, **kwargs)

    trainer.optimizer.step = checked_step
    result = trainer.fit()
    assert norms and max(norms) <= 1e-3 * (1 + 1e-4)
    assert all(h["grad_norm"] > 1e-3 for h in result.history)  # the recorded norm is the one before clipping


def test_nan_loss_stops_with_the_step_named() -> None:
    calls = 0

    def poisoned(model, batch):
        nonlocal calls
        calls += 1
        loss = loss_fn(model, batch)
        return loss * float("nan") if calls == 3 else loss

    model = adapted()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 \(epoch 1, micro-batch 3"):
        fit(model, batch_size=8, loss=poisoned)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dylora_first_step_trains_a_drawn_rank() -> None:
    # seed=3 draws rank 1 for step 0 (not r=4): before the fix the first step trained rank r, undrawn.
    def dylora() -> pk.AdaptedModel:
        cfg = pk.get_config("dylora", r=4, alpha=8.0, targets=["fc1", "fc2"], seed=3)
        return pk.adapt(make_tiny_net(), cfg)

    model = dylora()
    seen: list[int] = []
    module = model.adapter_modules("default")["fc1"]
    module.register_forward_hook(lambda m, args, out: seen.append(m.rank) if m.training else None)
    fit(model, batch_size=8, max_steps=6)
    probe = dylora().adapter_modules("default")["fc1"]
    drawn = []
    for step in range(6):  # the rank step(s) draws for the optimizer step after s steps
        probe.step(step)
        drawn.append(probe.train_rank)
    assert seen == drawn
    assert seen[0] == 1 != module.config.r


def test_checkpoints_hold_only_the_adapter(tmp_path) -> None:
    model = adapted()
    result = fit(model, epochs=2, batch_size=32, output_dir=tmp_path)
    assert result.checkpoints == [tmp_path / "epoch-1", tmp_path / "epoch-2"]
    for path in result.checkpoints:
        assert sorted(f.name for f in path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    tensors = load_file(str(tmp_path / "epoch-2" / "adapter.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in trainable(model).values())
    reloaded = pk.load(make_tiny_net(), tmp_path / "epoch-2")
    ids = torch.stack([x for x, _ in dataset(8)])
    torch.testing.assert_close(reloaded(ids), model(ids))


def test_same_seed_same_run_other_seed_other_run() -> None:
    r1, r2, r3 = (fit(adapted(), batch_size=8, seed=s) for s in (0, 0, 1))
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]
    assert [h["loss"] for h in r1.history] != [h["loss"] for h in r3.history]


def test_callbacks_eval_and_adapter_step_hook() -> None:
    model = adapted()
    seen: list[int] = []
    for adapter in model.adapter_modules("default").values():
        adapter.step = seen.append  # the trainer calls every adapter module once per optimizer step
    n_modules = len(model.adapter_modules("default"))

    class Recorder(Callback):
        def __init__(self) -> None:
            self.events: list[str] = []

        def on_train_begin(self, trainer) -> None:
            self.events.append("begin")

        def on_step_end(self, trainer, logs) -> None:
            self.events.append("step")
            assert {"loss", "lr", "grad_norm", "samples_per_s"} <= set(logs)

        def on_epoch_end(self, trainer, logs) -> None:
            self.events.append("epoch")
            if logs["epoch"] == 2:
                trainer.should_stop = True

        def on_train_end(self, trainer, result) -> None:
            self.events.append("end")

    rec = Recorder()
    cfg = TrainConfig(lr=1e-2, epochs=5, batch_size=32, progress=False)
    result = Trainer(model, cfg, dataset(), loss_fn=loss_fn, eval_fn=lambda m: {"acc": 0.5}, callbacks=[rec]).fit()
    assert rec.events == ["begin", "step", "step", "epoch", "step", "step", "epoch", "end"]
    assert result.stopped_early and result.global_step == 4
    assert [e["acc"] for e in result.epochs] == [0.5, 0.5]
    # step(0) before the first optimizer step, then step(n) after the n-th.
    assert seen == [s for s in (0, 1, 2, 3, 4) for _ in range(n_modules)]


def test_max_steps_and_the_progress_bar_run() -> None:
    result = fit(adapted(), batch_size=8, max_steps=3, progress=True)
    assert result.global_step == 3 and len(result.history) == 3


def test_schedules() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine")
    factors = [lr_factor(s, 20, cfg) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and math.isclose(factors[-1], 0.0, abs_tol=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    linear = TrainConfig(schedule="linear", min_lr_ratio=0.1)
    assert lr_factor(0, 11, linear) == 1.0 and math.isclose(lr_factor(10, 11, linear), 0.1)
    assert lr_factor(7, 11, TrainConfig(schedule="constant")) == 1.0


def test_weight_decay_only_on_matrices() -> None:
    trainer = Trainer(adapted(), TrainConfig(weight_decay=0.1, progress=False), dataset(), loss_fn=loss_fn)
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(trainable(trainer.model))
