"""The demo task as a benchmark harness: every method trained the same way, each in its own process.

The demo task (``make demo``, ``examples/demo.py``): the packaged all-MiniLM-L6-v2 with a
:class:`~peftkit.train.tasks.SentenceClassifier` head (built from a fixed seed) on Rotten Tomatoes snippets
split by movie (:func:`peftkit.assets.rotten_tomatoes`), trained with :class:`~peftkit.train.Trainer` for a
fixed budget. A benchmark script lists :class:`Run` s (label, config, optional init, optional hooks that
drive a method's schedule the way a user would: callbacks, a loss term, a phase before training) and calls
:func:`main`. For each run this records:

* held-out accuracy (``peftkit.train.tasks.accuracy``);
* trainable parameters (``model.trainable_parameters()`` after training: growing or pruning methods report
  their final size; the head's 770 parameters are included in every row);
* mean optimizer-step time in ms after ``--warmup-steps`` steps (wall time between the trainer's
  ``on_step_end`` calls: forward, backward, clipping, AdamW step, the adapters' ``step`` hooks and the
  collation of the batch, which is the same for every method);
* peak memory of training steps in steady state, in a **fresh subprocess per run** (peak RSS is
  process-global, and an earlier run's freed memory would stay in the allocator). After the warm-up steps
  (the first step allocates one-time state: AdamW moments, autograd and oneDNN buffers, and a run with a
  calibration phase before ``fit`` would have paid that earlier) the process returns freed heap to the OS
  (``malloc_trim``), resets its peak-RSS counter (``/proc/self/clear_refs`` ← 5) and reads its RSS between
  steps (model, adapter, optimizer state); after ``fit`` it reads ``VmHWM``. ``train_peak_mib = VmHWM − RSS
  between steps`` is what a training step adds at its peak (activations saved for backward, gradients, the
  adapters' temporaries) and is what the ratio uses; ``rss_peak_mib`` is the whole process's peak over the
  same steps. ``tracemalloc`` was not used: it sees only Python's allocator, not torch's tensor memory;
* ratios to the LoRA run (``reference``) of the same invocation.

Every run uses the same seed, split, tokenisation, batch size, learning rate and schedule. The training runs
are sequential: on a loaded machine their step times carry the load of their own minute, so the LoRA
reference is run again at the end (``--no-repeat-reference`` turns that off) to show the drift, and the
comparable step-time ratios come from :func:`interleaved_steps` (every model in one process, one step each
in a shuffled rotation), run after the training runs (``--interleaved-only`` redoes just that).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import peftkit as pk
from peftkit.core.config import AdapterConfig
from peftkit.train import Callback, TrainConfig, Trainer
from peftkit.train.tasks import SentenceClassifier, TextCollator, accuracy

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = ["query", "value"]  # as the demo: LoRA on query/value, the head trained via modules_to_save
HEAD = ["head"]


class MethodMissing(Exception):
    """The method (or init) is not available in this checkout; the row is marked "missing", not "error"."""


@dataclass
class Budget:
    """What every run trains on: the same split, tokenisation and schedule."""

    # Sized for a shared 2-core CPU (~20 methods per script): a step of 16 x 32 tokens takes ~0.8 s on one
    # busy core, so a run is ~1 min; the demo's 32 x 64 tokens cost ~10 s a step there. Rotten Tomatoes
    # snippets average ~25 tokens, so 32 tokens truncates few of them.
    train: int = 960
    held_out: int = 400
    max_length: int = 32
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    warmup_steps: int = 3  # optimizer steps left out of the mean step time

    @property
    def steps(self) -> int:
        return self.epochs * math.ceil(self.train / self.batch_size)


@dataclass
class Context:
    """What a run's hooks get: the budget, the data, the collator and the training settings."""

    budget: Budget
    train: list[tuple[str, int]]
    held_out: list[tuple[str, int]]
    collate: TextCollator
    train_config: TrainConfig
    info: dict[str, Any] = field(default_factory=dict)  # a hook's extra results, reported in the JSON

    def batches(self, n: int, offset: int = 0) -> list[dict[str, torch.Tensor]]:
        """``n`` collated training batches starting at example ``offset`` (for calibration / pilot phases)."""
        bs = self.budget.batch_size
        full = max(1, len(self.train) // bs)  # wraps around on a small (--quick) split
        starts = [(offset // bs + i) % full * bs for i in range(n)]
        return [self.collate(self.train[s : s + bs]) for s in starts]


Loss = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class Run:
    """One row of a benchmark table.

    Attributes:
        label: the row's name.
        config: the adapter config, or a function of the :class:`Budget` building it (may raise
            :class:`MethodMissing`).
        setting: the hyper-parameters to print next to the label (rank, budget ...).
        init: passed to ``pk.adapt(..., init=init)`` when set (data-aware initialisers); a function is
            called with the :class:`Context` first (initialisers that need calibration batches).
        build: builds the adapted model from the bare classifier instead of ``pk.adapt`` (CoLoRA's pilot).
        before_fit: runs after building, before training (DiffoRA's search phase).
        callbacks: trainer callbacks for the run.
        loss: a loss function replacing the model's own loss (SoRA's L1 term, IncreLoRA's regulariser).
        after_fit: runs after training; its dict goes into the run's JSON (learned ranks ...).
    """

    label: str
    config: AdapterConfig | Callable[[Budget], AdapterConfig] | None = None
    setting: str = ""
    init: Any = None
    build: Callable[[nn.Module, Context], nn.Module] | None = None
    before_fit: Callable[[nn.Module, Context], None] | None = None
    callbacks: Callable[[nn.Module, Context], list[Callback]] | None = None
    loss: Callable[[nn.Module, Context], Loss] | None = None
    after_fit: Callable[[nn.Module, Context], dict[str, Any]] | None = None

    def make_config(self, budget: Budget) -> AdapterConfig:
        if self.config is None:
            raise MethodMissing(f"{self.label}: no config")
        return self.config(budget) if callable(self.config) else self.config


def config_of(method: str, **fields: Any) -> Callable[[Budget], AdapterConfig]:
    """A config factory for registered method ``method`` (``MethodMissing`` if it is not registered), with the
    demo's targets and head unless ``fields`` say otherwise. A field given as a function is called with the
    :class:`Budget` (e.g. a schedule length in steps)."""

    def make(budget: Budget) -> AdapterConfig:
        if method not in pk.list_methods():
            raise MethodMissing(f"method {method!r} is not registered (peftkit.list_methods())")
        values = {k: v(budget) if callable(v) else v for k, v in fields.items()}
        values.setdefault("targets", TARGETS)
        values.setdefault("modules_to_save", HEAD)
        return pk.get_config(method, **values)

    return make


def adapt_accepts_init() -> bool:
    import inspect

    return "init" in inspect.signature(pk.adapt).parameters


# ----------------------------------------------------------------------------------------- measurement
def status_kib(key: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``, ``VmHWM``, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so reuse of it counts as growth
    except OSError:
        pass


def reset_peak_rss() -> None:
    trim_heap()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS


class StepTimer(Callback):
    """Wall time of every optimizer step (between consecutive ``on_step_end`` calls); after step
    ``warmup`` it resets the peak-RSS counter and records the RSS between steps (the memory baseline)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.last = 0.0
        self.rss_base_kib = 0

    def on_train_begin(self, trainer: Trainer) -> None:
        reset_peak_rss()
        self.rss_base_kib = status_kib("VmRSS")
        self.last = time.perf_counter()

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        if len(self.times) == self.warmup:
            reset_peak_rss()
            self.rss_base_kib = status_kib("VmRSS")
        self.last = time.perf_counter()  # the measurement above is not part of the next step


def load_context(budget: Budget) -> Context:
    from peftkit.assets import rotten_tomatoes

    split = rotten_tomatoes(seed=budget.seed, max_train=budget.train, max_held_out=budget.held_out)
    _, tokenizer = _load_encoder()
    train_config = TrainConfig(
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        lr=budget.lr,
        warmup_ratio=0.06,
        seed=budget.seed,
        progress=False,
    )
    return Context(budget, split.train, split.held_out, TextCollator(tokenizer, budget.max_length), train_config)


def _load_encoder() -> tuple[nn.Module, Any]:
    from peftkit.assets import load_minilm

    return load_minilm()


def classifier(seed: int) -> SentenceClassifier:
    """A fresh classifier: the packaged MiniLM and the seeded head (identical in every run)."""
    encoder, _ = _load_encoder()
    return SentenceClassifier(encoder, num_labels=2, head_seed=seed)


def build_model(run: Run, budget: Budget, ctx: Context) -> nn.Module:
    """The adapted classifier of ``run``, ready to train (built, initialised, ``before_fit`` done)."""
    torch.manual_seed(budget.seed)
    base = classifier(budget.seed)
    if run.build is not None:
        model = run.build(base, ctx)
    else:
        config = run.make_config(budget)
        if run.init is not None:
            if not adapt_accepts_init():
                raise MethodMissing("pk.adapt has no init= argument yet")
            init = run.init(ctx) if callable(run.init) else run.init
            model = pk.adapt(base, config, init=init)  # type: ignore[call-arg]
        else:
            model = pk.adapt(base, config)
    if run.before_fit is not None:
        run.before_fit(model, ctx)
    return model


def run_one(run: Run, budget: Budget) -> dict[str, Any]:
    """Train and measure ``run`` in this process (call it in a fresh process: see the module docstring)."""
    t0 = time.perf_counter()
    ctx = load_context(budget)
    model = build_model(run, budget, ctx)
    timer = StepTimer(budget.warmup_steps if budget.warmup_steps < budget.steps else 0)
    callbacks = [timer, *(run.callbacks(model, ctx) if run.callbacks else [])]
    kwargs: dict[str, Any] = {"loss_fn": run.loss(model, ctx)} if run.loss else {}
    trainer = Trainer(model, ctx.train_config, ctx.train, collate_fn=ctx.collate, callbacks=callbacks, **kwargs)
    result = trainer.fit()
    rss_peak = status_kib("VmHWM")
    rss_before = timer.rss_base_kib
    steps = timer.times[budget.warmup_steps :] or timer.times
    out: dict[str, Any] = {
        "status": "ok",
        "steps": result.global_step,
        "step_ms": 1000 * sum(steps) / len(steps),
        "step_ms_median": 1000 * sorted(steps)[len(steps) // 2],
        "train_peak_mib": (rss_peak - rss_before) / 1024,
        "rss_peak_mib": rss_peak / 1024,
        "last_loss": result.history[-1]["loss"],
    }
    if run.after_fit is not None:
        out["extra"] = run.after_fit(model, ctx)
    out["trainable"] = model.trainable_parameters().trainable  # type: ignore[operator]
    out["accuracy"] = accuracy(model, ctx.held_out, ctx.collate)
    if ctx.info:
        out.setdefault("extra", {}).update(ctx.info)
    out["seconds"] = time.perf_counter() - t0
    return out


def interleaved_steps(runs: Sequence[tuple[str, Run]], budget: Budget, rounds: int, warmup: int = 1) -> dict[str, Any]:
    """Step time of every ``(label, run)`` side by side in **one process**: all models are built (untrained,
    in the configuration they train in), then one optimizer step of each on the same batch in turn, in a new
    random order every round (so no method always follows the same one), ``warmup`` rounds discarded, median
    of ``rounds``. Load drifts hit every method alike, so these ratios are the comparable step times (the
    per-run means carry the load of their own minute). A step is the run's loss (with its regulariser),
    backward, AdamW and the adapters' ``step`` hook. A label listed twice for the same run (the reference
    "again") is a second, independent model: its ratio shows the noise of the measurement."""
    import random

    from peftkit.train.callbacks import step_adapters
    from peftkit.train.trainer import default_loss

    ctx = load_context(budget)
    batch = ctx.batches(1)[0]
    fns: dict[str, Callable[[], None]] = {}
    out: dict[str, Any] = {}
    for label, run in runs:
        try:
            model = build_model(run, budget, ctx)
        except MethodMissing as exc:
            out[label] = {"status": "missing", "error": str(exc)}
            continue
        except Exception as exc:
            out[label] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=budget.lr)
        loss_fn = run.loss(model, ctx) if run.loss else default_loss
        counter = [0]

        def step(model: nn.Module = model, opt: Any = opt, loss_fn: Loss = loss_fn, counter: list = counter) -> None:
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            counter[0] += 1
            step_adapters(model, counter[0])

        fns[label] = step
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    shuffle = random.Random(budget.seed).shuffle
    for i in range(warmup + rounds):
        shuffle(order)
        for label in order:
            if label in out:  # failed in an earlier round
                continue
            t = time.perf_counter()
            try:
                fns[label]()
            except Exception as exc:
                out[label] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            if i >= warmup:
                times[label].append(time.perf_counter() - t)
    for label, ts in times.items():
        if label not in out and ts:
            out[label] = {"status": "ok", "step_ms": 1000 * sorted(ts)[len(ts) // 2], "rounds": len(ts)}
    return out


def attach_interleaved(results: list[dict[str, Any]], timing: dict[str, Any], reference: str) -> None:
    """Put each run's interleaved step time and its ratio to ``reference`` into its row."""
    ref = timing.get(reference, {})
    for r in results:
        t = timing.get(r["label"])
        if not t or t.get("status") != "ok":
            continue
        r["step_ms_interleaved"] = t["step_ms"]
        if ref.get("status") == "ok":
            r["step_vs_ref_interleaved"] = t["step_ms"] / ref["step_ms"]


# -------------------------------------------------------------------------------------------- the parent
def _worker_result(run: Run, budget: Budget) -> dict[str, Any]:
    try:
        return run_one(run, budget)
    except MethodMissing as exc:
        return {"status": "missing", "error": str(exc)}
    except Exception as exc:  # a failing method is a row of the table, with its error
        traceback.print_exc()
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}


def spawn(script: str, label: str, budget: Budget, timeout: float, threads: int = 1) -> dict[str, Any]:
    """Run ``label`` in a fresh ``python script --worker`` process; return its result line."""
    cmd = [
        sys.executable,
        script,
        "--worker",
        label,
        "--budget",
        json.dumps(budget.__dict__),
        "--threads",
        str(threads),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    return run_worker(cmd, env, timeout)


def run_worker(cmd: list[str], env: dict[str, str], timeout: float, error_chars: int = 300) -> dict[str, Any]:
    """Run a worker process; its result is the JSON of its last ``RESULT ...`` line on stdout, else an error row
    with the tail of its output."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "error", "error": f"worker exited {proc.returncode}: {' | '.join(tail)}"[:error_chars]}


def add_ratios(results: list[dict[str, Any]], reference: str) -> None:
    ref = next((r for r in results if r["label"] == reference and r["status"] == "ok"), None)
    for r in results:
        if ref is None or r["status"] != "ok":
            continue
        r["step_vs_ref"] = r["step_ms"] / ref["step_ms"]
        r["mem_vs_ref"] = r["train_peak_mib"] / ref["train_peak_mib"] if ref["train_peak_mib"] > 0 else float("nan")
        r["params_vs_ref"] = r["trainable"] / ref["trainable"]


def fmt_int(n: int) -> str:
    return f"{n:,}"


def markdown_table(results: list[dict[str, Any]], reference: str) -> str:
    """One row per run: accuracy, trainable parameters, step time, step peak memory, ratios to ``reference``."""
    ref = reference
    lines = [
        f"| method | setting | held-out acc | trainable params | step ms (own run) | step vs {ref} (interleaved) "
        f"| step peak MiB "
        f"| peak mem vs {ref} | process peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r.get('setting', '')} | **{r['status']}**: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r.get('setting', '')} | {r['accuracy']:.3f} | {fmt_int(r['trainable'])} "
            f"| {r['step_ms']:.0f} | {r.get('step_vs_ref_interleaved', float('nan')):.2f}x | {r['train_peak_mib']:.0f} "
            f"| {r.get('mem_vs_ref', float('nan')):.2f}x | {r['rss_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str, reference: str) -> None:
    """Accuracy vs trainable parameters (log x), one labelled point per method that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok" and not r["label"].startswith(f"{reference} (again")]
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in ok:
        is_ref = r["label"].startswith(reference)
        ax.scatter(r["trainable"], r["accuracy"], color="tab:red" if is_ref else "tab:blue", zorder=3)
        ax.annotate(r["label"], (r["trainable"], r["accuracy"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; the head's 770 included)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    failed = [r["label"] for r in results if r["status"] != "ok"]
    if failed:
        ax.text(0.01, 0.01, "not shown (failed / missing): " + ", ".join(failed), transform=ax.transAxes, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def env_info() -> dict[str, Any]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peftkit": pk.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "registered": pk.list_methods(),
        "adapt_accepts_init": adapt_accepts_init(),
    }


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    d = Budget()
    ap.add_argument("--train", type=int, default=d.train, help="training snippets")
    ap.add_argument("--held-out", type=int, default=d.held_out, help="held-out snippets (other movies)")
    ap.add_argument("--max-length", type=int, default=d.max_length, help="tokens per snippet")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--quick", action="store_true", help="smoke run: 48 train / 32 held-out, 16 tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (runs are sequential)")
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    ap.add_argument("--no-repeat-reference", action="store_true", help="do not run the reference again at the end")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the interleaved step timing")
    ap.add_argument(
        "--interleaved-only",
        action="store_true",
        help="only (re)run the interleaved step timing and re-render the existing results of --out",
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run before it is marked failed")
    ap.add_argument("--out", type=Path, default=None, help="results stem (default: benchmarks/results/<name>)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--budget", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def budget_of(args: argparse.Namespace) -> Budget:
    if args.budget:
        return Budget(**json.loads(args.budget))
    if args.quick:
        return Budget(train=48, held_out=32, max_length=16, batch_size=16, seed=args.seed, warmup_steps=1)
    return Budget(args.train, args.held_out, args.max_length, args.epochs, args.batch_size, args.lr, args.seed)


def main(
    name: str,
    runs: list[Run],
    description: str,
    *,
    reference: str = "LoRA",
    extras: Callable[[argparse.Namespace], dict[str, Any]] | None = None,
    extras_markdown: Callable[[dict[str, Any]], str] | None = None,
    argv: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """Run a benchmark script: the parent spawns one worker per run; ``--worker LABEL`` is the child.

    ``extras(args)`` runs in the parent after the table (side-by-side measurements); its dict is stored
    under ``"extras"`` and ``extras_markdown`` renders it below the table. Returns the results dict.
    """
    args = parse_args(description, argv)
    torch.set_num_threads(args.threads)
    budget = budget_of(args)
    by_label = {r.label: r for r in runs}
    if args.worker:
        result = _worker_result(by_label[args.worker], budget)
        print("RESULT " + json.dumps(result), flush=True)
        return None
    script = str(Path(sys.argv[0]).resolve())
    chosen = [r for r in runs if not args.only or r.label in args.only.split(",")]
    if reference in by_label and reference not in [r.label for r in chosen]:
        chosen.insert(0, by_label[reference])
    order = [(r.label, r.label) for r in chosen]
    if not args.no_repeat_reference and reference in by_label:
        order.append((reference, f"{reference} (again, at the end)"))
    stem = args.out or RESULTS_DIR / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.interleaved_only:  # keep the trained runs of the last invocation, redo the timing only
        out = json.loads(Path(f"{stem}.json").read_text())
        results = out["runs"]
    else:
        load_start = os.getloadavg()
        results = []
        for label, shown in order:
            res = spawn(script, label, budget, args.timeout, args.threads)
            res.update(label=shown, setting=by_label[label].setting)
            results.append(res)
            acc = f"acc {res['accuracy']:.3f}, {res['step_ms']:.0f} ms/step" if res["status"] == "ok" else res["error"]
            print(f"[{time.perf_counter() - start:5.0f}s] {shown}: {res['status']} ({acc})", flush=True)
        add_ratios(results, reference)
        out = {
            "env": {**env_info(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
            "budget": {**budget.__dict__, "steps": budget.steps, "threads": args.threads},
            "reference": reference,
            "runs": results,
            "run_s": time.perf_counter() - start,
        }
        if extras is not None:
            out["extras"] = extras(args)
    # each row's run; the reference's repeat row times a second, independent reference model
    timed = [(r["label"], by_label.get(r["label"], by_label.get(reference))) for r in results]
    timed = [(label, run) for label, run in timed if run is not None]
    out["interleaved"] = {
        "rounds": args.rounds,
        "loadavg": os.getloadavg(),
        "steps": interleaved_steps(timed, Budget(**{k: out["budget"][k] for k in Budget().__dict__}), args.rounds),
    }
    attach_interleaved(results, out["interleaved"]["steps"], reference)
    print(f"interleaved step timing done ({time.perf_counter() - start:.0f}s)", flush=True)
    table = markdown_table(results, reference)
    b = out["budget"]
    md = [
        f"# {name}: the demo task, {b['train']} train / {b['held_out']} held-out snippets, max_len "
        f"{b['max_length']}, {b['epochs']} epoch(s) = {b['steps']} steps of {b['batch_size']}, lr "
        f"{b['lr']}, seed {b['seed']}",
        "",
        table,
    ]
    if extras_markdown is not None and out.get("extras"):
        md += ["", extras_markdown(out["extras"])]
    Path(f"{stem}.json").write_text(json.dumps(out, indent=2))
    Path(f"{stem}.md").write_text("\n".join(md) + "\n")
    plot(
        results,
        Path(f"{stem}.png"),
        f"{name}: held-out accuracy vs trainable parameters (MiniLM + Rotten Tomatoes, {b['steps']} steps)",
        reference,
    )
    print("\n".join(md))
    print(f"wrote {stem}.json / .md / .png")
    return out
