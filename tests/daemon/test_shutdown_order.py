"""The shutdown runs in order under one deadline: producers of work stop while the models are
still serving, so nothing can start an install against a closing manager."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace
from pathlib import Path

from edged.config import load_config
from edged.daemon import Daemon
from edged.telemetry.hub import TelemetryHub


def make_daemon(model_repo: Path, tmp_path: Path, drain_timeout_s: float = 5.0) -> Daemon:
    config = load_config(None)
    config = replace(
        config,
        server=replace(config.server, port=-1, socket_path=None, drain_timeout_s=drain_timeout_s),
        models=replace(config.models, repository=model_repo),
        state=replace(config.state, directory=tmp_path / "state"),
    )
    return Daemon(config)


async def wait_until(predicate: object, timeout_s: float = 30.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_producers_stop_while_the_models_still_serve_and_telemetry_flushes_last(
    model_repo: Path, tmp_path: Path
) -> None:
    daemon = make_daemon(model_repo, tmp_path)
    seen: dict[str, object] = {}
    flushed_after_close: list[bool] = []

    async def fleet() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen["models ready when the fleet stopped"] = daemon.manager.ready
            raise

    original_flush = TelemetryHub.flush

    async def flush(hub: TelemetryHub, timeout_s: float) -> None:
        flushed_after_close.append(not daemon.manager.ready)
        await original_flush(hub, timeout_s)

    daemon.supervisor.add("fleet", fleet)
    daemon.telemetry.flush = flush.__get__(daemon.telemetry)  # type: ignore[method-assign]

    async def scenario() -> int:
        run = asyncio.ensure_future(daemon.run())
        await wait_until(lambda: daemon.manager.ready and daemon.telemetry.spool is not None)
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(run, 60)

    assert asyncio.run(scenario()) == 0
    assert seen == {"models ready when the fleet stopped": True}
    assert flushed_after_close == [True]
    states = {s.name: s.state for s in daemon.supervisor.status()}
    assert states == {
        "watchdog": "finished",  # not under systemd: nothing to ping
        "reload": "stopped",
        "telemetry": "stopped",
        "fleet": "stopped",
    }
    assert daemon.manager.running_workers() == []
