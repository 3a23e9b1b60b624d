"""The low-rank family on the demo task (issue 4): accuracy, trainable parameters, step time and peak memory
of every method next to LoRA, each in a fresh process (see ``benchmarks/demo_task.py``).

    python benchmarks/bench_lowrank.py            # all methods (~15 min on 2 quiet cores, ~40 min at load 5)
    python benchmarks/bench_lowrank.py --quick    # smoke run on a few dozen examples
    python benchmarks/bench_lowrank.py --only LoRA,DoRA,SoRA

Writes ``benchmarks/results/lowrank.{json,md,png}``. Every method adapts MiniLM's ``query`` and ``value`` and
trains the classifier head through ``modules_to_save`` (the demo's setting); the rank knob is chosen so the
update budget is close to LoRA r=8 (6,144 parameters per 384×384 layer) where the method's structure allows,
and stated in the table. Schedules run the way a user runs them: the trainer's per-step adapter hook
(DyLoRA, SoRA, DV-LoRA), :class:`~peftkit.train.callbacks.GrowthCallback` (IncreLoRA), a loss term (SoRA's
L1, IncreLoRA's orthogonality), a search phase before training (DiffoRA) and a pilot run (CoLoRA).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_task import HEAD, TARGETS, Budget, Context, MethodMissing, Run, config_of, main

import peftkit as pk
from peftkit.train import Callback
from peftkit.train.trainer import default_loss


def _ranks(model: nn.Module, ctx: Context) -> dict[str, Any]:
    from peftkit.train.ranks import rank_report

    report = rank_report(model)
    report = {k: v for k, v in report.items() if not k.endswith("head")}
    return {"ranks": report, "total_rank": sum(report.values())}


def _with(extra: Any):  # a loss = the model's own loss + a regulariser of the model
    def make(model: nn.Module, ctx: Context):
        def loss(m: nn.Module, batch: Any) -> torch.Tensor:
            return default_loss(m, batch) + extra(m)

        return loss

    return make


# -------------------------------------------------------------------------------- schedules as a user runs them
def sora_loss(model: nn.Module, ctx: Context):
    from peftkit.methods.sora import sora_l1_penalty

    return _with(sora_l1_penalty)(model, ctx)


def increlora_growth(model: nn.Module, ctx: Context) -> list[Callback]:
    from peftkit.methods.increlora import IncreLoRAAllocator
    from peftkit.train.callbacks import GrowthCallback

    allocator = IncreLoRAAllocator(model)
    ctx.info["increlora_target_total"] = allocator.target_total
    ctx.info["increlora_history"] = allocator.history  # filled in during training (same list object)
    return [GrowthCallback(allocator)]


def increlora_loss(model: nn.Module, ctx: Context):
    from peftkit.methods.increlora import increlora_orth_penalty

    return _with(increlora_orth_penalty)(model, ctx)


def diffora_search(model: nn.Module, ctx: Context) -> None:
    """DiffoRA's search phase (10% of the steps, ``search_ratio``): DARTS alternation, weights on a training
    batch and ``θ`` on a batch from the *end of the training split* (never the held-out set); then keep the
    top half of the modules and fine-tune those with the trainer. The search adapter cannot carry
    ``modules_to_save`` (``discretize`` refuses it), so the head trains as a plain base parameter."""
    from peftkit.methods.diffora import DiffoRASearch, discretize, gammas
    from peftkit.train.trainer import seed_everything

    seed_everything(ctx.budget.seed)
    n = max(1, round(0.1 * ctx.budget.steps))
    train = ctx.batches(n)
    val_offset = len(ctx.train) - n * ctx.budget.batch_size
    val = ctx.batches(n, offset=max(0, val_offset))
    search = DiffoRASearch(model, "default", default_loss, lr=ctx.budget.lr)
    model.train()
    for t, v in zip(train, val):
        search.step(t, v)
    ctx.info["diffora_gammas"] = gammas(model, "default")
    ctx.info["diffora_search_steps"] = n
    kept = discretize(model, "default")
    ctx.info["diffora_kept"] = kept.targets
    model.get_base_model().head.requires_grad_(True)


def diffora_build(base: nn.Module, ctx: Context) -> nn.Module:
    cfg = pk.get_config("diffora", r=8, alpha=16, targets=TARGETS)
    return pk.adapt(base, cfg)


def colora_build(base: nn.Module, ctx: Context) -> nn.Module:
    """CoLoRA: per-layer ranks from a 4-batch pilot full fine-tuning of the target weights (on a copy), rank
    budget ``r_avg = 8`` per layer, given to ``pk.adapt`` as per-module ``overrides`` (what ``add_colora``
    does for a model that is already adapted)."""
    from peftkit.methods.colora import colora_ranks, pilot_contributions

    contributions = pilot_contributions(base, ctx.batches(4), default_loss, targets=TARGETS, lr=ctx.budget.lr)
    ranks = colora_ranks(contributions, r_avg=8)
    overrides = {path: {"r": int(r)} for path, r in ranks.items()}
    cfg = pk.get_config("colora", targets=TARGETS, overrides=overrides, modules_to_save=HEAD)
    ctx.info["colora_ranks"] = ranks
    return pk.adapt(base, cfg)


def lora_config(budget: Budget) -> Any:
    return pk.get_config("lora", r=8, alpha=16, targets=TARGETS, modules_to_save=HEAD)


def _init(name: str):
    """An initialiser of ``peftkit.init`` built with 4 training batches (``MethodMissing`` if absent)."""

    def make(ctx: Context) -> Any:
        import peftkit.init

        cls = getattr(peftkit.init, name, None)
        if cls is None:
            raise MethodMissing(f"peftkit.init.{name} does not exist in this checkout")
        if name == "LoRASB":
            return cls(ctx.batches(4), total_steps=ctx.budget.steps, loss_fn=default_loss, lr=ctx.budget.lr)
        return cls(ctx.batches(4), loss_fn=default_loss)

    return make


RUNS: list[Run] = [
    Run("LoRA", config_of("lora", r=8, alpha=16), "r=8, α=16"),
    # the floor: only the head trains (full fine-tuning of the 770 head parameters, encoder frozen)
    Run("head only", config_of("full", targets=["head"], modules_to_save=[]), "the head alone, encoder frozen"),
    Run("rsLoRA", config_of("lora", r=8, alpha=16, rslora=True), "r=8, α=16, s=α/√r"),
    Run("DoRA", config_of("dora", r=8, alpha=16), "r=8, α=16"),
    Run("DyLoRA", config_of("dylora", r=8, alpha=16), "r≤8 drawn per step, eval r=8", after_fit=_ranks),
    Run(
        "SoRA",
        config_of("sora", r=8, alpha=16),
        "max r=8, L1 λ=10 + proximal 3e-4",
        loss=sora_loss,
        after_fit=_ranks,
    ),
    Run(
        "IncreLoRA",
        config_of("increlora", r=2, target_rank=8, incre_rank_num=2, top_h=4, init_warmup=5, incre_interval=3),
        "r 2→≤8 per layer (+2 every 3 steps, top 4)",
        callbacks=increlora_growth,
        loss=increlora_loss,
        after_fit=_ranks,
    ),
    Run(
        "DiffoRA",
        None,
        "r=8, α=16, search 10% then keep 1/2 of modules",
        build=diffora_build,
        before_fit=diffora_search,
        after_fit=_ranks,
    ),
    Run("ALLoRA", config_of("allora", r=8), "r=8, no scaling, row-norm grad"),
    Run("Hydra", config_of("hydra", r=4), "r=4 per branch (2 branches)"),
    Run("Block-LoRA", config_of("blocklora", r=8, alpha=16, n=8, dropout=0.0), "r=8, n=8 blocks, α=16"),
    Run("Comp-LoRA", config_of("complora", r=8, alpha=16, dropout=0.0), "r=8, α=16"),
    Run("CoLoRA", None, "r_avg=8 by pilot contribution", build=colora_build, after_fit=_ranks),
    Run("DV-LoRA", config_of("dvlora", r=8, alpha=16, warm_up_step=lambda b: b.steps // 2), "r=8, α=16, A/B then U/V"),
    Run("LoRA-XS", config_of("loraxs", r=80, alpha=80), "r=80 (80×80 core)"),
    # data-aware initialisers and SVD/LU-parameterised methods (issue 4's init family)
    Run("PiSSA", lora_config, "r=8, α=16, init=pissa", init="pissa"),
    Run("LoRA-GA", lora_config, "r=8, α=16, init=LoRAGA(4 batches)", init=_init("LoRAGA")),
    Run("LoRA-SB", config_of("lorasb", r=80, alpha=80), "r=80 core, init=LoRASB(4 batches)", init=_init("LoRASB")),
    Run("SVFit", config_of("svfit"), "defaults (top r=16 singular values)"),
    Run("SALT", config_of("salt"), "defaults (r=4)"),
    Run("LoLDU", config_of("loldu"), "defaults (full-rank LDU, D trains)"),
]


if __name__ == "__main__":
    main("lowrank", RUNS, __doc__.splitlines()[0])
