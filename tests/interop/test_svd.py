"""``peftkit.interop.svd``: the truncated SVD of an adapter's ``ΔW`` (the serving engine's ``svd_rank``)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_net

import peftkit as pk
from peftkit.interop.svd import SVDLowRank, svd_factors, svd_lowrank, svd_to_lora


def _rank3(out: int = 12, inp: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(out, 3, generator=g) @ torch.randn(3, inp, generator=g)


def test_factors_are_the_truncated_svd_with_its_relative_error() -> None:
    delta = torch.randn(12, 9, generator=torch.Generator().manual_seed(1))
    sv = torch.linalg.svdvals(delta)
    for k in (1, 3, 9, 20):
        down, up, error = svd_factors(delta, k)
        kk = min(k, 9)
        assert down.shape == (kk, 9) and up.shape == (12, kk)
        approx = up @ down
        # the reported error is the measured one, and the Eckart-Young optimum sqrt(sum_{i>k} s_i^2 / sum s_i^2)
        measured = float((delta - approx).norm() / delta.norm())
        assert error == pytest.approx(measured, abs=1e-5)
        assert error == pytest.approx(float((sv[kk:].square().sum() / sv.square().sum()).sqrt()), abs=1e-6)
        # the kept singular values are delta's leading ones, split evenly over both factors
        torch.testing.assert_close(torch.linalg.svdvals(approx)[:kk], sv[:kk], rtol=1e-5, atol=1e-5 * float(sv[0]))
        torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-5, atol=0.0)
    assert svd_factors(delta, 9).error == pytest.approx(0.0, abs=1e-6)


def test_exact_at_the_true_rank_and_zero_error_for_zero() -> None:
    delta = _rank3()
    down, up, error = svd_factors(delta, 3)
    torch.testing.assert_close(up @ down, delta, rtol=0, atol=1e-5 * float(delta.abs().max()))
    assert error < 1e-5
    assert svd_factors(torch.zeros(4, 5), 2).error == 0.0
    conv = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(2))  # flattened to [out, in*k*k]
    assert svd_factors(conv, 36).down.shape == (6, 36)
    with pytest.raises(ValueError, match="rank"):
        svd_factors(delta, 0)


@pytest.mark.parametrize("method", ["lokr", "dora", "shira"])
def test_stand_in_computes_the_truncated_update(method: str) -> None:
    """On a Linear: the stand-in's forward and delta are ``up·down``; at full rank it is the adapter itself."""
    config = pk.get_method(method).config_class.tiny().replace(targets=["fc1"])
    model = pk.adapt(make_tiny_net(), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    adapter, base = model.adapter_modules("default")["fc1"], model.model.fc1.base
    x = torch.randn(5, 16, generator=g)
    with torch.no_grad():
        base_out, delta = base(x), adapter.delta_weight(base)
        want = adapter(x, base_out, base)
        for k, exact in ((2, False), (16, True)):
            stand_in, error = svd_lowrank(adapter, base, k)
            assert isinstance(stand_in, SVDLowRank) and stand_in.down.shape == (k, 16)
            assert stand_in.lowrank(base).scale == 1.0 and not stand_in.state_dict()  # never saved
            approx = stand_in.delta_weight(base)
            assert error == pytest.approx(float((delta - approx).norm() / delta.norm()), abs=1e-5)
            torch.testing.assert_close(stand_in(x, base_out, base), base_out + x @ approx.T, rtol=0, atol=1e-5)
            if exact:
                torch.testing.assert_close(
                    stand_in(x, base_out, base), want, rtol=0, atol=1e-5 * float(want.abs().max())
                )
            else:
                assert error > 1e-3


def test_not_applicable_returns_none_and_dtype_follows_the_base() -> None:
    model = pk.adapt(make_tiny_net(), pk.get_config("lokr", r=2, targets=["conv"]))
    assert svd_lowrank(model.adapter_modules("default")["conv"], model.model.conv.base, 2) is None  # Conv2d
    full = pk.adapt(make_tiny_net(), pk.FullConfig(targets=["fc1"]))  # changes the bias
    assert svd_lowrank(full.adapter_modules("default")["fc1"], full.model.fc1.base, 2) is None
    houlsby = pk.adapt(make_tiny_net(), pk.get_method("houlsby").config_class.tiny().replace(targets=["fc1"]))
    assert svd_lowrank(houlsby.adapter_modules("default")["fc1"], houlsby.model.fc1.base, 2) is None  # no ΔW
    double = pk.adapt(make_tiny_net().double(), pk.get_config("lokr", r=2, targets=["fc1"]))
    stand_in, _ = svd_lowrank(double.adapter_modules("default")["fc1"], double.model.fc1.base, 2)
    assert stand_in.down.dtype == stand_in.up.dtype == torch.float64


def _trained(config: pk.AdapterConfig) -> pk.AdaptedModel:
    model = pk.adapt(make_tiny_net(), config, name="src")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(1))


