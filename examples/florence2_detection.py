"""Florence-2-style detection fine-tune: LoRA on a small encoder-decoder that emits box tokens.

Florence-2 (Xiao, Wu, Xu, Dai, Hu, Lu, Zeng, Liu and Yuan, 2024, "Florence-2: Advancing a Unified
Representation for a Variety of Vision Tasks", CVPR 2024) casts every vision task as sequence-to-sequence: an
image encoder (DaViT) turns the image into visual token embeddings, they are concatenated with the task
prompt's text embeddings and read by a transformer encoder-decoder (BART-like), and the decoder writes the
answer as tokens. For object detection (task prompt ``<OD>``) the answer is ``label<loc_x1><loc_y1><loc_x2>
<loc_y2>`` per object, the coordinates quantised into 1,000 bins that are tokens of the vocabulary. This example
shows that recipe at toy scale, on CPU, with nothing downloaded:

1. **A small Florence-2-style model built here** (not Florence-2's weights): a ViT-ish image encoder (8×8 patch
   embedding: 16 visual tokens, learned positions, one pre-norm block), the visual tokens concatenated with the
   embedded task prompt (``<OD>``), a one-block multimodal encoder and a two-block decoder with causal
   self-attention and cross-attention (BART's layer names ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``,
   ``fc1``, ``fc2``), and a language-model head over one vocabulary of special tokens, class names and 32
   location tokens (``<loc_0>`` … ``<loc_31>``: one bin per pixel of the 32×32 images).
2. **Pre-training here** on one kind of object: a bright filled rectangle on a dark noisy background, answer
   ``rectangle<loc_x1><loc_y1><loc_x2><loc_y2></s>``, teacher-forced cross-entropy over the answer tokens.
3. **The new object kind**: a dark ring (a circle outline) on a brighter, shaded background with small
   bright specks, whose answer starts with the class token ``ring`` (in the vocabulary from the start, never seen
   in pre-training). The pre-trained model names the wrong class and boxes it poorly.
4. **LoRA** (``pk.LoRAConfig``, r=8) on every attention and MLP projection of the encoders and the decoder,
   trained on a few hundred ring images with the same loss; everything else is frozen.

It prints, on held-out ring images, the mean IoU of the greedily decoded box against the true box, AP@0.5
(for one object per image: the fraction whose decoded class is right and whose IoU is at least 0.5) and the
class accuracy, before and after, and the trained parameter count against the total.

    python examples/florence2_detection.py [--seed 0] [--quick]

Full run (``--seed 0``): 124 s wall (``time``) with one thread (``torch.set_num_threads(1)``) on the shared 2-core
machine at load ~5-7; held-out rings mIoU 0.054 -> 0.450, AP@0.5 0.000 -> 0.439, class accuracy 0 -> 1 (the
rectangle mIoU after pre-training is 0.826: decoded boxes sit on bin centres). ``--quick`` (a few steps, for the
smoke test): a few seconds.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import peftkit as pk

SIZE, PATCH, DIM, HEADS, BINS = 32, 8, 64, 4, 32
PAD, BOS, EOS, OD = 0, 1, 2, 3
CLASSES = {"rectangle": 4, "ring": 5}
LOC0 = 6  # <loc_i> is token LOC0 + i
VOCAB = LOC0 + BINS
ANSWER = 6  # label, x1, y1, x2, y2, </s>


# ----------------------------------------------------------------------------------------------------- data
def render(n: int, kind: str, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` images ``[n, 1, SIZE, SIZE]`` with one object of ``kind`` each, and its box ``[n, 4]`` in pixels
    ``(x1, y1, x2, y2)``, inclusive pixel edges (``x2 = last column + 1``)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    ys, xs = ys.expand(n, SIZE, SIZE), xs.expand(n, SIZE, SIZE)

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)

    if kind == "rectangle":
        w, h = torch.randint(6, 17, (2, n, 1, 1), generator=g)
        x1 = (torch.rand(n, 1, 1, generator=g) * (SIZE - w + 1)).floor()
        y1 = (torch.rand(n, 1, 1, generator=g) * (SIZE - h + 1)).floor()
        mask = (xs >= x1) & (xs < x1 + w) & (ys >= y1) & (ys < y1 + h)
        image = torch.where(mask, uniform(0.6, 1.0), uniform(-1.0, -0.6))
        image = image + 0.2 * torch.randn(image.shape, generator=g)
        box = torch.cat([x1, y1, x1 + w, y1 + h], dim=-1).reshape(n, 4)
    elif kind == "ring":
        rad = uniform(3.5, 9.0)
        cx, cy = uniform(0, 1) * (SIZE - 2 * rad) + rad, uniform(0, 1) * (SIZE - 2 * rad) + rad
        dist = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()
        mask = (dist <= rad) & (dist >= rad - 1.6)
        slope = uniform(-0.03, 0.03)
        background = uniform(0.0, 0.5) + slope * (xs - SIZE / 2)
        image = torch.where(mask, uniform(-1.0, -0.7), background)
        specks = torch.rand(image.shape, generator=g) < 0.02
        image = torch.where(specks & ~mask, torch.ones_like(image), image)
        image = image + 0.2 * torch.randn(image.shape, generator=g)
        box = torch.cat([cx - rad, cy - rad, cx + rad, cy + rad], dim=-1).reshape(n, 4)
    else:
        raise ValueError(f"kind must be 'rectangle' or 'ring', got {kind!r}")
    return image.unsqueeze(1), box


def quantise(box: Tensor) -> Tensor:
    """Pixel coordinates -> location bins ``0 … BINS-1`` (Florence-2 quantises to 1,000 bins of the image size)."""
    return (box / SIZE * BINS).floor().clamp(0, BINS - 1).long()


def dequantise(bins: Tensor) -> Tensor:
    """Location bins -> pixel coordinates (bin centres)."""
    return (bins.float() + 0.5) * SIZE / BINS


def answer_tokens(kind: str, box: Tensor) -> Tensor:
    """``[n, 6]``: ``label <loc_x1> <loc_y1> <loc_x2> <loc_y2> </s>``."""
    n = box.shape[0]
    label = torch.full((n, 1), CLASSES[kind])
    return torch.cat([label, LOC0 + quantise(box), torch.full((n, 1), EOS)], dim=1)


# ---------------------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    """Multi-head attention with BART's layer names; ``kv`` is ``x`` for self-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.v_proj, self.out_proj = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x: Tensor, kv: Tensor | None = None, causal: bool = False) -> Tensor:
        kv = x if kv is None else kv
        b, n, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, -1, HEADS, DIM // HEADS).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(kv)), heads(self.v_proj(kv)),
                                             is_causal=causal)  # fmt: skip
        return self.out_proj(out.transpose(1, 2).reshape(b, n, DIM))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP (``fc1``, ``fc2``)."""

    def __init__(self, cross: bool = False) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(DIM), Attention()
        self.norm_x = nn.LayerNorm(DIM) if cross else None
        self.cross_attn = Attention() if cross else None
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x: Tensor, memory: Tensor | None = None, causal: bool = False) -> Tensor:
        x = x + self.self_attn(self.norm1(x), causal=causal)
        if self.cross_attn is not None and self.norm_x is not None:
            x = x + self.cross_attn(self.norm_x(x), memory)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyFlorence(nn.Module):
    """Image encoder -> [visual tokens; prompt embeddings] -> multimodal encoder -> decoder -> token logits."""

    def __init__(self) -> None:
        super().__init__()
        grid = (SIZE // PATCH) ** 2
        self.patch_embed = nn.Conv2d(1, DIM, PATCH, PATCH)
        self.vision_pos = nn.Parameter(torch.randn(1, grid, DIM) * 0.02)
        self.vision = nn.ModuleList(Block() for _ in range(1))
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.encoder_pos = nn.Parameter(torch.randn(1, grid + 1, DIM) * 0.02)
        self.encoder = nn.ModuleList(Block() for _ in range(1))
        self.decoder_pos = nn.Parameter(torch.randn(1, ANSWER, DIM) * 0.02)
        self.decoder = nn.ModuleList(Block(cross=True) for _ in range(2))
        self.final_norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB)

    def encode(self, pixel_values: Tensor, prompt_ids: Tensor) -> Tensor:
        v = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.vision_pos
        for block in self.vision:
            v = block(v)
        x = torch.cat([v, self.embed_tokens(prompt_ids)], dim=1) + self.encoder_pos
        for block in self.encoder:
            x = block(x)
        return x

    def forward(self, pixel_values: Tensor, prompt_ids: Tensor, decoder_input_ids: Tensor) -> Tensor:
        memory = self.encode(pixel_values, prompt_ids)
        y = self.embed_tokens(decoder_input_ids) + self.decoder_pos[:, : decoder_input_ids.shape[1]]
        for block in self.decoder:
            y = block(y, memory, causal=True)
        return self.lm_head(self.final_norm(y))


def prompt(n: int) -> Tensor:
    return torch.full((n, 1), OD)


def seq_loss(model: nn.Module, images: Tensor, answers: Tensor) -> Tensor:
    """Teacher-forced cross-entropy over the answer tokens (decoder input: ``<s>`` + answer[:-1])."""
    inputs = torch.cat([torch.full((answers.shape[0], 1), BOS), answers[:, :-1]], dim=1)
    logits = model(pixel_values=images, prompt_ids=prompt(images.shape[0]), decoder_input_ids=inputs)
    return F.cross_entropy(logits.reshape(-1, VOCAB), answers.reshape(-1))


def train(model: nn.Module, images: Tensor, answers: Tensor, steps: int, lr: float, seed: int) -> float:
    """``steps`` AdamW steps (batch 64, warm-up then cosine) on the trainable parameters; returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (64,), generator=g)
        loss = seq_loss(model, images[idx], answers[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def decode(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy decoding of ``label <loc>×4``: the class tokens ``[n]`` and boxes ``[n, 4]`` in pixels. Location
    positions are decoded among the location tokens only (Florence-2's post-processing reads ``<loc_i>`` tokens)."""
    n = images.shape[0]
    ids = torch.full((n, 1), BOS)
    for step in range(5):
        logits = model(pixel_values=images, prompt_ids=prompt(n), decoder_input_ids=ids)[:, -1]
        if step == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = LOC0 + logits[:, LOC0:].argmax(-1)
        ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
    return ids[:, 1], dequantise(ids[:, 2:] - LOC0)


def iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``[n, 4]`` (x1, y1, x2, y2); a decoded box with x2 < x1 or y2 < y1 has area 0."""
    lo, hi = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    area = lambda t: (t[:, 2:] - t[:, :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-8)


def evaluate(model: nn.Module, images: Tensor, boxes: Tensor, kind: str) -> dict[str, float]:
    """Mean IoU, AP@0.5 (one object per image: right class and IoU ≥ 0.5) and class accuracy."""
    labels, decoded = decode(model, images)
    overlap = iou(decoded, boxes)
    right = labels == CLASSES[kind]
    return {
        "miou": float(overlap.mean()),
        "ap50": float((right & (overlap >= 0.5)).float().mean()),
        "class_acc": float(right.float().mean()),
    }


# ------------------------------------------------------------------------------------------------------ run
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the example; returns the metrics and counts that it prints."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    pre_steps, adapt_steps, n_src, n_tgt, n_test = (
        (10, 10, 256, 128, 128) if args.quick else (1200, 400, 6000, 512, 512)
    )

    torch.manual_seed(args.seed)
    src_x, src_box = render(n_src, "rectangle", args.seed)
    tgt_x, tgt_box = render(n_tgt, "ring", args.seed + 1)
    test_src = render(n_test, "rectangle", args.seed + 2)
    test_tgt = render(n_test, "ring", args.seed + 3)

    print("Florence-2-style detection on a small encoder-decoder built and pre-trained here (not Florence-2's weights)")
    base = TinyFlorence()
    pre_loss = train(base, src_x, answer_tokens("rectangle", src_box), pre_steps, lr=2e-3, seed=args.seed)
    src = evaluate(base, *test_src, "rectangle")
    print(f"pre-trained on rectangles ({pre_steps} steps, last loss {pre_loss:.3f}): "
          f"rectangle mIoU {src['miou']:.3f}, AP@0.5 {src['ap50']:.3f}")  # fmt: skip
    before = evaluate(base, *test_tgt, "ring")

    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    model = pk.adapt(base, pk.LoRAConfig(r=args.r, alpha=2 * args.r, targets=targets, seed=args.seed))
    report = model.trainable_parameters()
    adapt_loss = train(model, tgt_x, answer_tokens("ring", tgt_box), adapt_steps, lr=3e-3, seed=args.seed + 1)
    after = evaluate(model, *test_tgt, "ring")

    print(f"LoRA r={args.r} on {', '.join(targets)}: {adapt_steps} steps on {n_tgt} ring images "
          f"(last loss {adapt_loss:.3f})")  # fmt: skip
    print(f"trainable parameters: {report.trainable:,} of {report.total:,} ({report.percent:.2f}%)")
    print(f"{'held-out rings':16}{'mIoU':>8}{'AP@0.5':>8}{'class':>8}")
    for label, m in (("before", before), ("after LoRA", after)):
        print(f"{label:16}{m['miou']:8.3f}{m['ap50']:8.3f}{m['class_acc']:8.3f}")
    wall = time.perf_counter() - t0
    print(f"total time: {wall:.0f} s on {torch.get_num_threads()} threads")
    return {
        "miou_before": before["miou"],
        "miou_after": after["miou"],
        "ap50_before": before["ap50"],
        "ap50_after": after["ap50"],
        "class_acc_before": before["class_acc"],
        "class_acc_after": after["class_acc"],
        "source_miou": src["miou"],
        "trainable": report.trainable,
        "total": report.total,
        "seconds": wall,
    }


if __name__ == "__main__":
    main()
