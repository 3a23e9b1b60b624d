"""Serve what you trained (issue 14, item 5): ``AdapterCache.register_dir`` (what ``peftkit serve --adapters``
calls) takes a folder of adapter folders, a training run folder (adapter in ``RUN/adapter/``, served under the
run's name), a parent folder of runs, and a ``model.save`` folder of several adapters (``adapters.json``).

Run folders are laid out as ``peftkit train`` writes them (``peftkit.train.run``): ``RUN/adapter/`` (the final
adapter, ``model.save``), ``RUN/checkpoints/step-<n>/`` (full checkpoints, each with its own ``adapter/``),
``RUN/run.json`` and ``RUN/metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from serve_util import CharTokenizer, char_tokenizer_hf, random_adapter, serve_cli, tiny_llama

import peftkit as pk
from peftkit.serve.cache import AdapterCache
from peftkit.serve.engine import Engine, Request, SamplingParams
from peftkit.serve.folders import RUN_ADAPTER_DIR, discover

CONFIG = pk.LoRAConfig(r=2, alpha=4.0, targets=["q_proj", "v_proj"])


def _run(folder: Path, seed: int) -> Path:
    """A training run folder: ``adapter/`` (the trained adapter), an earlier checkpoint, run.json, metrics.jsonl."""
    checkpoint = folder / "checkpoints" / "step-1"
    random_adapter(tiny_llama, CONFIG, checkpoint / "adapter", seed=seed + 100)
    random_adapter(tiny_llama, CONFIG, folder / "adapter", seed=seed)
    for record in (folder, checkpoint):
        (record / "run.json").write_text(json.dumps({"format": "peftkit-run", "method": "lora", "seed": seed}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    return folder


def _multi(folder: Path, names: list[str], seed: int) -> Path:
    """``model.save`` of several adapters: ``adapters.json`` and one sub-folder each."""
    model = pk.AdaptedModel(tiny_llama())
    g = torch.Generator().manual_seed(seed)
    for name in names:
        model.add_adapter(name, CONFIG)
        with torch.no_grad():
            for p in model.adapter_modules(name).values():
                for t in p.parameters():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model.save(folder)


def _registered(root: Path) -> dict[str, Path]:
    cache = AdapterCache(1 << 24, root=root)
    names = cache.register_dir(root)
    assert names == cache.names()
    return {n: cache.path_of(n) for n in names}


def test_layouts_and_names(tmp_path: Path) -> None:
    """Each layout alone, and all mixed in one parent folder; the adapter folders the names point to."""
    parent = tmp_path / "parent"
    plain = random_adapter(tiny_llama, CONFIG, parent / "plain", seed=0)
    run1 = _run(parent / "run1", seed=1)
    run2 = _run(parent / "run2", seed=2)
    multi = _multi(parent / "multi", ["x", "y"], seed=3)
    random_adapter(tiny_llama, CONFIG, parent / ".partial", seed=4)  # a hidden leftover: never served
    random_adapter(tiny_llama, CONFIG, multi / "stale", seed=5)  # not in the index (an earlier save): not served
    assert _registered(run1) == {"run1": (run1 / "adapter").resolve()}
    assert _registered(multi) == {"x": (multi / "x").resolve(), "y": (multi / "y").resolve()}
    assert _registered(plain) == {"plain": plain.resolve()}  # an adapter folder itself: its own name
    assert _registered(parent) == {
        "multi-x": (multi / "x").resolve(),
        "multi-y": (multi / "y").resolve(),
        "plain": plain.resolve(),
        "run1": (run1 / "adapter").resolve(),
        "run2": (run2 / "adapter").resolve(),
    }
    # a run whose adapter folder holds several adapters: <run>-<adapter>
    run3 = parent / "run3"
    _multi(run3 / "adapter", ["x", "y"], seed=6)
    assert _registered(run3) == {
        "run3-x": (run3 / "adapter" / "x").resolve(),
        "run3-y": (run3 / "adapter" / "y").resolve(),
    }
    assert {"run3-x", "run3-y"} <= set(_registered(parent))


def test_the_run_layout_is_the_trainers() -> None:
    from peftkit.train import run

    assert RUN_ADAPTER_DIR == run.ADAPTER_DIR


def test_a_folder_of_adapters_with_one_named_adapter_is_not_a_run(tmp_path: Path) -> None:
    """A folder of adapters that happens to hold one called ``adapter`` keeps all of them under their names."""
    for name in ("adapter", "other"):
        random_adapter(tiny_llama, CONFIG, tmp_path / name, seed=len(name))
    assert sorted(_registered(tmp_path)) == ["adapter", "other"]


def test_a_name_found_twice_keeps_its_first_folder(tmp_path: Path) -> None:
    _multi(tmp_path / "b", ["x", "y"], seed=2)
    random_adapter(tiny_llama, CONFIG, tmp_path / "b-x", seed=3)  # "b-x" again, after the save "b" named it
    with pytest.warns(UserWarning, match="'b-x'.*the name 'b-x' is taken"):
        found = dict(discover(tmp_path))
    assert found == {"b-x": tmp_path / "b" / "x", "b-y": tmp_path / "b" / "y"}


def _logits(model: torch.nn.Module, prompt: str, n: int) -> torch.Tensor:
    """Greedy next-token logits without a KV cache."""
    ids, out, logits = CharTokenizer().encode(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            step = model(torch.tensor([ids + out])).logits[0, -1]
            logits.append(step)
            out.append(int(step.argmax()))
    return torch.stack(logits)


def test_engine_serves_each_run_under_its_name(tmp_path: Path) -> None:
    """A parent folder of runs: each run's name serves the adapter in its ``adapter/`` folder (what pk.load of
    that folder computes), not its checkpoints; load_adapter takes a run folder too."""
    runs = [_run(tmp_path / "runs" / name, seed=i) for i, name in enumerate(["first", "second"])]
    cache = AdapterCache(1 << 24, root=tmp_path / "runs")
    assert cache.register_dir(tmp_path / "runs") == ["first", "second"]
    engine = Engine(tiny_llama(), CharTokenizer(), cache, record_logits=True)
    assert engine.load_adapter("again", "second") is False  # a run folder given as the path: its adapter
    n = 4
    reqs = engine.generate(
        [Request("hello", adapter=a, params=SamplingParams(max_tokens=n)) for a in ["first", "second", "again"]]
    )
    for req, run in zip(reqs, [*runs, runs[1]]):
        want = _logits(pk.load(tiny_llama(), run / "adapter"), "hello", n)
        assert req.error is None, req.error
        torch.testing.assert_close(torch.stack(req.logits), want, rtol=0, atol=1e-5 * want.abs().max().item())
        checkpoint = _logits(pk.load(tiny_llama(), run / "checkpoints" / "step-1" / "adapter"), "hello", n)
        assert (torch.stack(req.logits) - checkpoint).abs().max() > 1e-3  # the run's adapter, not a checkpoint


@pytest.mark.slow
def test_peftkit_serve_a_run_folder(tmp_path: Path) -> None:
    """``peftkit serve --adapters RUN``: the run's adapter is served under the run's name."""
    openai = pytest.importorskip("openai")
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    char_tokenizer_hf().save_pretrained(base)
    run = _run(tmp_path / "my-run", seed=0)
    with serve_cli("--base", str(base), "--adapters", str(run)) as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["base", "my-run"]
        out = client.completions.create(model="my-run", prompt="hello", max_tokens=4, temperature=0)
        want = _logits(pk.load(tiny_llama(), run / "adapter"), "hello", 4).argmax(-1).tolist()
        assert out.choices[0].text == CharTokenizer().decode(want)
