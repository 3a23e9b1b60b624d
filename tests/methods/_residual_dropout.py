"""Helpers for the residual-init dropout tests (PiSSA, LoRA-GA, LoKU; issue 12, item 13).

PEFT's residual inits rewrite the frozen weight to ``W_res = W − s·B₀A₀`` and train a plain LoRA on it, so with
dropout ``p`` the output is ``W_res x + s·B A drop(x)``: dropout only on the trainable branch. Ours keeps ``W`` and
subtracts the frozen offset ``s·B₀A₀ x`` in the adapter; these helpers build PEFT's picture (a plain PEFT LoRA on a
copy of the base with ``W_res`` written in) from our adapter's tensors and compare the two in training mode with
the same dropout masks (the RNG is seeded identically before each forward; each model draws one mask per adapted
layer, in the same order).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

import peftkit as pk


def peft_lora_on_residual_base(base: nn.Module, ours: pk.AdaptedModel, dropout: float) -> nn.Module:
    """A PEFT LoRA (dropout ``dropout``) on a copy of ``base`` whose adapted weights are ``W − s·B₀A₀``, with our
    adapter's current ``A``, ``B`` (same rank, alpha, rsLoRA setting)."""
    from peft import LoraConfig, get_peft_model

    cfg = ours.configs["default"]
    adapters = ours.adapter_modules("default")
    rewritten = copy.deepcopy(base)
    conv1d = False
    with torch.no_grad():
        for path, a in adapters.items():
            module = rewritten.get_submodule(path)
            offset = a.scale * (a.B0 @ a.A0.reshape(a.A0.shape[0], -1))  # [out, fan_in]
            if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
                conv1d = True
                module.weight.sub_(offset.T)
            else:
                module.weight.sub_(offset.reshape(module.weight.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            rewritten,
            LoraConfig(
                r=cfg.r,
                lora_alpha=cfg.alpha,
                use_rslora=cfg.rslora,
                target_modules=sorted({p.rpartition(".")[2] for p in adapters}),
                lora_dropout=dropout,
                fan_in_fan_out=conv1d,
            ),
        )
    with torch.no_grad():
        for path, a in adapters.items():
            layer = pm.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(a.A.reshape(layer.lora_A["default"].weight.shape))
            layer.lora_B["default"].weight.copy_(a.B.reshape(layer.lora_B["default"].weight.shape))
    return pm


def move_off_init(ours: pk.AdaptedModel, seed: int = 5) -> None:
    """Move ``A`` and ``B`` off ``A₀``, ``B₀`` (as training would), so ``BA ≠ B₀A₀``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in ours.adapter_modules("default").values():
            a.A.add_(0.1 * a.A.abs().mean() * torch.randn(a.A.shape, generator=g))
            a.B.add_(0.1 * a.B.abs().mean() * torch.randn(a.B.shape, generator=g))


def assert_train_mode_parity(
    pm: nn.Module, ours: pk.AdaptedModel, run: Callable[[nn.Module], torch.Tensor], seed: int = 11
) -> float:
    """Outputs and ``A``/``B`` gradients of ``pm`` (PEFT) and ``ours`` agree in train mode with the same dropout
    masks; returns the largest output difference relative to the output's scale (for reports)."""
    ys = []
    for model in (pm.train(), ours.train()):
        model.zero_grad()
        torch.manual_seed(seed)
        y = run(model)
        (y * torch.linspace(-1, 1, y.shape[-1])).square().mean().backward()
        ys.append(y.detach())
    theirs, mine = ys
    with torch.no_grad():  # eval mode (no dropout: our fused rank-2r path) agrees too
        y_eval = run(pm.eval())
        torch.testing.assert_close(run(ours.eval()), y_eval, rtol=1e-5, atol=1e-5 * float(y_eval.abs().max()))
    pm.train()
    ours.train()
    assert (theirs - y_eval).abs().max() > 1e-3 * y_eval.abs().max()  # the dropout masks are really active
    scale = theirs.abs().max()
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * float(scale))
    for path, a in ours.adapter_modules("default").items():
        layer = pm.base_model.model.get_submodule(path)
        for peft_p, ours_p in ((layer.lora_A["default"].weight, a.A), (layer.lora_B["default"].weight, a.B)):
            want = peft_p.grad.reshape(ours_p.shape)
            torch.testing.assert_close(ours_p.grad, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    return float((mine - theirs).abs().max() / scale)
