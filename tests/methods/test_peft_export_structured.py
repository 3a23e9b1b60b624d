"""``export_peft`` / ``import_peft`` for the structured methods PEFT has (SHiRA, RandLoRA, FourierFT, MiSS and
Bone = MiSS's ``bat`` mode, LoKr, LoHa): an exported folder loads with ``peft.PeftModel.from_pretrained`` onto
the same base and gives our outputs (1e-5, fp32); importing it back gives them too; settings PEFT cannot
express raise ``ExportError`` naming the setting."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import make_tiny_net, tiny_bert, tiny_gpt2
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.errors import ExportError, UnsupportedAdapterError
from peftkit.interop import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, export_peft, import_peft

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

NET = ["fc1", "fc2"]
CASES: dict[str, tuple[Callable[[], nn.Module], str, dict]] = {
    "shira-random": (make_tiny_net, "shira", dict(r=1, targets=NET, random_seed=7)),
    "shira-magnitude": (make_tiny_net, "shira", dict(r=1, targets=NET, mask_type="magnitude")),
    "shira-bert": (tiny_bert, "shira", dict(r=2, targets=["query", "value"], random_seed=3)),
    "randlora": (make_tiny_net, "randlora", dict(r=4, alpha=8.0, targets=NET, projection_shape=[32, 32])),
    "randlora-sparse": (make_tiny_net, "randlora", dict(r=3, targets=["fc1"], sparse=True, projection_prng_key=2)),
    "fourierft": (make_tiny_net, "fourierft", dict(n_frequency=30, scaling=20.0, targets=NET, random_loc_seed=5)),
    "fourierft-gpt2": (tiny_gpt2, "fourierft", dict(n_frequency=50, scaling=10.0, targets=["c_attn", "c_fc"])),
    "miss": (make_tiny_net, "miss", dict(r=3, targets=NET, dropout=0.1)),
    "miss-mini": (make_tiny_net, "miss", dict(r=4, mode="mini", mini_r=2, targets=NET)),
    "bone-bat": (make_tiny_net, "miss", dict(r=4, mode="bat", targets=NET)),
    "lokr": (make_tiny_net, "lokr", dict(r=2, alpha=5.0, targets=[*NET, "conv"])),
    "lokr-head": (make_tiny_net, "lokr", dict(r=2, targets=NET, modules_to_save=["head"])),  # + a trained head
    "lokr-both-cp": (
        make_tiny_net,
        "lokr",
        dict(r=1, alpha=2.0, targets=["fc1", "conv"], decompose_both=True, use_effective_conv2d=True),
    ),
    "loha": (make_tiny_net, "loha", dict(r=2, alpha=5.0, targets=[*NET, "conv"], rank_dropout=0.1)),
    "loha-cp": (make_tiny_net, "loha", dict(r=3, alpha=2.0, targets=["fc2", "conv"], use_effective_conv2d=True)),
}


def _trained(factory: Callable[[], nn.Module], method: str, kw: dict) -> pk.AdaptedModel:
    """An adapter whose trainable tensors hold random values (as after training)."""
    model = pk.adapt(factory(), pk.get_config(method, **kw), name="a")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def _inputs(factory: Callable[[], nn.Module]) -> torch.Tensor:
    return torch.randint(0, 40 if factory is make_tiny_net else 64, (3, 6), generator=torch.Generator().manual_seed(1))


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_folder_loads_in_peft_with_our_outputs(case: str, tmp_path) -> None:
    from peft import PeftModel

    factory, method, kw = CASES[case]
    ours = _trained(factory, method, kw)
    x = _inputs(factory)
    expected = _run(ours, x)
    export_peft(ours, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(factory(), tmp_path / "peft").eval()
    torch.testing.assert_close(_run(pm, x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, _run(factory(), x), atol=1e-4)  # the adapter does something

    back = import_peft(factory(), tmp_path / "peft", name="b").eval()
    assert type(back.configs["b"]).method == method
    torch.testing.assert_close(_run(back, x), expected, atol=1e-5, rtol=1e-5)
    for path, a in ours.adapter_modules("a").items():
        mine = back.adapter_modules("b")[path].state_dict()
        assert mine.keys() == a.state_dict().keys()
        for k, t in a.state_dict().items():
            if a.method == "full":  # a saved head travels as W + ΔW: ΔW comes back as (W + ΔW) − W, rounded
                torch.testing.assert_close(mine[k], t, atol=1e-6, rtol=0)
            else:
                assert torch.equal(mine[k], t), (path, k)


def test_saved_file_holds_only_what_trains(tmp_path) -> None:
    """RandLoRA's bases and FourierFT's locations are rebuilt from the seed (PEFT ``save_projection=False``),
    SHiRA's indices travel with the values (PEFT reads them back)."""
    for case, keys in {
        "randlora": {"randlora_lambda", "randlora_gamma"},
        "fourierft": {"fourierft_spectrum"},
        "shira-random": {"shira_weight", "shira_indices"},
    }.items():
        factory, method, kw = CASES[case]
        export_peft(_trained(factory, method, kw), tmp_path / case)
        saved = load_file(str(tmp_path / case / PEFT_WEIGHTS_FILE))
        assert {k.rsplit(".", 1)[-1] for k in saved} == keys
        config = json.loads((tmp_path / case / PEFT_CONFIG_FILE).read_text())
        assert config.get("save_projection", False) is False


