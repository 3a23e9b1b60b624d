"""The generic checks every registered method must pass, on every base-layer kind it supports.

Nothing here names a method: the combinations come from the registry (``list_methods()``), each method's
``config_class.tiny_variants()`` and ``supports()``; exceptions come only from the method's ``exempt`` dict.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from conftest import make_tiny_net, tiny_bert, tiny_gpt2
from torch import Tensor, nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.core.layer import AdaptedLayer
from peftkit.errors import NotMergeableError, UnsupportedLayerError

# The properties a method's ``exempt`` dict may name (with the spec's reason):
#   identity_at_init: the adapted model need not equal the base at init;
#   mergeable: the method has no weight-space form; merge() must raise NotMergeableError and change nothing.
EXEMPTIONS = frozenset({"identity_at_init", "mergeable"})

MERGE_ATOL = 1e-5  # merged forward vs unmerged forward, fp32 (spec)
RESTORE_ATOL = 1e-6  # unmerge(merge(W)) vs W (spec)
MIXED_ATOL = 1e-5  # a mixed batch vs each row through its own adapter (grouped matmuls reorder the sums)
IDENTITY_ATOL = 1e-6  # identity at init (methods with a renormalisation, e.g. DoRA's m/||W||, are 1 up to rounding)


# --------------------------------------------------------------------------------------------- layer kinds
@dataclass(frozen=True)
class Kind:
    """A base model and the modules of one layer kind in it that the suite adapts."""

    id: str
    build: Callable[[], nn.Module]
    targets: tuple[str, ...]
    vocab: int
    seq: int

    def base(self) -> nn.Module:
        return copy.deepcopy(_prototype(self.build)).eval()

    def inputs(self, seed: int = 1) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, self.vocab, (4, self.seq), generator=g)}

    def target_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in self.targets)]


@functools.cache
def _prototype(build: Callable[[], nn.Module]) -> nn.Module:
    return build()


KINDS = (
    Kind("linear", make_tiny_net, ("fc1", "fc2"), 40, 5),
    Kind("embedding", make_tiny_net, ("emb",), 40, 5),
    Kind("conv2d", make_tiny_net, ("conv",), 40, 5),
    Kind("bert-linear", tiny_bert, ("query", "value"), 64, 6),
    Kind("gpt2-conv1d", tiny_gpt2, ("c_attn", "c_fc"), 64, 6),
)


def output(out: Any) -> Tensor:
    """The main tensor of a model's output (plain tensor, HF ``logits`` or ``last_hidden_state``)."""
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(f"no tensor output in {type(out).__name__}")


def same(a: Tensor, b: Tensor, atol: float = 0.0, msg: str = "") -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0.0, msg=lambda m: f"{msg}\n{m}")


# ------------------------------------------------------------------------------------------------- combos
@dataclass
class Combo:
    """One method variant on one layer kind."""

    method: str
    variant: pk.AdapterConfig
    kind: Kind

    @property
    def cls(self) -> type[pk.Adapter]:
        return pk.get_method(self.method)

    def exempt(self, prop: str) -> bool:
        return prop in self.cls.exempt

    @property
    def mergeable(self) -> bool:
        return not self.exempt("mergeable")

    def config(self, seed: int = 0) -> pk.AdapterConfig:
        return self.variant.replace(targets=list(self.kind.targets), seed=seed)

    def supported(self) -> bool:
        """Whether the method supports every target module: its ``supports()``, and (for settings that only
        fit some layer kinds) building the adapter does not raise ``UnsupportedLayerError``."""
        modules = self.kind.target_modules(self.kind.base())
        if not all(self.cls.supports(m) for m in modules):
            return False
        try:
            for m in modules:
                self.cls(BaseView(m), self.variant)
        except UnsupportedLayerError:
            return False
        return True

    def adapted(self, *names: str) -> pk.AdaptedModel:
        """The base with adapters ``names`` (default ``"a"``), each with its own seed; the first is active."""
        names = names or ("a",)
        model = pk.adapt(self.kind.base(), self.config(seed=0), name=names[0])
        for i, name in enumerate(names[1:], start=1):
            model.add_adapter(name, self.config(seed=i))
        return model.eval()

    def run(self, model: nn.Module, **kwargs: Any) -> Tensor:
        with torch.no_grad():
            return output(model(**self.kind.inputs(), **kwargs))

    def base_out(self) -> Tensor:
        return self.run(self.kind.base())


def combo_id(method: str, variant: pk.AdapterConfig, index: int) -> str:
    tiny = type(variant).tiny()
    diff = [f"{f.name}={getattr(variant, f.name)}" for f in dataclasses.fields(variant)]
    diff = [d for d, f in zip(diff, dataclasses.fields(variant)) if getattr(tiny, f.name) != getattr(variant, f.name)]
    return method + (f"[{','.join(diff)}]" if diff else "" if index == 0 else f"[{index}]")


