"""peftkit.federated.privacy: per-example gradients of peftkit adapters equal one backward per example; the DP
optimizer steps with the mean of per-example gradients clipped to norm C (each ≤ C), plus noise of standard
deviation σ·C/B; the accountant's ε grows with the steps and meets a target; unreachable targets, bad settings,
adapter dropout are refused."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_bert

import peftkit as pk
from peftkit.federated.errors import FederatedOptionError, PrivacyBudgetError
from peftkit.federated.privacy import (
    PerSampleGradients,
    PrivacySettings,
    UserPrivacy,
    client_delta,
    epsilon_spent,
    make_private,
    noise_multiplier,
    sample_rate,
)
from peftkit.train import TrainConfig, Trainer

pytest.importorskip("opacus")


def model_and_data(method: str = "lorasb", n: int = 8, dropout: float = 0.0) -> tuple[pk.AdaptedModel, list]:
    base = tiny_bert(num_labels=2)
    for m in base.modules():  # no dropout in the base, so one-example backward passes see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = pk.get_config(method, r=4, alpha=4.0, targets=["query", "value"], modules_to_save=["classifier"],
                        dropout=dropout)  # fmt: skip
    model = pk.adapt(base, cfg)
    with torch.no_grad():  # a non-zero LoRA B, so A's gradient is not zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(5, 60, (6,), generator=g), "labels": torch.tensor(i % 2)} for i in range(n)]
    return model, data


def one_by_one(model: pk.AdaptedModel, data: list) -> dict[str, torch.Tensor]:
    """Per-example gradients by one backward per example."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for example in data:
        model.zero_grad()
        model(input_ids=example["input_ids"][None], labels=example["labels"][None]).loss.backward()
        for n, p in params.items():
            out[n].append(p.grad.detach().clone())
    model.zero_grad()
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("method", ["lorasb", "lora"])
def test_per_example_gradients_equal_one_backward_per_example(method: str) -> None:
    model, data = model_and_data(method, n=5)
    model.train()
    expected = one_by_one(model, data)
    batch = {
        "input_ids": torch.stack([d["input_ids"] for d in data]),
        "labels": torch.stack([d["labels"] for d in data]),
    }
    with PerSampleGradients(model):
        model(**batch).loss.backward()  # mean loss: grad_sample is each example's own gradient
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = expected[name]
            torch.testing.assert_close(p.grad_sample, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
            del p.grad_sample
    assert len(expected) == (4 if method == "lorasb" else 8) + 2


def _first_step_gradient(sigma: float, clip: float, seed: int = 0) -> tuple[list[torch.Tensor], list, Trainer]:
    """The gradients the DP optimizer hands AdamW at the first step, the model's per-example gradients, the trainer."""
    model, data = model_and_data(n=8)
    model.train()
    per_example = one_by_one(model, data[:4])
    trainer = Trainer(model, TrainConfig(batch_size=4, max_grad_norm=None, shuffle=False, max_steps=1, progress=False),
                      data)  # fmt: skip
    seen: list[torch.Tensor] = []
    with make_private(trainer, PrivacySettings(noise_multiplier=max(sigma, 1e-9), max_grad_norm=clip), sigma,
                      seed=seed) as engine:  # fmt: skip
        inner = trainer.optimizer.original_optimizer
        step = inner.step

        def spy(*args, **kwargs):
            seen.extend(p.grad.detach().clone() for p in trainer.params)
            return step(*args, **kwargs)

        inner.step = spy
        trainer.fit()
        assert engine.accountant.history[0][2] == 1  # one step accounted
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return seen, [per_example[n] for n in names], trainer


def test_dp_step_is_the_mean_of_per_example_gradients_clipped_to_c() -> None:
    clip = 0.05
    seen, per_example, _ = _first_step_gradient(sigma=0.0, clip=clip)
    flat = torch.cat([g.flatten(1) for g in per_example], dim=1)  # [4 examples, all trained entries]
    norms = flat.norm(dim=1)
    assert (norms > clip).all()  # clipping is active for every example
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = flat * factors[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-5)).all()
    got = torch.cat([g.flatten() for g in seen])
    torch.testing.assert_close(got, clipped.mean(0), rtol=1e-4, atol=1e-6 * float(clipped.abs().max()))


