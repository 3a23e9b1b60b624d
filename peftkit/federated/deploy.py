"""A federation as separate processes (Flower's deployment runtime) instead of the simulation engine: a SuperLink
(the server's link), one SuperNode per client, and the run submitted to the SuperLink's Control API. The same
``ClientApp`` (:data:`peftkit.federated.flower.client_app`) and server code (:class:`~peftkit.federated.run.
Federation`) run in both.

On one machine (loopback), by hand::

    export FLWR_HOME=/tmp/flwr-home            # Flower's working folder (apps, logs); not the home folder
    flower-superlink --insecure --port 9300 --disable-runtime-dependency-installation &
    flower-supernode --insecure --superlink 127.0.0.1:9300 --port 9301 \\
        --node-config "partition-id=0 num-partitions=2" &
    flower-supernode --insecure --superlink 127.0.0.1:9300 --port 9302 \\
        --node-config "partition-id=1 num-partitions=2" &
    python -c "from peftkit.federated.deploy import deploy; deploy('runs/fed', superlink='127.0.0.1:9300', \\
        clients=2, rounds=2, strategy='fedsb', split='iid')"

or all of it from Python with :class:`LocalDeployment` (the processes are started and stopped by their ids)::

    with LocalDeployment(clients=2) as local:
        result = deploy("runs/fed", superlink=local.superlink, clients=2, rounds=2, split="iid")

:func:`deploy` writes a Flower app folder (``pyproject.toml`` naming this module's :data:`server_app` and the
client app, and the run's settings as JSON), submits it (a FAB) to the SuperLink, whose ``flwr-serverapp``
process builds the :class:`~peftkit.federated.run.Federation` from the settings file and runs the rounds through
the SuperNodes, and waits for ``OUT/federation.json`` to say ``complete``. Each SuperNode's ``partition-id``
selects its shard; the clients read their rows from the same data file (a simulation of private data on one
machine). Nothing here is started with ``flwr run``, so no managed background SuperLink is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from peftkit.federated.privacy import PrivacySettings, UserPrivacy

__all__ = ["LocalDeployment", "deploy", "server_app", "submit", "write_app"]

APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "peftkit-federation"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "peftkit"

[tool.flwr.app.components]
serverapp = "peftkit.federated.deploy:server_app"
clientapp = "peftkit.federated.flower:client_app"

[tool.flwr.app.config]
settings = {settings}
"""


def write_app(folder: str | Path, output_dir: str | Path, **settings: Any) -> Path:
    """A Flower app folder for a federation into ``output_dir`` with ``settings`` (those of
    :class:`~peftkit.federated.run.Federation`): ``pyproject.toml`` and ``settings.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = dict(settings, output_dir=str(Path(output_dir).resolve()))
    for key in ("privacy", "user_privacy"):
        if values.get(key) is not None:
            values[key] = vars(values[key])
    values["drop"] = {str(k): v for k, v in (values.get("drop") or {}).items()}
    (folder / "settings.json").write_text(json.dumps(values, indent=2))
    (folder / "pyproject.toml").write_text(APP_TOML.format(settings=json.dumps(str((folder / "settings.json")
                                                                                  .resolve()))))  # fmt: skip
    return folder


def _read_settings(path: str | Path) -> dict[str, Any]:
    values = json.loads(Path(path).read_text())
    if values.get("privacy"):
        values["privacy"] = PrivacySettings(**values["privacy"])
    if values.get("user_privacy"):
        values["user_privacy"] = UserPrivacy(**values["user_privacy"])
    values["drop"] = {int(k): int(v) for k, v in (values.get("drop") or {}).items()}
    return values


server_app = ServerApp()
"""The ``ServerApp`` of a deployed federation: the settings file named in the run config
(``settings = "..."``, written by :func:`write_app`)."""


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    from peftkit.federated.run import Federation

    settings = _read_settings(str(context.run_config["settings"]))
    output_dir = settings.pop("output_dir")
    federation = Federation(output_dir, **settings)
    federation.run_server(grid)
    federation.finish()


def submit(app_dir: str | Path, superlink: str) -> int:
    """Submit the Flower app in ``app_dir`` as a FAB to the SuperLink's Control API at ``superlink`` (host:port,
    insecure, as ``flwr run`` does for a user-managed SuperLink); returns the run id."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.fab import Fab
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    fab_bytes = build_fab_from_disk(Path(app_dir))
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    client = ControlHttpClient.from_server_address(
        server_address=superlink, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )  # fmt: skip
    try:
        response = client.StartRun(StartRunRequest(fab=fab_to_proto(fab)))
    finally:
        client.close()
    if not response.HasField("run_id"):
        raise RuntimeError(f"the SuperLink at {superlink} did not start the run")
    return int(response.run_id)


