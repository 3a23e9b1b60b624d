"""SoKA and TLoRA next to LoRA on MiniLM's ``query`` / ``value`` (the demo table's placement and batch): the
interleaved training-step time (forward, backward, AdamW) and the bytes autograd saves for backward, measured
side by side in one process.

Both methods apply a structured matrix (a sum of Kronecker products; tensor-train matrices) whose factored
form keeps ``2k`` (SoKA) or ``ρ`` (TLoRA) copies of the activations for backward; for more tokens than that
form pays off, they build the small dense matrix instead (see their docstrings). Run this script on a commit
before that change to get the "before" row.

    python benchmarks/bench_kron_forward.py    # ~1 min; writes benchmarks/results/kron_forward.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_structured import _minilm, _saved_bytes, interleaved

import peftkit as pk

ROWS, TOKENS, REPEATS = 16, 32, 15  # the demo task's batch: 16 snippets × 32 tokens


def main() -> None:
    torch.set_num_threads(1)
    encoder = _minilm()
    targets = ["query", "value"]
    configs = {
        "LoRA": pk.LoRAConfig(r=8, alpha=16, targets=targets),
        "SoKA": pk.get_config("soka", targets=targets),
        "TLoRA": pk.get_config("tlora", targets=targets),
    }
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (ROWS, TOKENS), generator=g),
        "attention_mask": torch.ones(ROWS, TOKENS, dtype=torch.long),
    }
    steps, saved, trainable = {}, {}, {}
    for name, config in configs.items():
        model = pk.adapt(copy.deepcopy(encoder), config).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def loss(model: torch.nn.Module = model) -> torch.Tensor:
            return model(**batch).last_hidden_state.pow(2).mean()

        def step(loss=loss, opt: torch.optim.Optimizer = opt) -> None:  # type: ignore[no-untyped-def]
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name], saved[name] = step, _saved_bytes(loss)
        trainable[name] = model.trainable_parameters().trainable
        opt.zero_grad(set_to_none=True)
    med = interleaved(steps, REPEATS)
    report = {
        "batch": [ROWS, TOKENS],
        "repeats": REPEATS,
        "trainable": trainable,
        "step_ms": {k: 1000 * v for k, v in med.items()},
        "step_vs_lora": {k: v / med["LoRA"] for k, v in med.items()},
        "saved_for_backward_mib": {k: v / 2**20 for k, v in saved.items()},
        "saved_vs_lora": {k: v / saved["LoRA"] for k, v in saved.items()},
    }
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "kron_forward.json"
    out.write_text(json.dumps(report, indent=1))
    for name in configs:
        print(
            f"{name:6} trainable {trainable[name]:>8,}  step {report['step_ms'][name]:6.1f} ms "
            f"({report['step_vs_lora'][name]:.2f}x)  saved {report['saved_for_backward_mib'][name]:6.1f} MiB "
            f"({report['saved_vs_lora'][name]:.2f}x)"
        )


if __name__ == "__main__":
    main()
