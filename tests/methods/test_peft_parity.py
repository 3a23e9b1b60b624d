"""Parity with Hugging Face PEFT: same weights give the same outputs, gradients and merged weights, and
adapters move between the two libraries through ``export_peft`` / ``import_peft``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_net, tiny_bert, tiny_gpt2
from torch import nn

import peftkit as pk
from peftkit.errors import (
    AdapterFileError,
    BaseModelMismatch,
    ExportError,
    UnsupportedAdapterError,
)

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

pytestmark = [
    pytest.mark.parity,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
ATOL = 1e-5


def bert_cls() -> nn.Module:
    return tiny_bert(num_labels=3)


# id -> (base factory, LoraConfig kwargs). Every layer kind: Linear (BERT), Conv1D (GPT-2), Embedding and
# Conv2d (TinyNet), with LoRA, rsLoRA, DoRA, lora_bias and dropout (which is off in eval).
CASES = {
    "bert-lora": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.1)),
    "bert-rslora": (tiny_bert, dict(r=4, lora_alpha=6, target_modules=["key", "dense"], use_rslora=True)),
    "bert-dora": (tiny_bert, dict(r=2, lora_alpha=4, target_modules=["query", "value"], use_dora=True)),
    "bert-dora-rslora": (
        tiny_bert,
        dict(r=4, lora_alpha=4, target_modules=["dense"], use_dora=True, use_rslora=True, lora_dropout=0.2),
    ),
    "bert-lora-bias": (tiny_bert, dict(r=2, lora_alpha=4, target_modules=["query", "dense"], lora_bias=True)),
    "gpt2-lora": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-dora": (
        tiny_gpt2,
        dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True),
    ),
    "gpt2-lora-bias": (tiny_gpt2, dict(r=2, target_modules=["c_proj"], fan_in_fan_out=True, lora_bias=True)),
    "net-lora": (
        make_tiny_net,
        dict(r=2, lora_alpha=5, target_modules=["emb", "fc1", "fc2", "conv"], lora_dropout=0.1),
    ),
    "net-dora": (make_tiny_net, dict(r=2, lora_alpha=4, target_modules=["fc1", "conv"], use_dora=True)),
    "net-lora-bias": (make_tiny_net, dict(r=2, target_modules=["fc2", "conv"], lora_bias=True, use_rslora=True)),
}


def ids(vocab: int = 40, rows: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, 6), generator=torch.Generator().manual_seed(seed))


def out(o: object) -> torch.Tensor:
    return o if isinstance(o, torch.Tensor) else o[0]


def run(model: nn.Module, x: torch.Tensor, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return out(model(x, **kw))


def quiet_peft(base: nn.Module, **cfg: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, LoraConfig(**cfg))


def fill_peft(model: nn.Module, seed: int = 0) -> None:
    """Random non-zero LoRA tensors; DoRA magnitudes perturbed around their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * noise)
            elif "lora_" in n:
                p.copy_(0.3 * noise)


