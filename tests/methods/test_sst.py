"""SST spec properties: reconstruction at init (1e-5), count, only sampled columns change within a round
while all σ change, after a new round ``UᵀU = I`` (1e-4) and the function is unchanged, the sample has r
distinct indices, larger σ are sampled more often (fixed seed), enhanced gradient = plain gradient / σ_i."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.sst import SST, SSTConfig


def _adapter(**kw: object) -> tuple[SST, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    base = BaseView(lin)
    return SST(base, SSTConfig(**kw)), base, lin


def _train(a: SST, base: BaseView, lin: nn.Linear, steps: int) -> None:
    opt = torch.optim.SGD(a.parameters(), lr=0.05)
    x, t = torch.randn(32, 24), torch.randn(32, 20)
    for _ in range(steps):
        opt.zero_grad()
        (a(x, lin(x).detach(), base) - t).pow(2).mean().backward()
        opt.step()


def test_reconstruction_and_count() -> None:
    a, base, lin = _adapter(r=5)
    torch.testing.assert_close(a.weight().detach(), lin.weight.detach(), atol=1e-5, rtol=0)
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lin(x), base), lin(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in a.parameters()) == 20 + 5 * 44 == SST.expected_trainable(base, a.config)
    assert SST.expected_trainable(base, SSTConfig(r=99)) == 20 + 20 * 44  # r clamped to min(d_in, d_out)
    with pytest.raises(InvalidConfigError, match="round_steps"):
        SSTConfig(round_steps=0)


def test_only_sampled_columns_change_sigma_all_change() -> None:
    a, base, lin = _adapter(r=4)
    u0, v0 = (t.detach().clone() for t in a.full_factors())
    sigma0 = a.sigma.detach().clone()
    _train(a, base, lin, 3)
    u1, v1 = (t.detach() for t in a.full_factors())
    rest = torch.ones(20, dtype=torch.bool)
    rest[a.S] = False
    assert torch.equal(u1[:, rest], u0[:, rest]) and torch.equal(v1[:, rest], v0[:, rest])
    assert not torch.allclose(u1[:, a.S], u0[:, a.S])
    assert (a.sigma.detach() != sigma0).all()


def test_new_round_orthogonal_same_function_distinct_sample() -> None:
    a, base, lin = _adapter(r=6, round_steps=3)
    _train(a, base, lin, 5)
    before, old = a.weight().detach().clone(), a.S.clone()
    for step in (1, 2, 3):
        a.step(step)
    assert a.round == 1 and not torch.equal(a.S, old)
    torch.testing.assert_close(a.weight().detach(), before, atol=1e-5, rtol=0)
    u, v = a.full_factors()
    torch.testing.assert_close(u.T @ u, torch.eye(20), atol=1e-4, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(20), atol=1e-4, rtol=0)
    assert a.S.unique().numel() == 6


def test_larger_sigma_sampled_more_often() -> None:
    a, _, _ = _adapter(r=3, seed=11)
    with torch.no_grad():
        a.sigma.copy_(torch.linspace(0.01, 1.0, 20))
    counts = torch.zeros(20)
    for k in range(300):
        a.round = k
        a._sample()
        counts[a.S] += 1
    assert counts[10:].sum() > 2 * counts[:10].sum()


def test_enhanced_gradient_divides_by_sigma() -> None:
    x = torch.randn(8, 24)
    grads = {}
    for enhanced in (True, False):
        a, base, lin = _adapter(r=4, enhanced_grad=enhanced)
        a(x, lin(x), base).pow(2).sum().backward()
        grads[enhanced] = a.U_s.grad.clone()
    torch.testing.assert_close(grads[True], grads[False] / a.sigma.detach()[a.S], rtol=1e-4, atol=1e-6)


def _run(model, steps: range, samples: list) -> None:
    """SGD steps ``steps`` (global step numbers) as a trainer runs them: update, then ``step_adapters``."""
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)  # no optimizer state: a resumed run can match exactly
    for step in steps:
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 40, (4, 5), generator=g)
        target = torch.randn(4, 3, generator=g)
        opt.zero_grad()
        F.mse_loss(model(input_ids=ids), target).backward()
        opt.step()
        model.step_adapters(step + 1)
        samples.append({p: m.S.clone() for p, m in model.adapter_modules("default").items()})


def test_resumed_run_samples_the_same_columns(tmp_path) -> None:
    """Issue 12 item 14: the round counter is saved, so a run saved after round 2 and resumed from the file on a
    fresh base draws the same columns at every later round as the run that was never interrupted."""
    from conftest import make_tiny_net

    import peftkit as pk

    config = SSTConfig(r=3, round_steps=2, targets=["fc1", "fc2"], seed=4)
    straight: list = []
    model = pk.adapt(make_tiny_net(), config)
    _run(model, range(10), straight)
    assert all(m.round == 5 for m in model.adapter_modules("default").values())

    resumed: list = []
    first = pk.adapt(make_tiny_net(), config)
    _run(first, range(5), resumed)  # rounds 1 and 2 done, mid-way through round 3
    first.save(tmp_path / "sst")
    again = pk.load(make_tiny_net(), tmp_path / "sst").train()
    assert all(m.round == 2 for m in again.adapter_modules("default").values())
    _run(again, range(5, 10), resumed)
    assert len(resumed) == len(straight) == 10
    for step, (got, want) in enumerate(zip(resumed, straight)):
        for path in want:
            assert torch.equal(got[path], want[path]), f"step {step + 1}, {path}"
    ids = torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        want_out = model.eval()(input_ids=ids)
        torch.testing.assert_close(
            again.eval()(input_ids=ids), want_out, rtol=0, atol=1e-6 * float(want_out.abs().max())
        )


def test_files_saved_without_the_round_counter_still_load() -> None:
    """Adapters saved before ``round_index`` was saved load (through ``pk.load``'s path) at round 0."""
    from conftest import make_tiny_net

    import peftkit as pk
    from peftkit.core.protocol import skip_init

    config = SSTConfig(r=3, round_steps=2, targets=["fc1", "fc2"], seed=4)
    model = pk.adapt(make_tiny_net(), config)
    old_file = {k: t for k, t in model.adapter_state_dict("default").items() if not k.endswith("round_index")}
    loaded = pk.AdaptedModel(make_tiny_net())
    with skip_init():
        loaded.add_adapter("default", config)
    loaded.assign_tensors("default", old_file, source="old file")
    for path, m in loaded.adapter_modules("default").items():
        assert m.round == 0 and torch.equal(m.S, model.adapter_modules("default")[path].S)
