"""EoRA: the spec's properties on single layers (optimality in the activation-weighted norm against a brute-force
solve, exact at full rank, plain SVD for white inputs) and the compensation of a tiny Llama as a LoRA adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.compress import compressors
from peftkit.compress.eora import eora, eora_factors, weighted_error
from peftkit.compress.errors import (
    CalibrationError,
    CompressOptionError,
    RankError,
    RatioError,
    UnknownArchitectureError,
)
from tests.compress import _tiny


def _anisotropic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d)  # input directions of very different energy
    mix = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    return (torch.randn(n, d, generator=g) * scales) @ mix.T


def _err(delta, a, b, x):
    return float(((delta - b @ a) @ x.T).norm())


def test_eora_is_optimal_in_the_weighted_norm_against_a_brute_force_solve():
    torch.manual_seed(0)
    delta, x = torch.randn(6, 5).double(), _anisotropic(200, 5).double()
    h = x.T @ x / len(x)
    a, b = eora_factors(delta, h, 2)
    ours = _err(delta, a.double(), b.double(), x)
    best = float("inf")
    for start in range(8):  # brute force: many random starts of a direct minimisation over B, A
        g = torch.Generator().manual_seed(start)
        pa = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_()
        pb = torch.randn(6, 2, generator=g, dtype=torch.float64).requires_grad_()
        opt = torch.optim.LBFGS([pa, pb], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure(opt=opt, pa=pa, pb=pb):
            opt.zero_grad()
            loss = ((delta - pb @ pa) @ x.T).square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        best = min(best, _err(delta, pa.detach(), pb.detach(), x))
    assert ours <= best * (1 + 1e-6)
    assert ours == pytest.approx(best, rel=1e-4)  # the brute force reaches the same optimum
    plain = eora_factors(delta, None, 2)
    assert _err(delta, plain[0].double(), plain[1].double(), x) > ours * 1.05  # strictly better than plain SVD


def test_full_rank_reproduces_the_weight_and_white_inputs_give_the_plain_svd():
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    wc = compressors.magnitude_prune(w, 0.5)
    x = _anisotropic(300, 6)
    a, b = eora_factors(w - wc, x.T @ x / len(x), 6)
    torch.testing.assert_close(wc + b @ a, w, rtol=0, atol=1e-4 * float(w.abs().max()))
    a_w, b_w = eora_factors(w - wc, 3.0 * torch.eye(6), 3)
    a_s, b_s = eora_factors(w - wc, None, 3)
    assert a_w.shape == (3, 6) and b_w.shape == (8, 3)
    torch.testing.assert_close(b_w @ a_w, b_s @ a_s, rtol=0, atol=1e-5 * float((b_s @ a_s).abs().max()))


def test_weighted_error_is_never_above_plain_svd():
    torch.manual_seed(0)
    for seed in range(5):
        delta, x = torch.randn(10, 7), _anisotropic(100, 7, seed)
        h = x.T @ x / len(x)
        for r in (1, 3, 5):
            a, b = eora_factors(delta, h, r)
            a0, b0 = eora_factors(delta, None, r)
            assert weighted_error(delta - b @ a, h) <= weighted_error(delta - b0 @ a0, h) * (1 + 1e-6)


def test_compensation_of_a_pruned_llama_is_a_lora_adapter_that_saves_loads_and_exports(tmp_path):
    model, data = _tiny.llama(), _tiny.batches()
    reference = _tiny.llama()
    ids = data[0]["input_ids"]
    result = eora(model, data, compress="magnitude", ratio=0.5, rank=8)
    adapted = result.model
    assert all(result.report.after[p] < result.report.before[p] for p in result.report.before)
    with torch.no_grad():
        compensated = adapted(input_ids=ids).logits
        with adapted.adapters_disabled():
            compressed = adapted(input_ids=ids).logits
        original = reference(input_ids=ids).logits
    # the compensation moves the compressed model towards the original
    assert (compensated - original).norm() < 0.8 * (compressed - original).norm()
    for path in result.report.before:  # the base stays the pruned weight
        assert float((adapted.base_view(path).weight == 0).float().mean()) >= 0.5
    with torch.no_grad():  # a mixed batch (what the server runs): row 0 compensated, row 1 the compressed base
        mixed = adapted(input_ids=ids[:2], adapter_ids=torch.tensor([0, -1])).logits
        torch.testing.assert_close(mixed[0], compensated[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed[1], compressed[1], rtol=0, atol=1e-5)
        adapted.merge(unload=False)  # W_c + BA
        torch.testing.assert_close(adapted(input_ids=ids).logits, compensated, rtol=0, atol=1e-4)
        adapted.unmerge()
    adapted.save(tmp_path / "eora")
    loaded = pk.load(adapted.unload(), tmp_path / "eora")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, compensated, rtol=0, atol=1e-5)
    pk.export_peft(loaded, tmp_path / "peft")
    from peft import PeftModel

    plain = loaded.unload()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(plain, tmp_path / "peft").eval()(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, compensated, rtol=0, atol=1e-5)


def test_eigen_beats_svd_on_the_same_calibration_and_sequential_changes_later_blocks():
    data = _tiny.batches()
    eigen = eora(_tiny.llama(), data, compress="magnitude", ratio=0.6, rank=4, sequential=False).report
    svd = eora(_tiny.llama(), data, compress="magnitude", ratio=0.6, rank=4, mode="svd", sequential=False).report
    assert all(eigen.after[p] <= svd.after[p] * (1 + 1e-6) for p in eigen.after)
    assert sum(eigen.after.values()) < 0.95 * sum(svd.after.values())
    seq = eora(_tiny.llama(), data, compress="magnitude", ratio=0.6, rank=4).report
    first = [p for p in seq.after if ".layers.0." in p]
    last = [p for p in seq.after if ".layers.2." in p]
    for p in first:  # block 0 sees the same inputs either way
        assert seq.before[p] == pytest.approx(eigen.before[p], rel=1e-6)
    assert any(abs(seq.before[p] - eigen.before[p]) > 1e-4 for p in last)


def test_quantised_base_with_hqq():
    pytest.importorskip("hqq")
    data = _tiny.batches()
    result = eora(_tiny.llama(), data, compress="hqq3", rank=4)
    assert all(result.report.after[p] < result.report.before[p] for p in result.report.before)


def test_bad_input():
    data = _tiny.batches()
    with pytest.raises(RatioError, match=r"\(0, 1\)"):
        eora(_tiny.llama(), data, compress="magnitude", ratio=1.5, rank=4)
    with pytest.raises(RankError, match="q_proj"):
        eora(_tiny.llama(), data, compress="2:4", rank=33)
    with pytest.raises(CalibrationError, match="empty"):
        eora(_tiny.llama(), [], compress="2:4", rank=4)
    bad = [{"input_ids": torch.full((1, 4), _tiny.VOCAB + 5)}]
    with pytest.raises(CalibrationError, match="another tokenizer"):
        eora(_tiny.llama(), bad, compress="2:4", rank=4)
    with pytest.raises(UnknownArchitectureError, match="q_proj") as info:
        eora(nn.Sequential(nn.Linear(4, 4)), data, compress="2:4", rank=2)
    assert isinstance(info.value, TypeError) and isinstance(info.value, pk.errors.PeftkitError)


def test_quantized_base_is_stored_as_hqq_and_the_adapter_compensates_what_it_computes():
    pytest.importorskip("hqq")
    model, data = _tiny.llama(layers=2), _tiny.batches(n=2)
    original = copy.deepcopy(model)
    result = eora(model, data, compress="hqq4", rank=4, quantized=True)
    adapted = result.model
    base = adapted.get_base_model()
    path = "model.layers.0.mlp.up_proj"
    assert type(adapted.base_view(path).module).__name__ == "HQQLinear"  # packed codes, not a dense copy
    # the same model written densely: every target weight = the stored layer's dequantised weight + B A
    dense = copy.deepcopy(original)
    tensors = adapted.adapter_state_dict("eora")
    for p in result.report.after:
        w = adapted.base_view(p).weight.detach()
        dense.get_submodule(p).weight.data = w + tensors[f"{p}.B"] @ tensors[f"{p}.A"]
    ids = data[0]["input_ids"]
    with torch.no_grad():
        want, got = dense(input_ids=ids).logits, adapted(input_ids=ids).logits
        first = original(input_ids=ids).logits
        with adapted.disable_adapter():
            plain = adapted(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert float((got - first).norm()) < float((plain - first).norm())  # closer to the original than the 4-bit base
    assert all(result.report.after[p] < result.report.before[p] for p in result.report.after)
    assert isinstance(base.model.layers[0].mlp.up_proj, nn.Module)


def test_quantized_needs_an_hqq_compressor():
    with pytest.raises(CompressOptionError, match="hqq"):
        eora(_tiny.llama(layers=2), _tiny.batches(n=1), compress="2:4", rank=2, quantized=True)


def test_the_block_progress_bar_follows_progress(capsys):
    eora(_tiny.llama(layers=2), _tiny.batches(n=1), compress="2:4", rank=2, progress=False)
    assert "EoRA" not in capsys.readouterr().err
    eora(_tiny.llama(layers=2), _tiny.batches(n=1), compress="2:4", rank=2)
    assert "EoRA" in capsys.readouterr().err
