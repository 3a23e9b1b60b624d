"""``AdapterSlots``: the adapters held in the served model, and their way there from the adapter cache.

At most ``max_loras`` adapters live in the model (the second tier of S-LoRA's / vLLM's two-tier scheme; the
:class:`~peftkit.serve.cache.AdapterCache` is the CPU tier). An adapter a request needs is fetched from the cache
in a loader thread (:meth:`AdapterSlots.fetch`, started when the request is submitted and again while it waits)
and installed when it arrives; to make room, the least recently used adapter that no running request needs is
taken out. An evicted adapter whose config equals the new one's lends it its modules (renamed, the new tensors
copied in) instead of being deleted and the new one built. Every install goes through
:meth:`AdaptedModel.load_tensors` (a new adapter) or :meth:`AdaptedModel.assign_tensors` (reused modules), the one
path from saved tensors to adapter modules, then checks every module's rank against ``max_rank`` and, with
``svd_rank``, converts modules without a low-rank form to their truncated SVD
(:func:`peftkit.interop.svd.svd_lowrank`).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import AdapterFileError, BaseModelMismatch, InvalidConfigError, PeftkitError
from peftkit.core.model import AdaptedModel
from peftkit.core.protocol import Adapter
from peftkit.core.registry import get_method
from peftkit.core.state import check_fingerprint
from peftkit.interop.svd import svd_lowrank

from .cache import AdapterCache, CachedAdapter
from .errors import AdapterLoadError, AdapterRankError

__all__ = ["AdapterSlots"]


class AdapterSlots:
    """Adapters in ``model``, least recently used first out.

    Args:
        model: the served model (adapters are added and deleted here only).
        cache: where adapters come from.
        max_loras: adapters held in the model at once.
        max_rank: the largest rank accepted (the saved config's ``r`` and every module's low-rank form).
        svd_rank: convert adapters without a low-rank form to rank-``svd_rank`` truncated SVDs (``None``: keep them
            exact on the per-group path).
        metrics: counters ``adapter_loads`` and ``adapter_unloads`` are added up here.
        wake: called when a fetch ends (the scheduler's loop waits for it).
    """

    def __init__(
        self,
        model: AdaptedModel,
        cache: AdapterCache,
        *,
        max_loras: int,
        max_rank: int,
        svd_rank: int | None,
        metrics: dict[str, int],
        wake: Callable[[], Any],
    ) -> None:
        if svd_rank is not None and not 0 < svd_rank <= max_rank:
            raise InvalidConfigError(f"svd_rank must lie in [1, max_rank={max_rank}], got {svd_rank}")
        self.model, self.cache = model, cache
        self.max_loras, self.max_rank, self.svd_rank = max_loras, max_rank, svd_rank
        self.metrics, self._wake = metrics, wake
        self.approximation_error: dict[str, float] = {}  # adapter -> worst relative error of its SVD conversion
        self._installed: OrderedDict[str, None] = OrderedDict()  # adapters in the model, LRU first
        self._retiring: set[str] = set()  # replaced or unloaded, in the model until their running requests end
        self._fetching: dict[str, Future[CachedAdapter]] = {}

    # --------------------------------------------------------------------------------------------- queries
    @property
    def installed(self) -> list[str]:
        """Adapters now in the model, least recently used first."""
        return list(self._installed)

    def __contains__(self, name: object) -> bool:
        return name in self._installed

    def retiring(self, name: str | None) -> bool:
        """Whether the model still holds a previous version of ``name`` that running requests use (new requests
        for ``name`` wait until it is out)."""
        return name in self._retiring

    def adapter_id(self, name: str | None) -> int:
        """The id that routes a row through adapter ``name`` (``-1``: the base); marks it recently used."""
        if name is None:
            return -1
        self._installed.move_to_end(name)
        return self.model.adapter_names.index(name)

    def check_compatible(self, meta: dict[str, Any]) -> None:
        """Raise a :class:`~peftkit.errors.PeftkitError` if a saved adapter (its ``adapter.json``) does not fit
        the model: unknown method, invalid config, a different base (fingerprint), a rank above ``max_rank``."""
        check_fingerprint(self.model.model, meta["base_fingerprint"])
        try:
            config = _config_of(meta)
        except TypeError as exc:
            raise InvalidConfigError(f"the saved config does not fit method {meta['method']!r}: {exc}") from None
        rank = getattr(config, "r", None)
        if isinstance(rank, int) and rank > self.max_rank:
            raise AdapterRankError(f"its rank r={rank} exceeds the engine's max_rank={self.max_rank}")

    # ------------------------------------------------------------------------------------------- fetching
    def fetch(self, name: str) -> Future[CachedAdapter]:
        """The (shared) load of adapter ``name`` into the cache, started if needed; its end wakes the loop."""
        future = self._fetching.get(name)
        if future is None:
            future = self.cache.get_async(name)
            self._fetching[name] = future
            future.add_done_callback(lambda _: self._wake())
        return future

    def prefetch(self, names: Iterable[str]) -> None:
        """Start loading ``names`` (the first adapters waiting requests need) so they are in memory when their
        requests reach the front; forget finished loads that no waiting request wants any more."""
        wanted = dict.fromkeys(names)
        for name in wanted:
            try:
                self.fetch(name)
            except PeftkitError:  # unregistered meanwhile: reported when its request reaches admission
                pass
        for name in [n for n, f in self._fetching.items() if f.done() and n not in wanted]:
            del self._fetching[name]

    def ready(self, name: str, in_use: Collection[str | None]) -> bool:
        """Start or finish the fetch of ``name`` and install it once it arrives: whether it is in the model now
        (``False``: still loading, or every slot is held by ``in_use``). Raises what failed the fetch or the
        install (an unregistered, unloadable or unfitting adapter)."""
        future = self.fetch(name)
        if not future.done():
            return False
        try:
            installed = self.install(future.result(), in_use)  # False: every slot is busy, wait for one
        except Exception:
            self._fetching.pop(name, None)
            raise
        if installed:
            self._fetching.pop(name, None)
        return installed

    def forget_fetch(self, name: str) -> None:
        """Drop a fetch of ``name`` (a newer version was registered: the old one must not be installed)."""
        self._fetching.pop(name, None)

    # ------------------------------------------------------------------------------------------ installing
    def install(self, entry: CachedAdapter, in_use: Collection[str | None]) -> bool:
        """Put a loaded adapter into the model; ``False`` if every slot is held by an adapter in ``in_use``."""
        name = entry.name
        if name in self._installed:
            return True
        config = _config_of(entry.meta)
        reused = None
        while len(self._installed) >= self.max_loras:
            victim = next((n for n in self._installed if n not in in_use), None)
            if victim is None:
                return False
            if reused is None and self._reusable(victim, config, entry):
                reused = victim  # same config: its modules take the new tensors (no delete + build)
                del self._installed[victim]
                self.metrics["adapter_unloads"] += 1
            else:
                self.remove(victim)
        if reused is not None:
            self.model.rename_adapter(reused, name)
        self._build(name, entry, config, fresh=reused is None)
        self._installed[name] = None
        self.metrics["adapter_loads"] += 1
        return True

    def try_install(self, entry: CachedAdapter) -> None:
        """Install ``entry`` under a scratch name and take it out again: raises what installing it for a request
        would raise (tensors that do not fit its config, a rank above ``max_rank``), changing nothing."""
        probe = f"probe-{secrets.token_hex(8)}"
        self._build(probe, entry, _config_of(entry.meta))
        self._drop(probe)

    def _build(self, slot: str, entry: CachedAdapter, config: AdapterConfig, fresh: bool = True) -> None:
        """Fill adapter ``slot`` of the model (added here if ``fresh``, else already holding modules of the same
        config and targets) with ``entry``'s saved tensors; on any error ``slot`` is deleted and the error, an
        :class:`AdapterLoadError` naming ``entry``, propagates."""
        try:
            if fresh:  # all or nothing: load_tensors removes the adapter again if it fails
                self.model.load_tensors(
                    slot,
                    config,
                    entry.tensors,
                    activate=False,
                    source=entry.source,
                    fingerprint=entry.meta["base_fingerprint"],
                )
        except (AdapterFileError, BaseModelMismatch) as exc:
            raise AdapterLoadError(entry.name, str(exc)) from None
        try:
            if not fresh:
                try:
                    self.model.assign_tensors(slot, entry.tensors, source=entry.source)
                except AdapterFileError as exc:
                    raise AdapterLoadError(entry.name, str(exc)) from None
            self._convert(slot, config, entry.name)
        except BaseException:
            self._drop(slot)
            raise

    def _reusable(self, victim: str, config: AdapterConfig, entry: CachedAdapter) -> bool:
        """Whether the modules of installed adapter ``victim`` can take ``entry``'s tensors: same config and the
        same modules as ``entry`` was saved for, not an SVD stand-in, and shapes that the config alone fixes (no
        module reshapes to its saved state in ``fit_state``: a reused module could hold another adapter's
        structure, e.g. grown components)."""
        if self.model.configs[victim] != config or victim in self.approximation_error:
            return False
        if sorted(self.model.layer_paths[victim]) != sorted(entry.meta["base_fingerprint"]):
            return False  # a fresh build reports the mismatch (load_tensors)
        return all(type(a).fit_state is Adapter.fit_state for a in self.model.adapter_modules(victim).values())

    @torch.no_grad()
    def _convert(self, name: str, config: AdapterConfig, shown: str) -> None:
        """Check every module's rank against ``max_rank``; with ``svd_rank``, replace modules that have no
        low-rank form by their truncated SVD and record the worst relative error. Errors name adapter
        ``shown``."""
        worst = None
        for path, adapter in self.model.adapter_modules(name).items():
            layer = self.model._layer(path)
            form = adapter.lowrank(layer.base)
            if form is not None:
                if form.down.shape[0] > self.max_rank:
                    raise AdapterLoadError(
                        shown, f"module {path!r} has rank {form.down.shape[0]} > max_rank={self.max_rank}"
                    )
                continue
            converted = svd_lowrank(adapter, layer.base, self.svd_rank) if self.svd_rank else None
            if converted is None:
                continue  # exact per-group fallback
            module, error = converted
            worst = error if worst is None else max(worst, error)
            layer.add(name, module)  # replaces the module
        if worst is not None:
            self.approximation_error[name] = worst

    # ------------------------------------------------------------------------------------------- removing
    def remove(self, name: str) -> None:
        """Take installed adapter ``name`` out of the model."""
        self._drop(name)
        del self._installed[name]
        self.metrics["adapter_unloads"] += 1

    def _drop(self, name: str) -> None:
        self.approximation_error.pop(name, None)
        self.model.delete_adapter(name)

    def retire(self, name: str, in_use: Collection[str | None]) -> None:
        """Take the version of ``name`` now in the model out: at once if ``in_use`` (the running requests'
        adapters) lacks it, else when the last one ends (:meth:`release`); until then no new request for
        ``name`` is admitted, so none mixes the old version with a newer one."""
        if name not in self._installed:
            return
        if name in in_use:
            self._retiring.add(name)
        else:
            self.remove(name)

    def release(self, in_use: Collection[str | None]) -> None:
        """Take out the retiring adapters that no running request (``in_use``) needs any more."""
        for name in [n for n in self._retiring if n not in in_use]:
            self._retiring.discard(name)
            if name in self._installed:
                self.remove(name)


def _config_of(meta: dict[str, Any]) -> AdapterConfig:
    return get_method(meta["method"]).config_class.from_dict(meta["config"])
