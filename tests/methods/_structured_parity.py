"""Helpers for the structured / sparse / Kronecker method tests: one seeded ``Linear(24, 20)`` to build an
adapter on, and PEFT parity (the same trained tensors loaded into a PEFT model and a peftkit model must give
the same outputs, gradients and merged weights)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import peftkit as pk

ATOL = 1e-5


def seeded_linear() -> tuple[pk.core.base.BaseView, nn.Linear]:
    """A ``Linear(24, 20)`` drawn from seed 0 and its view."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    return pk.core.base.BaseView(lin), lin


def on_linear(method: type[pk.Adapter], config: pk.AdapterConfig) -> tuple[Any, pk.core.base.BaseView, nn.Linear]:
    """``(method(view, config), view, linear)`` on :func:`seeded_linear`."""
    base, lin = seeded_linear()
    return method(base, config), base, lin


def peft_model(base: nn.Module, peft_config: object) -> nn.Module:
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), peft_config).eval()


def fill(model: nn.Module, prefix: str, seed: int = 0, std: float = 0.3) -> None:
    """Random values for every trainable PEFT tensor whose name contains ``prefix``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if prefix in n:
                p.copy_(std * torch.randn(p.shape, generator=g))


def copy_into_ours(
    pm: nn.Module,
    ours: pk.AdaptedModel,
    prefix: str,
    name: str = "a",
    rename: Callable[[str], str] = lambda n: n,
    peft_name: str = "default",
) -> int:
    """Copy PEFT's ``base_model.model.<path>.<prefix><rename(ours)>.<peft_name>`` into each of our adapter
    tensors (parameters and persistent buffers). Returns how many tensors were copied."""
    peft_tensors = dict(pm.named_parameters()) | dict(pm.named_buffers())
    copied = 0
    with torch.no_grad():
        for path, adapter in ours.adapter_modules(name).items():
            for n, t in list(adapter.named_parameters()) + list(adapter.named_buffers()):
                key = f"base_model.model.{path}.{prefix}{rename(n)}.{peft_name}"
                if key not in peft_tensors:
                    continue
                src = peft_tensors[key]
                assert src.shape == t.shape, (key, src.shape, t.shape)
                t.copy_(src)
                copied += 1
    return copied


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out[0]


def assert_parity(pm: nn.Module, ours: pk.AdaptedModel, x: torch.Tensor, atol: float = ATOL) -> None:
    """Same forward, same loss gradients on the base inputs' outputs, same merged model."""
    pm.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(ours, x), run(pm, x), atol=atol, rtol=1e-5)
    merged_peft = copy.deepcopy(pm).merge_and_unload()
    merged_ours = copy.deepcopy(ours).merge()
    sd_p, sd_o = merged_peft.state_dict(), merged_ours.state_dict()
    assert sd_p.keys() == sd_o.keys()
    for k in sd_p:
        torch.testing.assert_close(sd_o[k], sd_p[k], atol=atol, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def assert_grad_parity(
    pm: nn.Module,
    ours: pk.AdaptedModel,
    x: torch.Tensor,
    prefix: str,
    atol: float = 1e-4,
    name: str = "a",
    skip: frozenset[str] = frozenset(),
    rename: Callable[[str], str] = lambda n: n,
) -> None:
    """The loss gradients of every copied tensor (except those named in ``skip``) agree."""
    for m in (pm, ours):
        m.zero_grad()
        run(m, x).pow(2).mean().backward()
    grads_p = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    checked = 0
    for path, adapter in ours.adapter_modules(name).items():
        for n, p in adapter.named_parameters():
            key = f"base_model.model.{path}.{prefix}{rename(n)}.default"
            if key in grads_p and n not in skip:
                torch.testing.assert_close(p.grad, grads_p[key], atol=atol, rtol=1e-4)
                checked += 1
    assert checked > 0