def combos(method: str) -> list[tuple[str, Combo]]:
    """``(id, Combo)`` for every tiny variant of ``method`` × every layer kind it supports."""
    out = []
    for i, variant in enumerate(pk.get_method(method).config_class.tiny_variants()):
        for kind in KINDS:
            combo = Combo(method, variant, kind)
            if combo.supported():
                out.append((f"{combo_id(method, variant, i)}-{kind.id}", combo))
    return out


@torch.no_grad()
def randomise(model: pk.AdaptedModel, name: str, seed: int = 0, std: float = 0.1) -> None:
    """Move every parameter of adapter ``name`` off its init by Gaussian noise (so ``B = 0`` and the like no
    longer hide bugs)."""
    g = torch.Generator().manual_seed(1000 + seed)
    for adapter in model.adapter_modules(name).values():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def plain_modules(model: nn.Module) -> list[str]:
    return [f"{n}: {type(m).__module__}.{type(m).__name__}" for n, m in model.named_modules()]


# ------------------------------------------------------------------------------------------------- checks
def check_identity_at_init(c: Combo, tmp_path: Path) -> None:
    model = c.adapted()
    if c.exempt("identity_at_init"):
        return
    same(c.run(model), c.base_out(), IDENTITY_ATOL, "adapted output at init differs from the base output")


def check_merge_matches_unmerged(c: Combo, tmp_path: Path) -> None:
    model = c.adapted()
    randomise(model, "a")
    unmerged = c.run(model)
    if not c.mergeable:
        before = [p.detach().clone() for p in model.get_base_model().parameters()]
        try:
            model.merge(unload=False)
        except NotMergeableError as exc:
            assert c.method in str(exc)
        else:
            raise AssertionError("merge of a method exempt from 'mergeable' did not raise NotMergeableError")
        for p, b in zip(model.get_base_model().parameters(), before):
            assert torch.equal(p, b), "a failed merge changed a base weight"
        same(c.run(model), unmerged, 0.0, "a failed merge changed the outputs")
        return
    model.merge(unload=False)
    same(c.run(model), unmerged, MERGE_ATOL, "merged forward != unmerged forward")


def check_merge_several_active(c: Combo, tmp_path: Path) -> None:
    """Adapters a and b active on the same layers: merging both (in one call, or one call each) gives the
    forward with both active, since each update is computed against the base weight, not against the weight
    with the other already merged (DoRA's norm, PaCA, SST ... depend on it)."""
    if not c.mergeable:
        return
    model = c.adapted("a", "b")
    randomise(model, "a")
    randomise(model, "b", seed=1)
    model.set_adapter(["a", "b"])
    both = c.run(model)
    model.merge(unload=False)
    same(c.run(model), both, MERGE_ATOL, "merging two active adapters != their forward")
    model.unmerge()
    same(c.run(model), both, MERGE_ATOL, "unmerging two adapters changed the forward")
    model.merge("a", unload=False)
    model.merge("b", unload=False)
    same(c.run(model), both, MERGE_ATOL, "merging a, then b != the forward with both active")


def plain(t: Tensor) -> Tensor:
    """``t`` as a plain tensor: torchao's weight subclasses implement neither ``equal`` nor subtraction, so they are
    compared through their dequantised values (a change of the stored codes changes those)."""
    if type(t) in (Tensor, nn.Parameter):
        return t
    if hasattr(t, "get_original_weight"):  # NF4Tensor (its dequantize() is a static per-value helper)
        return t.get_original_weight()
    return t.dequantize() if hasattr(t, "dequantize") else t


def check_unmerge_restores_base(c: Combo, tmp_path: Path) -> None:
    if not c.mergeable:
        return  # covered by check_merge_matches_unmerged
    base = c.kind.base()
    before = [(p, plain(p.detach()).clone()) for p in base.parameters()]
    model = pk.adapt(base, c.config(), name="a").eval()
    randomise(model, "a")
    adapted = c.run(model)
    model.merge(unload=False)
    assert any(not torch.equal(plain(p), b) for p, b in before), "merge did not change any base weight"
    model.unmerge()
    for p, b in before:
        same(plain(p.detach()), b, RESTORE_ATOL, "unmerge(merge(W)) != W")
    same(c.run(model), adapted, MERGE_ATOL, "outputs after unmerge differ from before merge")


