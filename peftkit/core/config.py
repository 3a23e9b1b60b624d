"""Method settings: :class:`AdapterConfig`, the base of every method's config dataclass, and the field types
the core checks once for all (:class:`Bound`, ``PositiveInt``, ``Probability``, ...).

A config is plain, JSON-serialisable data. Its fields are validated from their annotations when it is built
(types, ``Literal`` choices, numeric ranges), then by the method's :meth:`AdapterConfig.validate` for rules that
involve several fields. Part of the method contract (:mod:`peftkit.core.protocol`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import InvalidConfigError

Targets = typing.Union[list[str], str]

# What PEFT calls a config field, and what it is in peftkit (``None``: peftkit needs no such setting).
PEFT_FIELD_NAMES: dict[str, str | None] = {
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "exclude_modules": "exclude",
    "rank": "r",
    "init_lora_weights": "init",
    "use_rslora": "rslora",
    "rank_pattern": "overrides",
    "alpha_pattern": "overrides",
    "use_dora": "the method 'dora' (pk.DoRAConfig)",
    "fan_in_fan_out": None,
    "task_type": None,
    "inference_mode": None,
    "base_model_name_or_path": None,
}
_WHY_NOT_NEEDED = {
    "fan_in_fan_out": "peftkit reads GPT-2 Conv1D's layout itself",
    "task_type": "the model class decides the task",
    "inference_mode": "eval() / requires_grad decide it",
    "base_model_name_or_path": "a saved adapter records the base model's module shapes",
}


class _ConfigType(type):
    """Checks a config's keyword arguments before the dataclass ``__init__`` sees them, so a misspelt or
    PEFT-style field name gets an :class:`InvalidConfigError` naming the fields that exist (and the peftkit
    name of a PEFT field), not a bare ``TypeError``."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise InvalidConfigError(
                f"{cls.__name__} takes keyword arguments only (e.g. {cls.__name__}(r=8, targets=[...])), "
                f"got {len(args)} positional"
            )
        known = _init_fields(cls)
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            raise InvalidConfigError(_unknown_fields_message(cls.__name__, unknown, known))
        return super().__call__(**kwargs)


def _init_fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls) if f.init)


def _unknown_fields_message(config: str, unknown: list[str], known: frozenset[str]) -> str:
    import difflib

    hints = []
    for name in unknown:
        if name in PEFT_FIELD_NAMES:
            ours = PEFT_FIELD_NAMES[name]
            if ours is None:
                hints.append(f"{name!r} is a PEFT setting peftkit does not need ({_WHY_NOT_NEEDED[name]})")
            elif ours in known or " " in ours:
                hints.append(f"PEFT's {name!r} is {ours!r} in peftkit" if " " not in ours else f"{name!r}: use {ours}")
            else:
                hints.append(f"PEFT's {name!r} has no equivalent in {config}")
        else:
            close = difflib.get_close_matches(name, sorted(known), n=2, cutoff=0.6)
            guess = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            hints.append(f"{name!r} is not a field{guess}")
    return f"{config}: {'; '.join(hints)}. Its fields: {', '.join(sorted(known))}"


