"""peftkit's bottleneck adapters next to AdapterHub's ``adapters`` library: same base model, same adapter
weights, outputs compared and speed measured side by side (interleaved A/B medians).

``adapters`` pins an older ``transformers`` than peftkit's environment, so this script runs in a **separate**
virtual environment (never the project's ``.venv``)::

    python -m venv /tmp/ah && /tmp/ah/bin/pip install torch==2.13.0 adapters
    /tmp/ah/bin/python benchmarks/compare_adapterhub.py      # imports peftkit from this checkout

Model: a BERT with random weights built in code (hidden 256, 4 layers, 4 heads, FFN 1024), batch 8 × 128 tokens.
Adapters: Houlsby = AdapterHub ``DoubleSeqBnConfig`` (attention and FFN output, σ = swish, reduction 16) vs
peftkit ``houlsby`` (r = d/16, swish); Pfeiffer = ``SeqBnConfig`` vs peftkit ``pfeiffer`` (ReLU, reduction 16).
AdapterHub's adapter weights are copied into peftkit's (``adapter_down.0`` → ``down``, ``adapter_up`` → ``up``).
Figures: max |Δ| of the last hidden state (eval), eval-forward time and training-step time (forward + backward
+ AdamW step on the adapter parameters) of peftkit / AdapterHub. Results: ``results/compare_adapterhub.json``.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # peftkit from this checkout

import adapters
import transformers
from adapters import DoubleSeqBnConfig, SeqBnConfig
from transformers import BertConfig, BertModel

import peftkit as pk

RESULTS = Path(__file__).parent / "results"
PAIRS = {"houlsby": DoubleSeqBnConfig, "pfeiffer": SeqBnConfig}
NOTES = {
    "houlsby": "same placement: o' = o + a(o) on both output projections, then the block's LN(o' + x)",
    "pfeiffer": (
        "different placement, so outputs differ by design: AdapterHub's SeqBnConfig (original_ln_before=True, "
        "residual_before_ln=True) computes LN(o + a(LN(o + x)) + x) -- the adapter reads the block's "
        "LayerNorm'd residual sum and the frozen LayerNorm runs twice -- while peftkit's pfeiffer wraps the FFN "
        "output projection: LN(o + a(o) + x) (the adapter reads o)"
    ),
}


def base_model() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=256,
    )
    return BertModel(cfg).eval()


def hub_model(base: BertModel, method: str) -> BertModel:
    model = copy.deepcopy(base)
    adapters.init(model)
    model.add_adapter(method, config=PAIRS[method]())
    model.train_adapter(method)  # freezes the base, activates the adapter
    torch.manual_seed(1)
    with torch.no_grad():  # move the up-projections off AdapterHub's near-zero init so outputs differ from base
        for name, p in model.named_parameters():
            if f"adapters.{method}." in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def ours_from_hub(base: BertModel, hub: BertModel, method: str) -> pk.AdaptedModel:
    activation = PAIRS[method]().non_linearity  # pinned to AdapterHub's (swish / relu), not peftkit's default
    config = pk.get_config(method, r=base.config.hidden_size // 16, activation=activation)
    ours = pk.adapt(copy.deepcopy(base), config)
    hub_params = dict(hub.named_parameters())
    with torch.no_grad():
        for path, adapter in ours.adapter_modules("default").items():
            owner = path.rsplit(".", 1)[0]  # encoder.layer.N.attention.output / encoder.layer.N.output
            prefix = f"{owner}.adapters.{method}"
            adapter.branch.down.weight.copy_(hub_params[f"{prefix}.adapter_down.0.weight"])
            adapter.branch.down.bias.copy_(hub_params[f"{prefix}.adapter_down.0.bias"])
            adapter.branch.up.weight.copy_(hub_params[f"{prefix}.adapter_up.weight"])
            adapter.branch.up.bias.copy_(hub_params[f"{prefix}.adapter_up.bias"])
    return ours.eval()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def step_fn(model: torch.nn.Module, ids: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids).last_hidden_state.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in params)


def compare(method: str, repeats: int = 9) -> dict:
    base = base_model()
    hub = hub_model(base, method)
    ours = ours_from_hub(base, hub, method)
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = hub(input_ids=ids).last_hidden_state, ours(input_ids=ids).last_hidden_state
        plain = base(input_ids=ids).last_hidden_state
    result = {
        "placement": NOTES[method],
        "max_abs_diff": float((want - got).abs().max()),
        "adapter_effect": float((want - plain).abs().max()),  # how far the adapters move the output
        "adapted_modules": len(ours.layer_paths["default"]),
    }
    with torch.no_grad():
        fwd_hub, fwd_ours = [], []
        for _ in range(repeats):  # interleaved: a busy machine slows both alike
            fwd_hub += timed(lambda: hub(input_ids=ids), 1)
            fwd_ours += timed(lambda: ours(input_ids=ids), 1)
    hub.train(), ours.train()
    for m in (*hub.modules(), *ours.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    step_hub, n_hub = step_fn(hub, ids)
    step_ours, n_ours = step_fn(ours, ids)
    st_hub, st_ours = [], []
    for i in range(repeats + 2):
        a, b = timed(step_hub, 1), timed(step_ours, 1)
        if i >= 2:  # warm-up
            st_hub += a
            st_ours += b
    result.update(
        trainable_hub=n_hub,
        trainable_peftkit=n_ours,
        forward_ms_hub=statistics.median(fwd_hub) * 1e3,
        forward_ms_peftkit=statistics.median(fwd_ours) * 1e3,
        forward_ratio=statistics.median(fwd_ours) / statistics.median(fwd_hub),
        step_ms_hub=statistics.median(st_hub) * 1e3,
        step_ms_peftkit=statistics.median(st_ours) * 1e3,
        step_ratio=statistics.median(st_ours) / statistics.median(st_hub),
    )
    return result


def main() -> None:
    torch.set_num_threads(1)
    results = {
        "versions": {
            "adapters": adapters.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "model": "BERT hidden 256, 4 layers, 4 heads, FFN 1024, random weights; batch 8x128; 1 thread",
        "methods": {m: compare(m) for m in PAIRS},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compare_adapterhub.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
