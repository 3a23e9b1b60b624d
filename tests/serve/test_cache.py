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


def test_register_dir_skips_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    """A symlinked folder that leads outside the root (issue 12, item 21: it stopped ``peftkit serve`` from
    starting with AdapterNameError) is skipped with a warning; a symlink inside the root is an alias."""
    root, _ = _write_many(tmp_path, 2)
    outside = tmp_path / "elsewhere"
    (root / "a1").rename(outside)
    (root / "link_out").symlink_to(outside, target_is_directory=True)
    (root / "link_in").symlink_to(root / "a0", target_is_directory=True)
    cache = AdapterCache(max_bytes=1 << 20, root=root)
    with pytest.warns(UserWarning, match="link_out.*outside the adapters folder"):
        found = cache.register_dir(root)
    assert found == ["a0", "link_in"] and cache.names() == ["a0", "link_in"]
    assert torch.equal(cache.get("link_in").tensors["0.A"], cache.get("a0").tensors["0.A"])
    cache.close()


def test_problem_reports_what_cannot_load_without_absolute_paths(tmp_path: Path) -> None:
    """``problem`` (what /v1/models filters on) names corrupt / incompatible adapters, in messages that name the
    folder relative to the root; fixing the files clears it. The load errors are redacted the same way."""
    root, _ = _write_many(tmp_path, 4)
    good = (root / "a0" / "adapter.safetensors").read_bytes()
    (root / "a1" / "adapter.safetensors").write_bytes(good[: len(good) // 2])  # truncated
    (root / "a2" / "adapter.json").write_text("{not json")

    def check(meta: dict) -> None:
        if meta["name"] == "a3":
            raise BaseModelMismatch("saved for another base")

    cache = AdapterCache(max_bytes=1 << 20, root=root, validate=check)
    cache.register_dir(root)
    problems = {n: cache.problem(n) for n in cache.names()}
    assert problems["a0"] is None
    assert "a1/adapter.safetensors" in problems["a1"] and "a2/adapter.json" in problems["a2"]
    assert problems["a3"] == "saved for another base"
    for name in ("a1", "a2"):
        assert str(tmp_path) not in problems[name]
        with pytest.raises(AdapterLoadError) as info:
            cache.get(name)
        assert str(tmp_path) not in str(info.value) and f"{name}/adapter." in str(info.value)
    (root / "a1" / "adapter.safetensors").write_bytes(good)  # repaired: a new size, so checked again
    assert cache.problem("a1") is None
    cache.close()


def test_put_replaces_atomically_and_disowns_stale_loads(tmp_path: Path) -> None:
    """``read`` + ``put``: a registered name needs ``replace=True``; after it, ``get`` returns the new version,
    even while a load of the old version was in flight (it must not overwrite the new resident copy)."""
    root, truth = _write_many(tmp_path, 3)
    gate = threading.Event()

    def slow(meta: dict) -> None:
        if meta["name"] == "a0":
            gate.wait(5)

    cache = AdapterCache(max_bytes=1 << 20, root=root, validate=slow)
    cache.register("a0", "a0")  # relative to the root
    stale = cache.get_async("a0")  # blocked in validate
    fresh = cache.read("a0", "a1")
    with pytest.raises(pk.errors.AdapterExistsError):
        cache.put("a0", fresh)
    cache.put("a0", fresh, replace=True)
    gate.set()
    stale.result(5)
    assert torch.equal(cache.get("a0").tensors["0.A"], truth["a1"]["0.A"])
    assert cache.path_of("a0") == (root / "a1").resolve()
    with pytest.raises(AdapterNameError, match=r"'\.\./x' lies outside"):
        cache.read("a9", "../x")
    cache.close()