@dataclass(frozen=True)
class Bound:
    """A range a config number must lie in, declared in its annotation (``Annotated[int, Bound(low=1)]``); the core
    checks it with the field's type, so ``validate()`` is left with rules across fields."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def violated(self, value: float) -> bool:
        low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        return low or (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{low}, {high}"


# The bounded numbers config fields use most (anything else: ``Annotated[float, Bound(...)]``).
PositiveInt = typing.Annotated[int, Bound(low=1)]
NonNegativeInt = typing.Annotated[int, Bound(low=0)]
PositiveFloat = typing.Annotated[float, Bound(low=0, low_open=True)]
NonNegativeFloat = typing.Annotated[float, Bound(low=0)]
Probability = typing.Annotated[float, Bound(low=0, high=1, high_open=True)]  # dropout-like rates, in [0, 1)
Fraction = typing.Annotated[float, Bound(low=0, high=1)]  # shares, densities, energies, in [0, 1]
PositiveFraction = typing.Annotated[float, Bound(low=0, high=1, low_open=True)]  # in (0, 1]


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation, with the bounds of every class in the MRO that declares it: a subclass that
    redeclares a field to change its default (``r: int = 4``) keeps the bounds of ``RankConfig.r``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for base in cls.__mro__[1:]:
        if not dataclasses.is_dataclass(base):
            continue
        for name, kind in typing.get_type_hints(base, include_extras=True).items():
            inherited = [b for b in typing.get_args(kind)[1:] if isinstance(b, Bound)]
            own = hints.get(name)
            if not inherited or own is None or own == kind:
                continue
            present = typing.get_args(own)[1:] if typing.get_origin(own) is typing.Annotated else ()
            missing = [b for b in inherited if b not in present]
            if missing:
                hints[name] = typing.Annotated[(own, *missing)]
    return hints


def _type_error(name: str, value: object, kind: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``kind`` (``None`` if it fits or the type is not checked)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Annotated:
        reason = _type_error(name, value, args[0])
        if reason is not None or value is None:  # (None: an optional field left unset; bounds are for numbers)
            return reason
        for bound in (b for b in args[1:] if isinstance(b, Bound)):
            if bound.violated(value):  # type: ignore[arg-type]
                return f"{name} must lie in {bound}, got {value!r}"
        return None
    if origin in (typing.Union, types.UnionType):
        reasons = [_type_error(name, value, a) for a in args]
        if any(r is None for r in reasons):
            return None
        for member, reason in zip(args, reasons):  # a list (or dict) given: say what is wrong inside it
            if isinstance(value, (list, dict)) and typing.get_origin(member) is type(value):
                return reason
        others = [r for a, r in zip(args, reasons) if a is not type(None)]
        if value is not None and len(others) == 1:  # an optional field given a wrong value: the value's reason
            return others[0]
        return f"{name} must be one of {' | '.join(getattr(a, '__name__', str(a)) for a in args)}, got {value!r}"
    if kind is type(None):
        return None if value is None else f"{name} must be None, got {value!r}"
    if origin is typing.Literal:
        return None if value in args else f"{name} must be one of {list(args)}, got {value!r}"
    if kind is bool:
        return None if isinstance(value, bool) else f"{name} must be True or False, got {value!r}"
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{name} must be an integer, got {value!r}"
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number, got {value!r}"
        return None if math.isfinite(value) else f"{name} must be finite, got {value!r}"
    if kind is str:
        return None if isinstance(value, str) else f"{name} must be a string, got {value!r}"
    if origin is list:
        if not isinstance(value, list):
            return f"{name} must be a list, got {value!r}"
        inner = args[0] if args else Any
        bad = next((r for r in (_type_error(f"{name}[{i}]", v, inner) for i, v in enumerate(value)) if r), None)
        return bad
    if origin is dict:
        return None if isinstance(value, dict) else f"{name} must be a dict, got {value!r}"
    return None


@dataclass(kw_only=True)
class AdapterConfig(metaclass=_ConfigType):
    r"""Settings shared by every method.

    Attributes:
        targets: which modules to adapt: module-name suffixes (``["query", "value"]`` matches
            ``encoder.layer.0.attention.self.query``; a single name such as ``"query"`` or ``"self.query"`` —
            letters, digits, ``_``, ``-``, ``.`` only — is a suffix too), a regular expression matched against the
            full module name (any other string, e.g. ``r".*layer\.[01]\..*query"``), or ``"all-linear"`` (every
            Linear / GPT-2 Conv1D except the output head).
        exclude: module-name suffixes (or a regex) never adapted, even when ``targets`` matches them.
        modules_to_save: module-name suffixes whose *whole* weight trains with this adapter (a new task head,
            say). They are adapted with a dense delta that starts at zero, so they save, merge, disable and
            mix in batches like every other adapter.
        seed: if set, the adapter's random initialisation is drawn from this seed (reproducible adapters).
        overrides: per-module settings, ``{module path or name suffix: {field: value}}`` (PEFT's
            ``rank_pattern`` / ``alpha_pattern``, for any field of the method): ``{"query": {"r": 16}}`` gives every
            ``*.query`` rank 16. An exact path wins over a suffix, a longer suffix over a shorter one. Saved with
            the config, so a reloaded adapter gets the same per-module shapes.
    """

    method: ClassVar[str] = ""

    targets: Targets = "all-linear"
    exclude: Targets | None = None
    modules_to_save: list[str] = field(default_factory=list)
    seed: int | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("targets", "exclude", "modules_to_save"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if self.targets is None:
            raise InvalidConfigError(
                "targets is None: name the modules to adapt (a list of name suffixes such as ['query', 'value']), "
                "a regular expression over full module paths, or 'all-linear'"
            )
        if isinstance(self.targets, list) and not self.targets:
            raise InvalidConfigError("targets is empty: name at least one module, a regex or 'all-linear'")
        self._check_types()
        for name in ("targets", "exclude"):
            pattern = getattr(self, name)
            if isinstance(pattern, str) and not is_name_suffix(pattern):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise InvalidConfigError(f"{name} {pattern!r} is not a valid regular expression: {exc}") from None
        self.validate()
        self._check_overrides()

    def _check_types(self) -> None:
        """Every field's value fits its annotation (numbers finite; no strings for numbers, no NaN alpha), and
        ``alpha``, the scale numerator of every method that has one, is positive (checked here, not in
        :meth:`validate`, which methods override)."""
        types_ = _field_types(type(self))
        for f in dataclasses.fields(self):
            reason = _type_error(f.name, getattr(self, f.name), types_.get(f.name, Any))
            if reason is not None:
                raise InvalidConfigError(f"{type(self).__name__}: {reason}")
        alpha = getattr(self, "alpha", None)
        if alpha is not None and not alpha > 0:
            name = type(self).__name__
            raise InvalidConfigError(f"{name}: alpha must be positive (it scales the update), got {alpha}")

    def _check_overrides(self) -> None:
        if not self.overrides:
            return
        per_module = {f.name for f in dataclasses.fields(self)} - _SHARED_FIELDS
        for key, changes in self.overrides.items():
            if not isinstance(key, str) or not key or not isinstance(changes, dict):
                raise InvalidConfigError(
                    f"overrides must map a module path or suffix to a dict of fields, got {key!r}: {changes!r}"
                )
            unknown = sorted(set(changes) - per_module)
            if unknown:
                raise InvalidConfigError(
                    f"overrides[{key!r}] sets {unknown}, which cannot vary per module; "
                    f"fields that can: {sorted(per_module)}"
                )
            try:
                self.for_module(key)  # validates the per-module config now, not at injection time
            except InvalidConfigError as exc:
                raise InvalidConfigError(f"overrides[{key!r}]: {exc}") from None

    def for_module(self, path: str) -> AdapterConfig:
        """The settings for the module at ``path``: this config with the matching :attr:`overrides` applied
        (the core builds each module's adapter from it)."""
        if not self.overrides:
            return self
        if path in self.overrides:
            changes = self.overrides[path]
        else:
            hits = [k for k in self.overrides if path.endswith("." + k)]
            if not hits:
                return self
            changes = self.overrides[max(hits, key=len)]
        return dataclasses.replace(self, **changes, overrides={})

    def validate(self) -> None:
        """Check method-specific fields; raise :class:`InvalidConfigError` naming the bad field."""

    # Small settings the conformance suite runs (targets are filled in by the suite), and the changes to them
    # that make each further variant it checks: class data, so most methods need no tiny() code.
    tiny_fields: ClassVar[dict[str, Any]] = {}
    variant_fields: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    def tiny(cls) -> AdapterConfig:
        """Small settings the conformance suite uses for this method: ``cls(**tiny_fields)`` unless overridden."""
        return cls(**cls.tiny_fields)

    @classmethod
    def tiny_variants(cls) -> list[AdapterConfig]:
        """Every variant the conformance suite checks: :meth:`tiny`, then ``tiny().replace(**changes)`` for each
        entry of ``variant_fields``."""
        tiny = cls.tiny()
        return [tiny, *(tiny.replace(**changes) for changes in cls.variant_fields)]

    def export_config(self) -> AdapterConfig:
        """The config of the form this adapter takes in foreign formats (Hugging Face PEFT): by default itself.
        A method whose saved form is not what others can read overrides it with :meth:`Adapter.export_state`
        (LoRA with a residual init exports as a plain LoRA of rank ``2r``)."""
        return self

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidConfigError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**data)


# Fields that select modules or seed the whole adapter: they cannot differ per module.
_SHARED_FIELDS = frozenset({"targets", "exclude", "modules_to_save", "seed", "overrides"})


@dataclass(kw_only=True)
class RankConfig(AdapterConfig):
    """Fields shared by low-rank methods whose update is scaled by ``alpha / r`` (subclasses redeclare a
    field to change its default and document it).

    Attributes:
        r: rank of the update.
        alpha: scale numerator; the update is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter branch's input (off in eval mode).
    """

    r: PositiveInt = 8
    alpha: PositiveFloat = 8.0
    dropout: Probability = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def is_name_suffix(target: str) -> bool:
    """Whether a ``targets`` / ``exclude`` string is a module-name suffix (only letters, digits, ``_``, ``-``
    and ``.``: ``"query"``, ``"attention.self.query"``) rather than a regular expression."""
    return target == "all-linear" or re.fullmatch(r"[\w.\-]+", target) is not None
