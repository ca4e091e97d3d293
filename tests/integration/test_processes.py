"""The serving processes (docs/serving.md, "Processes"): one engine, N front ends, the control
plane. A front end killed under load is replaced and the others' clients see nothing; the
engine killed is logged with what it served and restarted; status shows every process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.load import MLP_BODY, InferenceLoad

pytestmark = pytest.mark.integration

TWO_FRONT_ENDS = "[server]\nworkers = 2\n"


def status(daemon: DaemonProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{daemon.url}/edged/v1/status", timeout=10) as response:
        doc: dict[str, Any] = json.load(response)
    return doc


def processes(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in status(daemon)["processes"]}


def wait_until(predicate: Any, daemon: DaemonProcess, timeout_s: float = 60.0) -> None:
    """A bounded poll of real state."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert daemon.process.poll() is None, daemon.log()
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)


class PinnedClients:
    """Keep-alive clients that never reconnect on their own: each records whether its one
    connection (held by one front end) ever failed, and how many answers it got after."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.failed: Counter[int] = Counter()
        self.ok_after_failure: Counter[int] = Counter()
        self.ok: Counter[int] = Counter()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> PinnedClients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def total_ok(self) -> int:
        return sum(self.ok.values())

    def _run(self, number: int) -> None:
        headers = {"Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            try:
                conn.request("POST", "/v2/models/mlp/infer", MLP_BODY, headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    self.failed[number] += 1
                    continue
                self.ok[number] += 1
                if self.failed[number]:
                    self.ok_after_failure[number] += 1
            except (OSError, http.client.HTTPException):
                self.failed[number] += 1  # its front end died: a new connection, a live one
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()


def test_status_shows_the_engine_and_every_front_end(model_repo: Path, tmp_path: Path) -> None:
    with running_daemon(model_repo, tmp_path / "d", TWO_FRONT_ENDS) as daemon:
        wait_until(lambda: len(status(daemon)["engine"].get("cpu", {})) == 3, daemon)
        rows = processes(daemon)
        assert set(rows) == {"engine", "front-end-1", "front-end-2"}
        assert all(r["state"] == "running" and r["pid"] for r in rows.values())
        assert rows["engine"]["role"] == "engine"
        wait_until(lambda: processes(daemon)["engine"]["front_ends_connected"] == 2, daemon)
        pids = {r["pid"] for r in rows.values()} | {daemon.process.pid}
        assert len(pids) == 4  # four processes: the control plane, the engine, two front ends


def test_a_front_end_killed_under_load_is_replaced_and_other_clients_see_nothing(
    model_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(model_repo, tmp_path / "d", TWO_FRONT_ENDS) as daemon:
        wait_until(lambda: processes(daemon)["engine"]["front_ends_connected"] == 2, daemon)
        victim = processes(daemon)["front-end-1"]["pid"]
        with PinnedClients(daemon.port, clients=8) as clients:
            wait_until(lambda: len(clients.ok) == 8 and clients.total_ok() > 100, daemon)
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda: processes(daemon)["front-end-1"]["pid"] not in (None, victim), daemon
            )
            wait_until(lambda: processes(daemon)["engine"]["front_ends_connected"] == 2, daemon)
            before = clients.total_ok()
            wait_until(lambda: clients.total_ok() > before + 200, daemon)
        row = processes(daemon)["front-end-1"]
        assert row["restarts"] == 1 and row["last_exit"] == "killed by SIGKILL"
        # The clients whose connection the killed front end held failed once each, then got
        # answers again; the clients of the other front end never failed.
        assert all(count == 1 for count in clients.failed.values()), clients.failed
        assert all(clients.ok_after_failure[n] > 0 for n in clients.failed), clients.ok
        assert len(clients.failed) < 8
        assert "front-end-1 (pid" in daemon.log() and "killed by SIGKILL" in daemon.log()
        services = {s["name"]: s for s in status(daemon)["services"]}
        assert services["telemetry"]["restarts"] == 0


def grpc_connections(daemon: DaemonProcess, status: str) -> Counter[int]:
    """How many TCP sockets on the gRPC port in ``status`` each process holds."""
    return Counter(
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.laddr and c.laddr.port == daemon.grpc_port and c.status == status and c.pid
    )


def own_connection_client(daemon: DaemonProcess) -> triton.InferenceServerClient:
    """A client with its own TCP connection (grpc shares one between channels by default)."""
    return triton.InferenceServerClient(
        daemon.grpc_url, channel_args=[("grpc.use_local_subchannel_pool", 1)]
    )


def grpc_infer_ok(client: triton.InferenceServerClient) -> bool:
    x = triton.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.full((1, 64), 0.1, np.float32))
    try:
        return client.infer("mlp", [x], client_timeout=30).as_numpy("output") is not None
    except InferenceServerException:
        return False


def test_every_front_end_serves_grpc_and_one_killed_leaves_the_others_clients_served(
    model_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(model_repo, tmp_path / "d", TWO_FRONT_ENDS) as daemon:
        wait_until(lambda: processes(daemon)["engine"]["front_ends_connected"] == 2, daemon)
        front_ends = {n: processes(daemon)[n]["pid"] for n in ("front-end-1", "front-end-2")}
        listening = grpc_connections(daemon, psutil.CONN_LISTEN)
        assert all(listening[pid] == 1 for pid in front_ends.values()), listening
        clients = [own_connection_client(daemon) for _ in range(24)]
        try:
            assert all(grpc_infer_ok(c) for c in clients)
            # The kernel spreads the connections over both front ends (24 all on one: 1e-7).
            held = grpc_connections(daemon, psutil.CONN_ESTABLISHED)
            assert all(held[pid] > 0 for pid in front_ends.values()), held
            victim = front_ends["front-end-1"]
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda: processes(daemon)["front-end-1"]["pid"] not in (None, victim), daemon
            )
            # The other front end's clients see nothing; the dead one's fail once, then
            # reconnect to a live front end.
            first = [grpc_infer_ok(c) for c in clients]
            assert sum(first) >= held[front_ends["front-end-2"]], (first, held)
            assert all(ok or grpc_infer_ok(c) for ok, c in zip(first, clients, strict=True))
        finally:
            for client in clients:
                client.close()
        wait_until(
            lambda: len(grpc_connections(daemon, psutil.CONN_LISTEN)) == 2, daemon
        )  # the new front end 1 listens on the shared port again
        assert front_ends["front-end-1"] not in grpc_connections(daemon, psutil.CONN_LISTEN)


def test_an_engine_killed_under_load_is_logged_with_what_served_and_restarted(
    model_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(model_repo, tmp_path / "d") as daemon:
        engine = processes(daemon)["engine"]["pid"]
        with InferenceLoad(daemon.port, clients=4) as load:
            load.wait_for_ok(50)
            os.kill(engine, signal.SIGKILL)
            daemon.wait_for_log("killed by SIGKILL, while serving")
            wait_until(lambda: processes(daemon)["engine"]["pid"] not in (None, engine), daemon)
            load.wait_for_ok(100)  # serving again, through the same front end
        log = daemon.log()
        assert (
            f"the engine (pid {engine}) ended: killed by SIGKILL, while serving fc@1, mlp@1" in log
        )
        # Requests that were in the dead engine answered 503 (retry), nothing else failed.
        assert set(load.failures) <= {"status 503"}, load.failures
        row = processes(daemon)["engine"]
        assert row["restarts"] == 1 and row["state"] == "running"
        services = {s["name"]: s for s in status(daemon)["services"]}
        assert services["telemetry"]["restarts"] == 0


def test_nothing_outlives_a_killed_control_plane(model_repo: Path, tmp_path: Path) -> None:
    with running_daemon(model_repo, tmp_path / "d") as daemon:
        children = [p["pid"] for p in processes(daemon).values()]
        daemon.process.kill()
        daemon.process.wait(30)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in children):
            assert time.monotonic() < deadline, f"still running: {children}"
            time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie waits for its parent: it ended
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
