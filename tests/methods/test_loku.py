"""LoKU (Cha et al., 2025): inverted hinge loss, FILA init (identity at init, base untouched,
Fisher importance, constant weights reduce to PiSSA), save/load, and the unlearning example."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from _residual_dropout import assert_train_mode_parity, move_off_init, peft_lora_on_residual_base

import peftkit as pk
from peftkit.init import fila_factors, inverted_hinge_loss
from peftkit.methods.lora import pissa_factors

TARGETS = ["c_attn", "c_fc"]


def tiny_gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 LM without dropout (the Fisher passes run in training mode, as the official code)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    cfg = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, **no_dropout
    )
    return GPT2LMHeadModel(cfg).eval()


def _sets() -> tuple[list[dict], list[dict]]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (8, 6), generator=g)
    labels = ids.clone()
    labels[:2, :2] = -100  # ignored tokens do not count
    batch = lambda i, lab: {"input_ids": i, "labels": lab}  # noqa: E731
    return [batch(ids[:2], labels[:2]), batch(ids[2:4], labels[2:4])], [batch(ids[4:], labels[4:])]


def test_ihl_range_and_value() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=g) * 4
    labels = torch.randint(0, 11, (5, 7), generator=g)
    labels[0, :3] = -100
    loss = inverted_hinge_loss(logits, labels)
    p = logits.softmax(-1)
    keep = labels != -100
    per = []
    for i, j in keep.nonzero().tolist():
        y = int(labels[i, j])
        other = torch.cat([p[i, j, :y], p[i, j, y + 1 :]]).max()
        per.append(1 + p[i, j, y] - other)
    torch.testing.assert_close(loss, torch.stack(per).mean())
    for scale in (0.0, 1.0, 100.0):  # uniform, random, near one-hot predictions
        value = inverted_hinge_loss(torch.randn(64, 11, generator=g) * scale, torch.randint(0, 11, (64,), generator=g))
        assert 0.0 <= float(value) <= 2.0
    confident = torch.full((1, 11), -50.0)
    confident[0, 3] = 50.0
    assert float(inverted_hinge_loss(confident, torch.tensor([3]))) == pytest.approx(2.0)
    assert float(inverted_hinge_loss(confident, torch.tensor([4]))) == pytest.approx(0.0, abs=1e-6)


def test_ihl_gradient_lowers_the_true_token_and_raises_the_runner_up() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]], requires_grad=True)
    label = torch.tensor([0])
    inverted_hinge_loss(logits, label).backward()
    with torch.no_grad():
        before = logits.softmax(-1)
        after = (logits - 0.1 * logits.grad).softmax(-1)
    assert after[0, 0] < before[0, 0]  # p_y goes down
    assert after[0, 1] > before[0, 1]  # the runner-up goes up


def test_constant_importance_reduces_to_pissa() -> None:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(20, 12, generator=g))
    v, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    w = u @ torch.diag(2.0 * 0.3 ** torch.arange(12.0)) @ v.T
    importance = torch.full_like(w, 0.25)  # w_i = sqrt(12 · 0.25) = sqrt(3) for every row
    a, b = fila_factors(w, importance, 3, 2.0, niter=8)
    pa, pb = pissa_factors(w, 3, 2.0)
    c = 3.0**0.5
    torch.testing.assert_close(b @ a, (c / (c + 1e-5)) * (pb @ pa), atol=1e-5, rtol=1e-5)


def test_fila_init_is_identity_with_untouched_base_and_uses_the_fisher_ratio(tmp_path) -> None:
    forget, retain = _sets()
    base = tiny_gpt2()
    ids = forget[0]["input_ids"]
    want = base(ids).logits
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    init = pk.init.LoKU(forget, retain)
    model = pk.adapt(copy.deepcopy(base), pk.LoRAConfig(r=2, alpha=8, targets=TARGETS), init=init).eval()
    assert model.configs["default"].init == "loku"
    torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)
    for n, p in model.get_base_model().named_parameters():
        if "adapters" not in n:
            assert torch.equal(p, weights[n.replace("base_layer.", "")]), n
    # the importance of one layer, computed directly: I = (F_f/f_cnt) / (1e-5 + F_r/r_cnt), F = Σ g²·n_tok
    path = "transformer.h.0.attn.c_attn"

    def fisher(batches: list[dict]) -> torch.Tensor:
        net = copy.deepcopy(base).train()
        total, tokens = 0.0, 0
        for batch in batches:
            net.zero_grad()
            net(**batch).loss.backward()
            n = int((batch["labels"] != -100).sum())
            total = total + net.get_submodule(path).weight.grad.T.square() * n
            tokens += n
        return total / tokens

    want_i = fisher(forget) / (1e-5 + fisher(retain))
    fresh = pk.adapt(copy.deepcopy(base), pk.LoRAConfig(r=2, alpha=8, targets=TARGETS))
    torch.testing.assert_close(init.importance(fresh, "default")[path], want_i, rtol=1e-4, atol=1e-6)
    adapter = model.adapter_modules("default")[path]
    a, b = fila_factors(model.get_submodule(f"model.{path}").base.weight, want_i, 2, 4.0)
    torch.testing.assert_close(adapter.B @ adapter.A, b @ a, rtol=1e-3, atol=1e-5)
    # trained, saved, reloaded onto the untouched base
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    trained = model(ids).logits
    model.save(tmp_path / "loku")
    loaded = pk.load(tiny_gpt2(), tmp_path / "loku").eval()
    assert torch.equal(loaded(ids).logits, trained)


def test_unlearning_example_raises_forget_loss_and_keeps_retain_loss() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    try:
        import unlearning_loku
    finally:
        sys.path.pop(0)
    result = unlearning_loku.main(pretrain_steps=150, unlearn_steps=20, verbose=False)
    assert result["forget_at_init"] == pytest.approx(result["forget_before"], abs=1e-4)  # identity at init
    assert result["retain_at_init"] == pytest.approx(result["retain_before"], abs=1e-4)
    assert result["forget_after"] > result["forget_before"] + 3.0  # forgotten (NLL up by > 3 nats)
    assert result["retain_after"] < result["retain_before"] + 0.25  # retained (NLL stays close)


@pytest.mark.parity
def test_dropout_in_training_leaves_the_frozen_offset_undropped() -> None:
    """With dropout in training, ``y = W_res x + s·B A drop(x)``: the frozen FILA offset ``s·B₀A₀`` sees the
    undropped ``x`` (PEFT's residual convention). Compared with a PEFT LoRA on ``W_res`` (same masks), GPT-2 Conv1D."""
    pytest.importorskip("peft")
    forget, retain = _sets()
    base = tiny_gpt2()
    cfg = pk.LoRAConfig(r=2, alpha=8, targets=TARGETS, dropout=0.2)
    ours = pk.adapt(copy.deepcopy(base), cfg, init=pk.init.LoKU(forget, retain))
    move_off_init(ours)
    pm = peft_lora_on_residual_base(base, ours, 0.2)
    ids = forget[0]["input_ids"]
    assert_train_mode_parity(pm, ours, lambda m: m(ids).logits)
