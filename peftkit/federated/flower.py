"""The Flower glue (flwr 1.42, Message API): a ``Strategy`` that aggregates with
:mod:`peftkit.federated.aggregate` and a ``ClientApp`` that trains with :func:`peftkit.federated.client.
local_update`. Everything federated-learning specific lives in those modules; this one moves tensors.

Messages. Each round the server sends every sampled client the global trained tensors (``"arrays"``) and the
local settings (``"config"``); a client it has not set up yet also gets the frozen tensors (``"setup"``: Fed-SB's
``A``, ``B``, FFA-LoRA's ``A``) and the job (``"job"``: the run's settings and its shard, JSON). FedEx-LoRA adds
``"residual"``: the last round's increment as factors (``<path>.up`` / ``<path>.down``) to a client that holds
the previous residual, or the whole residual (``<path>.dense``) to one that does not. A client keeps the frozen
tensors, the residual and its DP step count in its Flower ``context.state`` and replies with its trained
tensors (``"arrays"``) and a ``MetricRecord`` (``num-examples``, ``train-loss``, ``steps``, ``epsilon``,
``frozen-hash``: a digest of its frozen tensors, which the server checks against its own).

Failures. A client whose ``ClientApp`` raises (or that never answers within the round's timeout) replies with an
error; the round aggregates the others and reports the failed nodes and reasons (a round where every client
fails keeps the previous global adapter).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from peftkit.federated.aggregate import Residual, Scales, aggregation_error
from peftkit.federated.client import ClientJob, ClientRuntime, local_update, set_residual
from peftkit.federated.errors import AdapterMismatchError
from peftkit.federated.privacy import PrivacySettings
from peftkit.federated.strategies import StrategySpec, get_strategy

__all__ = ["PeftkitStrategy", "client_app", "failure_reason", "from_record", "job_from_json", "job_to_json",
           "payload_bytes", "state_digest", "to_record"]  # fmt: skip

FROZEN, RESIDUAL_STATE, DP_STATE, JOB_STATE = "peftkit.frozen", "peftkit.residual", "peftkit.dp", "peftkit.job"


def to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``state`` (keys kept)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, Tensor]:
    """The tensors of an ``ArrayRecord``."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def payload_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors' values (``numel × element size``; Flower's framing adds about 130 bytes a tensor)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def state_digest(state: Mapping[str, Tensor]) -> int:
    """A 48-bit digest of tensors' names and values (fits a Flower metric exactly)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return int(h.hexdigest()[:12], 16)


def job_to_json(job: ClientJob) -> str:
    values = dataclasses.asdict(job)
    values["drop"] = {str(k): v for k, v in job.drop.items()}
    return json.dumps(values)


def job_from_json(text: str) -> ClientJob:
    values = json.loads(text)
    values["privacy"] = PrivacySettings(**values["privacy"]) if values["privacy"] else None
    values["drop"] = {int(k): int(v) for k, v in values["drop"].items()}
    return ClientJob(**values)


class PeftkitStrategy(FedAvg):
    """Flower's ``FedAvg`` sampling and messaging with a peftkit strategy's aggregation (see the module
    docstring). Server-side evaluation only (``evaluate_fn`` of ``start``); no federated evaluation.

    Args:
        spec: the federated strategy.
        job: what clients need (sent once to each).
        frozen: the frozen tensors every client gets once.
        scales: the LoRA scale of each module (FedAvg-LoRA / FedEx-LoRA form ``s·B A``).
        weighted: weight clients by their example counts (default: uniform, as the official Fed-SB code).
        fraction: the share of clients sampled each round.
    """

    def __init__(self, spec: StrategySpec, job: ClientJob, frozen: Mapping[str, Tensor], *, scales: Scales = 1.0,
                 weighted: bool = False, fraction: float = 1.0) -> None:  # fmt: skip
        clients = len(job.shards)
        sampled = max(1, int(clients * fraction))
        super().__init__(fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=sampled,
                         min_evaluate_nodes=0, min_available_nodes=clients)  # fmt: skip
        self.spec, self.job, self.scales, self.weighted = spec, job, scales, weighted
        self.frozen = dict(frozen)
        self.frozen_hash = state_digest(self.frozen)
        self.residual: dict[str, Tensor] = {}  # FedEx-LoRA: everything folded into the base so far
        self.increment: dict[str, Residual] = {}  # ... and the last round's part of it
        self.version = 0  # rounds whose residual is folded in
        self.synced: dict[int, int] = {}  # node -> residual version it holds (present: set up)
        self.pending: dict[int, int] = {}
        self.rounds: dict[int, dict[str, Any]] = {}  # per round: bytes, failures, errors (what the run logs)
        self.client_states: list[dict[str, Tensor]] = []  # the last round's uploads (tests check the mean)

    @property
    def job_json(self) -> str:
        """The job as clients receive it, from :attr:`job` as it is now (``federate`` sets its threads after the
        strategy is made)."""
        return job_to_json(self.job)

    def _residual_record(self, node: int) -> dict[str, Tensor]:
        if not self.spec.folds_residual or self.version == 0 or self.synced.get(node) == self.version:
            return {}
        if self.synced.get(node) == self.version - 1:  # it holds the previous residual: send the increment
            out = {}
            for path, inc in self.increment.items():
                if inc.factored_numel < inc.dense_numel:
                    out[f"{path}.up"], out[f"{path}.down"] = inc.up, inc.down
                else:
                    out[f"{path}.dense_add"] = inc.dense()
            return out
        return {f"{path}.dense": t for path, t in self.residual.items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                        ) -> Iterable[Message]:  # fmt: skip
        messages = list(super().configure_train(server_round, arrays, config, grid))
        down = payload_bytes(from_record(arrays))
        info = self.rounds.setdefault(server_round, {"download": {}, "setup": {}, "upload": {}, "failures": []})
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            content = RecordDict({"arrays": arrays, "config": config})
            setup = 0
            if node not in self.synced:
                content["setup"] = to_record(self.frozen)
                content[JOB_STATE] = ConfigRecord({"job": self.job_json})
                setup = payload_bytes(self.frozen)
            residual = self._residual_record(node)
            if residual:
                content["residual"] = to_record(residual)
            self.pending[node] = self.version
            info["download"][node] = down + payload_bytes(residual)
            info["setup"][node] = setup
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:  # fmt: skip
        valid, failed = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        info = self.rounds.setdefault(server_round, {"download": {}, "setup": {}, "upload": {}, "failures": []})
        for message in failed:
            node = message.metadata.src_node_id
            info["failures"].append({"node": node, "reason": failure_reason(message.error.reason)})
            self.synced.pop(node, None)  # its state is unknown: set it up afresh next time
        if not valid:
            return None, None
        states, metrics = [], []
        for message in valid:
            node = message.metadata.src_node_id
            m = dict(next(iter(message.content.metric_records.values())))
            if int(m.get("frozen-hash", self.frozen_hash)) != self.frozen_hash:
                raise AdapterMismatchError(
                    f"node {node}'s frozen tensors differ from the server's ({', '.join(sorted(self.frozen)[:3])} "
                    "...): every client must hold the factors the server set up"
                )
            state = from_record(message.content["arrays"])
            info["upload"][node] = payload_bytes(state)
            self.synced[node] = self.pending.get(node, 0)
            states.append(state)
            metrics.append(m)
        weights = [float(m["num-examples"]) for m in metrics] if self.weighted else None
        result = self.spec.aggregate(states, weights, self.scales)
        self.client_states = states
        if result.residual:
            info["aggregation_error"] = aggregation_error(states, weights, result.residual, self.scales)
        if self.spec.folds_residual:
            for path, inc in result.residual.items():
                self.residual[path] = self.residual.get(path, torch.zeros_like(inc.dense())) + inc.dense()
            self.increment, self.version = result.residual, self.version + 1
        record = MetricRecord(_summary(metrics))
        return to_record(result.state), record

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                           ) -> Iterable[Message]:  # fmt: skip
        return []


def failure_reason(text: str) -> str:
    """The message of the exception a failed client raised, from Flower's error reason (in simulation: Ray's whole
    traceback, colour codes included), on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    found = re.findall(r"Message: (.+)", text) or re.findall(r"^\s*\w+(?:Error|Exception): (.+)$", text, re.M)
    line = found[-1] if found else next((x for x in reversed(text.splitlines()) if x.strip()), text)
    return " ".join(line.split()).rstrip("'>")[:300]


