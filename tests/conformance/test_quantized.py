"""The conformance suite over a quantised base: every method that adapts linear layers, on a TinyNet whose ``fc1``
and ``fc2`` are bitsandbytes nf4 ``Linear4bit`` layers (double quantisation, float32 compute).

Every generic check of ``_harness`` runs unchanged except the merge tolerance: merging re-quantises ``W + ΔW``, so
the merged forward differs from the adapted one by rounding. That tolerance is stated relative to the
quantisation itself: ``QUANT_FACTOR`` times the output change that rounding the merged weights to nf4 causes
(:func:`requantisation_scale`, measured per combo with bitsandbytes directly: the model holding ``W + ΔW`` in float
vs the same weights quantised and dequantised). Unmerge
is exact (the stored bytes come back: ``RESTORE_ATOL`` unchanged), as are identity at init, disabling, mixed
batches and save/load (their tolerances are the float suite's).

LoRA's whole suite also runs on the other backends (bnb fp4 and int8, torchao NF4 and int8, hqq 4-bit), and DoRA's
cached column norms are checked to follow merges on each.

A method whose checks cannot pass on a quantised base must be refused when the adapter is built
(tested in ``tests/optim/test_optim_refusals.py``): none is today.
"""

from __future__ import annotations

import _harness as H
import pytest
import torch
from conftest import make_tiny_net
from torch import nn

import peftkit as pk

pytestmark = pytest.mark.usefixtures("one_thread")

bnb = pytest.importorskip("bitsandbytes")

QUANT_FACTOR = 3.0  # one merge: <= 1.0x measured (one rounding); merging a, then b rounds twice: <= 2.2x


def nf4(layer: nn.Linear, quant_type: str = "nf4") -> nn.Module:
    """A bitsandbytes 4-bit copy of ``layer`` (double quantisation, float32 compute)."""
    q = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        quant_type=quant_type,
        compress_statistics=True,
        compute_dtype=torch.float32,
    )
    q.load_state_dict(layer.state_dict())
    # bnb's CPU fast path for eval (AVX512-BF16) fails on layers narrower than a block and computes in bfloat16;
    # peftkit's view turns it off on the layers it adapts, the plain reference model needs it off too
    q.support_avx512bf16_for_cpu = False
    return q.to("cpu")


def fp4(layer: nn.Linear) -> nn.Module:
    return nf4(layer, "fp4")


def bnb_int8(layer: nn.Linear) -> nn.Module:
    q = bnb.nn.Linear8bitLt(
        layer.in_features, layer.out_features, bias=layer.bias is not None, has_fp16_weights=False, threshold=0.0
    )
    q.load_state_dict(layer.state_dict())
    return q.to("cpu")


def torchao_nf4(layer: nn.Linear) -> nn.Module:
    from torchao.quantization import to_nf4

    layer.weight = nn.Parameter(to_nf4(layer.weight.detach(), 64, 8), requires_grad=False)  # 64-blocks, 8 scalers
    return layer


def torchao_int8(layer: nn.Linear) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(layer, Int8WeightOnlyConfig())
    return layer


