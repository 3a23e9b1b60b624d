"""The four federated LoRA strategies as data: which adapter method the clients carry, which of its tensors they
train and send, how the server aggregates, and what each round costs in communication.

========  ========  ==============  ==========================  ======  ===========================================
strategy  method    clients train   server                      exact   upload / download per layer and round
========  ========  ==============  ==========================  ======  ===========================================
fedsb     lorasb    ``R``           mean of ``R``               yes     ``r²`` / ``r²`` (+ ``A``, ``B`` once)
fedavg    lora      ``A``, ``B``    means of ``A`` and ``B``    no      ``r(d+k)`` / ``r(d+k)``
ffa       lora      ``B``           mean of ``B``               yes     ``d·r`` / ``d·r`` (+ ``A`` once)
fedex     lora      ``A``, ``B``    means + residual into W0    yes     ``r(d+k)`` / ``r(d+k)`` + ``min(d·k, c·r(d+k))``
========  ========  ==============  ==========================  ======  ===========================================

(``d = out``, ``k = in``, ``c`` clients; Fed-SB paper, Table 1.) A task head (``modules_to_save``) trains whole
and is averaged under every strategy. Papers: see :mod:`peftkit.federated.aggregate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from peftkit.federated import aggregate
from peftkit.federated.errors import UnknownStrategyError

Aggregator = Callable[..., aggregate.Aggregate]
Payload = Callable[[int, int, int, int], tuple[int, int]]


@dataclass(frozen=True)
class StrategySpec:
    """One federated strategy.

    Attributes:
        name: its name on the command line.
        title: its name in papers and plots.
        method: the adapter method clients carry (``"lorasb"`` or ``"lora"``).
        trained: tensor names of that method the clients train and upload each round; every tensor of a task
            head (``modules_to_save``) trains and travels too. The others are frozen and sent once.
        aggregator: the aggregation function (state dicts in, :class:`~peftkit.federated.aggregate.Aggregate`
            out).
        uses_scales: the aggregator takes the modules' LoRA scales (it forms ``s·B A`` products).
        folds_residual: the server folds the aggregate's residual into the frozen base (FedEx-LoRA).
        exact: the aggregate equals the average of the clients' adapted weights.
        payload: ``payload(d, k, r, clients) -> (upload, download)``: parameters per client for one adapted
            ``d×k`` layer in one round (the table above; FedEx-LoRA's download includes the residual, factored
            or dense, whichever is smaller).
    """

    name: str
    title: str
    method: str
    trained: frozenset[str]
    aggregator: Aggregator
    uses_scales: bool = False
    folds_residual: bool = False
    exact: bool = True
    payload: Payload = lambda d, k, r, c: (r * (d + k), r * (d + k))

    def aggregate(self, states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None,
                  scales: aggregate.Scales = 1.0) -> aggregate.Aggregate:  # fmt: skip
        """Run :attr:`aggregator` on the clients' states."""
        if self.uses_scales:
            return self.aggregator(states, weights, scales)
        return self.aggregator(states, weights)

    def is_trained(self, key: str, heads: Sequence[str]) -> bool:
        """Whether tensor ``key`` (``<module path>.<name>``) is trained and sent every round: the strategy's
        trained names, and every tensor of a head module in ``heads``."""
        path, _, name = key.rpartition(".")
        return path in heads or name in self.trained


# fmt: off
STRATEGIES: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        StrategySpec("fedsb", "Fed-SB", "lorasb", frozenset({"R"}), aggregate.fedsb,
                     payload=lambda d, k, r, c: (r * r, r * r)),
        StrategySpec("fedavg", "FedAvg-LoRA", "lora", frozenset({"A", "B"}), aggregate.fedavg, uses_scales=True,
                     exact=False),
        StrategySpec("ffa", "FFA-LoRA", "lora", frozenset({"B"}), aggregate.ffa,
                     payload=lambda d, k, r, c: (d * r, d * r)),
        StrategySpec("fedex", "FedEx-LoRA", "lora", frozenset({"A", "B"}), aggregate.fedex, uses_scales=True,
                     folds_residual=True,
                     payload=lambda d, k, r, c: (r * (d + k), r * (d + k) + min(d * k, c * r * (d + k)))),
    )
}
# fmt: on


def get_strategy(name: str) -> StrategySpec:
    """The strategy called ``name``.

    Raises:
        UnknownStrategyError: no such strategy (the message lists them).
    """
    if isinstance(name, StrategySpec):
        return name
    spec = STRATEGIES.get(str(name).strip().lower())
    if spec is None:
        raise UnknownStrategyError(f"unknown federated strategy {name!r}; strategies: {', '.join(STRATEGIES)}")
    return spec