def _summary(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Round metrics over the replies: mean train loss, total examples and steps, the largest ε."""
    out = {
        "train-loss": float(np.mean([float(m.get("train-loss", np.nan)) for m in metrics])),
        "num-examples": float(sum(float(m["num-examples"]) for m in metrics)),
        "clients": float(len(metrics)),
    }
    eps = [float(m["epsilon"]) for m in metrics if "epsilon" in m]
    if eps:
        out["epsilon"] = max(eps)
    return out


# ------------------------------------------------------------------------------------------------ client side
def _apply_residual(runtime: ClientRuntime, store: RecordDict, incoming: dict[str, Tensor]) -> None:
    """Update this client's FedEx-LoRA residual from the message and write it into the residual adapter."""
    held = from_record(store[RESIDUAL_STATE]) if RESIDUAL_STATE in store.array_records else {}
    for key, t in incoming.items():
        path, _, kind = key.rpartition(".")
        if kind == "dense":
            held[path] = t
        elif kind == "dense_add":
            held[path] = held.get(path, 0) + t
        elif kind == "up":
            held[path] = held.get(path, 0) + t @ incoming[f"{path}.down"]
    store[RESIDUAL_STATE] = to_record(held)
    set_residual(runtime.model, held)


def train(message: Message, context: Context) -> Message:
    """The ``ClientApp`` train handler (see the module docstring)."""
    store = context.state
    if JOB_STATE in message.content.config_records:
        store[JOB_STATE] = message.content[JOB_STATE]
    job = job_from_json(str(store[JOB_STATE]["job"]))
    partition = int(context.node_config["partition-id"])
    server_round = int(message.content["config"]["server-round"])
    if job.drop.get(partition) == server_round:
        raise RuntimeError(f"client {partition} dropped out in round {server_round} (failure injection)")
    runtime = ClientRuntime.get(job)
    if "setup" in message.content.array_records:
        store[FROZEN] = message.content["setup"]
    frozen = from_record(store[FROZEN]) if FROZEN in store.array_records else {}
    if "residual" in message.content.array_records or (
        get_strategy(job.strategy).folds_residual and RESIDUAL_STATE in store.array_records
    ):
        incoming = from_record(message.content["residual"]) if "residual" in message.content.array_records else {}
        _apply_residual(runtime, store, incoming)
    prior = int(store[DP_STATE]["steps"]) if DP_STATE in store.config_records else 0
    result = local_update(
        runtime.model, job.strategy, {**frozen, **from_record(message.content["arrays"])}, runtime.shard(partition),
        job.train_config(server_round, partition), collate_fn=runtime.built.collate, privacy=job.privacy,
        sigma=job.sigmas[partition] if job.sigmas else None, prior_steps=prior,
    )  # fmt: skip
    store[DP_STATE] = ConfigRecord({"steps": prior + int(result.metrics["steps"])})
    metrics: dict[str, float | int] = {
        "num-examples": result.num_examples, "train-loss": result.metrics["train_loss"],
        "steps": int(result.metrics["steps"]), "frozen-hash": state_digest(frozen),
    }  # fmt: skip
    if "epsilon" in result.metrics:
        metrics["epsilon"] = result.metrics["epsilon"]
    content = RecordDict({"arrays": to_record(result.state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


def make_client_app(mods: Sequence[Callable[..., Any]] = ()) -> ClientApp:
    """A ``ClientApp`` running :func:`train` (``mods``: Flower client mods)."""
    app = ClientApp(mods=list(mods))
    app.train()(train)
    return app


client_app = make_client_app()
"""The ``ClientApp`` of every peftkit federation (simulated or deployed: ``peftkit.federated.flower:client_app``)."""
