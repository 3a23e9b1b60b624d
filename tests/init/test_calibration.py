"""The activation statistics and block replay shared by the calibration passes (peftkit.init._calibration)."""

from __future__ import annotations

import pytest
import torch

from peftkit.core.errors import InvalidConfigError
from peftkit.init._calibration import Moments, Recorder, block_inputs, module_statistics, replay
from tests.compress import _tiny


def test_moments_are_the_token_averages_and_padding_rows_are_left_out():
    model, data = _tiny.llama(), _tiny.batches(n=2)
    data[1]["attention_mask"][:, -5:] = 0  # padded tail
    q = model.model.layers[1].self_attn.q_proj
    seen = []
    handle = q.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    stats = module_statistics(model, {"q": q}, data)["q"]
    handle.remove()
    rows = torch.cat([seen[0].reshape(-1, 32), seen[1][:, :-5].reshape(-1, 32)]).double()
    assert stats.count == len(rows)
    torch.testing.assert_close(stats.second, rows.T @ rows / len(rows))
    torch.testing.assert_close(stats.mean, rows.mean(0))
    torch.testing.assert_close(stats.covariance, torch.cov(rows.T, correction=0))


def test_output_side_and_empty_data():
    model, data = _tiny.llama(), _tiny.batches(n=1)
    down = model.model.layers[0].mlp.down_proj
    stats = module_statistics(model, {"d": down}, data, side="output")["d"]
    assert stats.mean.shape == (32,)
    with pytest.raises(InvalidConfigError, match="empty"):
        module_statistics(model, {"d": down}, [])
    with pytest.raises(InvalidConfigError, match="side"):
        Recorder({"d": down}, side="middle")
    with pytest.raises(InvalidConfigError, match="empty"):
        Moments().mean  # noqa: B018


def test_replaying_every_block_reproduces_the_models_hidden_states():
    model, data = _tiny.llama(), _tiny.batches(n=2)
    inputs = block_inputs(model, model.model.layers[0], data)
    assert len(inputs) == 2
    for block in model.model.layers:
        inputs = replay(block, inputs)
    again = block_inputs(model, model.model.layers[0], data)  # a second replay gives the same (no cache grows)
    for block in model.model.layers:
        again = replay(block, again)
    with torch.no_grad():
        for (args, kwargs, _), batch in zip(inputs, data):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = model(**batch, output_hidden_states=True)
            # hidden_states[-1] is after the final norm; compare through it
            torch.testing.assert_close(model.model.norm(hidden), out.hidden_states[-1], rtol=1e-5, atol=1e-5)
        for (a1, k1, _), (a2, k2, _) in zip(inputs, again):
            torch.testing.assert_close(a1[0] if a1 else k1["hidden_states"], a2[0] if a2 else k2["hidden_states"])
