"""``peftkit train --quantize`` (peftkit/quantize.py): the base's linear layers are stored by the backend (nf4 /
fp4 / int8 / hqq4), the heads stay float, the run records the scheme and ``peftkit eval`` rebuilds the same
quantised base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_lm import chat_rows, save, write_jsonl
from torch import nn
from typer.testing import CliRunner

from peftkit.cli import app
from peftkit.errors import InvalidConfigError
from peftkit.quantize import SCHEMES, quantize
from peftkit.train.run import evaluate, train

pytest.importorskip("bitsandbytes")
pytest.importorskip("hqq")
pytest.importorskip("transformers")
QUIET = {"progress": False, "log": lambda message: None}
BACKEND_CLASS = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt", "hqq4": "HQQLinear"}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_replaces_the_linears_and_keeps_the_function(scheme: str) -> None:
    model = mlp()
    x = torch.randn(8, 64)
    with torch.no_grad():
        exact = model(x)
    assert quantize(model, scheme) == ["0", "2"]
    assert {type(model[i]).__name__ for i in (0, 2)} == {BACKEND_CLASS[scheme]}
    with torch.no_grad():
        rounded = model(x)
    # 4-bit weights (16 levels per block) move this output by a few percent, 8-bit by well under one
    limit = 0.02 if scheme == "int8" else 0.25
    assert float((rounded - exact).norm() / exact.norm()) < limit


def test_heads_and_unknown_schemes() -> None:
    model = nn.Sequential()
    model.add_module("body", nn.Linear(64, 64))
    model.add_module("lm_head", nn.Linear(64, 10))
    assert quantize(model, "nf4") == ["body"] and type(model.lm_head) is nn.Linear
    with pytest.raises(InvalidConfigError, match="unknown quantisation 'nf3'; choose one of nf4, fp4, int8, hqq4"):
        quantize(mlp(), "nf3")
    with pytest.raises(InvalidConfigError, match=r"no nn\.Linear layer"):
        quantize(nn.Sequential(nn.ReLU()), "nf4")


def test_a_run_on_an_nf4_base_records_it_and_eval_rebuilds_it(tmp_path: Path) -> None:
    lm = save(tmp_path / "tiny-llama")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    result = train(
        tmp_path / "run", model=str(lm), data=str(data), task="causal-lm", r=4, alpha=8, lr=1e-2, epochs=1,
        batch_size=4, quantize="nf4", overrides={"task.max_new_tokens": 2}, **QUIET,
    )  # fmt: skip
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["quantize"] == "nf4"
    base = result.model.get_base_model()
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"  # adapted, quantised
    assert type(base.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"  # not adapted, quantised too
    assert type(base.lm_head) is nn.Linear  # the (tied) head stays float
    metrics, _ = evaluate(result.output_dir, progress=False)
    assert metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-5)


def test_cli_refuses_an_unknown_scheme_before_loading() -> None:
    out = CliRunner().invoke(app, ["train", "--quantize", "int4", "--max-steps", "1"])
    assert out.exit_code == 2 and "unknown quantisation 'int4'" in out.output
