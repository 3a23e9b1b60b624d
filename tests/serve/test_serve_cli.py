"""``peftkit serve --base DIR --adapters DIR`` in a subprocess, queried with the openai client."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_gpt2
from serve_util import char_tokenizer_hf, random_adapter, serve_cli

import peftkit as pk

openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_peftkit_serve_command(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny_gpt2().save_pretrained(base)
    char_tokenizer_hf().save_pretrained(base)
    random_adapter(tiny_gpt2, pk.LoRAConfig(r=2, targets=["c_attn"]), tmp_path / "adapters" / "demo", seed=0)
    # a symlinked folder leading out of the adapters folder: skipped with a warning (it stopped the server from
    # starting, issue 12 item 21)
    outside = random_adapter(tiny_gpt2, pk.LoRAConfig(r=2, targets=["c_attn"]), tmp_path / "outside", seed=1)
    (tmp_path / "adapters" / "escape").symlink_to(outside, target_is_directory=True)
    args = ["--base", str(base), "--adapters", str(tmp_path / "adapters"), "--embedder", "minilm", "--max-rank", "8"]
    with serve_cli(*args, env={"PEFTKIT_API_KEY": "k"}) as (proc, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["base", "demo", "embedding"]  # no "escape"
        vector = client.embeddings.create(model="embedding", input="hi").data[0].embedding
        assert len(vector) == 384 and abs(sum(v * v for v in vector) - 1) < 1e-4  # MiniLM, unit length
        out = client.completions.create(model="demo", prompt="hello", max_tokens=4, temperature=0)
        assert len(out.choices[0].text) == 4
        chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert chat.choices[0].finish_reason == "length"
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "skipping adapter folder 'escape'" in output
