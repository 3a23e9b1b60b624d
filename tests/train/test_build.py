"""peftkit.train.build: which model a run loads (folders, Hub ids, HF_HUB_OFFLINE respected and never set), the
default targets, and the weight digest that tells another base model apart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _tiny_lm import chat_rows, model, save, tokenizer, write_jsonl
from conftest import tiny_bert, tiny_gpt2

from peftkit.train.build import build, default_targets, model_digest, resolve_model
from peftkit.train.run import settings_from

pytest.importorskip("transformers")


def test_resolve_model(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path), "causal-lm") == str(tmp_path.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "gone"), "causal-lm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./models/mine", "causal-lm")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        resolve_model(str(tmp_path / "file"), "classify")
    with pytest.raises(ValueError, match="the causal-lm task needs --model"):
        resolve_model(None, "causal-lm")


def test_default_targets_follow_the_architecture() -> None:
    assert default_targets(tiny_bert()) == ["query", "value"]
    assert default_targets(model(64)) == ["q_proj", "v_proj"]
    assert default_targets(tiny_gpt2()) == ["c_attn"]
    assert default_targets(torch.nn.Sequential(torch.nn.Linear(2, 2))) == "all-linear"


def test_a_run_defaults_to_the_demos_lora_settings(tmp_path: Path) -> None:
    # Before this fix the run took LoRAConfig's own alpha (8), not the alpha 16 `peftkit train` always used.
    from peftkit.train.build import adapter_config

    spec = settings_from(task="causal-lm", model="m")
    config = adapter_config(spec, model(64), [])
    assert (config.r, config.alpha, config.targets, config.seed) == (8, 16.0, ["q_proj", "v_proj"], 0)
    spec = settings_from(task="causal-lm", model="m", alpha=4, targets="all-linear")
    config = adapter_config(spec, model(64), [])
    assert (config.alpha, config.targets) == (4.0, "all-linear") and spec.method_options["alpha"] == 4.0


def test_model_digest_tells_other_weights_apart() -> None:
    a, b = model(64, seed=0), model(64, seed=0)
    assert model_digest(a) == model_digest(b)
    with torch.no_grad():
        b.model.layers[1].self_attn.q_proj.weight[0, 0] += 1e-3
    assert model_digest(a) != model_digest(b)


def test_hub_ids_are_loaded_through_the_hub_and_offline_mode_is_never_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the CLI set HF_HUB_OFFLINE=1 itself (and passed local_files_only=True), so Hub ids failed online.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = save(tmp_path / "tiny")
    calls: list[tuple[str, dict, str | None]] = []

    def fake(loader):
        real = loader.from_pretrained

        def load(name, *args, **kwargs):
            calls.append((name, kwargs, os.environ.get("HF_HUB_OFFLINE")))
            return real(str(folder), *args, **kwargs)

        return load

    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", fake(cls))
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(6))
    built = build(settings_from(model="someone/tiny-llama", data=str(data), task="causal-lm"), progress=False)
    hub = [(kw, env) for name, kw, env in calls if name == "someone/tiny-llama"]  # (not the loaders' inner calls)
    assert built.spec.model == "someone/tiny-llama" and len(hub) == 3  # tokenizer, config, model
    assert all("local_files_only" not in kw for kw, _ in hub) and all(env is None for _, _, env in calls)
    assert "HF_HUB_OFFLINE" not in os.environ


def test_an_unreachable_hub_id_is_one_line_naming_offline_mode(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    with pytest.raises(
        OSError, match=r"^cannot load model 'peftkit-tests/no-such-model' \(HF_HUB_OFFLINE is set: only"
    ):
        build(settings_from(model="peftkit-tests/no-such-model", data=str(data), task="causal-lm"), progress=False)
    assert tokenizer().chat_template