def test_dp_noise_has_standard_deviation_sigma_c_over_b() -> None:
    clip, sigma = 0.05, 2.0
    clean = torch.cat([g.flatten() for g in _first_step_gradient(0.0, clip)[0]])
    noisy = torch.cat([g.flatten() for g in _first_step_gradient(sigma, clip, seed=1)[0]])
    std = float((noisy - clean).std())
    assert clean.numel() == 4 * 16 + 2 * 32 + 2
    assert std == pytest.approx(sigma * clip / 4, rel=0.2)  # 130 draws: ±20 % covers sampling error


def test_epsilon_grows_with_steps_and_meets_a_target() -> None:
    rate, delta = sample_rate(100, 10), 1e-3
    assert rate == 0.1
    eps = [epsilon_spent(1.0, rate, steps, delta) for steps in (0, 10, 50, 200)]
    assert eps[0] == 0 and eps[1] < eps[2] < eps[3]
    settings = PrivacySettings(epsilon=3.0)
    sigma = noise_multiplier(settings, rate, 200, delta)
    assert 2.9 <= epsilon_spent(sigma, rate, 200, delta) <= 3.0
    assert noise_multiplier(settings, rate, 400, delta) > sigma  # more steps need more noise for the same epsilon
    assert client_delta(settings, 50) == 1 / 50 and client_delta(PrivacySettings(epsilon=1, delta=1e-6), 50) == 1e-6


def test_the_engine_accounts_earlier_rounds() -> None:
    model, data = model_and_data(n=8)
    settings = PrivacySettings(noise_multiplier=1.0, max_grad_norm=0.1)
    trainer = Trainer(model, TrainConfig(batch_size=4, max_grad_norm=None, progress=False), data)
    with make_private(trainer, settings, 1.0, prior_steps=6, seed=0) as engine:
        trainer.fit()
        eps = engine.get_epsilon(1e-3)
    assert eps == pytest.approx(epsilon_spent(1.0, 0.5, 8, 1e-3), rel=1e-9)
    assert eps > epsilon_spent(1.0, 0.5, 2, 1e-3)
    assert all(getattr(p, "grad_sample", None) is None for p in trainer.params)
    assert type(trainer.optimizer).__name__ == "AdamW"  # restored


def test_an_unreachable_epsilon_is_refused() -> None:
    with pytest.raises(PrivacyBudgetError, match=r"no noise level reaches epsilon=1e-06 .* after 1000 DP-SGD steps"):
        noise_multiplier(PrivacySettings(epsilon=1e-6), 1.0, 1000, 1e-5)
    assert isinstance(PrivacyBudgetError("x"), ValueError)


def test_bad_settings_and_dp_with_adapter_dropout_are_refused() -> None:
    with pytest.raises(FederatedOptionError, match="exactly one"):
        PrivacySettings()
    with pytest.raises(FederatedOptionError, match="max_grad_norm must be a positive number"):
        PrivacySettings(epsilon=1.0, max_grad_norm=0)
    with pytest.raises(FederatedOptionError, match="delta must lie in"):
        PrivacySettings(epsilon=1.0, delta=2.0)
    with pytest.raises(FederatedOptionError, match="unknown accountant"):
        PrivacySettings(epsilon=1.0, accountant="moments")
    with pytest.raises(FederatedOptionError, match="positive clipping norm"):
        UserPrivacy(noise_multiplier=1.0, clipping_norm=None)
    model, data = model_and_data("lora", dropout=0.1)
    trainer = Trainer(model, TrainConfig(batch_size=4, max_grad_norm=None, progress=False), data)
    with pytest.raises(FederatedOptionError, match="adapter dropout 0"), make_private(trainer, PrivacySettings(
            noise_multiplier=1.0), 1.0):  # fmt: skip
        pass
    trainer = Trainer(model, TrainConfig(batch_size=4, progress=False), data)
    with pytest.raises(FederatedOptionError, match="max_grad_norm=None"), make_private(trainer, PrivacySettings(
            noise_multiplier=1.0), 1.0):  # fmt: skip
        pass
    assert math.isfinite(epsilon_spent(0.5, 1.0, 1, 1e-5))