def test_import_of_peft_randlora_with_its_saved_bases(tmp_path) -> None:
    """A PEFT RandLoRA saved with its default ``save_projection=True`` imports: the saved bases are checked
    against the ones peftkit rebuilds from the key."""
    peft = pytest.importorskip("peft")
    from _structured_parity import fill, peft_model

    pm = peft_model(make_tiny_net(), peft.RandLoraConfig(r=4, target_modules=NET, projection_prng_key=3))
    fill(pm, "randlora_l")
    fill(pm, "randlora_g", seed=1)
    pm.save_pretrained(tmp_path / "p")
    ours = import_peft(make_tiny_net(), tmp_path / "p")
    x = _inputs(make_tiny_net)
    torch.testing.assert_close(_run(ours, x), _run(pm, x), atol=1e-5, rtol=1e-5)
    # bases that are not the key's are refused
    saved = load_file(str(tmp_path / "p" / PEFT_WEIGHTS_FILE))
    saved["base_model.model.fc1.randlora_A"] = saved["base_model.model.fc1.randlora_A"] + 1.0
    from safetensors.torch import save_file

    save_file(saved, str(tmp_path / "p" / PEFT_WEIGHTS_FILE))
    with pytest.raises(UnsupportedAdapterError, match="randlora_A is not the 'A' peftkit rebuilds"):
        import_peft(make_tiny_net(), tmp_path / "p")


@pytest.mark.parametrize(
    ("method", "kw", "match"),
    [
        ("shira", dict(r=1, targets=NET, scale=2.0), "scale=2.0 has no PEFT SHIRA equivalent"),
        ("randlora", dict(r=4, targets=NET, projection_shape=[32, 32], scale_by_sqrt_bases=True), "scale_by_sqrt"),
        # fc1 is 32x16 and fc2 16x32: PEFT sizes one shared set of bases 32x32, ours are per layer
        ("randlora", dict(r=4, targets=NET), r"rebuild .A. .*projection_shape.: \[32, 32\]"),
    ],
)
def test_settings_peft_cannot_express_raise(method: str, kw: dict, match: str, tmp_path) -> None:
    with pytest.raises(ExportError, match=match):
        export_peft(_trained(make_tiny_net, method, kw), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_layer_peft_cannot_adapt_raises(tmp_path) -> None:
    model = _trained(tiny_gpt2, "shira", dict(r=1, targets=["c_fc"]))  # PEFT's SHiRA adapts nn.Linear only
    with pytest.raises(ExportError, match="PEFT's SHIRA has no adapter for a Conv1D"):
        export_peft(model, tmp_path / "x")


def test_merged_adapter_is_refused(tmp_path) -> None:
    model = _trained(make_tiny_net, "lokr", dict(r=2, targets=NET))
    model.merge(unload=False)
    with pytest.raises(ExportError, match="unmerge"):
        export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["lokr", "loha"])
def test_per_module_rank_and_alpha_travel_as_peft_patterns(method: str, tmp_path) -> None:
    from peft import PeftModel

    kw = dict(r=2, alpha=4.0, targets=[*NET, "conv"], overrides={"fc1": {"r": 4}, "conv": {"alpha": 3.0}})
    ours = _trained(make_tiny_net, method, kw)
    x = _inputs(make_tiny_net)
    export_peft(ours, tmp_path / "p")
    config = json.loads((tmp_path / "p" / PEFT_CONFIG_FILE).read_text())
    assert config["rank_pattern"] == {"fc1": 4} and config["alpha_pattern"] == {"conv": 3.0}
    pm = PeftModel.from_pretrained(make_tiny_net(), tmp_path / "p").eval()
    torch.testing.assert_close(_run(pm, x), _run(ours, x), atol=1e-5, rtol=1e-5)
    back = import_peft(make_tiny_net(), tmp_path / "p").eval()
    assert back.configs["default"].for_module("fc1").r == 4 and back.configs["default"].for_module("conv").alpha == 3
    torch.testing.assert_close(_run(back, x), _run(ours, x), atol=1e-5, rtol=1e-5)


def test_override_peft_cannot_carry_raises(tmp_path) -> None:
    model = _trained(make_tiny_net, "shira", dict(r=1, targets=NET, overrides={"fc2": {"r": 2}}))
    with pytest.raises(ExportError, match=r"r=2 \(an override of 'fc2'\) has no PEFT SHIRA equivalent"):
        export_peft(model, tmp_path / "x")
    config = dict(n_frequency=20, targets=NET, random_loc_seed=1)
    export_peft(_trained(make_tiny_net, "fourierft", config), tmp_path / "f")
    raw = json.loads((tmp_path / "f" / PEFT_CONFIG_FILE).read_text())
    raw["n_frequency_pattern"] = {"fc1": 10}
    (tmp_path / "f" / PEFT_CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(UnsupportedAdapterError, match="n_frequency_pattern"):
        import_peft(copy.deepcopy(make_tiny_net()), tmp_path / "f")
