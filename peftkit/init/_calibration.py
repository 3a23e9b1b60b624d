"""Gradient passes over calibration batches, shared by the data-aware initialisers.

The gradient is taken with respect to the *base* weights of the layers an adapter targets, with the adapters
disabled (the gradient of the pre-trained model, as in LoRA-GA, LoRA-SB and LoKU), in training mode (the
official LoRA-GA / LoRA-SB estimation calls ``model.train()``), and only those weights require grad for the
pass (what PEFT's ``estimate_gradients`` does too); their ``requires_grad`` flags and the model's mode are
restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from peftkit.core.errors import InvalidConfigError
from peftkit.core.layer import AdaptedLayer
from peftkit.core.model import AdaptedModel
from peftkit.core.protocol import Adapter

LossFn = Callable[[Any, Any], Tensor]


def default_loss(model: Any, batch: Any) -> Tensor:
    """``model(**batch).loss`` for a dict batch (Hugging Face models given ``labels``), ``model(*batch)`` for a
    tuple; the output must carry a ``loss`` (otherwise pass ``loss_fn``)."""
    out = model(**batch) if isinstance(batch, Mapping) else model(*batch) if isinstance(batch, tuple) else model(batch)
    loss = out if isinstance(out, Tensor) and out.dim() == 0 else getattr(out, "loss", None)
    if loss is None:
        raise InvalidConfigError(
            "the model's output has no loss for this batch: "
            "pass loss_fn(model, batch) -> scalar loss to the initialiser"
        )
    return loss


def token_count(batch: Any) -> int:
    """Tokens a batch's loss averages over: the non-ignored ``labels`` (``!= -100``) of a dict batch, else the
    batch size (inferred: the official FILA code weights each batch's squared gradient by its token count)."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if isinstance(labels, Tensor):
        return int((labels != -100).sum())
    first = (
        next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0] if isinstance(batch, tuple) else batch
    )
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 1


def target_layers(model: AdaptedModel, name: str) -> dict[str, tuple[AdaptedLayer, Adapter]]:
    """``{module path: (layer, adapter module)}`` of adapter ``name``'s own method (``modules_to_save`` heads
    are left out)."""
    method = type(model.configs[name]).method
    return {
        path: (model.adapted_layer(path), adapter)
        for path, adapter in model.adapter_modules(name).items()
        if adapter.method == method
    }


def per_batch_gradients(
    model: AdaptedModel, name: str, batches: Iterable[Any], loss_fn: LossFn | None, desc: str
) -> Iterator[tuple[Any, dict[str, Tensor]]]:
    """For each batch: ``(batch, {module path: ∂loss/∂W})`` with ``W`` in the canonical ``[out, fan_in]``
    layout, float32. A tqdm bar counts the batches."""
    loss_fn = loss_fn or default_loss
    layers = target_layers(model, name)
    if not layers:
        raise InvalidConfigError(f"adapter {name!r} adapts no layer whose weight a gradient pass could reach")
    weights = [layer.base.module.weight for layer, _ in layers.values()]
    flags = [w.requires_grad for w in weights]
    was_training = model.training
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(model.adapters_disabled())
        stack.enter_context(torch.enable_grad())
        model.train()
        for w in weights:
            w.requires_grad_(True)
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            out = {}
            for (path, (layer, _)), w, g in zip(layers.items(), weights, grads):
                g = torch.zeros_like(w) if g is None else g.detach()
                g = g.T if layer.base.transposed else g
                out[path] = g.reshape(g.shape[0], -1).float()
            yield batch, out
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        model.train(was_training)
        stack.close()


def seeded(seed: int, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A forked RNG seeded with ``seed`` (randomised SVDs with fixed seeds, global RNG left untouched)."""

    @contextlib.contextmanager
    def block() -> Iterator[None]:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    return block()
