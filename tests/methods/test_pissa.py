"""PiSSA as a residual LoRA init (Meng et al., 2024): properties, PEFT parity, save/load onto an
untouched base, export to a plain PEFT LoRA of rank 2r."""

from __future__ import annotations

import copy

import pytest
import torch
from _residual_dropout import assert_train_mode_parity, move_off_init, peft_lora_on_residual_base
from conftest import tiny_gpt2
from torch import nn

import peftkit as pk
from peftkit.errors import InvalidConfigError, UnsupportedLayerError
from peftkit.methods.lora import pissa_factors

R, ALPHA = 3, 6.0  # s = 2


class MLP(nn.Module):
    """Two Linear layers whose weights have a decaying spectrum with clear gaps (so the randomised SVD of
    ``pissa_niter_K`` converges to the exact top-r subspace)."""

    def __init__(self, d_in: int = 12, d_hidden: int = 20, d_out: int = 10, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        with torch.no_grad():
            for lin in (self.fc1, self.fc2):
                out, inp = lin.weight.shape
                q = min(out, inp)
                u, _ = torch.linalg.qr(torch.randn(out, q, generator=g))
                v, _ = torch.linalg.qr(torch.randn(inp, q, generator=g))
                spectrum = 3.0 * 0.3 ** torch.arange(q, dtype=torch.float32)
                lin.weight.copy_(u @ torch.diag(spectrum) @ v.T)
                lin.bias.copy_(0.1 * torch.randn(out, generator=g))  # every MLP(seed) is the same model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(7, 12, generator=torch.Generator().manual_seed(seed))


def _cfg(**kw) -> pk.LoRAConfig:
    return pk.LoRAConfig(r=R, alpha=ALPHA, targets=["fc1", "fc2"], **kw)


def _adapters(model: pk.AdaptedModel) -> dict[str, nn.Module]:
    return model.adapter_modules(model.active_adapters[0])


def test_factors_are_scaled_principal_components() -> None:
    base = MLP()
    model = pk.adapt(copy.deepcopy(base), _cfg(), init="pissa")
    s = ALPHA / R
    for path, a in _adapters(model).items():
        w = base.get_submodule(path).weight.detach()
        sv = torch.linalg.svdvals(w)
        want = torch.diag(sv[:R] / s)
        torch.testing.assert_close(a.B.T @ a.B, want, atol=1e-5, rtol=1e-5)  # BᵀB = diag(S_r / s)
        torch.testing.assert_close(a.A @ a.A.T, want, atol=1e-5, rtol=1e-5)  # AAᵀ = diag(S_r / s)
        residual = w - s * a.B0 @ a.A0
        assert torch.linalg.matrix_norm(residual, ord=2) == pytest.approx(float(sv[R]), rel=1e-4)  # σ_{r+1}
        assert torch.equal(a.A, a.A0) and torch.equal(a.B, a.B0)
        # sign convention: the largest-|entry| of each left vector (column of B) is positive
        cols = a.B.detach()
        assert (cols.gather(0, cols.abs().argmax(0, keepdim=True)) > 0).all()


def test_identity_at_init_base_untouched_and_merge_reproduces_w() -> None:
    base = MLP()
    x = _x()
    want = base(x)
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = pk.adapt(base, _cfg(), init="pissa")
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
    for n, p in model.get_base_model().named_parameters():
        if n.endswith("base_layer.weight") or n.endswith("base_layer.bias"):
            assert torch.equal(p, weights[n.replace("base_layer.", "")]), n  # the user's base is not modified
    with model.adapters_disabled():
        assert torch.equal(model(x), want)
    merged = model.merge()
    for n, p in merged.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)


