"""sd_notify over a real AF_UNIX datagram socket bound by the test as $NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from edged.daemon.sdnotify import (
    LOOP_PROBE_NAME,
    Notifier,
    Watchdog,
    watchdog_interval_s,
)
from edged.errors import DeviceError, NotifyError
from edged.serve.stall import StallDetector


class Receiver:
    """The service manager's end: a bound datagram socket and the messages it got."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # the $NOTIFY_SOCKET value

    def recv(self, timeout_s: float = 2.0) -> dict[str, str]:
        self.sock.settimeout(timeout_s)
        data = self.sock.recv(4096)
        assert data.endswith(b"\n")
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def assert_empty(self) -> None:
        self.sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            self.sock.recv(4096)


@pytest.fixture
def path_receiver() -> Iterator[Receiver]:
    # Not tmp_path: AF_UNIX paths are limited to 107 bytes and pytest's can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield Receiver(sock, path)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"edged-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Receiver(sock, "@" + name)


@pytest.fixture
def notifier(path_receiver: Receiver) -> Iterator[Notifier]:
    with Notifier(path_receiver.address) as notifier:
        yield notifier


# --- Notifier ------------------------------------------------------------------------------


def test_ready_with_status_arrives_as_one_datagram(path_receiver: Receiver) -> None:
    with Notifier.from_environment({"NOTIFY_SOCKET": path_receiver.address}) as notifier:
        assert notifier.enabled
        assert notifier.ready("serving 2 models")
    assert path_receiver.recv() == {"READY": "1", "STATUS": "serving 2 models"}


def test_abstract_namespace_socket_receives(abstract_receiver: Receiver) -> None:
    with Notifier(abstract_receiver.address) as notifier:
        notifier.status("loading")
        notifier.watchdog()
    assert abstract_receiver.recv() == {"STATUS": "loading"}
    assert abstract_receiver.recv() == {"WATCHDOG": "1"}


def test_each_state_change_sends_its_field(path_receiver: Receiver) -> None:
    with Notifier(path_receiver.address) as notifier:
        notifier.stopping()
        notifier.stopping("draining")
        notifier.extend_timeout(12.5)
    assert path_receiver.recv() == {"STOPPING": "1"}
    assert path_receiver.recv() == {"STOPPING": "1", "STATUS": "draining"}
    assert path_receiver.recv() == {"EXTEND_TIMEOUT_USEC": "12500000"}


def test_reloading_carries_the_current_monotonic_clock(path_receiver: Receiver) -> None:
    with Notifier(path_receiver.address) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading("re-reading config")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = path_receiver.recv()
    assert message["RELOADING"] == "1"
    assert message["STATUS"] == "re-reading config"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_multiline_status_is_flattened_not_injected(path_receiver: Receiver) -> None:
    with Notifier(path_receiver.address) as notifier:
        notifier.status("model failed\nREADY=1")
    assert path_receiver.recv() == {"STATUS": "model failed READY=1"}


def test_raw_field_with_newline_is_refused(path_receiver: Receiver) -> None:
    with Notifier(path_receiver.address) as notifier, pytest.raises(NotifyError, match="newline"):
        notifier.notify(STATUS="a\nWATCHDOG=1")
    path_receiver.assert_empty()


def test_not_under_systemd_every_call_is_a_noop() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.reloading() is False
    assert repr(notifier) == "Notifier(disabled)"


def test_relative_notify_socket_is_rejected_with_what_is_supported() -> None:
    with pytest.raises(NotifyError, match="absolute path") as excinfo:
        Notifier("run/notify")
    assert isinstance(excinfo.value, DeviceError)


def test_sending_to_a_missing_socket_raises_notify_error(tmp_path: Path) -> None:
    with Notifier(str(tmp_path / "gone")) as notifier, pytest.raises(NotifyError, match="gone"):
        notifier.ready()