def fill_ours(model: pk.AdaptedModel, name: str = "default", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.adapter_modules(name).values():
            for n, p in adapter.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if n == "magnitude":
                    p.mul_(1 + 0.2 * noise)
                else:
                    p.copy_((0.3 if n in ("A", "B", "bias") else 0.05) * noise)


def peft_case(case: str, tmp_path: Path, seed: int = 0) -> tuple[nn.Module, nn.Module, Path]:
    """(base, filled PEFT model in eval mode, folder it was saved to)."""
    factory, cfg = CASES[case]
    base = factory()
    pm = quiet_peft(copy.deepcopy(base), **cfg)
    fill_peft(pm, seed)
    folder = tmp_path / f"peft-{case}-{seed}"
    pm.save_pretrained(folder)
    return base, pm.eval(), folder


# ------------------------------------------------------------------------------- 1. import PEFT's adapters
@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_peft(case: str, tmp_path: Path) -> None:
    base, pm, folder = peft_case(case, tmp_path)
    ours = pk.import_peft(copy.deepcopy(base), folder).eval()
    x = ids()
    want = run(pm, x)
    assert (want - run(base, x)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(run(ours, x), want, atol=ATOL, rtol=0)
    cfg = CASES[case][1]
    expected_method = "dora" if cfg.get("use_dora") else "lora"
    assert type(ours.configs["default"]).method == expected_method
    assert ours.configs["default"].rslora == cfg.get("use_rslora", False)


def test_import_layers_to_transform_and_uniform_patterns(tmp_path: Path) -> None:
    """Adapted modules are read from the keys, so layers_to_transform works; rank/alpha patterns that give every
    module the same (r, alpha) import too."""
    base = tiny_bert()
    pm = quiet_peft(
        copy.deepcopy(base),
        r=2,
        lora_alpha=3,
        target_modules=["query", "value"],
        layers_to_transform=[1],
        layers_pattern="layer",
        rank_pattern={"query": 4, "value": 4},
        alpha_pattern={"query": 7, "value": 7},
    )
    fill_peft(pm)
    pm.save_pretrained(tmp_path / "p")
    ours = pk.import_peft(copy.deepcopy(base), tmp_path / "p").eval()
    assert sorted(ours.layer_paths["default"]) == [
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    ]
    assert (ours.configs["default"].r, ours.configs["default"].alpha) == (4, 7.0)
    torch.testing.assert_close(run(ours, ids()), run(pm.eval(), ids()), atol=ATOL, rtol=0)


def test_import_modules_to_save_and_tied_lm_head(tmp_path: Path) -> None:
    base = bert_cls()
    pm = quiet_peft(copy.deepcopy(base), r=2, target_modules=["query"], modules_to_save=["classifier"])
    fill_peft(pm)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    pm.save_pretrained(tmp_path / "p")
    ours = pk.import_peft(copy.deepcopy(base), tmp_path / "p").eval()
    assert "classifier" in ours.layer_paths["default"]
    torch.testing.assert_close(run(ours, ids()), run(pm.eval(), ids()), atol=ATOL, rtol=0)

    # GPT-2: targeting the (tied) lm_head makes PEFT also save its base weight; it is this model's, so accepted.
    base = tiny_gpt2()
    pm = quiet_peft(copy.deepcopy(base), r=2, target_modules=["c_attn", "lm_head"])
    fill_peft(pm)
    pm.save_pretrained(tmp_path / "g")
    ours = pk.import_peft(copy.deepcopy(base), tmp_path / "g").eval()
    torch.testing.assert_close(run(ours, ids()), run(pm.eval(), ids()), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- 2. export to PEFT
EXPORTS = {
    "bert-lora+classifier": (
        bert_cls,
        pk.LoRAConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"]),
    ),
    "bert-dora-rslora": (tiny_bert, pk.DoRAConfig(r=2, alpha=4, rslora=True, dropout=0.1, targets=["query", "dense"])),
    "gpt2-dora": (tiny_gpt2, pk.DoRAConfig(r=2, alpha=4, targets=["c_attn", "c_proj"])),
    # Conv1D and nn.Linear in one adapter: PEFT's single fan_in_fan_out flag is corrected per layer.
    "gpt2-mixed-kinds": (tiny_gpt2, pk.LoRAConfig(r=2, alpha=4, targets=["c_attn", "lm_head"], bias=True)),
    "net-lora+head": (
        make_tiny_net,
        pk.LoRAConfig(r=2, alpha=3, targets=["emb", "fc1", "conv"], modules_to_save=["head"]),
    ),
    "net-dora": (make_tiny_net, pk.DoRAConfig(r=2, alpha=4, targets=["fc2", "conv"], modules_to_save=["emb"])),
    "net-lora-bias-gaussian": (make_tiny_net, pk.LoRAConfig(r=2, bias=True, init="gaussian", targets=["conv", "fc2"])),
    # per-module rank / alpha (overrides) <-> PEFT's rank_pattern / alpha_pattern, both ways
    "bert-lora-overrides": (
        tiny_bert,
        pk.LoRAConfig(
            r=2,
            alpha=4,
            rslora=True,
            targets=["query", "value"],
            overrides={"value": {"r": 3}, "encoder.layer.1.attention.self.query": {"alpha": 8.0}},
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_export_loads_in_peft(case: str, tmp_path: Path) -> None:
    factory, config = EXPORTS[case]
    base = factory()
    ours = pk.adapt(copy.deepcopy(base), config)
    fill_ours(ours)
    ours.eval()
    folder = pk.export_peft(ours, tmp_path / "exported")
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["use_dora"] == (type(config).method == "dora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    x = ids()
    want = run(ours, x)
    assert (want - run(base, x)).abs().max() > 1e-3
    torch.testing.assert_close(run(pm, x), want, atol=ATOL, rtol=0)
    # and back: PEFT's own save of the loaded adapter imports to the same outputs
    pm.save_pretrained(tmp_path / "resaved")
    again = pk.import_peft(copy.deepcopy(base), tmp_path / "resaved").eval()
    torch.testing.assert_close(run(again, x), want, atol=ATOL, rtol=0)


def test_export_task_type_seq_cls(tmp_path: Path) -> None:
    base = bert_cls()
    ours = pk.adapt(copy.deepcopy(base), pk.LoRAConfig(r=2, targets=["query"], modules_to_save=["classifier"]))
    fill_ours(ours)
    pk.export_peft(ours.eval(), tmp_path / "e", task_type="SEQ_CLS")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "e")
    assert type(pm).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(run(pm.eval(), ids()), run(ours, ids()), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- 3. forward and gradients
FRESH = {
    "bert-lora": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_bias=True)),
    "bert-dora": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "dense"], use_dora=True)),
    "gpt2-dora-rslora": (
        tiny_gpt2,
        dict(
            r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], use_dora=True, use_rslora=True, fan_in_fan_out=True
        ),
    ),
    "net-lora": (make_tiny_net, dict(r=2, lora_alpha=4, target_modules=["emb", "fc1", "conv"])),
    "net-dora": (make_tiny_net, dict(r=2, lora_alpha=4, target_modules=["fc2", "conv"], use_dora=True)),
}
# PEFT parameter (adapter name removed) -> ours, per layer.
PEFT_TO_OURS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "bias",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector.weight": "magnitude",
}


