"""Saving / loading compressed models whose shapes the configuration cannot describe (factorised Linears, pruned
heads and channels): the loaded model computes what the saved one did."""

from __future__ import annotations

import pytest
import torch

from peftkit.compress import arch, structured
from peftkit.compress.lord import lord
from peftkit.compress.saving import CompressedFolderError, load_compressed, save_compressed
from tests.compress import _tiny


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_a_factorised_and_pruned_model_loads_back_with_the_same_outputs(tmp_path):
    model = _tiny.llama(layers=4)
    structured.apply(model, {1: (torch.tensor([1]), torch.arange(0, 48, 2))})  # block 1: one kv group, 24 channels
    lord(model, ratio=0.3)
    batch = _tiny.batches(n=1)[0]
    expected = _logits(model, batch)
    save_compressed(model, tmp_path / "out", method="test")
    loaded = load_compressed(tmp_path / "out")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, arch.FactoredLinear)
    assert arch.unit_count(loaded.model.layers[1]) == (1, 24)
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    assert not (tmp_path / "out" / "model.safetensors").exists()  # Auto* cannot silently re-initialise it


def test_a_folder_without_the_compressed_files_is_refused(tmp_path):
    with pytest.raises(CompressedFolderError, match=r"compressed\.json"):
        load_compressed(tmp_path)