def test_niter_variant_and_rank_2r_lowrank_form() -> None:
    base = MLP()
    exact = pk.adapt(copy.deepcopy(base), _cfg(), init="pissa")
    approx = pk.adapt(copy.deepcopy(base), _cfg(seed=0), init=pk.init.PiSSA(niter=8))
    assert approx.configs["default"].init == "pissa_niter_8"
    for path, a in _adapters(exact).items():
        b = _adapters(approx)[path]
        torch.testing.assert_close(b.B0 @ b.A0, a.B0 @ a.A0, atol=1e-4, rtol=1e-4)
        low = a.lowrank(exact.get_submodule(f"model.{path}").base)
        assert low.down.shape[0] == 2 * R and low.up.shape[1] == 2 * R


def test_bad_init_names_and_layers() -> None:
    with pytest.raises(InvalidConfigError, match="init"):
        pk.LoRAConfig(init="pissa_niter_0")
    with pytest.raises(InvalidConfigError, match="unknown init"):
        pk.adapt(MLP(), _cfg(), init="pisa")
    with pytest.raises(InvalidConfigError, match="plain LoRA only"):
        pk.adapt(MLP(), pk.DoRAConfig(r=2, targets=["fc1"], init="pissa"))
    emb = nn.Sequential(nn.Embedding(10, 8))
    with pytest.raises(UnsupportedLayerError, match="Embedding"):
        pk.adapt(emb, pk.LoRAConfig(r=2, targets=["0"]), init="pissa")
    with pytest.raises(InvalidConfigError, match="initialises a LoRA adapter"):
        pk.adapt(MLP(), pk.get_config("loraxs", r=2, targets=["fc1"]), init="pissa")


def _train(model: pk.AdaptedModel, steps: int = 5) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    target = torch.randn(7, 10, generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        opt.zero_grad()
        ((model(_x()) - target) ** 2).mean().backward()
        opt.step()


def test_trained_adapter_saves_and_loads_onto_a_fresh_base(tmp_path) -> None:
    model = pk.adapt(MLP(), _cfg(), init="pissa")
    _train(model)
    want = model(_x())
    model.save(tmp_path / "pissa")
    loaded = pk.load(MLP(), tmp_path / "pissa")
    assert loaded.configs["default"].init == "pissa"
    assert torch.equal(loaded(_x()), want)


# ----------------------------------------------------------------------------------------------- PEFT parity
@pytest.mark.parity
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_parity_with_peft(init: str) -> None:
    peft = pytest.importorskip("peft")
    base = MLP()
    x = _x()
    ours = pk.adapt(copy.deepcopy(base), _cfg(seed=0), init=init)
    torch.manual_seed(0)  # PEFT's randomised SVD (pissa_niter_K) draws from the global RNG: same draw every run
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["fc1", "fc2"], init_lora_weights=init),
    )
    s = ALPHA / R
    for path, a in _adapters(ours).items():
        layer = theirs.base_model.model.get_submodule(path)
        pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        # same factors up to one sign per singular pair, hence the same offset s·B₀A₀ = PEFT's s·BA
        sign = torch.sign((pb * a.B).sum(0))
        torch.testing.assert_close(a.B * sign, pb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.A * sign[:, None], pa, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s * a.B0 @ a.A0, s * pb @ pa, atol=1e-4, rtol=1e-4)
        # PEFT's rewritten base weight is our W − s·B₀A₀ (we keep W itself)
        w = base.get_submodule(path).weight
        torch.testing.assert_close(layer.base_layer.weight, w - s * a.B0 @ a.A0, atol=1e-4, rtol=1e-4)
        # the same training update on both sides: load PEFT's (sign-aligned) factors, move them identically
        with torch.no_grad():
            a.A.copy_(pa)
            a.B.copy_(pb)
            noise = torch.randn(pa.shape, generator=torch.Generator().manual_seed(5)) * 0.05
            a.A.add_(noise)
            pa.add_(noise)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parity
