"""``peftkit compress`` on a tiny Llama folder: each method's output loads the way the command says (Auto* for
EoRA's base + pk.load for its adapter; load_compressed for the reshaped models) and computes the compressed model;
bad input is one error line with exit code 1 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli import invoke as invoke_cli
from _cli import runner
from _tiny_lm import chat_rows, save, write_jsonl

import peftkit as pk
from peftkit.cli import app
from peftkit.compress import arch
from peftkit.compress.saving import load_compressed

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compress")
    return save(root / "tiny"), write_jsonl(root / "calib.jsonl", chat_rows(24))


def invoke(*args: object) -> str:
    return invoke_cli("compress", *args)


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_eora_writes_an_auto_loadable_base_and_a_lora_adapter_that_reduces_the_error(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, calib = folder
    out = tmp_path / "eora"
    invoke("--method", "eora", "--model", model_dir, "--compressor", "2:4", "--rank", 4, "--calib", calib,
           "--seq-len", 32, "--output-dir", out, "--no-progress")  # fmt: skip
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    weight = base.model.layers[0].mlp.up_proj.weight.reshape(-1, 4)
    assert int((weight == 0).sum(1).min()) >= 2  # the stored base is the 2:4-pruned one
    ids, want = _ids(), _logits(original, _ids())
    compressed_error = float((_logits(base, ids) - want).norm())
    adapted = pk.load(base, out / "adapter")
    assert float((_logits(adapted, ids) - want).norm()) < compressed_error
    summary = json.loads((out / "compress.json").read_text())
    assert summary["weighted_error_after"] < summary["weighted_error_before"]


@pytest.mark.parametrize("method", ["lord", "pela", "loraprune"])
def test_reshaping_methods_write_a_smaller_model_that_load_compressed_reads(folder, tmp_path, method):
    model_dir, calib = folder
    out = tmp_path / method
    invoke("--method", method, "--model", model_dir, "--ratio", 0.5, "--calib", calib, "--seq-len", 32,
           "--steps", 2, "--output-dir", out, "--no-progress")  # fmt: skip
    loaded = load_compressed(out / "model")
    summary = json.loads((out / "compress.json").read_text())
    assert summary["params_after"] == sum(p.numel() for p in loaded.parameters()) < summary["params_before"]
    if method == "loraprune":  # block 0 is prunable (the last block is kept whole): half its units are gone
        assert arch.unit_count(loaded.model.layers[0]) == (1, 32)
    else:
        assert isinstance(loaded.model.layers[0].mlp.up_proj, arch.FactoredLinear)
    assert torch.isfinite(_logits(loaded, _ids())).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "lord", "--ratio", "1.5"], "(0, 1)"),
        (["--method", "lord"], "needs --ratio"),
        (["--method", "eora", "--compressor", "2:4"], "needs calibration data"),
        (["--method", "svd", "--ratio", "0.5"], "unknown method 'svd'"),
        (["--method", "eora", "--compressor", "hqq9", "--calib", "CALIB"], "unknown compressor 'hqq9'"),
        (["--method", "eora", "--compressor", "2:4", "--rank", "999", "--calib", "CALIB"], "rank 999"),
    ],
)
def test_bad_input_is_one_error_line_and_nothing_is_written(folder, tmp_path, args, message):
    model_dir, calib = folder
    out = tmp_path / "out"
    args = [str(calib) if a == "CALIB" else a for a in args]
    result = runner.invoke(app, ["compress", "--model", str(model_dir), "--output-dir", str(out), "--seq-len", "32",
                                 "--no-progress", *args])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert message in result.output and result.output.count("error:") == 1
    assert not out.exists()
