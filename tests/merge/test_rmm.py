"""``peftkit.merge.rmm``: reversible merging, a shared basis and per-task coefficients (closed form)."""

from __future__ import annotations

import itertools

import pytest
import torch
from _helpers import adapted, delta, rel
from conftest import make_tiny_net

import peftkit as pk
from peftkit.merge import MergeError, MergeOptionError
from peftkit.merge.rmm import ReversibleMerge, rmm, rmm_report

TARGETS = ["fc1", "fc2"]


def _tasks(n: int = 4, **fields) -> pk.AdaptedModel:
    return adapted(
        make_tiny_net(), {f"t{i}": pk.LoRAConfig(r=2, alpha=4.0, targets=TARGETS, **fields) for i in range(n)}
    )


@pytest.mark.parametrize(("space", "joint"), [("factors", False), ("factors", True), ("delta", False)])
def test_k_equal_n_reverts_every_task_exactly(space: str, joint: bool) -> None:
    model = _tasks()
    names = model.adapter_names
    fit = rmm(model, names, k=4, space=space, joint=joint)
    assert max(fit.errors.values()) < 1e-6
    for j, name in enumerate(names):
        for path in TARGETS:
            got, _ = fit.delta(j, path)
            assert rel(got, delta(model, name, path).reshape(got.shape)) < 1e-6


@pytest.mark.parametrize(("space", "joint"), [("factors", False), ("factors", True), ("delta", False)])
def test_error_falls_with_k_and_is_the_tail_of_the_spectrum(space: str, joint: bool) -> None:
    model = _tasks()
    names = model.adapter_names
    rows = rmm_report(model, names, space=space, joint=joint)
    fit_errors = []
    for k in range(1, 5):
        fit = rmm(model, names, k, space=space, joint=joint)
        residual = 0.0
        for layer in fit.layers.values():
            for side, f in layer.fits.items():
                x = _stacked(model, names, layer, side, space)
                measured = float((x - f.basis @ f.coeffs).norm())
                assert measured == pytest.approx(f.tail, rel=1e-6, abs=1e-9)  # Eckart-Young: the discarded σ's
                residual += measured**2
        fit_errors.append(residual**0.5)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(fit_errors))
    if space == "delta":  # the reconstructed products' error falls with k too (in factor space it need not)
        means = [r["mean_error"] for r in rows]
        assert all(a >= b - 1e-12 for a, b in itertools.pairwise(means))
    storage = [r["storage"] for r in rows]
    assert storage == sorted(storage) and rows[-1]["storage_ratio"] > 1.0  # k = n costs more than the n tasks


def _stacked(model, names, layer, side, space) -> torch.Tensor:
    from peftkit.merge.sources import collect

    source = next(s for s in collect(model, names) if s.base.out_features == layer.shape[0])
    if space == "delta":
        return torch.stack([delta(model, n, source.path).reshape(-1) for n in names], dim=1)
    forms = source.factors()
    downs = torch.stack([d.reshape(-1) for _, d in forms], dim=1).double()
    ups = torch.stack([u.reshape(-1) for u, _ in forms], dim=1).double()
    return {"down": downs, "up": ups, "joint": torch.cat([downs, ups])}[side]


def test_storage_counts_bases_and_coefficients() -> None:
    model = _tasks(n=3)
    fit = rmm(model, model.adapter_names, k=2)
    # fc1: A [2, 16], B [32, 2]; fc2: A [2, 32], B [16, 2]; each fit: k·D + k·n
    per_task = 2 * 16 + 32 * 2 + 2 * 32 + 16 * 2
    assert fit.source_storage == 3 * per_task
    assert fit.storage == 2 * per_task + 4 * 2 * 3


def test_a_reverted_task_is_an_adapter_that_saves_and_reloads(tmp_path) -> None:
    model = _tasks(n=3)
    names = model.adapter_names
    fit = rmm(model, names, k=3)
    fit.add_to(model, "t1", "back", activate=True)
    x = torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.set_adapter("t1")
        want = model(x)
        model.set_adapter("back")
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    fit.save(tmp_path)
    again = ReversibleMerge.load(tmp_path)
    assert again.names == names and again.errors == pytest.approx(fit.errors)
    for path in TARGETS:
        torch.testing.assert_close(again.delta(1, path)[0], fit.delta(1, path)[0], rtol=1e-6, atol=1e-7)


def test_delta_space_takes_any_method_and_bias() -> None:
    model = adapted(
        make_tiny_net(),
        {
            "lora": pk.LoRAConfig(r=2, targets=TARGETS, bias=True),
            "lokr": pk.get_config("lokr", targets=TARGETS),
        },
    )
    fit = rmm(model, ["lora", "lokr"], k=2, space="delta")
    assert max(fit.errors.values()) < 1e-6
    fit.add_to(model, "lora", "back")
    base = model.base_view("fc1")
    got = model.adapter_modules("back")["fc1"]
    want = model.adapter_modules("lora")["fc1"]
    torch.testing.assert_close(got.delta_bias(base), want.delta_bias(base), rtol=1e-5, atol=1e-6)
    with pytest.raises(MergeError, match=r"no low-rank form there .* use space='delta'"):
        rmm(model, ["lora", "lokr"], k=1)


def test_bad_requests() -> None:
    model = adapted(
        make_tiny_net(),
        {"a": pk.LoRAConfig(r=2, targets=TARGETS), "b": pk.LoRAConfig(r=3, targets=TARGETS)},
    )
    with pytest.raises(MergeError, match=r"the tasks' ranks differ \(\[2, 3\]\)"):
        rmm(model, ["a", "b"], k=1)
    with pytest.raises(MergeOptionError, match=r"k must be an int in \[1, 2\]"):
        rmm(model, ["a", "b"], k=3)
    with pytest.raises(MergeOptionError, match="space must be"):
        rmm(model, ["a", "b"], k=1, space="weights")  # type: ignore[arg-type]
    with pytest.raises(MergeError, match="no task 'c'"):
        rmm(model, ["a", "b"], k=2, space="delta").delta("c", "fc1")