def test_export_is_a_plain_rank_2r_peft_lora_of_the_untouched_base(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = pk.adapt(MLP(), _cfg(rslora=True), init="pissa")
    _train(model)
    want = model(_x())
    pk.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(MLP(), tmp_path / "peft")
    torch.testing.assert_close(loaded(_x()), want, atol=1e-5, rtol=1e-5)
    back = pk.import_peft(MLP(), tmp_path / "peft")  # re-imports as plain LoRA of rank 2r
    assert back.configs["default"].r == 2 * R
    torch.testing.assert_close(back(_x()), want, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_pissa_is_identity_and_exact_merge() -> None:
    base = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    want = base(ids).logits
    model = pk.adapt(base, pk.LoRAConfig(r=4, targets=["c_attn", "c_fc"]), init="pissa").eval()
    torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)
    a = model.adapter_modules("default")["transformer.h.0.attn.c_attn"]
    w = model.get_submodule("model.transformer.h.0.attn.c_attn").base.weight
    ref_a, ref_b = pissa_factors(w, 4, 8.0 / 4)
    torch.testing.assert_close(a.A, ref_a)
    torch.testing.assert_close(a.B, ref_b)


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")  # PEFT's own warning about its residual
def test_peft_converted_pissa_adapter_imports_onto_the_untouched_base(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["fc1", "fc2"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(MLP(), cfg)
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter as plain
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    want = theirs(_x())
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    # the converted folder is a plain LoRA of rank 2r relative to the original W: it imports as such
    ours = pk.import_peft(MLP(), tmp_path / "converted")
    assert ours.configs["default"].r == 2 * R
    torch.testing.assert_close(ours(_x()), want, atol=1e-5, rtol=1e-5)
    # an unconverted PiSSA folder is still refused (its tensors apply to PEFT's rewritten W_res only)
    theirs.save_pretrained(tmp_path / "raw")
    with pytest.raises(pk.errors.UnsupportedAdapterError, match="rewrites the base weights"):
        pk.import_peft(MLP(), tmp_path / "raw")


# ------------------------------------------------------------------------------------- dropout in training
@pytest.mark.parity
@pytest.mark.parametrize("dropout", [0.1, 0.3])
def test_dropout_in_training_matches_peft(dropout: float) -> None:
    """Dropout belongs to the trainable branch only: ``y = W_res x + s·B A drop(x)`` as PEFT's PiSSA (whose
    rewritten base sees the undropped ``x``), with the same masks; the frozen offset is not dropped."""
    peft = pytest.importorskip("peft")
    base = MLP()
    ours = pk.adapt(copy.deepcopy(base), _cfg(dropout=dropout), init="pissa")
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=["fc1", "fc2"], init_lora_weights="pissa", lora_dropout=dropout
        ),
    )
    with torch.no_grad():
        for path, a in _adapters(ours).items():
            layer = theirs.base_model.model.get_submodule(path)
            pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            sign = torch.sign((pb * a.B).sum(0))  # same factors up to one sign per singular pair
            torch.testing.assert_close(a.B * sign, pb, atol=1e-4, rtol=1e-4)
            a.A.copy_(pa)
            a.B.copy_(pb)
    move_off_init(ours)  # ... then the same "training" move on both sides
    with torch.no_grad():
        for path, a in _adapters(ours).items():
            layer = theirs.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(a.A)
            layer.lora_B["default"].weight.copy_(a.B)
    x = _x()
    assert_train_mode_parity(theirs, ours, lambda m: m(x))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))


@pytest.mark.parity
def test_conv2d_dropout_in_training_matches_lora_on_the_residual_base() -> None:
    """Conv2d PiSSA with dropout in training = a PEFT LoRA (same dropout mask) on the rewritten ``W_res``."""
    pytest.importorskip("peft")
    base = ConvNet()
    ours = pk.adapt(
        copy.deepcopy(base), pk.LoRAConfig(r=2, alpha=4.0, targets=["conv1", "conv2"], dropout=0.2), init="pissa"
    )
    move_off_init(ours)
    pm = peft_lora_on_residual_base(base, ours, 0.2)
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(2))
    assert_train_mode_parity(pm, ours, lambda m: m(x))
