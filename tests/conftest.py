"""Shared fixtures: tiny models built in code (no downloads)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under ``tests/integration/`` carries the ``integration`` marker (``-m "not integration"`` runs
    the unit tests alone)."""
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test: tiny models gain nothing from more, and the suite stays fast on a busy
    machine (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same RNG state (torch, random, numpy), whatever ran before it: results do
    not depend on test order (the suite is run in random order with pytest-randomly, which reseeds per test
    too; this fixture keeps the seed fixed when it is absent or disabled)."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


class TinyNet(nn.Module):
    """Embedding -> two Linear -> Conv2d over a reshaped map -> head. Covers every wrappable layer kind
    except GPT-2's Conv1D (see ``tiny_gpt2``)."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 32)
        self.fc2 = nn.Linear(32, dim)
        self.conv = nn.Conv2d(4, 6, kernel_size=3, padding=1)
        self.head = nn.Linear(6 * 4, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)  # [B, T, dim]
        h = self.fc2(torch.relu(self.fc1(h)))  # [B, T, dim]
        grid = h.mean(1).view(-1, 4, 2, 2)  # [B, 4, 2, 2]
        c = torch.relu(self.conv(grid)).flatten(1)
        return self.head(c)


def make_tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def tiny_bert(seed: int = 0, num_labels: int | None = None) -> nn.Module:
    """A 2-layer BERT with random weights (real architecture)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=num_labels or 2,
    )
    model = BertForSequenceClassification(cfg) if num_labels else BertModel(cfg)
    return model.eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 LM with random weights (uses transformers' Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def tiny_vit(seed: int = 0, num_labels: int | None = 3, intermediate_size: int = 48) -> nn.Module:
    """A 2-layer ViT (hidden 32, 16×16 images, 4×4 patches) with random weights; ``num_labels=None``: the bare
    ``ViTModel`` without pooler."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate_size,
        image_size=16,
        patch_size=4,
        num_labels=num_labels or 2,
    )
    model = ViTForImageClassification(cfg) if num_labels else ViTModel(cfg, add_pooling_layer=False)
    return model.eval()


@pytest.fixture
def tiny_net() -> TinyNet:
    return make_tiny_net()


@pytest.fixture
def token_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 40, (4, 5), generator=g)