def deploy(output_dir: str | Path, *, superlink: str, timeout: float = 1800.0, **settings: Any) -> dict[str, Any]:
    """Run a federation through the SuperLink at ``superlink`` and its SuperNodes (``settings`` as for
    :class:`~peftkit.federated.run.Federation`); returns ``OUT/federation.json`` once complete.

    Raises:
        TimeoutError: the run did not complete within ``timeout`` seconds (see the SuperLink's log).
    """
    out = Path(output_dir)
    done = out / "federation.json"
    done.unlink(missing_ok=True)
    app = write_app(out / "flower-app", out, **settings)
    submit(app, superlink)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done.is_file():
            record = json.loads(done.read_text())
            if record.get("status") == "complete":
                return record
        time.sleep(1.0)
    raise TimeoutError(f"the federation in {out} did not complete within {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalDeployment:
    """A SuperLink and ``clients`` SuperNodes on loopback, each its own process (insecure HTTP, free ports, a
    temporary ``FLWR_HOME``), started on enter and stopped (SIGTERM, then SIGKILL, by process id) on exit.

    Attributes:
        superlink: ``host:port`` of the SuperLink (for :func:`submit` / :func:`deploy`).
        logs: the folder of the processes' logs.
    """

    def __init__(self, clients: int, *, home: str | Path | None = None) -> None:
        self.clients = clients
        self.home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="peftkit-flwr-"))
        self.logs = self.home / "logs"
        self.processes: list[subprocess.Popen] = []
        self.superlink = f"127.0.0.1:{_free_port()}"

    def _start(self, name: str, *args: str) -> None:
        bin_dir = Path(sys.executable).parent
        path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": path}
        log = open(self.logs / f"{name}.log", "wb")  # the child keeps its own descriptor
        self.processes.append(subprocess.Popen([str(bin_dir / args[0]), *args[1:]], env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        log.close()

    def __enter__(self) -> LocalDeployment:
        self.logs.mkdir(parents=True, exist_ok=True)
        port = self.superlink.rpartition(":")[2]
        self._start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", port,
                    "--disable-runtime-dependency-installation")  # fmt: skip
        self._wait_for(int(port))
        for i in range(self.clients):
            node = f"partition-id={i} num-partitions={self.clients}"
            self._start(f"supernode-{i}", "flower-supernode", "--insecure", "--superlink", self.superlink, "--port",
                        str(_free_port()), "--node-config", node)  # fmt: skip
        return self

    def _wait_for(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if self.processes[0].poll() is not None:
                raise RuntimeError(f"the SuperLink exited: see {self.logs / 'superlink.log'}")
            time.sleep(0.2)
        raise TimeoutError(f"the SuperLink did not listen on port {port} within {timeout:.0f} s")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every process this deployment started (their process groups: the ServerApp / ClientApp
        subprocesses they spawned go with them)."""
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def cleanup(self) -> None:
        """Remove the temporary ``FLWR_HOME`` (apps and logs)."""
        shutil.rmtree(self.home, ignore_errors=True)
