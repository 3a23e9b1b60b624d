"""The synthetic click data and the DeepFM model AFM is measured on."""

from __future__ import annotations

import torch

from peftkit.compress import ctr


def test_ctr_data_and_model_learn_something():
    train, size = ctr.synthetic_clicks(4000, fields=4, vocab=30, seed=0)
    test, _ = ctr.synthetic_clicks(2000, fields=4, vocab=30, seed=1)
    assert 0.1 < float(train.clicks.mean()) < 0.6
    model = ctr.DeepFM(size, fields=4, dim=8, hidden=(32,))
    before = ctr.evaluate(model, test)["auc"]
    ctr.train(model, train, epochs=3)
    after = ctr.evaluate(model, test)["auc"]
    assert after > max(before, 0.6) + 0.02
    assert ctr.auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == 0.75


def test_the_hidden_click_model_is_shared_by_splits_and_data_follow_the_seed():
    a, _ = ctr.synthetic_clicks(300, fields=3, vocab=10, seed=0)
    b, _ = ctr.synthetic_clicks(300, fields=3, vocab=10, seed=0)
    c, _ = ctr.synthetic_clicks(300, fields=3, vocab=10, seed=1)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.clicks, b.clicks) and not torch.equal(a.ids, c.ids)
    assert int(a.ids[:, 1].min()) >= 10 and int(a.ids[:, 2].max()) < 30  # per-field offsets into one table
    counts = torch.bincount(a.ids[:, 0], minlength=10)
    assert int(counts[0]) > int(counts[9])  # Zipf: the first value is the most frequent
