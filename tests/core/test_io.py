"""Saving never loses data: other files in the folder stay, every instant of a save leaves a loadable adapter,
several adapters are saved together, files follow the umask, corrupted tensors are refused."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_net

import peftkit as pk
from peftkit.errors import AdapterFileError, NoAdaptersError, NotMergeableError, SavePathError

HERE = Path(__file__).parent


def lora(**kw) -> pk.LoRAConfig:
    return pk.LoRAConfig(**{"r": 4, "alpha": 8, "targets": ["fc1", "fc2"], **kw})


@pytest.fixture
def model() -> pk.AdaptedModel:
    model = pk.adapt(make_tiny_net(), lora(seed=1)).eval()
    with torch.no_grad():
        for adapter in model.adapter_modules("default").values():
            adapter.B.normal_()
    return model


def outputs(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ other files stay
def test_save_leaves_other_files_in_the_folder(model, token_batch, tmp_path) -> None:
    folder = tmp_path / "myproject"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "model.pt").write_bytes(b"user weights")
    (folder / "README.md").write_text("notes")
    model.save(folder)
    model.save(folder)  # again, over the first save
    assert (folder / "checkpoints" / "model.pt").read_bytes() == b"user weights"
    assert (folder / "README.md").read_text() == "notes"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter.json",
        "adapter.safetensors",
        "checkpoints",
    ]
    torch.testing.assert_close(
        outputs(pk.load(make_tiny_net(), folder).eval(), token_batch), outputs(model, token_batch)
    )


def test_export_peft_leaves_other_files_in_the_folder(tmp_path) -> None:
    from conftest import tiny_bert

    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["query"]))
    folder = tmp_path / "myproject"
    folder.mkdir()
    (folder / "README.md").write_text("notes")
    pk.export_peft(model, folder)
    pk.export_peft(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("how", ["save", "export_peft"])
def test_a_file_at_the_path_is_refused_and_kept(how, tmp_path) -> None:
    from conftest import tiny_bert

    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["query"]))
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(SavePathError, match=r"is a file"):
        model.save(target) if how == "save" else pk.export_peft(model, target)
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing hidden beside it


def test_read_only_folder_and_file_are_refused(model, tmp_path) -> None:
    folder = tmp_path / "frozen"
    model.save(folder)
    before = files(folder)
    folder.chmod(0o555)
    try:
        with pytest.raises(SavePathError, match=r"read-only"):
            model.save(folder)
    finally:
        folder.chmod(0o755)
    (folder / "adapter.json").chmod(0o444)
    with pytest.raises(SavePathError, match=r"read-only"):
        model.save(folder)
    assert files(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]


# ------------------------------------------------------------------------------------------- atomicity
def test_sigkill_at_random_points_and_at_every_step_keeps_a_loadable_save(tmp_path) -> None:
    """25 saves killed with SIGKILL at random times and one at each file-system step of a save (see
    ``_crash_saves.py``): after every kill the folder loads one of the two saved versions exactly, a kill
    between the two renames is among them, and the next save removes every leftover."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    done = subprocess.run(
        [sys.executable, str(HERE / "_crash_saves.py"), str(tmp_path / "adapter"), "25"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["random_kills"] == 25
    assert result["step_kills"] >= 6  # the save's fsyncs, the link, both renames, the clean-up
    assert result["kept_file_used"] >= 1  # a kill fell between replacing the tensors and adapter.json
    assert set(result["versions"]) == {0, 1}
    assert result["leftovers_after"] == []
    assert result["final"] == 1


def test_next_save_cleans_leftovers_of_killed_saves(model, tmp_path) -> None:
    folder = tmp_path / "adapter"
    model.save(folder)
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    (folder / f".adapter.safetensors.tmp-{dead}-abcd").write_bytes(b"half")
    (folder / f".adapter.json.tmp-{dead}-abcd").write_bytes(b"half")
    (folder / ".adapter.safetensors.0123456789abcdef").write_bytes(b"old")
    (tmp_path / ".adapter.tmp-xyz").mkdir()  # leftovers of the folder-swapping saves before this version
    (tmp_path / f".adapter.old-{dead}").mkdir()
    model.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_written_before_checksums_is_upgraded_and_kept_during_the_next_save(model, token_batch, tmp_path) -> None:
    folder = tmp_path / "adapter"
    model.save(folder)
    meta = json.loads((folder / "adapter.json").read_text())
    del meta["weights_sha256"]
    (folder / "adapter.json").write_text(json.dumps(meta))
    first = outputs(model, token_batch)
    assert torch.equal(outputs(pk.load(make_tiny_net(), folder).eval(), token_batch), first)  # still loads
    model.save(folder)
    assert "weights_sha256" in json.loads((folder / "adapter.json").read_text())


# ------------------------------------------------------------------------------------- several adapters
def test_save_writes_every_adapter_and_load_restores_them(model, token_batch, tmp_path) -> None:
    model.add_adapter("dora", pk.DoRAConfig(r=2, targets=["fc2"], seed=3))
    model.add_adapter("other", lora(r=2, seed=5))
    for name in ("dora", "other"):
        with torch.no_grad():
            for adapter in model.adapter_modules(name).values():
                adapter.B.normal_()
    model.set_adapter(["default", "other"])
    expected = outputs(model, token_batch)
    per_row = torch.tensor([0, 1, 2, -1])
    mixed = outputs_ids(model, token_batch, per_row)
    model.save(tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["adapters.json", "default", "dora", "other"]
    loaded = pk.load(make_tiny_net(), tmp_path / "all").eval()
    assert loaded.adapter_names == ["default", "dora", "other"]
    assert loaded.active_adapters == ["default", "other"]
    torch.testing.assert_close(outputs(loaded, token_batch), expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs_ids(loaded, token_batch, per_row), mixed, rtol=0, atol=0)
    with pytest.raises(AdapterFileError, match=r"holds 3 adapters"):
        pk.adapt(make_tiny_net(), lora()).load_adapter(tmp_path / "all")

    model.save(tmp_path / "some", names=["dora", "default"])
    assert pk.load(make_tiny_net(), tmp_path / "some").adapter_names == ["dora", "default"]
    model.save(tmp_path / "one", names="dora")
    one = pk.load(make_tiny_net(), tmp_path / "one").eval()
    assert one.adapter_names == ["dora"]
    model.set_adapter("dora")
    torch.testing.assert_close(outputs(one, token_batch), outputs(model, token_batch), rtol=0, atol=0)

    model.save(tmp_path / "all", names="dora")  # one adapter into the folder of three: the index goes
    assert not (tmp_path / "all" / "adapters.json").exists()
    assert pk.load(make_tiny_net(), tmp_path / "all").adapter_names == ["dora"]


def outputs_ids(model: pk.AdaptedModel, batch: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(batch, adapter_ids=ids)


def test_save_of_a_model_without_adapters_says_why(model, tmp_path) -> None:
    model.merge()
    with pytest.raises(NoAdaptersError, match=r"holds no adapters: merge\(\) folded \['default'\]"):
        model.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------- umask
def test_saved_files_follow_the_umask(model, tmp_path) -> None:
    old = os.umask(0o022)
    try:
        model.save(tmp_path / "new" / "adapter")
        model.add_adapter("b", lora(seed=2))
        model.save(tmp_path / "several")
        pk.export_peft(pk.adapt(make_tiny_net(), lora()), tmp_path / "peft")
    finally:
        os.umask(old)
    for path in [tmp_path / "new", *(tmp_path / "new").rglob("*"), *(tmp_path / "several").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"
    for path in (tmp_path / "peft").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --------------------------------------------------------------------------------------------- checksum
def test_flipped_bit_in_the_tensors_is_refused(model, tmp_path) -> None:
    folder = tmp_path / "adapter"
    model.save(folder)
    data = bytearray((folder / "adapter.safetensors").read_bytes())
    data[-5] ^= 0x40  # one bit of the last tensor's data (the exponent of a float: NaN or a huge value)
    (folder / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match=r"does not match the checksum in adapter.json"):
        pk.load(make_tiny_net(), folder)


# ------------------------------------------------------------------------------------- disabled + merge
def test_merge_in_place_while_disabled_is_refused(model, token_batch) -> None:
    base = outputs(pk.adapt(make_tiny_net(), lora()).get_base_model(), token_batch)
    model.disable_adapters()
    with pytest.raises(NotMergeableError, match=r"adapters are disabled"):
        model.merge(unload=False)
    torch.testing.assert_close(outputs(model, token_batch), base, rtol=0, atol=0)
    model.enable_adapters()
    adapted = outputs(model, token_batch)
    model.merge(unload=False)
    model.disable_adapters()  # unmerges: disabled means the base outputs
    torch.testing.assert_close(outputs(model, token_batch), base, rtol=0, atol=1e-6)
    model.enable_adapters()
    torch.testing.assert_close(outputs(model, token_batch), adapted, rtol=0, atol=1e-6)