def check_merge_unload_plain(c: Combo, tmp_path: Path) -> None:
    model = c.adapted()
    randomise(model, "a")
    adapted = c.run(model)
    if not c.mergeable:
        try:
            model.merge()
        except NotMergeableError:
            return
        raise AssertionError("merge() of a method exempt from 'mergeable' did not raise NotMergeableError")
    plain = model.merge()
    left = [s for s in plain_modules(plain) if s.split(": ")[1].startswith("peftkit")]
    assert not left, f"merge() left peftkit modules behind: {left}"
    same(c.run(plain), adapted, MERGE_ATOL, "merge() output != adapted output")


def check_save_load_roundtrip(c: Combo, tmp_path: Path) -> None:
    model = c.adapted()
    randomise(model, "a")
    want = c.run(model)
    model.save(tmp_path / "ad")
    loaded = pk.load(c.kind.base(), tmp_path / "ad").eval()
    same(c.run(loaded), want, 0.0, "loaded adapter gives different outputs")
    assert loaded.configs["a"] == model.configs["a"]
    sd, sd2 = model.adapter_state_dict("a"), loaded.adapter_state_dict("a")
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k


def check_init_runs_once(c: Combo, tmp_path: Path) -> None:
    """Construction = ``__init__`` (allocate) + exactly one ``reset_parameters`` per adapted module (so seeded
    draws are not spent twice); loading builds under ``skip_init`` and calls it for no module."""
    calls: list[object] = []
    original = c.cls.reset_parameters

    def counting(self: pk.Adapter, base: BaseView) -> None:
        if type(self) is c.cls:
            calls.append(self)
        original(self, base)

    cls_attr = c.cls.__dict__.get("reset_parameters")
    c.cls.reset_parameters = counting  # type: ignore[method-assign]
    try:
        model = c.adapted()
        own = [a for a in model.adapter_modules("a").values() if type(a) is c.cls]
        assert len(calls) == len(own) and {id(a) for a in calls} == {id(a) for a in own}, (
            f"reset_parameters ran {len(calls)} times for {len(own)} modules (does __init__ call it itself?)"
        )
        model.save(tmp_path / "ad")
        calls.clear()
        pk.load(c.kind.base(), tmp_path / "ad")
        assert not calls, "loading initialised parameters that the file overwrites"
    finally:
        if cls_attr is None:
            del c.cls.reset_parameters
        else:
            c.cls.reset_parameters = cls_attr  # type: ignore[method-assign]


def check_disable(c: Combo, tmp_path: Path) -> None:
    model = c.adapted()
    randomise(model, "a")
    adapted, base = c.run(model), c.base_out()
    assert not torch.allclose(adapted, base), "randomised adapter does not change the output"
    with model.adapters_disabled():
        same(c.run(model), base, 0.0, "adapters_disabled() != base")
    same(c.run(model), adapted, 0.0, "outputs after adapters_disabled() block")
    model.disable_adapters()
    same(c.run(model), base, 0.0, "disable_adapters() != base")
    model.enable_adapters()
    same(c.run(model), adapted, 0.0, "enable_adapters() does not restore the adapted output")


def _single(c: Combo, model: pk.AdaptedModel, name: str) -> Tensor:
    """Outputs of a fresh model holding only a copy of adapter ``name`` of ``model``."""
    fresh = pk.adapt(c.kind.base(), model.configs[name], name=name).eval()
    for path, adapter in model.adapter_modules(name).items():
        fresh.adapter_modules(name)[path].load_state_dict(adapter.state_dict())
    return c.run(fresh)


def check_two_adapters_independent(c: Combo, tmp_path: Path) -> None:
    model = c.adapted()
    randomise(model, "a")
    out_a = c.run(model)
    model.add_adapter("b", c.config(seed=1))
    randomise(model, "b", seed=1)
    assert model.active_adapters == ["a"]
    same(c.run(model), out_a, 0.0, "adding adapter b changed the outputs of a")
    model.set_adapter("b")
    out_b = c.run(model)
    same(out_b, _single(c, model, "b"), 0.0, "set_adapter('b') != a model holding only b")
    assert not torch.allclose(out_a, out_b)
    model.set_adapter("a")
    same(c.run(model), out_a, 0.0, "switching back to a")
    model.delete_adapter("b")
    same(c.run(model), out_a, 0.0, "deleting b changed a")