def test_svd_to_lora_at_full_rank_is_the_adapter() -> None:
    """LoKr on Linear and Conv2d with a trained head: the LoRA (loaded through load_tensors) gives its outputs."""
    model = _trained(pk.get_config("lokr", r=2, targets=["fc1", "fc2", "conv"], modules_to_save=["head"]))
    with torch.no_grad():
        want = model(_ids())
    config, tensors, errors = svd_to_lora(model, "src", rank=32)
    assert config.r == 32 and config.for_module("conv").r == 6 and config.for_module("fc1").r == 16
    assert config.modules_to_save == ["head"] and max(errors.values()) < 1e-5 and not config.bias
    model.load_tensors("lora", config, tensors)
    model.set_adapter("lora")
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_svd_to_lora_of_full_fine_tuning_keeps_bias_changes() -> None:
    """A dense ("full") adapter on an Embedding, a Linear and a Conv2d: its bias changes become LoRA's bias (none
    on the Embedding), and at full rank the LoRA gives its outputs."""
    model = _trained(pk.FullConfig(targets=["emb", "fc1", "conv"]))
    with torch.no_grad():
        want = model(_ids())
    config, tensors, errors = svd_to_lora(model, "src", rank=40)
    assert config.bias and config.for_module("emb").bias is False and config.modules_to_save == []
    assert max(errors.values()) < 1e-5
    model.load_tensors("lora", config, tensors)
    model.set_adapter("lora")
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_svd_to_lora_truncates_with_the_reported_error_and_exports_to_peft(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = _trained(pk.get_config("loha", r=2, targets=["fc1", "fc2"]))
    config, tensors, errors = svd_to_lora(model, "src", rank=1)
    for path, module in model.adapter_modules("src").items():
        delta = module.delta_weight(model.model.get_submodule(path).base).detach()
        approx = tensors[f"{path}.B"] @ tensors[f"{path}.A"]
        assert errors[path] == pytest.approx(float((delta - approx).norm() / delta.norm()), abs=1e-5)
        assert errors[path] > 1e-2
    model.load_tensors("lora", config, tensors, activate=False)
    folder = pk.export_peft(model, tmp_path / "lora", "lora")
    pm = peft.PeftModel.from_pretrained(make_tiny_net(), folder).eval()
    back = pk.import_peft(make_tiny_net(), folder).eval()
    with torch.no_grad():
        for got in (pm(_ids()), back(_ids())):
            want = model(_ids(), adapter_ids=["lora"] * 4)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_svd_to_lora_refuses_an_adapter_without_a_weight_update() -> None:
    model = pk.adapt(make_tiny_net(), pk.get_method("houlsby").config_class.tiny().replace(targets=["fc1"]))
    with pytest.raises(pk.errors.NotMergeableError, match="'fc1'"):
        svd_to_lora(model, "default", rank=2)
