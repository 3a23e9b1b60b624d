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
    out = call(model, batch)
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


# ------------------------------------------------------------------------------------- activation statistics
# Forward passes that record what flows into or out of chosen modules (EoRA's input covariance, AFM's output
# mean and covariance, LoRD's feature mode). Counted over tokens: every row of the flattened activation
# ``[..., d]``, padding rows excluded when the batch carries an ``attention_mask`` of the leading shape.


def call(model: Any, batch: Any) -> Any:
    """``model(**batch)`` for a dict batch, ``model(*batch)`` for a tuple, else ``model(batch)``."""
    return model(**batch) if isinstance(batch, Mapping) else model(*batch) if isinstance(batch, tuple) else model(batch)


class Moments:
    """Running sums of ``n`` token rows ``x ∈ R^d`` in float64: ``Σx`` and ``Σxxᵀ``."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).double()
        if self.total is None:
            self.total = rows.new_zeros(rows.shape[-1])
            self.outer = rows.new_zeros(rows.shape[-1], rows.shape[-1])
        assert self.outer is not None
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer.addmm_(rows.T, rows)

    def _sums(self) -> tuple[Tensor, Tensor]:
        if self.total is None or self.outer is None or self.count == 0:
            raise InvalidConfigError("no calibration tokens reached this module: the calibration data is empty")
        return self.total, self.outer

    @property
    def mean(self) -> Tensor:
        """``E[x]`` (float64)."""
        return self._sums()[0] / self.count

    @property
    def second(self) -> Tensor:
        """``E[xxᵀ] = XᵀX / n`` (float64)."""
        return self._sums()[1] / self.count

    @property
    def covariance(self) -> Tensor:
        """``E[xxᵀ] − E[x]E[x]ᵀ`` (float64)."""
        mean = self.mean
        return self.second - torch.outer(mean, mean)


class Recorder:
    """Forward hooks that add the inputs (``side="input"``) or outputs (``"output"``) of ``modules`` to one
    :class:`Moments` each while the context is open; ``mask`` (``[batch, seq]``, set per batch by the caller)
    drops padded token rows."""

    def __init__(self, modules: Mapping[str, torch.nn.Module], side: str = "input") -> None:
        if side not in ("input", "output"):
            raise InvalidConfigError(f"side must be 'input' or 'output', got {side!r}")
        self.modules, self.side = dict(modules), side
        self.stats = {path: Moments() for path in self.modules}
        self.mask: Tensor | None = None
        self._handles: list[Any] = []

    def _hook(self, path: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if self.side == "input" else output[0] if isinstance(output, tuple) else output
            if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
                x = x[self.mask.bool()]
            self.stats[path].add(x)

        return hook

    def __enter__(self) -> Recorder:
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def batch_mask(batch: Any) -> Tensor | None:
    """The ``attention_mask`` of a dict batch, if any."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask if isinstance(mask, Tensor) else None


@torch.no_grad()
def module_statistics(
    model: Any,
    modules: Mapping[str, torch.nn.Module],
    batches: Iterable[Any],
    *,
    side: str = "input",
    desc: str = "calibration",
) -> dict[str, Moments]:
    """One pass of ``model`` over ``batches`` recording the inputs or outputs of ``modules`` (``{path: module}``).

    Raises:
        InvalidConfigError: no batch, or no token reached a module.
    """
    with Recorder(modules, side) as recorder:
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            recorder.mask = batch_mask(batch)
            call(model, batch)
    for stats in recorder.stats.values():
        stats._sums()
    return recorder.stats


_CACHE = ("past_key_values", "past_key_value", "cache", "layer_past")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


@torch.no_grad()
def block_inputs(model: Any, block: torch.nn.Module, batches: Iterable[Any]) -> list[tuple[tuple, dict, Tensor | None]]:
    """For each batch, the positional and keyword arguments ``block`` (the first transformer block) is called
    with, and the batch's attention mask; the forward stops there. Blocks can then be replayed one at a time
    (:func:`replay`), each seeing the outputs of the blocks before it as they are at that moment: the sequential
    calibration of GPTQ / EoRA (``llama_sequential``)."""
    captured: list[tuple[tuple, dict, Tensor | None]] = []
    mask: list[Tensor | None] = [None]

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # a KV cache would grow with every replay of the block: calibration replays without one
        kwargs = {k: v for k, v in kwargs.items() if "cache" not in type(v).__name__.lower() and k not in _CACHE}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((args, kwargs, mask[0]))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            mask[0] = batch_mask(batch)
            try:
                call(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not captured:
        raise InvalidConfigError("the calibration data is empty: no batch reached the first block")
    return captured


def _hidden(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    """The hidden states a block is called with (first positional argument, or ``hidden_states=``)."""
    if args:
        return args[0], args[1:], kwargs
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


@torch.no_grad()
def replay(
    block: torch.nn.Module, inputs: list[tuple[tuple, dict, Tensor | None]], recorder: Recorder | None = None
) -> list[tuple[tuple, dict, Tensor | None]]:
    """Run ``block`` on each captured input (recording with ``recorder`` if given) and return the inputs of the
    next block: its output hidden states with the same other arguments."""
    out = []
    for args, kwargs, mask in inputs:
        hidden, rest, other = _hidden(args, kwargs)
        if recorder is not None:
            recorder.mask = mask
        y = block(hidden, *rest, **other)
        y = y[0] if isinstance(y, tuple) else y
        out.append(((y, *rest), other, mask) if args else ((), {**other, "hidden_states": y}, mask))
    return out
