"""``AdaptedModel``: a base model with named adapters.

model = pk.adapt(base, pk.LoRAConfig(r=8, targets=["query", "value"]))
model.add_adapter("b", pk.get_config("dora", r=4))
out = model(**batch, adapter_ids=torch.tensor([0, 1, -1, 0]))    # one adapter per row
"""

from __future__ import annotations

import contextlib
import inspect
import re
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from . import inject, persist
from .base import BaseView
from .config import AdapterConfig
from .context import ForwardContext, batch_rows, check_adapter_ids, check_task_ids, peft_adapter_names
from .dense import Full
from .errors import (
    AdapterExistsError,
    AdapterIdsError,
    AdapterNameError,
    AdapterNotFoundError,
    AlreadyAdaptedError,
    NoAdaptersError,
    NotMergeableError,
    UnsupportedAdapterError,
)
from .layer import AdaptedLayer, Routing
from .peft_names import PEFT_ATTRIBUTES, PeftNames
from .persist import Persistence
from .protocol import Adapter, Initializer
from .registry import initializer, method_of
from .schedule import ScheduleWatch

A = TypeVar("A", bound=Adapter)
DEFAULT_ADAPTER = "default"
_NAME = re.compile(r"[A-Za-z0-9_\-]{1,128}")


def check_adapter_name(name: object) -> str:
    """Return ``name`` if it is a valid adapter name (1-128 letters, digits, ``_`` or ``-``), else raise
    :class:`~peftkit.errors.AdapterNameError`. Names never contain path separators or dots, so an adapter saved
    or served under its name cannot escape its folder."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterNameError(f"invalid adapter name {name!r}: use 1-128 letters, digits, '_' or '-'")
    return name


@dataclass(frozen=True)
class TrainableReport:
    """Trainable and total parameter counts of an adapted model."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable: {self.percent:.4f}%"


