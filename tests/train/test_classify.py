"""peftkit.train.classify: the label set, tokenisation with a truncation count, the seeded new head on the
Hugging Face classes, and accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny_lm import save_bert

from peftkit.train import classify
from peftkit.train.classify import Example, Options
from peftkit.train.data import Row
from peftkit.train.errors import DataError

pytest.importorskip("transformers")


def rows(labels: list) -> list[Row]:
    return [Row({"text": f"film {i}", "label": y}, i + 1) for i, y in enumerate(labels)]


def test_label_set_inferred_or_given() -> None:
    assert classify.label_set(rows(["pos", "neg", "pos"]), Options(), "f") == ["neg", "pos"]
    assert classify.label_set(rows([2, 0, 1, 1]), Options(), "f") == ["0", "1", "2"]  # 0..k-1 keep their value
    assert classify.label_set(rows([10, 2]), Options(), "f") == ["10", "2"]  # other numbers sort as text
    assert classify.label_set(rows(["b", "a"]), Options(labels=["b", "a"]), "f") == ["b", "a"]
    with pytest.raises(DataError, match=r"^f, line 3: label 'c' is not in the label set \(a, b\)$"):
        classify.label_set(rows(["a", "b", "c", "d"]), Options(labels=["a", "b"]), "f")
    with pytest.raises(DataError, match="every row has the label 'a'"):
        classify.label_set(rows(["a", "a"]), Options(), "f")


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bert(tmp_path_factory.mktemp("bert"))


def test_encoding_matches_the_tokenizers_truncation_and_counts_it(bert: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert)
    texts = ["good film", "the " * 40, "bad"]
    examples, longer = classify.encode_texts(texts, [1, 0, 1], tok, max_length=8)
    assert longer == 1
    assert [e.input_ids for e in examples] == tok(texts, truncation=True, max_length=8)["input_ids"]
    batch = classify.Collator(tok)(examples)
    assert batch["input_ids"].shape == (3, 8) and batch["labels"].tolist() == [1, 0, 1]
    assert batch["attention_mask"].sum(1).tolist() == [len(e.input_ids) for e in examples]


def test_the_new_head_is_drawn_from_the_seed(bert: Path) -> None:
    a, modules = classify.load_model(str(bert), ["neg", "pos"], seed=0)
    b, _ = classify.load_model(str(bert), ["neg", "pos"], seed=0)
    c, _ = classify.load_model(str(bert), ["neg", "pos"], seed=1)
    assert type(a).__name__ == "BertForSequenceClassification" and modules == ["classifier"]
    assert torch.equal(a.classifier.weight, b.classifier.weight) and not torch.equal(
        a.classifier.weight, c.classifier.weight
    )
    assert a.classifier.bias.abs().max() == 0 and 0.01 < a.classifier.weight.std() < 0.03  # N(0, 0.02)
    assert torch.equal(a.bert.pooler.dense.weight, c.bert.pooler.dense.weight)  # from the checkpoint
    assert a.config.id2label == {0: "neg", 1: "pos"}


def test_accuracy_and_loss(bert: Path) -> None:
    from transformers import AutoTokenizer

    model, _ = classify.load_model(str(bert), ["neg", "pos"], seed=0)
    tok = AutoTokenizer.from_pretrained(bert)
    data, _ = classify.encode_texts(["good film", "bad film", "the story"], [1, 0, 1], tok, 16)
    collate = classify.Collator(tok)
    metrics = classify.evaluate(model, data, collate, batch_size=2, progress=False)
    with torch.no_grad():
        batch = collate(data)
        labels = batch.pop("labels")
        logits = model(**batch).logits
    assert metrics["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert metrics["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert classify.evaluate(model, [], collate) == {} and isinstance(data[0], Example)
