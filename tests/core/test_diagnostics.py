"""peftkit.diagnostics.lora_norm_bound: the norm quantities of Hu et al., "Computational Limits of Low-Rank
Adaptation (LoRA) for Transformer-Based Models" (ICLR 2025), checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.diagnostics import DiagnosticsError, LayerNormBound, NormBoundReport, lora_norm_bound
from peftkit.errors import NoAdaptersError

D, L, BATCH = 8, 6, 3


class TinyAttn(nn.Module):
    """``v(drop(relu(q(LN(x)))))``: the input of ``v`` depends on the adapted ``q``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.q = nn.Linear(D, D)
        self.v = nn.Linear(D, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.v(self.drop(torch.relu(self.q(self.norm(x) * scale))))


def _adapted(n_adapters: int = 1) -> pk.AdaptedModel:
    model = pk.adapt(TinyAttn(), pk.LoRAConfig(r=2, alpha=4, targets=["q", "v"]))
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", pk.LoRAConfig(r=3, alpha=2, targets=["q", "v"]), activate=False)
    model.set_adapter(model.adapter_names)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in model.adapter_names:
            for m in model.adapter_modules(name).values():
                m.B.copy_(torch.randn(m.B.shape, generator=g))  # B = 0 at init would make every ΔW zero
    return model.eval()


def _batch() -> torch.Tensor:
    return torch.randn(BATCH, L, D, generator=torch.Generator().manual_seed(2)) * 3


def _close(actual: float | None, expected: torch.Tensor | float) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual is not None
    torch.testing.assert_close(torch.tensor(actual), expected, rtol=1e-5, atol=1e-6 * float(expected.abs()))


def _by_hand(model: pk.AdaptedModel, x: torch.Tensor) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Each row's quantities from the weights and factors, with the layer inputs recomputed explicitly."""
    base: TinyAttn = model.model
    q, v = base.q.base_layer, base.v.base_layer
    names = model.active_adapters

    def delta(path: str, name: str) -> torch.Tensor:
        m = model.adapter_modules(name)[path]
        return (m.config.alpha / m.config.r) * m.B @ m.A

    xq = base.norm(x)
    hq = xq @ q.weight.T + q.bias + sum(xq @ delta("q", n).T for n in names)
    xv = torch.relu(hq)  # dropout is off: the diagnostic runs in eval mode
    out = {}
    for path, xin, w in (("q", xq, q.weight), ("v", xv, v.weight)):
        for n in names:
            dw = delta(path, n)
            xw, xd = xin @ w.T, xin @ dw.T
            out[path, n] = {
                "x_max": xin.abs().max(),
                "w_max": w.abs().max(),
                "delta_max": dw.abs().max(),
                "xw_max": xw.abs().max(),
                "xdelta_max": xd.abs().max(),
                "adapted_max": (xw + xd).abs().max(),
                "gamma": torch.maximum(xw.abs().max(), xd.abs().max()),
            }
    return out


def test_quantities_equal_hand_computed_values() -> None:
    model, x = _adapted(), _batch()
    report = lora_norm_bound(model, x)
    assert isinstance(report, NormBoundReport) and len(report) == 2
    with torch.no_grad():
        expected = _by_hand(model, x)
    for row in report:
        assert isinstance(row, LayerNormBound)
        assert (row.kind, row.delta_source, row.seq_len) == ("linear", "lowrank", L)
        _close(row.sqrt_log_L, math.sqrt(math.log(L)))
        for key, value in expected[row.layer, row.adapter].items():
            _close(getattr(row, key), value)
        _close(row.gamma_over_sqrt_log_L, expected[row.layer, row.adapter]["gamma"] / math.sqrt(math.log(L)))
    assert [r.layer for r in report] == ["q", "v"]
    assert report.max_gamma_over_sqrt_log_L == max(r.gamma_over_sqrt_log_L for r in report)


def test_lora_at_init_has_no_adapter_term() -> None:
    """B = 0 at init (the paper's advice): ‖X αBA/r‖_max = 0 and Γ = ‖X W⋆‖_max."""
    model = pk.adapt(TinyAttn(), pk.LoRAConfig(r=2, alpha=4, targets=["q", "v"]))
    for row in lora_norm_bound(model, _batch()):
        assert row.xdelta_max == 0.0 and row.delta_max == 0.0
        assert row.gamma == row.xw_max == row.adapted_max > 0


def test_several_adapters_each_measured_against_the_real_inputs() -> None:
    model, x = _adapted(n_adapters=2), _batch()
    report = lora_norm_bound(model, x)
    assert [(r.layer, r.adapter) for r in report] == [("q", "default"), ("q", "a1"), ("v", "default"), ("v", "a1")]
    with torch.no_grad():
        expected = _by_hand(model, x)  # v's input includes both adapters' change of q's output
    for row in report:
        for key, value in expected[row.layer, row.adapter].items():
            _close(getattr(row, key), value)
    assert report["v", "a1"].xdelta_max != report["v", "default"].xdelta_max
    only = lora_norm_bound(model, x, adapters="a1")
    assert [(r.layer, r.adapter) for r in only] == [("q", "a1"), ("v", "a1")]
    assert only["q", "a1"] == report["q", "a1"]


def test_hooks_removed_and_model_unchanged() -> None:
    model, x = _adapted(), _batch()
    model.train()  # dropout and train flags must come back as they were
    model.model.norm.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.eval()
        before = model(x)
        for name, m in model.named_modules():
            m.training = flags[name]
    lora_norm_bound(model, x)
    assert {name: m.training for name, m in model.named_modules()} == flags
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    after_state = model.state_dict()
    assert state.keys() == after_state.keys()
    assert all(torch.equal(state[k], after_state[k]) for k in state)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_hooks_removed_when_the_forward_fails() -> None:
    model = _adapted()
    with pytest.raises(RuntimeError):
        lora_norm_bound(model, torch.randn(2, L, D + 1))  # wrong width: LayerNorm fails
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training is False


def test_batch_forms_and_token_axis() -> None:
    model, x = _adapted(), _batch()
    as_tensor = lora_norm_bound(model, x)
    assert lora_norm_bound(model, {"x": x}) == as_tensor
    assert lora_norm_bound(model, (x,)) == as_tensor
    scaled = lora_norm_bound(model, {"x": x, "scale": 2.0})
    _close(scaled["q", "default"].x_max, 2 * as_tensor["q", "default"].x_max)  # X is the layer's own input
    flat = lora_norm_bound(model, x[:, 0])  # [rows, in]: no token axis
    assert all(r.seq_len is None and r.sqrt_log_L is None and r.gamma_over_sqrt_log_L is None for r in flat)
    given = lora_norm_bound(model, x[:, 0], seq_len=1024)
    _close(given[0].gamma_over_sqrt_log_L, given[0].gamma / math.sqrt(math.log(1024)))


def test_delta_weight_source_for_dora() -> None:
    base = TinyAttn()
    model = pk.adapt(base, pk.DoRAConfig(r=2, alpha=4, targets=["q"])).eval()
    with torch.no_grad():
        for m in model.adapter_modules("default").values():
            m.B.normal_()
    x = _batch()
    row = lora_norm_bound(model, x)[0]
    assert row.delta_source == "delta_weight"
    layer = model.adapted_layer("q")
    dw = model.adapter_modules("default")["q"].delta_weight(layer.base)
    with torch.no_grad():
        xq = base.norm(x)
        _close(row.xdelta_max, (xq @ dw.T).abs().max())
        _close(row.delta_max, dw.abs().max())


def test_table_and_to_dict() -> None:
    report = lora_norm_bound(_adapted(n_adapters=2), _batch())
    lines = report.table().splitlines()
    assert len(lines) == 1 + len(report) and "Gamma/sqrt(logL)" in lines[0]
    assert lines[2].split()[:3] == ["q", "a1", str(L)]
    d = report.to_dict()
    assert len(d["rows"]) == 4 and d["rows"][0] == report[0].to_dict()
    assert d["max_gamma_over_sqrt_log_L"] == report.max_gamma_over_sqrt_log_L
    with pytest.raises(KeyError, match="no row"):
        report["nope", "default"]


def test_errors() -> None:
    with pytest.raises(NoAdaptersError):
        lora_norm_bound(pk.AdaptedModel(TinyAttn()), _batch())
    model = _adapted()
    with pytest.raises(DiagnosticsError, match="AdaptedModel"):
        lora_norm_bound(model.model, _batch())
    for bad in ("not a batch", 3, None):
        with pytest.raises(DiagnosticsError, match="batch must be"):
            lora_norm_bound(model, bad)
    with pytest.raises(DiagnosticsError, match="no adapter named 'b'"):
        lora_norm_bound(model, _batch(), adapters="b")
    with pytest.raises(DiagnosticsError, match="seq_len"):
        lora_norm_bound(model, _batch(), seq_len=0)
    model.merge(unload=False)
    with pytest.raises(DiagnosticsError, match="merged"):
        lora_norm_bound(model, _batch())
    model.unmerge()
    model.disable_adapters()
    with pytest.raises(DiagnosticsError, match="disabled"):
        lora_norm_bound(model, _batch())
    model.enable_adapters()
    assert len(lora_norm_bound(model, _batch())) == 2


def test_layer_the_batch_never_reaches() -> None:
    base = TinyAttn()
    base.unused = nn.Linear(D, D)
    model = pk.adapt(base, pk.LoRAConfig(r=2, targets=["q", "unused"]))
    with pytest.raises(DiagnosticsError, match=r"never reached the adapted layer\(s\) \['unused'\]"):
        lora_norm_bound(model, _batch())
    assert all(not m._forward_hooks for m in model.modules())


def test_residual_init_adapted_product_is_the_forward() -> None:
    """With PiSSA (frozen offset B₀A₀, ΔW = s(BA − B₀A₀) = 0 at init), ‖X (W⋆ + ΔW)‖_max is the largest entry of
    what the adapted layer computes, less its bias."""
    base = TinyAttn()
    model = pk.adapt(base, pk.LoRAConfig(r=2, alpha=4, targets=["q"]), init="pissa").eval()
    with torch.no_grad():
        model.adapter_modules("default")["q"].B.add_(0.5)  # move away from the init
        x = _batch()
        xq = base.norm(x)
        expected = (base.q(xq) - base.q.base_layer.bias).abs().max()
    row = lora_norm_bound(model, x)["q", "default"]
    assert row.delta_source == "lowrank"
    _close(row.adapted_max, expected)
    assert row.xdelta_max > 0
