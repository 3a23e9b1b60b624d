"""LoRA+ (peftkit.optim.loraplus) against PEFT's ``create_loraplus_optimizer`` on the same weights (the peftkit
adapter exported and loaded by PEFT): the same four groups (members, learning rates, weight decay) and the same
weights after a few AdamW steps; with ratio 1 it is plain AdamW."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.optim import NoTrainableParametersError, OptimizerError, build_optimizer, loraplus

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

LR, RATIO, WD, LR_EMB = 1e-3, 16.0, 0.01, 1e-4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        h = self.fc2(torch.relu(self.norm(self.fc1(h))))
        return self.head(h.mean(1))


def unfreeze_norm_and_head(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if name.split(".")[-2] in ("norm", "head"):
            p.requires_grad_(True)


def pair(tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    """A peftkit LoRA model (B made non-zero) and PEFT's model loaded from its export: the same weights."""
    torch.manual_seed(0)
    base = Net()
    ours = pk.adapt(copy.deepcopy(base), pk.LoRAConfig(r=4, alpha=8, targets=["emb", "fc1", "fc2"]))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad and p.abs().max() == 0:  # LoRA's B starts at 0: give it values to compare
                p.normal_(0, 0.1)
    pk.export_peft(ours, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft", is_trainable=True)
    for model in (ours, theirs):
        unfreeze_norm_and_head(model)
    return ours, theirs


def signature(params: list[torch.Tensor]) -> list[tuple[tuple[int, ...], float]]:
    """What identifies a tensor across the two libraries (an embedding's LoRA factors are stored transposed in
    one of them): its sorted shape and its sum."""
    return sorted((tuple(sorted(p.shape)), round(float(p.detach().double().sum()), 6)) for p in params)


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randint(0, 40, (8, 5), generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return model(torch.randint(0, 40, (8, 5), generator=g))


def test_loraplus_matches_peft_groups_and_steps(tmp_path: Path) -> None:
    from peft.optimizers import create_loraplus_optimizer

    ours, theirs = pair(tmp_path)
    opt = loraplus(ours, lr=LR, ratio=RATIO, weight_decay=WD, lr_embedding=LR_EMB)
    ref = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=WD,
        loraplus_lr_embedding=LR_EMB,
    )  # fmt: skip
    assert len(opt.param_groups) == len(ref.param_groups) == 4
    for mine, peft_group in zip(opt.param_groups, ref.param_groups):
        assert mine["lr"] == pytest.approx(peft_group["lr"], rel=1e-12)
        assert mine["weight_decay"] == peft_group["weight_decay"]
        assert signature(mine["params"]) == signature(peft_group["params"])
    assert [len(g["params"]) for g in opt.param_groups] == [3, 2, 2, 3]  # A + head.weight, emb A/B, B, norm + head.bias
    out_ours, out_theirs = run(ours, opt), run(theirs, ref)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6 * float(out_theirs.abs().max()))
    for mine, peft_group in zip(opt.param_groups, ref.param_groups):
        assert signature(mine["params"]) == signature(peft_group["params"])  # every tensor moved the same


def test_ratio_one_is_plain_adamw() -> None:
    torch.manual_seed(0)
    model = pk.adapt(Net(), pk.LoRAConfig(r=4, targets=["fc1", "fc2"]))
    twin = copy.deepcopy(model)
    plain = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    out = run(model, loraplus(model, lr=LR, ratio=1.0))
    torch.testing.assert_close(out, run(twin, plain), rtol=0, atol=0)


def test_build_by_name_keeps_the_ratio_as_base_lr_and_bad_input() -> None:
    torch.manual_seed(0)
    model = pk.adapt(Net(), pk.LoRAConfig(r=4, targets=["fc1", "fc2"]))
    opt = build_optimizer("loraplus", model, lr=LR, ratio=8.0)
    lrs = [(len(g["params"]), g["lr"], g["base_lr"]) for g in opt.param_groups]
    assert lrs == [(2, LR, LR), (2, 8 * LR, 8 * LR)]  # A's, then B's; the empty groups are dropped
    with pytest.raises(OptimizerError, match="at least 1"):
        build_optimizer("loraplus", model, lr=LR, ratio=0.5)
    with pytest.raises(OptimizerError, match=r"no option\(s\) \['rank'\]; it takes ratio, lr_embedding"):
        build_optimizer("loraplus", model, lr=LR, rank=4)
    frozen = Net().requires_grad_(False)
    with pytest.raises(NoTrainableParametersError, match="add and activate an adapter"):
        build_optimizer("loraplus", frozen, lr=LR, ratio=4.0)