def test_unset_environment_hides_the_socket_from_children(
    path_receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_receiver.address)
    with Notifier.from_environment(unset_environment=True) as notifier:
        assert "NOTIFY_SOCKET" not in os.environ
        notifier.ready()
    assert path_receiver.recv() == {"READY": "1"}


# --- watchdog interval ---------------------------------------------------------------------


def test_watchdog_interval_is_read_in_seconds() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_s({}) is None


def test_watchdog_interval_for_another_pid_is_ignored() -> None:
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}
    assert watchdog_interval_s(env, pid=4242) == 1.0
    assert watchdog_interval_s(env, pid=4243) is None
    assert watchdog_interval_s({**env, "WATCHDOG_PID": str(os.getpid())}) == 1.0


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"WATCHDOG_USEC": "soon"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "0"}, "positive"),
        ({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "me"}, "WATCHDOG_PID"),
    ],
)
def test_malformed_watchdog_variables_are_errors(env: dict[str, str], match: str) -> None:
    with pytest.raises(NotifyError, match=match):
        watchdog_interval_s(env)


# --- StallDetector -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stall_detector_is_unhealthy_only_while_work_overruns() -> None:
    clock = FakeClock()
    detector = StallDetector(stuck_after_s=5.0, clock=clock)
    assert detector()  # idle is healthy
    clock.now += 60
    assert detector()
    detector.started()
    clock.now += 5.0
    assert detector()
    clock.now += 0.1
    assert not detector()
    assert detector.busy_for_s() == pytest.approx(5.1)
    detector.finished()
    assert detector()
    assert detector.completed == 1


def test_stall_detector_context_manager_records_progress_even_on_error() -> None:
    detector = StallDetector(stuck_after_s=1.0)
    with pytest.raises(RuntimeError), detector.working():
        raise RuntimeError("inference failed")
    assert detector.completed == 1
    assert detector.busy_for_s() == 0.0


# --- Watchdog ------------------------------------------------------------------------------

Pings = list[float]  # loop times at which WATCHDOG=1 arrived


async def _collect_pings(sock: socket.socket, pings: Pings) -> None:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    while True:
        data = await loop.sock_recv(sock, 4096)
        if data == b"WATCHDOG=1\n":
            pings.append(loop.time())


def _run_with_watchdog(
    receiver: Receiver,
    watchdog: Watchdog,
    scenario: Callable[[Pings], Coroutine[Any, Any, None]],
) -> None:
    async def main() -> None:
        pings: Pings = []
        collector = asyncio.create_task(_collect_pings(receiver.sock, pings))
        runner = asyncio.create_task(watchdog.run())
        try:
            await scenario(pings)
        finally:
            runner.cancel()
            collector.cancel()
            await asyncio.gather(runner, collector, return_exceptions=True)

    asyncio.run(main())


def test_watchdog_pings_every_half_interval_while_healthy(
    path_receiver: Receiver, notifier: Notifier
) -> None:
    watchdog = Watchdog(notifier, interval_s=0.2)
    watchdog.add_probe("always", lambda: True)
    assert watchdog.period_s == pytest.approx(0.1)

    async def scenario(pings: Pings) -> None:
        await asyncio.sleep(0.55)
        assert 4 <= len(pings) <= 7
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.05 < gap < 0.2 for gap in gaps), gaps

    _run_with_watchdog(path_receiver, watchdog, scenario)
    assert watchdog.failing == ()


