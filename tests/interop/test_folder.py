"""``peftkit.interop.folder``: PEFT folders on disk (written through ``core.io.write_files``, read with checks)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from peftkit.errors import AdapterFileError
from peftkit.interop.folder import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    read_peft_config,
    read_peft_tensors,
    write_peft_folder,
)


def test_write_then_read_keeps_other_files(tmp_path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "README.md").write_text("notes")
    tensors = {"base_model.model.fc1.lora_A.weight": torch.arange(6.0).reshape(2, 3)}
    assert write_peft_folder(folder, {"peft_type": "LORA", "r": 2}, tensors) == folder
    assert read_peft_config(folder) == {"peft_type": "LORA", "r": 2}
    assert torch.equal(read_peft_tensors(folder)["base_model.model.fc1.lora_A.weight"], tensors[next(iter(tensors))])
    with safe_open(str(folder / PEFT_WEIGHTS_FILE), "pt") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["exported_by"].startswith("peftkit ")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]


def test_read_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(AdapterFileError, match=r"not a PEFT adapter folder: adapter_config\.json is missing"):
        read_peft_config(tmp_path)
    (tmp_path / PEFT_CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="does not hold a JSON object"):
        read_peft_config(tmp_path)
    (tmp_path / PEFT_CONFIG_FILE).write_text("{oops")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        read_peft_config(tmp_path)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors is missing$"):
        read_peft_tensors(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFileError, match="does not read pickle files"):
        read_peft_tensors(tmp_path)
    write_peft_folder(tmp_path, {}, {"x": torch.zeros(64)})
    data = (tmp_path / PEFT_WEIGHTS_FILE).read_bytes()
    (tmp_path / PEFT_WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated or corrupted"):
        read_peft_tensors(tmp_path)
    assert json.loads((tmp_path / PEFT_CONFIG_FILE).read_text()) == {}
