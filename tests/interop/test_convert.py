"""``peftkit.interop.convert``: the one export flow and the one import flow over the format table, and the
method-side export hooks they use (``AdapterConfig.export_config`` / ``Adapter.export_state``)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_net
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit as pk
from peftkit.interop import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE


def _perturb(model: pk.AdaptedModel, seed: int = 0) -> None:
    """Move every trainable tensor (as training would), so ``B A`` differs from the frozen offset ``B₀ A₀``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_lora_export_hooks_describe_the_modules_update(init: str, rslora: bool) -> None:
    """``export_state`` with ``export_config`` is a plain LoRA (no offset buffers) whose ``s'·B'A'`` is the
    module's ``ΔW``; a residual init becomes rank ``2r`` with the scale kept, a plain one is returned as is."""
    config = pk.LoRAConfig(r=2, alpha=3.0, rslora=rslora, bias=init == "kaiming", init=init, targets=["fc1", "conv"])
    model = pk.adapt(make_tiny_net(), config)
    _perturb(model)
    for path, module in model.adapter_modules("default").items():
        base = model.model.get_submodule(path).base
        plain, state = module.config.export_config(), module.export_state()
        assert not plain.residual and plain.r == (4 if init == "pissa" else 2)
        assert plain.scale == pytest.approx(module.config.scale, rel=1e-12)
        assert set(state) == ({"A", "B", "bias"} if init == "kaiming" else {"A", "B"})
        if init == "kaiming":
            assert plain is module.config
        want = module.delta_weight(base).detach()
        got = plain.scale * (state["B"] @ state["A"].reshape(plain.r, -1)).reshape(want.shape)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


# ------------------------------------------------------------------------------------------------ the flows
peft = pytest.importorskip("peft")


def _peft_dora_folder(tmp_path: Path) -> tuple[nn.Module, nn.Module, Path]:
    """A PEFT DoRA on TinyNet's fc1 and conv with a trained head (``modules_to_save``), saved by PEFT."""
    base = make_tiny_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["fc1", "conv"], modules_to_save=["head"], use_dora=True
        )
        pm = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "p")
    return base, pm.eval(), tmp_path / "p"


def _ids() -> torch.Tensor:
    return torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(1))


def test_import_reaches_the_modules_through_load_tensors_only(tmp_path: Path, monkeypatch) -> None:
    """PEFT's keys become peftkit's and go to ``AdaptedModel.load_tensors`` once (the core's one path from saved
    tensors to modules); no ``load_state_dict`` of its own."""
    base, pm, folder = _peft_dora_folder(tmp_path)
    calls = []
    load_tensors = pk.AdaptedModel.load_tensors

    def spy(self, name, config, tensors, **kw):
        calls.append((name, type(config).method, sorted(tensors)))
        return load_tensors(self, name, config, tensors, **kw)

    def refuse(self, *args, **kwargs):
        raise AssertionError("load_state_dict called")

    monkeypatch.setattr(pk.AdaptedModel, "load_tensors", spy)
    monkeypatch.setattr(nn.Module, "load_state_dict", refuse)
    ours = pk.import_peft(copy.deepcopy(base), folder).eval()
    modules = ["conv.A", "conv.B", "conv.magnitude", "fc1.A", "fc1.B", "fc1.magnitude"]
    assert calls == [("default", "dora", [*modules, "head.bias_delta", "head.weight_delta"])]
    with torch.no_grad():
        want = pm(_ids())
        torch.testing.assert_close(ours(_ids()), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_old_peft_magnitude_key_imports(tmp_path: Path) -> None:
    """Older PEFT wrote DoRA's magnitude as ``lora_magnitude_vector.weight`` (an alias in the table)."""
    base, pm, folder = _peft_dora_folder(tmp_path)
    file = folder / PEFT_WEIGHTS_FILE
    old = "lora_magnitude_vector.weight"
    tensors = {k.replace("lora_magnitude_vector", old): v for k, v in load_file(file).items()}
    assert sum(k.endswith(old) for k in tensors) == 2
    save_file(tensors, file)
    ours = pk.import_peft(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        want = pm(_ids())
        torch.testing.assert_close(ours(_ids()), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_export_writes_what_the_method_hook_gives(tmp_path: Path, monkeypatch) -> None:
    """The export reads a module's tensors from its ``export_state`` hook, not from its internals."""
    model = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, targets=["fc1"]))
    _perturb(model)
    module = model.adapter_modules("default")["fc1"]
    monkeypatch.setattr(type(module), "export_state", lambda self: {"A": self.A.detach(), "B": 2 * self.B.detach()})
    pk.export_peft(model, tmp_path / "e")
    saved = load_file(tmp_path / "e" / PEFT_WEIGHTS_FILE)
    assert torch.equal(saved["base_model.model.fc1.lora_B.weight"], 2 * module.B.detach())


def test_residual_init_with_per_module_ranks_exports_as_rank_2r_patterns(tmp_path: Path) -> None:
    """PiSSA with an override of r on fc2: PEFT gets rank 2r everywhere (r=4, rank_pattern fc2: 6), alpha 2α, and
    gives our outputs; importing the folder back gives them too."""
    config = pk.LoRAConfig(r=2, alpha=3.0, init="pissa", targets=["fc1", "fc2"], overrides={"fc2": {"r": 3}})
    model = pk.adapt(make_tiny_net(), config).eval()
    _perturb(model)
    with torch.no_grad():
        want = model(_ids())
    pk.export_peft(model, tmp_path / "e")
    written = json.loads((tmp_path / "e" / PEFT_CONFIG_FILE).read_text())
    assert (written["r"], written["lora_alpha"], written["rank_pattern"]) == (4, 6, {"fc2": 6})
    assert written["alpha_pattern"] == {} and written["init_lora_weights"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(make_tiny_net(), tmp_path / "e").eval()
    back = pk.import_peft(make_tiny_net(), tmp_path / "e").eval()
    assert back.configs["default"].for_module("fc2").r == 6 and not back.configs["default"].residual
    with torch.no_grad():
        for got in (pm(_ids()), back(_ids())):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_failed_check_after_loading_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    """Saved RandLoRA bases are checked once the adapter is loaded; when they differ the adapter is removed again,
    from an AdaptedModel given in and from a plain base (flags and layer types restored)."""
    pm = peft.get_peft_model(make_tiny_net(), peft.RandLoraConfig(r=4, target_modules=["fc1", "fc2"]))
    pm.save_pretrained(tmp_path / "p")
    file = tmp_path / "p" / PEFT_WEIGHTS_FILE
    saved = load_file(file)
    saved["base_model.model.fc1.randlora_A"] = saved["base_model.model.fc1.randlora_A"] + 1.0
    save_file(saved, file)
    plain = make_tiny_net()
    with pytest.raises(pk.errors.UnsupportedAdapterError, match="randlora_A is not the 'A'"):
        pk.import_peft(plain, tmp_path / "p")
    assert type(plain.fc1) is nn.Linear and all(p.requires_grad for p in plain.parameters())
    adapted = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, targets=["fc2"]))
    with pytest.raises(pk.errors.UnsupportedAdapterError):
        pk.import_peft(adapted, tmp_path / "p", name="r")
    assert adapted.adapter_names == ["default"] and sorted(adapted.layer_paths) == ["default"]