def ours_from_peft_config(cfg: dict) -> pk.AdapterConfig:
    cls = pk.DoRAConfig if cfg.get("use_dora") else pk.LoRAConfig
    return cls(
        r=cfg["r"],
        alpha=cfg["lora_alpha"],
        targets=cfg["target_modules"],
        rslora=cfg.get("use_rslora", False),
        bias=cfg.get("lora_bias", False),
    )


def paired_params(pm: nn.Module, ours: pk.AdaptedModel) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(PEFT parameter, our parameter) for every adapter tensor."""
    pairs = []
    for n, p in pm.base_model.model.named_parameters():
        if "lora_" not in n:
            continue
        parts = n.split(".")
        k = next(i for i, s in enumerate(parts) if s.startswith("lora_"))
        path, suffix = ".".join(parts[:k]), ".".join(s for s in parts[k:] if s != "default")
        adapter = ours.model.get_submodule(path).adapters["default"]
        pairs.append((p, getattr(adapter, PEFT_TO_OURS[suffix])))
    return pairs


@pytest.mark.parametrize("case", sorted(FRESH))
def test_fresh_forward_and_gradients_match_peft(case: str) -> None:
    factory, cfg = FRESH[case]
    base = factory()
    pm = quiet_peft(copy.deepcopy(base), **cfg)
    fill_peft(pm)
    ours = pk.adapt(copy.deepcopy(base), ours_from_peft_config(cfg))
    pairs = paired_params(pm, ours)
    assert len(pairs) == sum(1 for _ in ours.parameters() if _.requires_grad)
    with torch.no_grad():
        for theirs, mine in pairs:
            mine.copy_(theirs.reshape(mine.shape))
    x = ids()
    losses = []
    for model in (pm.train(), ours.train()):  # train mode: the base's own dropout draws the same masks
        torch.manual_seed(0)
        y = out(model(x))
        loss = (y * torch.linspace(-1, 1, y.shape[-1])).square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=ATOL, rtol=0)
    assert any(theirs.grad is not None for theirs, _ in pairs)
    for theirs, mine in pairs:
        if theirs.grad is None:  # e.g. BERT's pooler, which the loss does not reach
            assert mine.grad is None
            continue
        torch.testing.assert_close(mine.grad.reshape(theirs.shape), theirs.grad, atol=ATOL, rtol=1e-4)


# ------------------------------------------------------------------------------- 4. merged weights
@pytest.mark.parametrize("case", ["bert-dora", "bert-lora-bias", "gpt2-dora", "gpt2-lora", "net-lora", "net-dora"])
def test_merge_matches_merge_and_unload(case: str, tmp_path: Path) -> None:
    base, pm, folder = peft_case(case, tmp_path)
    ours = pk.import_peft(copy.deepcopy(base), folder)
    mine = ours.merge().state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pm.merge_and_unload().state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], atol=ATOL, rtol=0, msg=k)


def test_merge_with_modules_to_save(tmp_path: Path) -> None:
    base = bert_cls()
    ours = pk.adapt(copy.deepcopy(base), pk.DoRAConfig(r=2, targets=["value"], modules_to_save=["classifier"]))
    fill_ours(ours)
    pk.export_peft(ours, tmp_path / "e")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "e")
    theirs = pm.merge_and_unload().state_dict()
    mine = ours.merge().state_dict()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], atol=ATOL, rtol=0, msg=k)


# ------------------------------------------------------------------------------- 5. mixed batches
@pytest.mark.parametrize(
    "kinds", [("bert-lora", "bert-lora-bias"), ("bert-dora", "bert-rslora"), ("net-lora", "net-lora-bias")]
)
def test_mixed_batch_matches_adapter_names(kinds: tuple[str, str], tmp_path: Path) -> None:
    base, pm, first = peft_case(kinds[0], tmp_path, seed=1)
    _, _, second = peft_case(kinds[1], tmp_path, seed=2)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), first, adapter_name="a")
    pm.load_adapter(second, adapter_name="b")
    pm.eval()
    ours = pk.import_peft(copy.deepcopy(base), first, name="a")
    pk.import_peft(ours, second, name="b")
    ours.eval()
    x = ids(rows=5)
    rows = ["a", "b", None, "b", "a"]
    got = run(ours, x, adapter_ids=rows)
    # every row equals PEFT with that row's adapter alone (PEFT refuses adapter_names with DoRA) ...
    single = {}
    for name in ("a", "b"):
        pm.set_adapter(name)
        single[name] = run(pm, x)
    with pm.disable_adapter():
        single[None] = run(pm, x)
    want = torch.stack([single[name][i] for i, name in enumerate(rows)])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # ... and PEFT's own mixed batch, where PEFT has one
    if not any(CASES[k][1].get("use_dora") for k in kinds):
        mixed = run(pm, x, adapter_names=[name or "__base__" for name in rows])
        torch.testing.assert_close(got, mixed, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- errors
def edit_config(folder: Path, **changes: object) -> None:
    file = folder / "adapter_config.json"
    meta = json.loads(file.read_text())
    meta.update(changes)
    file.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(peft_type="IA3"), "peft_type 'IA3'"),
        (dict(init_lora_weights="pissa"), "rewrites the base weights"),
        (dict(bias="all"), "bias='all'"),
        (dict(use_qalora=True), "QALoRA"),
    ],
)
def test_import_refuses_unsupported_options(changes: dict, match: str, tmp_path: Path) -> None:
    base, _, folder = peft_case("bert-lora", tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(UnsupportedAdapterError, match=match):
        pk.import_peft(copy.deepcopy(base), folder)


def test_import_file_errors(tmp_path: Path) -> None:
    base, _, folder = peft_case("net-lora", tmp_path)
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json is missing"):
        pk.import_peft(copy.deepcopy(base), tmp_path / "nowhere")
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated or corrupted"):
        pk.import_peft(copy.deepcopy(base), folder)
    weights.unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFileError, match="pickle"):
        pk.import_peft(copy.deepcopy(base), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        pk.import_peft(copy.deepcopy(base), folder)


def test_import_onto_wrong_base_and_unsupported_layers(tmp_path: Path) -> None:
    _, _, folder = peft_case("bert-lora", tmp_path)
    net = make_tiny_net()
    with pytest.raises(BaseModelMismatch, match=r"encoder\.layer\.0\.attention\.self"):
        pk.import_peft(net, folder)
    assert not any(isinstance(m, pk.AdaptedModel) for m in net.modules())
    # PEFT's DoRA adapts embeddings; peftkit's DoRA does not.
    base = make_tiny_net()
    pm = quiet_peft(copy.deepcopy(base), r=2, target_modules=["emb", "fc1"], use_dora=True)
    pm.save_pretrained(tmp_path / "dora-emb")
    with pytest.raises(UnsupportedAdapterError, match="'emb'"):
        pk.import_peft(copy.deepcopy(base), tmp_path / "dora-emb")


def test_export_errors(tmp_path: Path) -> None:
    full = pk.adapt(make_tiny_net(), pk.FullConfig(targets=["fc1"]))
    with pytest.raises(ExportError, match="'full'"):
        pk.export_peft(full, tmp_path / "x")
    merged = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, targets=["fc1"]))
    merged.merge(unload=False)
    with pytest.raises(ExportError, match="unmerge"):
        pk.export_peft(merged, tmp_path / "x")
    dilated = make_tiny_net()
    dilated.conv = nn.Conv2d(4, 6, kernel_size=3, padding=2, dilation=2)
    with pytest.raises(ExportError, match="dilation"):
        pk.export_peft(pk.adapt(dilated, pk.LoRAConfig(r=2, targets=["conv"])), tmp_path / "x")
    per_module_dropout = pk.LoRAConfig(r=2, targets=["fc1", "fc2"], overrides={"fc1": {"dropout": 0.1}})
    with pytest.raises(ExportError, match=r"overrides\['fc1'\] sets \['dropout'\]"):
        pk.export_peft(pk.adapt(make_tiny_net(), per_module_dropout), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_import_per_module_ranks_and_alphas(tmp_path: Path) -> None:
    base = tiny_bert()
    pm = quiet_peft(
        copy.deepcopy(base),
        r=2,
        lora_alpha=3,
        target_modules=["query", "value"],
        rank_pattern={"query": 4},
        alpha_pattern={"layer.1.attention.self.value": 16},
    )
    fill_peft(pm)
    pm.save_pretrained(tmp_path / "p")
    ours = pk.import_peft(copy.deepcopy(base), tmp_path / "p").eval()
    ranks = {p: (m.A.shape[0], m.config.alpha) for p, m in ours.adapter_modules("default").items()}
    assert ranks == {
        "encoder.layer.0.attention.self.query": (4, 3.0),
        "encoder.layer.0.attention.self.value": (2, 3.0),
        "encoder.layer.1.attention.self.query": (4, 3.0),
        "encoder.layer.1.attention.self.value": (2, 16.0),
    }
    torch.testing.assert_close(run(ours, ids()), run(pm.eval(), ids()), atol=ATOL, rtol=0)


def test_interop_does_not_import_peft() -> None:
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "import peftkit.interop as m\n"
        "assert 'peft' not in [n.split('.')[0] for n in sys.modules if sys.modules[n] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_failed_import_leaves_the_base_untouched(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base, _, folder = peft_case("net-lora", tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.fc1.lora_B.weight"] = torch.zeros(31, 2)
    save_file(tensors, weights)
    target = copy.deepcopy(base)
    with pytest.raises(BaseModelMismatch, match=r"fc1\.lora_B\.weight has shape \(31, 2\)"):
        pk.import_peft(target, folder)
    assert all(p.requires_grad for p in target.parameters())
    assert type(target.fc1) is nn.Linear
    torch.testing.assert_close(run(target, ids()), run(base, ids()), atol=0, rtol=0)
    # a lora_B.bias that the config does not announce
    tensors["base_model.model.fc1.lora_B.weight"] = torch.zeros(32, 2)
    tensors["base_model.model.fc1.lora_B.bias"] = torch.zeros(32)
    save_file(tensors, weights)
    with pytest.raises(AdapterFileError, match="unexpected"):
        pk.import_peft(target, folder)
