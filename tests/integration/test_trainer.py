"""peftkit.train.Trainer on a tiny model built in code (fast, no assets)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from _tiny_lm import token_dataset, token_loss
from conftest import make_tiny_net
from safetensors.torch import load_file

import peftkit as pk
from peftkit.train import (
    Callback,
    NonFiniteGradientError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    TrainResult,
    lr_factor,
)


def dataset(n: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return token_dataset(n, seed)


loss_fn = token_loss


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


class Snapshots(Callback):
    """The trainable parameters after every optimizer step (index 0: before the first)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.after: list[dict[str, torch.Tensor]] = [trainable(model)]

    def on_step_end(self, trainer, logs) -> None:
        self.after.append(trainable(self.model))


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_nan_gradient_with_a_finite_loss_stops_before_the_update(max_grad_norm: float | None) -> None:
    # The loss stays finite; only fc1's A gets a NaN gradient, in the third backward. Before the fix the NaN
    # update was applied and step 4 failed with a NaN *loss* blaming the learning rate.
    model = adapted()
    a = model.adapter_modules("default")["fc1"].A
    calls = 0

    def poison(grad: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return grad * float("nan") if calls == 3 else grad

    a.register_hook(poison)
    snaps = Snapshots(model)
    trainer = Trainer(
        model,
        TrainConfig(lr=1e-2, batch_size=8, max_grad_norm=max_grad_norm, progress=False),
        dataset(),
        loss_fn=loss_fn,
        callbacks=[snaps],
    )
    with pytest.raises(NonFiniteGradientError, match=r"at step 3 \(epoch 1\) although the loss is finite") as info:
        trainer.fit()
    message = str(info.value)
    assert "in 1 of 6 trained tensors: model.fc1.adapters.default.A;" in message
    assert "parameters are those after step 2" in message and "learning rate" not in message
    assert trainer.global_step == 2 and len(snaps.after) == 3
    for name, value in trainable(model).items():  # exactly the parameters after step 2: no update applied
        assert torch.equal(value, snaps.after[2][name]), name
    assert all(p.grad is None for p in trainer.params)


def test_nan_gradients_everywhere_name_the_first_few() -> None:
    def loss_with_nan_grads(model, batch):
        # 0 * sqrt(0) is 0, but its gradient is 0 * inf = NaN in every trained tensor.
        zero = sum((p - p.detach()).sum() for p in model.parameters() if p.requires_grad)
        return loss_fn(model, batch) + 0.0 * torch.sqrt(zero)

    model = adapted()
    start = trainable(model)
    with pytest.raises(NonFiniteGradientError, match=r"at step 1 .* in 6 of 6 trained tensors") as info:
        fit(model, loss=loss_with_nan_grads)
    assert "model.fc1.adapters.default.A, model.fc1.adapters.default.B, model.fc2.adapters.default.A and 3 more" in str(
        info.value
    )
    assert all(torch.equal(v, start[n]) for n, v in trainable(model).items())


def test_a_huge_learning_rate_stops_as_diverged() -> None:
    # lr=1e6: the first loss is 1.09, every later one ~1e20 (finite). Before the fix the run "succeeded".
    with pytest.raises(TrainingDivergedError, match=r"from step 1 to step 30 stayed above 10x the first step's loss"):
        fit(adapted(), lr=1e6, epochs=10, batch_size=8)
    result = fit(adapted(), lr=1e6, epochs=10, batch_size=8, divergence_factor=None)  # the check can be turned off
    assert result.global_step == 80 and result.history[-1]["loss"] > 1e15


@pytest.mark.parametrize(("spike_windows", "diverges"), [(2, False), (3, True)])
def test_divergence_needs_patience_windows_in_a_row(spike_windows: int, diverges: bool) -> None:
    # The reported loss is 100x the true one during steps 11 .. 10 + 10 * spike_windows (windows of 10 steps),
    # then normal again: a spike shorter than divergence_patience=3 windows is tolerated.
    calls = 0

    def spiky(model, batch):
        nonlocal calls
        calls += 1
        return loss_fn(model, batch) * (100.0 if 10 < calls <= 10 + 10 * spike_windows else 1.0)

    model = adapted()
    if diverges:
        with pytest.raises(TrainingDivergedError, match="from step 11 to step 40"):
            fit(model, loss=spiky, epochs=8, batch_size=8)
    else:
        assert fit(model, loss=spiky, epochs=8, batch_size=8).global_step == 64


@pytest.mark.parametrize("lr", [1e-2, 3e-2, 1e-1])
def test_ordinary_runs_are_not_stopped_as_diverged(lr: float) -> None:
    # lr=0.1 is noisy (single steps up to ~2x the first loss) but does not diverge.
    result = fit(adapted(), lr=lr, epochs=10, batch_size=8, grad_accum=1)
    assert result.global_step == 80
    first = result.history[0]["loss"]
    assert max(h["loss"] for h in result.history) < 10 * first


def test_divergence_settings_are_validated() -> None:
    for bad in ({"divergence_factor": 1.0}, {"divergence_window": 0}, {"divergence_patience": 0}):
        with pytest.raises(ValueError, match="divergence"):
            TrainConfig(**bad)


def test_output_dir_that_is_a_file_fails_before_training(tmp_path) -> None:
    model = adapted()
    start = trainable(model)
    target = tmp_path / "ckpt"
    target.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        fit(model, output_dir=target)
    assert all(torch.equal(v, start[n]) for n, v in trainable(model).items())  # no step was taken


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


def test_checkpoints_hold_the_full_state_without_pickle(tmp_path) -> None:
    # Before: epoch-<n> folders with the adapter only (no optimizer, RNG or data position: no resume).
    model = adapted()
    result = fit(model, epochs=2, batch_size=32, output_dir=tmp_path)
    assert result.checkpoints == [tmp_path / "step-2", tmp_path / "step-4"]
    for path in result.checkpoints:
        files = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file())
        assert files == ["adapter/adapter.json", "adapter/adapter.safetensors", "trainer.json", "trainer.safetensors"]
    state = load_file(str(tmp_path / "step-4" / "trainer.safetensors"))
    moments = [k for k in state if k.startswith("optimizer.") and k.endswith(".exp_avg")]
    assert len(moments) == len(trainable(model)) and "rng.torch" in state and "data.generator" in state
    tensors = load_file(str(tmp_path / "step-4" / "adapter" / "adapter.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in trainable(model).values())
    reloaded = pk.load(make_tiny_net(), tmp_path / "step-4" / "adapter")
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