def test_pings_stop_while_a_probe_reports_unhealthy_and_resume_after(
    path_receiver: Receiver, notifier: Notifier, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = {"inference": True}
    watchdog = Watchdog(notifier, interval_s=0.1)
    watchdog.add_probe("inference", lambda: healthy["inference"])
    watchdog.add_probe("mqtt", lambda: True)

    async def scenario(pings: Pings) -> None:
        await asyncio.sleep(0.2)
        assert len(pings) >= 2
        healthy["inference"] = False
        await asyncio.sleep(0.06)  # let an in-flight tick land
        stopped_at = len(pings)
        await asyncio.sleep(0.3)  # six ping periods
        assert len(pings) == stopped_at
        assert watchdog.failing == ("inference",)
        healthy["inference"] = True
        await asyncio.sleep(0.15)
        assert len(pings) > stopped_at

    with caplog.at_level(logging.INFO, logger="edged.daemon.sdnotify"):
        _run_with_watchdog(path_receiver, watchdog, scenario)
    assert "unhealthy inference" in caplog.text
    assert "resuming pings" in caplog.text


def test_a_stuck_worker_stops_the_pings(path_receiver: Receiver, notifier: Notifier) -> None:
    detector = StallDetector(stuck_after_s=0.1)
    watchdog = Watchdog(notifier, interval_s=0.1)
    watchdog.add_probe("worker-0", detector)

    async def scenario(pings: Pings) -> None:
        await asyncio.sleep(0.12)
        detector.started()  # and never finishes
        await asyncio.sleep(0.2)
        stopped_at = len(pings)
        await asyncio.sleep(0.2)
        assert len(pings) == stopped_at
        assert watchdog.failing == ("worker-0",)

    _run_with_watchdog(path_receiver, watchdog, scenario)


def test_a_probe_that_raises_counts_as_unhealthy(
    path_receiver: Receiver, notifier: Notifier, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bool:
        raise RuntimeError("probe bug")

    watchdog = Watchdog(notifier, interval_s=0.1)
    watchdog.add_probe("broken", broken)

    async def scenario(pings: Pings) -> None:
        await asyncio.sleep(0.2)
        assert pings == []

    with caplog.at_level(logging.ERROR, logger="edged.daemon.sdnotify"):
        _run_with_watchdog(path_receiver, watchdog, scenario)
    assert watchdog.failing == ("broken",)
    assert "probe broken raised" in caplog.text


def test_a_late_event_loop_withholds_that_ping(
    path_receiver: Receiver, notifier: Notifier, caplog: pytest.LogCaptureFixture
) -> None:
    watchdog = Watchdog(notifier, interval_s=0.4, max_loop_lag_s=0.1)

    def block_the_loop() -> None:
        time.sleep(0.35)  # a synchronous call that should have gone to a thread

    async def scenario(pings: Pings) -> None:
        await asyncio.sleep(0.05)
        assert len(pings) == 1
        asyncio.get_running_loop().call_soon(block_the_loop)
        await asyncio.sleep(0.1)  # woken late, after the block: lag ~0.2 s at t~0.4
        await asyncio.sleep(0.05)
        assert len(pings) == 1
        assert watchdog.failing == (LOOP_PROBE_NAME,)
        await asyncio.sleep(0.25)  # next tick on time
        assert len(pings) == 2
        assert len(watchdog.failing) == 0

    with caplog.at_level(logging.WARNING, logger="edged.daemon.sdnotify"):
        _run_with_watchdog(path_receiver, watchdog, scenario)
    assert "unhealthy event-loop" in caplog.text


def test_watchdog_without_systemd_returns_at_once(
    path_receiver: Receiver, notifier: Notifier
) -> None:
    async def main() -> None:
        await asyncio.wait_for(Watchdog(Notifier(None), 1.0).run(), timeout=1.0)
        await asyncio.wait_for(Watchdog(notifier, None).run(), timeout=1.0)

    asyncio.run(main())
    path_receiver.assert_empty()


def test_probe_names_are_unique(path_receiver: Receiver, notifier: Notifier) -> None:
    watchdog = Watchdog(notifier, interval_s=1.0)
    watchdog.add_probe("a", lambda: True)
    with pytest.raises(ValueError, match="already registered"):
        watchdog.add_probe("a", lambda: True)
    with pytest.raises(ValueError, match="already registered"):
        watchdog.add_probe(LOOP_PROBE_NAME, lambda: True)
    watchdog.remove_probe("a")
    watchdog.add_probe("a", lambda: False)
    assert watchdog.check() == ("a",)