class AdaptedModel(PeftNames, Persistence, nn.Module):
    """A base model whose target modules carry named adapters.

    Attribute access falls through to the base model (``model.config``, ``model.generate`` ...), and
    ``forward`` accepts everything the base model's forward accepts plus ``adapter_ids``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, AdaptedModel):
            raise AlreadyAdaptedError("the model is already an AdaptedModel; use add_adapter() to add another adapter")
        self.model = model
        self.routing = Routing()
        self.configs: dict[str, AdapterConfig] = {}
        self.layer_paths: dict[str, list[str]] = {}
        self.merged_and_unloaded: list[str] = []  # what merge(unload=True) folded in (named when saving fails)
        self._schedules = ScheduleWatch()  # warns when a training loop never calls step_adapters
        for p in model.parameters():
            p.requires_grad_(False)
        self._expose_base_signature()

    # ------------------------------------------------------------------------------------------- attributes
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
        try:
            return getattr(self.model, name)
        except AttributeError:
            pass
        hint = PEFT_ATTRIBUTES.get(name)
        raise AttributeError(
            f"'AdaptedModel' object has no attribute {name!r}, nor has the wrapped {type(self.model).__name__}"
            + (f"; {hint}" if hint else "")
        ) from None

    def _expose_base_signature(self) -> None:
        """Make ``inspect.signature(model.forward)`` show the base model's arguments (plus ``adapter_ids``),
        so tools that filter inputs by the forward signature (HF ``Trainer``) see the real argument names."""
        try:
            base = inspect.signature(self.model.forward)
            params = [p for p in base.parameters.values() if p.kind is not p.VAR_KEYWORD]
            var_kw = [p for p in base.parameters.values() if p.kind is p.VAR_KEYWORD]
            ids = inspect.Parameter("adapter_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
            tasks = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
            this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
            sig = inspect.Signature([this, *params, ids, tasks, *var_kw])
        except (TypeError, ValueError):
            return
        fn = AdaptedModel.forward
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__ = fn.__kwdefaults__
        copy.__signature__ = sig  # type: ignore[attr-defined]
        self.__dict__["forward"] = types.MethodType(copy, self)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        *args: Any,
        adapter_ids: Tensor | Sequence[int | str | None] | None = None,
        task_ids: Tensor | Sequence[int] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model. ``adapter_ids``: one entry per batch row, an adapter index (position in
        :attr:`adapter_names`), an adapter name, or ``-1`` / ``None`` for the base model alone (PEFT's
        ``adapter_names=[..., "__base__"]`` is accepted too). ``task_ids``: one task index per batch row, handed
        to the adapters that declare ``uses_context`` (task-routed methods such as Poly/MHR); other adapters
        ignore them."""
        context = self._context(adapter_ids, task_ids, args, kwargs)  # all checked first: a bad argument sets nothing
        if self.training and torch.is_grad_enabled():
            self._schedules.check(self)
        self.routing.call = context
        kept = False
        try:
            out = self.model(*args, **kwargs)
            # With gradients, a backward may recompute checkpointed blocks (gradient checkpointing) after this
            # call returns: they must see the same per-row adapters, so the context stays until the next call.
            kept = torch.is_grad_enabled()
            return out
        finally:
            if not kept:
                self.routing.call = ForwardContext()  # nothing of this call (per-forward state included) outlives it

    def generate(
        self,
        *args: Any,
        adapter_ids: Tensor | Sequence[int | str | None] | None = None,
        task_ids: Tensor | Sequence[int] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's ``generate`` (Hugging Face) with the adapters, and optionally one adapter per
        prompt: ``adapter_ids`` / ``task_ids`` as in :meth:`forward`, one entry per row of ``input_ids``. Rows that
        ``generate`` expands (``num_beams``, ``num_return_sequences``: each prompt repeated in place) keep their
        prompt's adapter."""
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise AttributeError(f"the wrapped {type(self.model).__name__} has no generate()")
        context = self._context(adapter_ids, task_ids, args, kwargs)
        prompts = batch_rows(args, kwargs)
        routing = self.routing

        def route(module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
            # generate calls the base model itself, step by step: a context per step, rows repeated as it did
            rows = call_kwargs.get("input_ids", call_kwargs.get("inputs_embeds"))
            rows = rows.shape[0] if isinstance(rows, Tensor) else batch_rows(call_args, call_kwargs)
            if prompts is None or rows is None or rows % prompts:
                raise AdapterIdsError(f"generate ran a batch of {rows} rows for {prompts} prompts")
            routing.call = context.repeated(rows // prompts)

        hook = self.model.register_forward_pre_hook(route, with_kwargs=True)
        try:
            return generate(*args, **kwargs)
        finally:
            hook.remove()
            routing.call = ForwardContext()

    def _context(self, adapter_ids: Any, task_ids: Any, args: tuple, kwargs: dict[str, Any]) -> ForwardContext:
        adapter_ids = peft_adapter_names(adapter_ids, kwargs)
        rows = batch_rows(args, kwargs)
        ids, shared = (None, None) if adapter_ids is None else check_adapter_ids(adapter_ids, self.routing.order, rows)
        tasks = None if task_ids is None else check_task_ids(task_ids, rows)
        return ForwardContext(ids, shared, tasks)

    # ---------------------------------------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters, in the order they were added (position = id in ``adapter_ids``)."""
        return list(self.routing.order)

    @property
    def active_adapters(self) -> list[str]:
        return list(self.routing.active)

    def add_adapter(
        self, name: str, config: AdapterConfig, *, activate: bool | None = None, init: Initializer | str | None = None
    ) -> None:
        """Inject a new adapter. The first adapter becomes active (and trainable); later ones only when
        ``activate=True``. ``init``: a data-aware initialiser (:mod:`peftkit.init`, e.g. ``"pissa"`` or
        ``pk.init.LoRAGA(batches)``): ``init.prepare(config)`` gives the config the adapter is built with and
        ``init.apply(model, name)`` then writes its initial values (if that fails, the adapter is removed)."""
        self.check_new_name(name)
        if init is not None:
            init = initializer(init)
            config = init.prepare(config)
        method = method_of(config)
        paths = inject.find_targets(self.model, config, method)
        save_paths = inject.named_modules_to_save(self.model, config) if config.modules_to_save else []
        if not paths and not save_paths:
            raise inject.TargetModuleNotFound(str(config.targets), dict(inject.base_modules(self.model)))
        built: list[tuple[str, Adapter]] = []
        with _seeded(config.seed):  # build everything first: a failure leaves the model untouched
            for path, cls in [(p, method) for p in paths] + [(p, Full) for p in save_paths]:
                base = inject.base_view(inject.submodule(self.model, path))
                built.append((path, inject.build_adapter(cls, base, config.for_module(path), path)))
        for path, adapter in built:
            layer = inject.wrap(self.model, path, self.routing)
            layer.add(name, adapter)
            layer.training = layer.base_layer.training  # a new adapter follows the model's train/eval mode
            adapter.train(layer.training)  # (only the new one: adding stays O(1) in the number of adapters)
        self.configs[name] = config
        self.layer_paths[name] = [p for p, _ in built]
        self.routing.order.append(name)
        if activate or (activate is None and not self.routing.active):
            self.set_adapter(name)
        else:  # inactive: frozen (the adapters just built, without walking the model for them again)
            for _, adapter in built:
                for p in adapter.parameters():
                    p.requires_grad_(False)
        if init is not None:
            try:
                init.apply(self, name)
            except BaseException:
                self.delete_adapter(name)
                raise

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapter(s); only active adapters train."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self.require(n)
        self.routing.active = tuple(names)
        self._set_trainable()

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter (unmerging it first if it was merged)."""
        self.require(name)
        for path in self.layer_paths.pop(name):
            layer = self._layer(path)
            layer.remove(name)
            if not layer.adapters:
                inject.unwrap(self.model, path)
        del self.configs[name]
        self._schedules.forget(name)
        self.routing.order.remove(name)
        # The other adapters' trainable flags do not depend on this one: no walk over all of them (a server
        # paging adapters in and out deletes one per swap, and the walk cost ~13 ms with 64 adapters).
        self.routing.active = tuple(n for n in self.routing.active if n != name)

    def rename_adapter(self, old: str, new: str) -> None:
        """Give adapter ``old`` the name ``new``; its modules, id (position in :attr:`adapter_names`), active
        and merged state stay as they are. A server reuses an evicted adapter's modules this way for a new
        adapter with the same config, instead of deleting one and building the other."""
        self.require(old)
        self.check_new_name(new)
        for path in self.layer_paths[old]:
            layer = self._layer(path)
            layer.add(new, layer.adapters.pop(old))
            if old in layer.merged:
                layer.merged[new] = layer.merged.pop(old)
        self.configs[new] = self.configs.pop(old)
        self.layer_paths[new] = self.layer_paths.pop(old)
        self._schedules.forget(old)
        self.routing.order[self.routing.order.index(old)] = new
        self.routing.active = tuple(new if n == old else n for n in self.routing.active)

    def set_static_adapters(self, static: bool = True) -> None:
        """Promise (``static=True``) that adapter tensors change only through :meth:`add_adapter`,
        :meth:`delete_adapter`, :meth:`rename_adapter` or loading, never in place afterwards (no optimizer steps,
        no ``tensor.copy_``): mixed batches then skip checking every adapter tensor's version on each forward
        (with 64 adapters on 42 modules that check costs ~3 ms of a 40 ms decode step, its reads missing the
        cache). A serving engine, which writes an adapter's tensors only while installing it, makes this
        promise; in-place changes made under it are not seen by mixed batches until ``static=False``."""
        self.routing.static_adapters = static

    def disable_adapters(self) -> None:
        """Run the bare base model. Merged adapters are unmerged first, so outputs are the base's."""
        self.unmerge()
        self.routing.enabled = False

    def enable_adapters(self) -> None:
        self.routing.enabled = True

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """``with model.adapters_disabled(): ...`` runs the base model inside the block."""
        was = self.routing.enabled
        self.disable_adapters()
        try:
            yield
        finally:
            self.routing.enabled = was

    # --------------------------------------------------------------------- PEFT's names (also PeftNames)
    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, adapter_name: str | None = None) -> AdaptedModel:
        """PEFT's ``PeftModel.from_pretrained(base, path)``: :func:`peftkit.load`."""
        return load(model, path, name=adapter_name)

    def adapted_layer(self, path: str) -> AdaptedLayer:
        """The wrapper at module path ``path`` (its adapters, merged state, base module)."""
        return self._layer(path)

    def base_view(self, path: str) -> BaseView:
        """How adapters see the base module at ``path`` (canonical weight layout, shape, kind)."""
        return self._layer(path).base

    def resolve(self, name: str | None = None) -> str:
        """``name`` if the model holds it, else (``None``) the one active adapter: the default of every function
        that takes an optional adapter name.

        Raises:
            AdapterNotFoundError: an unknown name. NoAdaptersError / AdapterNameError: no name given and not
            exactly one adapter active.
        """
        if name is not None:
            self.require(name)
            return name
        return self._single_active()

    def _layer(self, path: str) -> AdaptedLayer:
        return cast(AdaptedLayer, inject.submodule(self.model, path))

    def check_new_name(self, name: object) -> None:
        """Raise unless ``name`` is a valid adapter name the model does not hold yet (``AdapterNameError`` /
        ``AdapterExistsError``): what :meth:`add_adapter` checks first, for callers that do work before adding."""
        check_adapter_name(name)
        if name in self.configs:
            raise AdapterExistsError(f"an adapter named {name!r} already exists; delete it first or pick another name")

    def require(self, name: str) -> None:
        """Raise :class:`AdapterNotFoundError` (naming close names) unless the model holds adapter ``name``."""
        if name not in self.configs:
            raise AdapterNotFoundError(name, self.configs)

    def _set_trainable(self, names: Sequence[str] | None = None) -> None:
        """Make the parameters of adapters ``names`` (default: all) trainable iff the adapter is active."""
        active = set(self.routing.active)
        for name in self.configs if names is None else names:
            for adapter in self.adapter_modules(name).values():
                for p in adapter.parameters():
                    p.requires_grad_(name in active)

    def layers(self) -> Iterator[AdaptedLayer]:
        for _, layer in inject.adapted_layers(self.model):
            yield layer

    def modules_of(self, name: str | None, cls: type[A]) -> dict[str, A]:
        """``{module path: module}`` of adapter ``name`` (default: the one active adapter) whose modules are
        ``cls`` instances (a method's helper functions use it: a ``modules_to_save`` head is left out).

        Raises:
            UnsupportedAdapterError: the adapter has no ``cls`` module (it is another method).
        """
        name = self.resolve(name)
        found = {path: m for path, m in self.adapter_modules(name).items() if isinstance(m, cls)}
        if not found:
            method = type(self.configs[name]).method
            raise UnsupportedAdapterError(f"adapter {name!r} is a {method!r} adapter, not a {cls.__name__}")
        return found

    def adapter_modules(self, name: str) -> dict[str, Adapter]:
        """``{module path: Adapter}`` of one adapter."""
        self.require(name)
        return {p: self._layer(p).adapters[name] for p in self.layer_paths[name]}

    def step_adapters(self, global_step: int) -> None:
        """Call :meth:`Adapter.step` on every module of the active adapters (trainers: once per optimizer step)."""
        self._schedules.stepped()
        for name in self.routing.active:
            for adapter in self.adapter_modules(name).values():
                adapter.step(global_step)

    # ----------------------------------------------------------------------------------------------- merging
    def merge(self, adapters: str | Sequence[str] | None = None, *, unload: bool = True) -> nn.Module:
        """Fold adapters (default: the active ones) into the base weights.

        With ``unload=True`` (default) the wrappers are removed and the plain base module is returned: no
        peftkit class is left in it. With ``unload=False`` the merge is in place and :meth:`unmerge` undoes it.
        Several adapters on one layer merge to the sum of their updates, each computed against the base weight
        (what the forward with all of them active computes). All or nothing: if one layer cannot merge, no layer
        stays merged.

        Raises:
            NotMergeableError: an adapter has no weight-space form, or ``unload=False`` while adapters are
                disabled (a disabled model must keep the base outputs: :meth:`enable_adapters` first).
        """
        if adapters is None:
            names = list(self.routing.active)
        else:
            names = [adapters] if isinstance(adapters, str) else list(adapters)
        for name in names:
            self.require(name)
        if not unload and not self.routing.enabled:
            raise NotMergeableError(
                "adapters are disabled, and merging in place would make the disabled model give adapted outputs: "
                "call enable_adapters() first (or merge(unload=True) for a plain merged model)"
            )
        per_layer: dict[str, list[str]] = {}
        for name in names:
            for path in self.layer_paths[name]:
                per_layer.setdefault(path, []).append(name)
        done: list[tuple[AdaptedLayer, list[str]]] = []
        try:
            for path, layer_names in per_layer.items():
                layer = self._layer(path)
                new = [n for n in layer_names if n not in layer.merged]
                layer.merge(new)
                done.append((layer, new))
        except BaseException:  # all or nothing: a layer that cannot merge leaves no other layer merged
            for layer, merged in reversed(done):
                for name in reversed(merged):
                    layer.unmerge(name)
            raise
        if not unload:
            return self
        self.merged_and_unloaded = [n for n in self.routing.order if n in names]
        return self._unwrap_all(keep_merged=True)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weights (exactly what merge added)."""
        for layer in self.layers():
            for name in list(layer.merged)[::-1]:
                layer.unmerge(name)

    def unload(self) -> nn.Module:
        """Remove every adapter and return the untouched base model."""
        self.unmerge()
        return self._unwrap_all(keep_merged=False)

    def _unwrap_all(self, keep_merged: bool) -> nn.Module:
        for path, _ in list(inject.adapted_layers(self.model)):
            inject.unwrap(self.model, path)
        self.configs.clear()
        self.layer_paths.clear()
        self.routing.order.clear()
        self.routing.active = ()
        return self.model

    def _single_active(self) -> str:
        """The one active adapter (what functions taking an optional adapter name use by default)."""
        if len(self.routing.active) == 1:
            return self.routing.active[0]
        if not self.configs:
            raise self.no_adapters_error()
        raise AdapterNameError(
            f"name the adapter to use: {len(self.routing.active)} of the adapters {self.adapter_names} are active"
        )

    def no_adapters_error(self) -> NoAdaptersError:
        """The error for an operation that needs adapters on a model that holds none (saying why, if merging
        removed them)."""
        merged = self.merged_and_unloaded
        why = f": merge() folded {merged} into the base weights and removed them" if merged else ""
        return NoAdaptersError(f"the model holds no adapters{why}")

    def adapter_state_dict(self, name: str) -> dict[str, Tensor]:
        """The tensors one adapter saves, keyed ``<module path>.<tensor name>``."""
        return {
            f"{path}.{key}": t for path, a in self.adapter_modules(name).items() for key, t in a.state_dict().items()
        }

    # -------------------------------------------------------------------------------------------- reporting
    def trainable_parameters(self) -> TrainableReport:
        params = {id(p): p for p in self.parameters()}.values()
        return TrainableReport(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters())

    def get_base_model(self) -> nn.Module:
        return self.model


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def adapt(
    model: nn.Module, config: AdapterConfig, name: str = DEFAULT_ADAPTER, *, init: Initializer | str | None = None
) -> AdaptedModel:
    """Wrap ``model`` and inject one adapter (active and trainable). The base parameters are frozen. ``init``:
    a data-aware initialiser (see :meth:`AdaptedModel.add_adapter`)."""
    with restore_grad_flags_on_error(model):
        adapted = AdaptedModel(model)
        adapted.add_adapter(name, config, init=init)
    return adapted


def load(base_model: nn.Module, path: str | Path, name: str | None = None) -> AdaptedModel:
    """Wrap ``base_model`` (unless it is an :class:`AdaptedModel` already) and load what :meth:`AdaptedModel.save`
    wrote at ``path``: one adapter (active, under ``name`` if given), or every adapter of a folder of several
    (their saved order and active set). On failure the base model is left as it was."""
    with restore_grad_flags_on_error(base_model):
        model = base_model if isinstance(base_model, AdaptedModel) else AdaptedModel(base_model)
        persist.load_into(model, path, name)
    return model


@contextlib.contextmanager
def restore_grad_flags_on_error(model: nn.Module) -> Iterator[None]:
    """Wrapping freezes the base; if adding the first adapter then fails, unfreeze it again, so a failed
    ``adapt`` / ``load`` leaves the user's model as it was."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
