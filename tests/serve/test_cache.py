"""AdapterCache: registration, bounded LRU residency, background loads, pins, errors per adapter."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import peftkit as pk
from peftkit.core.io import read_tensors
from peftkit.errors import AdapterNameError, AdapterNotFoundError, BaseModelMismatch
from peftkit.serve.cache import AdapterCache, AdapterLoadError, AdapterTooLargeError


def _template(tmp: Path) -> Path:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model = pk.adapt(base, pk.LoRAConfig(r=2, targets=["0", "2"]))
    return model.save(tmp / "template")


def _write_many(tmp: Path, n: int) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """``n`` adapters with distinct random tensors, written directly (no fsync) to keep the test fast."""
    template = _template(tmp)
    meta = json.loads((template / "adapter.json").read_text())
    meta.pop("weights_sha256", None)  # the template's checksum does not fit the random tensors written here
    keys = read_tensors(template)
    root = tmp / "adapters"
    truth = {}
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        name = f"a{i}"
        folder = root / name
        folder.mkdir(parents=True)
        tensors = {k: torch.randn(t.shape, generator=g) for k, t in keys.items()}
        save_file(tensors, str(folder / "adapter.safetensors"))
        (folder / "adapter.json").write_text(json.dumps({**meta, "name": name}))
        truth[name] = tensors
    return root, truth


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_thousand_adapters_bounded_lru_and_exact_reload(tmp_path: Path) -> None:
    root, truth = _write_many(tmp_path, 1000)
    size = _nbytes(truth["a0"])
    cache = AdapterCache(max_bytes=10 * size, root=root)
    assert len(cache.register_dir(root)) == 1000
    g = torch.Generator().manual_seed(2)
    order = torch.randint(0, 1000, (600,), generator=g).tolist()
    expected_lru: list[str] = []
    for i in order:
        name = f"a{i}"
        got = cache.get(name)
        for k, t in truth[name].items():
            assert torch.equal(got.tensors[k], t)
        assert cache.resident_bytes <= cache.max_bytes
        if name in expected_lru:
            expected_lru.remove(name)
        expected_lru.append(name)
        expected_lru = expected_lru[-10:]
        assert cache.resident() == expected_lru  # exact LRU order, at most 10 resident
    assert cache.stats["hits"] + cache.stats["misses"] == 600
    assert cache.stats["evictions"] == cache.stats["misses"] - 10
    cache.close()


def test_pinned_adapter_not_evicted(tmp_path: Path) -> None:
    root, truth = _write_many(tmp_path, 20)
    cache = AdapterCache(max_bytes=3 * _nbytes(truth["a0"]), root=root)
    cache.register_dir(root)
    with cache.using("a0") as held:
        for i in range(1, 20):
            cache.get(f"a{i}")
            assert "a0" in cache.resident()
        assert held.tensors.keys() == truth["a0"].keys()
        assert len(cache.resident()) == 3
    cache.get("a19")
    for i in range(10, 13):  # a0 is the least recently used once unpinned
        cache.get(f"a{i}")
    assert "a0" not in cache.resident()
    assert cache.resident_bytes <= cache.max_bytes
    cache.close()


def test_async_load_does_not_block_other_adapters(tmp_path: Path) -> None:
    root, _ = _write_many(tmp_path, 3)
    gate = threading.Event()

    def slow(meta: dict) -> None:
        if meta["name"] == "a1":
            assert gate.wait(10)

    cache = AdapterCache(max_bytes=1 << 20, root=root, validate=slow)
    cache.register_dir(root)
    cache.get("a0")
    slow_future = cache.get_async("a1")
    assert cache.get_async("a1") is slow_future  # one load shared by concurrent requests
    assert cache.get("a0", timeout=5).name == "a0"  # resident: served at once
    assert cache.get("a2", timeout=5).name == "a2"  # another loader thread
    assert not slow_future.done()
    gate.set()
    assert slow_future.result(5).name == "a1"
    cache.close()


def test_corrupt_and_incompatible_adapters_fail_alone(tmp_path: Path) -> None:
    root, truth = _write_many(tmp_path, 4)
    (root / "a1" / "adapter.safetensors").write_bytes(b"\x00garbage")
    (root / "a2" / "adapter.json").write_text("{not json")

    def check(meta: dict) -> None:
        if meta["name"] == "a3":
            raise BaseModelMismatch("saved for another base")

    cache = AdapterCache(max_bytes=1 << 20, root=root, validate=check)
    cache.register_dir(root)
    for name in ("a1", "a2", "a3"):
        with pytest.raises(AdapterLoadError) as info:
            cache.get(name)
        assert info.value.adapter == name
    assert torch.equal(cache.get("a0").tensors["0.A"], truth["a0"]["0.A"])
    assert cache.resident() == ["a0"]
    assert cache.stats["load_errors"] == 3
    tiny = AdapterCache(max_bytes=8, root=root)
    tiny.register("a0", root / "a0")
    with pytest.raises(AdapterTooLargeError):
        tiny.get("a0")
    cache.close()
    tiny.close()


@pytest.mark.parametrize("name", ["../etc", "/abs", "a/b", "a.b", "", "x" * 129, "sp ace", "a\\b"])
def test_bad_names_rejected(tmp_path: Path, name: str) -> None:
    cache = AdapterCache(max_bytes=100, root=tmp_path)
    with pytest.raises(AdapterNameError):
        cache.register(name, tmp_path)
    with pytest.raises(AdapterNameError):
        cache.get_async(name)


def test_root_confinement_and_unknown(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    cache = AdapterCache(max_bytes=100, root=tmp_path / "root")
    with pytest.raises(AdapterNameError):
        cache.register("ok", tmp_path / "root" / ".." / "elsewhere")
    with pytest.raises(AdapterNotFoundError):
        cache.get_async("missing")
    cache.register("ok", tmp_path / "root" / "ok")
    cache.unregister("ok")
    assert "ok" not in cache
