"""The README's ten-line example runs as written (real packaged MiniLM)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_readme_python_example_runs(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from peftkit.assets import minilm_dir

    try:
        minilm_dir()
    except Exception as exc:  # the asset package is missing: the example cannot run here
        pytest.skip(str(exc))
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 12  # "a 10-line example" + imports
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trainable params" in done.stdout
    # two adapters: one folder each plus the index that pk.load reads
    assert (tmp_path / "out/adapter/adapters.json").is_file()
    assert (tmp_path / "out/adapter/default/adapter.safetensors").is_file()
    assert (tmp_path / "out/adapter/dora/adapter.safetensors").is_file()
    assert (tmp_path / "out/peft/adapter_model.safetensors").is_file()
