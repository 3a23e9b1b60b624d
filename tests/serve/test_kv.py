"""The running batch's KV cache (``peftkit.serve.kv.BatchedKV``): requests prefilled apart, then decoded together on
one left-padded stacked cache, compute what each computes alone; a row that leaves is dropped from the stack."""

from __future__ import annotations

import inspect

import torch
from serve_util import tiny_llama

from peftkit.serve.kv import BatchedKV, cache_of


def _cache_kw(model: torch.nn.Module) -> str:
    """The keyword this transformers version takes the cache by (as the engine chooses it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _alone(model: torch.nn.Module, prompt: list[int], new: list[int]) -> torch.Tensor:
    """The logits of each token in ``new`` fed after ``prompt`` on the model's own cache, one row."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, logits = cache_of(out), []
        for token in new:
            out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{_cache_kw(model): cache})
            cache = cache_of(out)
            logits.append(out.logits[0, -1])
    return torch.stack(logits)


def test_stacked_rows_equal_each_row_alone() -> None:
    model = tiny_llama()
    prompts = {"short": [5, 9, 2], "long": [1, 4, 1, 5, 9, 2, 6], "mid": [3, 3, 8, 1]}
    new = {"short": [7, 7, 1], "long": [2, 8, 3], "mid": [4, 4, 4]}
    kv = BatchedKV(_cache_kw(model))
    got: dict[str, list[torch.Tensor]] = {k: [] for k in prompts}
    with torch.no_grad():
        for name, prompt in prompts.items():  # prefilled one by one, as requests admitted in different steps
            kv.add_prefill([name], model(input_ids=torch.tensor([prompt]), use_cache=True), [len(prompt)])
        batch = list(prompts)
        for step in range(3):
            if step == 2:
                kv.drop("mid")  # a finished request leaves: the next step re-stacks without it
                batch.remove("mid")
            rows, inputs = kv.step_inputs(batch)
            assert set(rows) == set(batch)
            assert inputs["position_ids"][:, 0].tolist() == [len(prompts[r]) + step for r in rows]
            out = model(input_ids=torch.tensor([[new[r][step]] for r in rows]), use_cache=True, **inputs)
            kv.advance(out, inputs)
            for i, r in enumerate(rows):
                got[r].append(out.logits[i, -1])
    assert "mid" not in kv and kv.length("long") == len(prompts["long"]) + 3
    for name in prompts:
        want = _alone(model, prompts[name], new[name])[: len(got[name])]
        torch.testing.assert_close(torch.stack(got[name]), want, rtol=0, atol=1e-5 * want.abs().max().item())
