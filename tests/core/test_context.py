"""``model(..., task_ids=ids)``: per-row task ids reach the adapters that declare ``uses_context`` (and only
them, as ``context.task_ids``), restricted to their own rows in a mixed batch, and are cleared after the call."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import make_tiny_net
from torch import Tensor, nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.core.config import AdapterConfig
from peftkit.core.context import ForwardContext
from peftkit.core.protocol import Adapter
from peftkit.core.registry import register, unregister
from peftkit.errors import AdapterIdsError, ForwardContextError


@dataclass(kw_only=True)
class TaskShiftConfig(AdapterConfig):
    """Adds ``shift[task]`` to every output (a per-task bias)."""

    n_tasks: int = 3


class TaskShift(Adapter):
    uses_context = True
    seen: list[Tensor | None]

    def __init__(self, base: BaseView, config: TaskShiftConfig) -> None:
        super().__init__(base, config)
        self.shift = nn.Parameter(torch.arange(config.n_tasks, dtype=torch.float32) + 1.0)
        self.seen = []

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView, context: ForwardContext) -> Tensor:
        task_ids = context.task_ids
        self.seen.append(task_ids)
        if task_ids is None:
            return base_out
        return base_out + self.shift[task_ids].view(-1, *([1] * (base_out.dim() - 1)))

    @classmethod
    def expected_trainable(cls, base: BaseView, config: AdapterConfig) -> int:
        return config.n_tasks  # type: ignore[attr-defined]


@pytest.fixture
def task_shift():
    register("_taskshift", TaskShiftConfig)(TaskShift)
    try:
        yield
    finally:
        unregister("_taskshift")


def _model(*names: str) -> pk.AdaptedModel:
    model = pk.adapt(make_tiny_net(), TaskShiftConfig(targets=["head"]), name=names[0])
    for name in names[1:]:
        model.add_adapter(name, TaskShiftConfig(targets=["head"]))
    return model.eval()


def _head(model: pk.AdaptedModel, name: str) -> TaskShift:
    return next(a for p, a in model.adapter_modules(name).items() if p.endswith("head"))  # type: ignore[return-value]


def test_task_ids_reach_the_adapter_and_are_cleared(task_shift, token_batch) -> None:
    model = _model("a")
    base = model.get_base_model()
    with torch.no_grad():
        with model.adapters_disabled():
            plain = model(token_batch)
        got = model(token_batch, task_ids=torch.tensor([0, 2, 1, 0]))
    seen = _head(model, "a").seen[-1]
    assert seen is not None and seen.tolist() == [0, 2, 1, 0]
    assert model.routing.call.task_ids is None
    # head is the last layer of TinyNet: the per-task shift shows directly in the outputs
    torch.testing.assert_close(got - plain, torch.tensor([1.0, 3.0, 2.0, 1.0]).view(4, 1).expand_as(got))
    with torch.no_grad():
        model(token_batch)
    assert _head(model, "a").seen[-1] is None, "task ids leaked into a later call"
    assert base is model.get_base_model()


def test_task_ids_follow_the_rows_of_a_mixed_batch(task_shift, token_batch) -> None:
    model = _model("a", "b")
    with torch.no_grad():
        model(token_batch, adapter_ids=torch.tensor([1, 0, 1, -1]), task_ids=torch.tensor([0, 1, 2, 2]))
    assert _head(model, "a").seen[-1].tolist() == [1]
    assert _head(model, "b").seen[-1].tolist() == [0, 2]


def test_task_ids_accept_a_list(task_shift, token_batch) -> None:
    model = _model("a")
    with torch.no_grad():
        model(token_batch, task_ids=[2, 2, 0, 1])
    assert _head(model, "a").seen[-1].tolist() == [2, 2, 0, 1]


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([0.0, 1.0, 0.0, 1.0]), "integer tensor"),
        (torch.tensor([[0, 1, 0, 1]]), "1-D"),
        (torch.tensor([0, -1, 0, 1]), "non-negative"),
        (torch.tensor([0, 1]), "2 entries but the batch has 4 rows"),
    ],
)
def test_bad_task_ids_raise(task_shift, token_batch, ids: Tensor, message: str) -> None:
    model = _model("a")
    with pytest.raises(AdapterIdsError, match=message):
        model(token_batch, task_ids=ids)
    assert model.routing.call.task_ids is None


def test_other_adapters_never_see_task_ids(token_batch) -> None:
    model = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, targets=["fc2"])).eval()
    assert not pk.get_method("lora").uses_context
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch, task_ids=[0, 1, 2, 3]), model(token_batch), rtol=0, atol=0)


def test_signature_shows_task_ids() -> None:
    import inspect

    model = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, targets=["fc2"]))
    assert "task_ids" in inspect.signature(model.forward).parameters


def test_bad_task_ids_leave_no_adapter_ids_behind(token_batch) -> None:
    model = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, targets=["fc1"]))
    with pytest.raises(pk.errors.AdapterIdsError):
        model(token_batch, adapter_ids=[0] * token_batch.shape[0], task_ids=[-1] * token_batch.shape[0])
    assert model.routing.call.adapter_ids is None and model.routing.call.task_ids is None


def test_published_values_reach_later_adapters_of_the_same_forward_only() -> None:
    """``publish`` / ``published``: the hand-off between adapters of one forward (UrbanSAM, Cloud-Adapter), shared
    by the contexts of a mixed batch's row groups; a missing value or one for another batch size is refused with
    the producer named."""
    context = ForwardContext()
    features = torch.randn(4, 3)
    context.for_rows(torch.tensor([0, 2])).publish("features", features)  # a row group's view shares the state
    assert context.published("features", 4, "the encoder adapter") is features
    with pytest.raises(ForwardContextError, match="a value for 4 rows under 'features' for this batch of 2 rows"):
        context.published("features", 2, "the encoder adapter")
    with pytest.raises(ForwardContextError, match=r"nothing under 'other'.*the encoder adapter must run earlier"):
        context.published("other", 4, "the encoder adapter")
    assert ForwardContext().state == {}  # one state per forward
