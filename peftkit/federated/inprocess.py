"""An in-process Flower ``Grid``: the server's strategy and every client's ``ClientApp`` in one Python process,
without Ray or a SuperLink.

:class:`InProcessGrid` delivers each message the strategy sends to :data:`peftkit.federated.flower.client_app` (the
``ClientApp`` the simulation engine and a deployment run) with that node's own Flower ``Context`` (its
``node_config`` holds ``partition-id`` / ``num-partitions`` as the simulation engine sets them; its ``state``
persists across rounds), one client after the other, and returns the replies. A client that raises replies with
an error, as Flower's engine reports it, so the strategy's failure handling is the same. What differs from
:func:`flwr.simulation.run_simulation` is only the transport: no serialisation between processes, no parallel
clients, no timeout (a client cannot hang on a message here). It exists for benchmarks and tests, where Ray's
start-up (about 40 s per simulation) would dominate.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "server_identity"]

SERVER_NODE = 0  # the SuperLink's node id in Flower's messages


@contextmanager
def server_identity(run_id: int = 1) -> Iterator[None]:
    """Flower stamps each message with the running task's identity (``TaskIdentity``), which its runtimes set;
    set one for the server side of an in-process run and restore the previous one afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, SERVER_NODE
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class InProcessGrid(Grid):
    """A Flower ``Grid`` over ``num_nodes`` clients running ``app`` in this process (see the module docstring).

    Node ids are ``1 .. num_nodes``; node ``i + 1`` is partition ``i``.
    """

    def __init__(self, app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        if num_nodes < 1:
            raise ValueError(f"an in-process grid needs at least one node, got {num_nodes}")
        self.app = app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            i + 1: Context(
                run_id=run_id,
                node_id=i + 1,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._sent = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id,
                       ttl=ttl)  # fmt: skip

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node not in self.contexts:
            raise ValueError(f"message for node {node}, but this grid has nodes {sorted(self.contexts)}")
        try:
            return self.app(message, self.contexts[node])
        except Exception as ex:  # reported as the simulation engine reports it: an error reply, not a crash
            reason = "".join(traceback.format_exception_only(type(ex), ex))
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self._sent += 1
            key = f"inprocess-{self._sent}"
            self._replies[key] = self._deliver(message)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(key) for key in message_ids if key in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every message's reply, delivered one after the other (``timeout`` is not needed here)."""
        return self.pull_messages(self.push_messages(messages))