def hqq4(layer: nn.Linear) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    q = HQQLinear(layer, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu")
    q.bias = q.bias.detach()  # (hqq clones the bias with its autograd history, which deepcopy refuses)
    return q


def _quantised_net(quantise) -> nn.Module:
    net = make_tiny_net()
    net.fc1, net.fc2 = quantise(net.fc1), quantise(net.fc2)
    return net


# one build function per backend (module level: the harness caches the prototype per build function)
def tiny_nf4_net() -> nn.Module:
    return _quantised_net(nf4)


def tiny_fp4_net() -> nn.Module:
    return _quantised_net(fp4)


def tiny_int8_net() -> nn.Module:
    return _quantised_net(bnb_int8)


def tiny_torchao_nf4_net() -> nn.Module:
    return _quantised_net(torchao_nf4)


def tiny_torchao_int8_net() -> nn.Module:
    return _quantised_net(torchao_int8)


def tiny_hqq4_net() -> nn.Module:
    return _quantised_net(hqq4)


QUANTISE = {
    "nf4": nf4,
    "fp4": fp4,
    "bnb-int8": bnb_int8,
    "torchao-nf4": torchao_nf4,
    "torchao-int8": torchao_int8,
    "hqq4": hqq4,
}
BUILD = {
    "nf4": tiny_nf4_net,
    "fp4": tiny_fp4_net,
    "bnb-int8": tiny_int8_net,
    "torchao-nf4": tiny_torchao_nf4_net,
    "torchao-int8": tiny_torchao_int8_net,
    "hqq4": tiny_hqq4_net,
}


class FreshKind(H.Kind):
    """A kind whose base is built anew each time instead of deep-copied: torchao's ``NF4Tensor.clone`` re-quantises
    with its default block sizes, which the tiny layers do not fit (torchao 0.18)."""

    def base(self) -> nn.Module:
        return self.build().eval()


QKINDS = {
    name: (FreshKind if name == "torchao-nf4" else H.Kind)(f"{name}-linear", build, ("fc1", "fc2"), 40, 5)
    for name, build in BUILD.items()
}
NF4 = QKINDS["nf4"]
FLOAT = next(k for k in H.KINDS if k.id == "linear")  # the TinyNet they quantise


def _combos(kind: H.Kind) -> list[tuple[str, H.Combo]]:
    out = []
    for method in pk.list_methods():
        for i, variant in enumerate(pk.get_method(method).config_class.tiny_variants()):
            combo = H.Combo(method, variant, kind)
            if combo.supported():
                out.append((f"{H.combo_id(method, variant, i)}-{kind.id}", combo))
    return out


COMBOS = _combos(NF4)


def _float_layer(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    dense = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        dense.weight.copy_(w)
        if b is not None:
            dense.bias.copy_(b)
    return dense


def _with_layers_of(kind: H.Kind, layers: dict[str, nn.Module]) -> nn.Module:
    """The plain base of ``kind`` with the module at each path replaced."""
    model = kind.base()
    for path, layer in layers.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, layer)
    return model.eval()


def _with_layers(combo: H.Combo, layers: dict[str, nn.Module]) -> nn.Module:
    return _with_layers_of(combo.kind, layers)


def _quantised_layer(kind: H.Kind, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    """``(w, b)`` quantised by the backend's own constructor with the kind's settings."""
    dense = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        dense.weight.copy_(w)
        if b is not None:
            dense.bias.copy_(b)
    return QUANTISE[kind.id.removesuffix("-linear")](dense)


def requantisation_scale(combo: H.Combo) -> float:
    """How much quantising the merged weights changes the output: for adapter ``a`` alone and for ``a`` and ``b``
    active together (the randomised adapters the merge checks use), the float model holding each adapted layer's
    ``W + ΣΔW`` vs the same weights in the backend's own quantised layers (their rounding of the weight and, for
    LLM.int8(), of the activations)."""
    model = combo.adapted("a", "b")
    H.randomise(model, "a")
    H.randomise(model, "b", seed=1)
    scale = 0.0
    for names in (["a"], ["a", "b"]):
        merged = {}
        for path in model.adapter_modules("a"):
            layer = model.adapted_layer(path)
            w, b = layer.base.weight.float(), layer.base.bias
            for name in names:
                w = w + layer.adapters[name].delta_weight(layer.base).float()
                db = layer.adapters[name].delta_bias(layer.base)
                b = b if db is None else b + db
            merged[path] = (w.detach(), None if b is None else b.detach())
        exact = combo.run(_with_layers(combo, {p: _float_layer(w, b) for p, (w, b) in merged.items()}))
        rounded = combo.run(
            _with_layers(combo, {p: _quantised_layer(combo.kind, w, b) for p, (w, b) in merged.items()})
        )
        scale = max(scale, float((exact - rounded).abs().max()))
    return scale


def forward_rounding(kind: H.Kind) -> float:
    """How far the backend's forward is from ``F.linear`` with its dequantised weight, at the model output: 0 for
    the weight-only formats; LLM.int8() also rounds the activations to int8."""
    from peftkit.core.base import BaseView

    base = kind.base()
    layers = {t: BaseView(base.get_submodule(t)) for t in kind.targets}
    dense = {t: _float_layer(v.weight, v.bias) for t, v in layers.items()}
    with torch.no_grad():
        return float(
            (H.output(base(**kind.inputs())) - H.output(_with_layers_of(kind, dense)(**kind.inputs()))).abs().max()
        )


@pytest.mark.parametrize("check", list(H.CHECKS))
@pytest.mark.parametrize("combo", [c for _, c in COMBOS], ids=[i for i, _ in COMBOS])
def test_conformance_nf4(combo: H.Combo, check: str, tmp_path, monkeypatch) -> None:
    run_check(combo, check, tmp_path, monkeypatch)


# LoRA's whole suite on every other backend (all methods on every backend would multiply the suite by six; the
# backends differ only in the view's dequantise / re-quantise, which every method reaches the same way)
LORA_ELSEWHERE = [
    (f"lora-{kind.id}", H.Combo("lora", pk.get_method("lora").config_class.tiny_variants()[0], kind))
    for kind in QKINDS.values()
    if kind is not NF4
]


@pytest.mark.parametrize("check", list(H.CHECKS))
@pytest.mark.parametrize("combo", [c for _, c in LORA_ELSEWHERE], ids=[i for i, _ in LORA_ELSEWHERE])
def test_conformance_lora_on_every_backend(combo: H.Combo, check: str, tmp_path, monkeypatch) -> None:
    run_check(combo, check, tmp_path, monkeypatch)


def run_check(combo: H.Combo, check: str, tmp_path, monkeypatch) -> None:
    if check.startswith(("merge", "unmerge")) and combo.mergeable:
        monkeypatch.setattr(H, "MERGE_ATOL", max(H.MERGE_ATOL, QUANT_FACTOR * requantisation_scale(combo)))
    if check == "unmerge_restores_base":  # SNELL's sparse delta at the suite's 0.1 noise rounds away in nf4 (no
        # stored byte changes, so the check would test nothing): a delta large enough to move the quantised weight
        original = H.randomise
        monkeypatch.setattr(H, "randomise", lambda *a, **k: original(*a, **{**k, "std": 1.0}))
    if check == "identity_at_init":  # methods that run W + ΔW themselves skip the backend's activation rounding
        monkeypatch.setattr(H, "IDENTITY_ATOL", max(H.IDENTITY_ATOL, QUANT_FACTOR * forward_rounding(combo.kind)))
    H.CHECKS[check](combo, tmp_path)


def test_every_linear_method_runs_on_nf4() -> None:
    """Each method that adapts the float TinyNet's fc1/fc2 is in the nf4 suite (or refused: none is)."""
    on_float = {c.method for m in pk.list_methods() for _, c in H.combos(m) if c.kind is FLOAT}
    on_nf4 = {c.method for _, c in COMBOS}
    assert on_float - on_nf4 == set()


@pytest.mark.parametrize("backend", list(QKINDS))
def test_dora_norms_follow_merges_into_every_quantised_base(backend: str) -> None:
    # DoRA cached ||W||² keyed on module.weight's version: hqq has no weight (adapt failed) and torchao re-quantises
    # into its inner tensors without bumping that version (stale norms, NaN outputs after merging another adapter)
    kind = QKINDS[backend]
    model = pk.adapt(kind.base(), pk.DoRAConfig(r=2, targets=list(kind.targets)), name="dora")
    model.add_adapter("other", pk.LoRAConfig(r=2, targets=list(kind.targets)))
    H.randomise(model, "dora")
    H.randomise(model, "other", seed=1, std=1.0)
    model.set_adapter("dora")
    with torch.no_grad():
        model(**kind.inputs())  # fills the cache
        model.merge("other", unload=False)
        assert torch.isfinite(H.output(model(**kind.inputs()))).all()
        for path, adapter in model.adapter_modules("dora").items():
            base = model.base_view(path)
            direct = (base.weight.float() + adapter.delta_lora(base).float()).norm(dim=1)
            torch.testing.assert_close(
                adapter.weight_norm(base).float(), direct, rtol=1e-5, atol=1e-6 * float(direct.abs().max())
            )
