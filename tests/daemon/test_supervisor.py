"""The supervisor keeps side services alive without ever ending the task group that serves."""

from __future__ import annotations

import asyncio

import pytest

from edged._compat import TaskGroup
from edged.daemon.supervisor import Supervisor
from edged.errors import SpoolError


def test_a_failing_service_is_restarted_and_reported_while_its_sibling_keeps_running() -> None:
    reported: list[tuple[str, str]] = []
    starts = 0
    sibling_ticks = 0
    third_start = asyncio.Event()

    async def flaky() -> None:
        nonlocal starts
        starts += 1
        if starts < 3:
            raise SpoolError(f"disk full (start {starts})")
        third_start.set()
        await asyncio.Event().wait()  # healthy from now on

    async def sibling() -> None:
        nonlocal sibling_ticks
        while True:
            sibling_ticks += 1
            await asyncio.sleep(0)

    async def scenario() -> None:
        supervisor = Supervisor(
            min_backoff_s=0.001,
            max_backoff_s=0.002,
            on_failure=lambda name, exc: reported.append((name, str(exc))),
        )
        supervisor.add("telemetry", flaky)
        supervisor.add("other", sibling)
        async with TaskGroup() as tg:
            tasks = [tg.create_task(supervisor.run_service(n)) for n in supervisor.names]
            await asyncio.wait_for(third_start.wait(), 10)
            status = {s.name: s for s in supervisor.status()}
            assert status["telemetry"].state == "running"
            assert status["telemetry"].restarts == 2
            assert status["telemetry"].last_error == "SpoolError: disk full (start 2)"
            assert status["other"].restarts == 0
            for task in tasks:
                task.cancel()
        assert {s.state for s in supervisor.status()} == {"stopped"}

    asyncio.run(scenario())
    assert reported == [("telemetry", "disk full (start 1)"), ("telemetry", "disk full (start 2)")]
    assert sibling_ticks > 0


def test_a_service_that_returns_is_finished_and_not_restarted() -> None:
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    async def scenario() -> None:
        supervisor = Supervisor(min_backoff_s=0.001, max_backoff_s=0.001)
        supervisor.add("watchdog", once)
        await supervisor.run_service("watchdog")
        assert supervisor.status()[0].state == "finished"

    asyncio.run(scenario())
    assert runs == 1


def test_cancellation_during_the_backoff_stops_the_service() -> None:
    async def broken() -> None:
        raise RuntimeError("bug")

    async def scenario() -> None:
        supervisor = Supervisor(min_backoff_s=60.0, max_backoff_s=60.0)
        supervisor.add("fleet", broken)
        task = asyncio.ensure_future(supervisor.run_service("fleet"))
        while supervisor.status()[0].state != "backing-off":
            await supervisor.wait_changed()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert supervisor.status()[0].state == "stopped"
        assert supervisor.status()[0].last_error == "RuntimeError: bug"

    asyncio.run(scenario())


def test_a_failing_failure_hook_does_not_stop_supervision() -> None:
    starts = 0
    second = asyncio.Event()

    async def flaky() -> None:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise ValueError("first")
        second.set()

    def bad_hook(name: str, exc: BaseException) -> None:
        raise RuntimeError("reporting is broken too")

    async def scenario() -> None:
        supervisor = Supervisor(min_backoff_s=0.001, max_backoff_s=0.001, on_failure=bad_hook)
        supervisor.add("reload", flaky)
        await asyncio.wait_for(supervisor.run_service("reload"), 10)

    asyncio.run(scenario())
    assert starts == 2