def check_several_active_sum(c: Combo, tmp_path: Path) -> None:
    """With adapters a and b active, each adapted layer's change is the sum of a's and b's changes."""
    model = c.adapted("a", "b")
    randomise(model, "a")
    randomise(model, "b", seed=1)
    model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"]
    inputs: dict[str, Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, p=path: inputs.__setitem__(p, args[0]))
        for path, layer in model.named_modules()
        if isinstance(layer, AdaptedLayer)
    ]
    both = c.run(model)
    for h in hooks:
        h.remove()
    assert inputs
    with torch.no_grad():
        for path, x in inputs.items():
            layer = model.get_submodule(path)
            got = layer(x)
            base = layer.base_layer(x)
            deltas = []
            for name in ("a", "b"):
                model.set_adapter(name)
                deltas.append(layer(x) - base)
            model.set_adapter(["a", "b"])
            same(got, base + deltas[0] + deltas[1], MERGE_ATOL, f"{path}: changes of active adapters do not add up")
    same(c.run(model), both, 0.0)


def _mixed(c: Combo, train: bool) -> None:
    model = c.adapted("a", "b")
    randomise(model, "a")
    randomise(model, "b", seed=1)
    for layer in model.modules():  # the adapted layers in training mode, without their dropout, so rows
        if isinstance(layer, AdaptedLayer):  # are deterministic (the base model stays in eval mode)
            layer.train(train)
            for m in layer.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()
    ids = torch.tensor([0, 1, -1, 0])
    calls: list[str] = []  # adapters whose own forward ran
    hooks = [
        a.register_forward_hook(lambda m, i, o, p=path: calls.append(p))
        for name in ("a", "b")
        for path, a in model.adapter_modules(name).items()
    ]
    mixed = c.run(model, adapter_ids=ids)
    for h in hooks:
        h.remove()
    if not train:  # eval: linear layers whose adapters are all low-rank run as one grouped bank matmul
        grouped = [
            path
            for path, layer in model.model.named_modules()
            if isinstance(layer, AdaptedLayer)
            and layer.base.kind == "linear"
            and all(a.lowrank(layer.base) is not None for a in layer.adapters.values())
        ]
        assert not set(grouped) & set(calls), f"low-rank adapters ran one by one in eval: {sorted(calls)}"
    model.set_adapter("a")
    rows = {0: c.run(model)}
    model.set_adapter("b")
    rows[1] = c.run(model)
    with model.adapters_disabled():
        rows[-1] = c.run(model)
    for i, k in enumerate(ids.tolist()):
        same(mixed[i], rows[k][i], MIXED_ATOL, f"row {i} (adapter id {k}) of a mixed batch, train={train}")
    assert model.routing.call.adapter_ids is None


def check_mixed_batch_eval(c: Combo, tmp_path: Path) -> None:
    _mixed(c, train=False)


def check_mixed_batch_train(c: Combo, tmp_path: Path) -> None:
    _mixed(c, train=True)


def check_only_adapter_params_trainable(c: Combo, tmp_path: Path) -> None:
    model = c.adapted("a", "b")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    active = {id(p) for a in model.adapter_modules("a").values() for p in a.parameters()}
    assert active and trainable == active, "trainable parameters are not exactly the active adapter's"
    model.set_adapter("b")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for a in model.adapter_modules("b").values() for p in a.parameters()}
    assert not any(p.requires_grad for p in model.get_base_model().parameters() if id(p) not in trainable)


def check_trainable_count(c: Combo, tmp_path: Path) -> None:
    model = c.adapted()
    config = model.configs["a"]
    want = sum(
        type(adapter).expected_trainable(model.get_submodule(f"model.{path}").base, config.for_module(path))
        for path, adapter in model.adapter_modules("a").items()
    )
    assert model.trainable_parameters().trainable == want


def check_training_reduces_loss(c: Combo, tmp_path: Path) -> None:
    model = c.adapted()  # eval mode: no dropout noise in the loss
    inputs = c.kind.inputs()
    target = torch.randn(c.base_out().shape, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(output(model(**inputs)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"AdamW did not reduce the loss: {losses}"
    assert not any(p.grad is not None for p in model.get_base_model().parameters() if not p.requires_grad)


def check_delete_restores_base(c: Combo, tmp_path: Path) -> None:
    base = c.kind.base()
    modules = dict(base.named_modules())
    model = pk.adapt(base, c.config(), name="a").eval()
    model.add_adapter("b", c.config(seed=1))
    randomise(model, "a")
    model.delete_adapter("a")
    assert model.adapter_names == ["b"]
    model.delete_adapter("b")
    assert model.adapter_names == [] and model.active_adapters == []
    after = dict(model.get_base_model().named_modules())
    assert after.keys() == modules.keys()
    assert all(after[n] is m for n, m in modules.items()), "delete_adapter did not put the base modules back"
    same(c.run(model), c.base_out(), 0.0)


CHECKS: dict[str, Callable[[Combo, Path], None]] = {
    name[len("check_") :]: fn for name, fn in dict(globals()).items() if name.startswith("check_")
}
