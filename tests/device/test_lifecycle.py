"""Daemon lifecycle with a real process: graceful SIGTERM under load, forced second SIGINT,
and the watchdog: a hung inference worker stops the pings, and a supervisor acting as systemd
does (WatchdogSec= expired -> SIGABRT -> restart) brings the service back.

systemd itself cannot run in this container (it is not PID 1), so the test binds the
``$NOTIFY_SOCKET`` datagram socket and plays the service manager's part with the same
environment systemd gives a ``Type=notify`` unit (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.daemon import DaemonProcess, running_daemon

pytestmark = pytest.mark.integration

HANG = {
    "inputs": [
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [0.0]},
        {"name": "iterations", "shape": [1], "datatype": "INT64", "data": [10**12]},
    ]
}


async def _client(url: str, stop: asyncio.Event, outcomes: dict[str, int]) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.1] * 64}]}
    # A new connection per request: after SIGTERM a refused connection is "not accepted",
    # while an accepted request that does not get its 200 would be a dropped one.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while not stop.is_set():
            try:
                async with session.post(f"{url}/v2/models/mlp/infer", json=body) as response:
                    await response.read()
                    key = f"status {response.status}"
                    if response.status == 503:  # told to go away: a polite client stops
                        outcomes[key] = outcomes.get(key, 0) + 1
                        return
            except aiohttp.ClientConnectorError:
                key = "refused"
                await asyncio.sleep(0.01)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                key = f"dropped {type(exc).__name__}"
            outcomes[key] = outcomes.get(key, 0) + 1


def test_sigterm_under_load_drains_and_drops_no_request(model_repo: Path, tmp_path: Path) -> None:
    outcomes: dict[str, int] = {}
    with running_daemon(model_repo, tmp_path / "d") as daemon:

        async def scenario() -> None:
            stop = asyncio.Event()
            clients = [
                asyncio.ensure_future(_client(daemon.url, stop, outcomes)) for _ in range(16)
            ]
            await asyncio.sleep(1.5)
            daemon.signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while daemon.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*clients)

        asyncio.run(scenario())
        code = daemon.process.wait(5)
    assert code == 0, daemon.log()
    assert outcomes.get("status 200", 0) > 100
    # Refused connections and 503s are requests the draining daemon did not admit; anything
    # else (a 5xx, a connection cut after the request was sent) would be a dropped request.
    assert {k for k in outcomes if k not in ("status 200", "status 503", "refused")} == set(), (
        outcomes
    )
    assert "stopping: draining in-flight requests" in daemon.log()


def _post(url: str, body: bytes, timeout_s: float) -> None:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=timeout_s).read()
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        pass


def hang_worker(daemon: DaemonProcess) -> threading.Thread:
    import json

    thread = threading.Thread(
        target=_post,
        args=(f"{daemon.url}/v2/models/loop/infer", json.dumps(HANG).encode(), 30.0),
        daemon=True,
    )
    thread.start()
    return thread


def test_second_sigint_forces_exit_while_a_drain_waits(loop_repo: Path, tmp_path: Path) -> None:
    config = "[server]\ndrain_timeout_s = 120\n"
    with running_daemon(loop_repo, tmp_path / "d", config) as daemon:
        hang_worker(daemon)
        time.sleep(0.5)
        daemon.signal(signal.SIGINT)
        time.sleep(1.0)
        assert daemon.process.poll() is None  # still draining the hung request
        started = time.monotonic()
        daemon.signal(signal.SIGINT)
        code = daemon.process.wait(10)
        assert time.monotonic() - started < 5
    assert code == 130
    assert "second SIGINT" in daemon.log()


class ServiceManager:
    """The part of systemd a Type=notify unit with WatchdogSec= talks to."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="edged-notify-"))
        self.address = str(self.directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)

    def wait_for(self, key: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                fields = dict(
                    line.split("=", 1)
                    for line in self.sock.recv(4096).decode().splitlines()
                    if "=" in line
                )
            except TimeoutError:
                return False
            if key in fields:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def service_manager() -> Iterator[ServiceManager]:
    manager = ServiceManager()
    yield manager
    manager.close()


def test_hung_worker_stops_watchdog_pings_and_the_service_is_restarted(
    loop_repo: Path, tmp_path: Path, service_manager: ServiceManager
) -> None:
    watchdog_s = 2.0
    env = {"NOTIFY_SOCKET": service_manager.address, "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}
    config = "[server]\nworker_stuck_after_s = 0.5\ndrain_timeout_s = 1\n"
    with running_daemon(loop_repo, tmp_path / "first", config, env=env) as daemon:
        assert service_manager.wait_for("READY", 10)
        assert service_manager.wait_for("WATCHDOG", watchdog_s)  # healthy: pings arrive
        assert service_manager.wait_for("WATCHDOG", watchdog_s)
        hang_worker(daemon)
        time.sleep(watchdog_s / 2)  # at most one ping already on its way
        service_manager.sock.settimeout(0.01)
        while True:
            try:
                service_manager.sock.recv(4096)
            except TimeoutError:
                break
        # WatchdogSec= passes without a ping: systemd would now abort and restart the unit.
        assert not service_manager.wait_for("WATCHDOG", watchdog_s * 1.5)
        assert "stuck" in daemon.log()
        daemon.signal(signal.SIGABRT)
        assert daemon.process.wait(10) != 0
    with running_daemon(loop_repo, tmp_path / "second", config, env=env) as restarted:
        assert service_manager.wait_for("READY", 10)
        assert service_manager.wait_for("WATCHDOG", watchdog_s)
        request = urllib.request.Request(
            f"{restarted.url}/v2/models/loop/infer",
            data=b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]},'
            b'{"name":"iterations","shape":[1],"datatype":"INT64","data":[2]}]}',
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert b'"data":[3.0]' in response.read()


def test_a_frozen_engine_stops_watchdog_pings_and_they_resume_with_it(
    model_repo: Path, tmp_path: Path, service_manager: ServiceManager
) -> None:
    watchdog_s = 2.0
    env = {"NOTIFY_SOCKET": service_manager.address, "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}
    with running_daemon(model_repo, tmp_path / "d", env=env) as daemon:
        assert service_manager.wait_for("READY", 10)
        assert service_manager.wait_for("WATCHDOG", watchdog_s)
        with urllib.request.urlopen(f"{daemon.url}/edged/v1/status", timeout=10) as response:
            engine = json.load(response)["engine"]["pid"]
        os.kill(engine, signal.SIGSTOP)  # alive, but it answers nothing: as hung as it gets
        try:
            # Its heartbeat stops; within three heartbeats (6 s) the pings stop too, and
            # WatchdogSec= passes without one: systemd would restart the unit.
            deadline = time.monotonic() + 30
            while service_manager.wait_for("WATCHDOG", watchdog_s):
                assert time.monotonic() < deadline, "watchdog pings went on"
        finally:
            os.kill(engine, signal.SIGCONT)
        assert service_manager.wait_for("WATCHDOG", 10)  # the engine answers again
