"""Knowledge unlearning with LoKU (FILA init + inverted hinge loss) on a tiny GPT-2 built in code.

1. Pre-train a tiny GPT-2 until it memorises two sets of random token sequences: a forget set and a retain set.
2. Add a LoRA adapter initialised by FILA (``pk.init.LoKU``: Fisher-weighted SVD of the weights, frozen
   residual offset, so the model is unchanged at step 0) and train it on ``IHL(forget) + NLL(retain)``.
3. Report the forget- and retain-set losses: the forget loss rises while the retain loss stays close.

    python examples/unlearning_loku.py
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import peftkit as pk
from peftkit.init import inverted_hinge_loss

VOCAB, SEQ = 64, 12


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, **no_dropout
    )
    return GPT2LMHeadModel(cfg)


def make_sets(n_forget: int = 8, n_retain: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (n_forget + n_retain, SEQ), generator=g)
    return data[:n_forget], data[n_forget:]


def nll(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def ihl(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]  # causal LM: position t predicts token t + 1
    return inverted_hinge_loss(logits, ids[:, 1:])


def pretrain(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nll(model, ids).backward()
        opt.step()
    model.eval()


@torch.no_grad()
def losses(model: torch.nn.Module, forget: torch.Tensor, retain: torch.Tensor) -> tuple[float, float]:
    return float(nll(model, forget)), float(nll(model, retain))


def main(pretrain_steps: int = 300, unlearn_steps: int = 40, r: int = 4, verbose: bool = True) -> dict[str, float]:
    forget, retain = make_sets()
    base = tiny_gpt2()
    pretrain(base, torch.cat([forget, retain]), pretrain_steps)
    before = losses(base, forget, retain)

    batches = lambda ids: [{"input_ids": chunk, "labels": chunk} for chunk in ids.split(4)]  # noqa: E731
    init = pk.init.LoKU(batches(forget), batches(retain))
    model = pk.adapt(base, pk.LoRAConfig(r=r, alpha=32, targets=["c_attn", "c_proj", "c_fc"]), init=init)
    at_init = losses(model, forget, retain)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.01)
    for _ in range(unlearn_steps):
        opt.zero_grad()
        (ihl(model, forget) + nll(model, retain)).backward()
        opt.step()
    after = losses(model, forget, retain)
    result = {
        "forget_before": before[0],
        "retain_before": before[1],
        "forget_at_init": at_init[0],
        "retain_at_init": at_init[1],
        "forget_after": after[0],
        "retain_after": after[1],
    }
    if verbose:
        print(f"{'':14}{'forget NLL':>12}{'retain NLL':>12}")
        for label, (f, rt) in (("base", before), ("LoKU init", at_init), ("after unlearn", after)):
            print(f"{label:14}{f:12.3f}{rt:12.3f}")
    return result


if __name__ == "__main__":
    main()
