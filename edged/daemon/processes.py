"""The control plane's children: one engine and N front ends, each restarted when it dies.

Children are forked by the zygote (``edged.daemon.zygote``), which reports each one's exit
status, so a crash is logged with its signal.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from edged.daemon.zygote import ZygoteProcess

log = logging.getLogger(__name__)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


@dataclass
class ChildState:
    """One child role's life so far, for ``edged status`` and ``edged top``."""

    name: str
    role: str  # engine | front-end
    pid: int | None = None
    state: str = "starting"  # starting | running | restarting | stopped
    started_at: float = 0.0
    restarts: int = 0
    last_exit: str | None = None
    last_exit_at: float | None = None
    last_pid: int | None = None  # the process that ended last

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "pid": self.pid,
            "state": self.state,
            "uptime_s": round(time.monotonic() - self.started_at, 1) if self.pid else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }


@dataclass
class CrashLoopBackoff:
    """How long to wait before restarting a child. The first quick death restarts at once (a
    one-off crash should cost nothing); each further quick death in a row doubles the wait from
    0.25 s up to 30 s; a child that lived ``healthy_s`` resets the count."""

    healthy_s: float = 10.0
    first_s: float = 0.25
    most_s: float = 30.0
    quick_deaths: int = 0

    def after_exit(self, lived_s: float) -> float:
        self.quick_deaths = self.quick_deaths + 1 if lived_s < self.healthy_s else 0
        if self.quick_deaths <= 1:
            return 0.0
        return float(min(self.most_s, self.first_s * 2 ** (self.quick_deaths - 2)))


Spawn = Callable[[], ZygoteProcess]
OnExit = Callable[[ChildState, int | None], None]
# Runs after an unexpected exit, before the restart (the crash gate reverts a release here).
BeforeRestart = Callable[[int | None], Awaitable[None]]


@dataclass
class Child:
    """Runs one child role forever: start, wait for its exit, report, restart."""

    state: ChildState
    spawn: Spawn
    on_exit: OnExit | None = None
    after_start: Callable[[ZygoteProcess], None] | None = None
    before_restart: BeforeRestart | None = None
    process: ZygoteProcess | None = None
    stopping: bool = False

    async def run(self) -> None:
        backoff = CrashLoopBackoff()
        while not self.stopping:
            process = self.spawn()
            try:
                await process.start()
            finally:
                if self.after_start is not None:
                    self.after_start(process)
            self.process = process
            self.state.pid = process.pid
            self.state.state = "running"
            self.state.started_at = time.monotonic()
            code = await process.wait()
            self.state.last_pid = process.pid
            self.state.last_exit = describe_exit(code)
            self.state.last_exit_at = time.time()
            self.state.pid = None
            if self._stopped():
                self.state.state = "stopped"
                return
            self.state.state = "restarting"
            self.state.restarts += 1
            if self.on_exit is not None:
                self.on_exit(self.state, code)
            if self.before_restart is not None:
                await self.before_restart(code)
            delay = backoff.after_exit(time.monotonic() - self.state.started_at)
            if delay:
                log.warning("%s is crash-looping: next start in %.2fs", self.state.name, delay)
                await asyncio.sleep(delay)

    def _stopped(self) -> bool:
        """``terminate()`` may have run while ``run`` waited (mypy cannot see that)."""
        return self.stopping

    def terminate(self) -> None:
        self.stopping = True
        process = self.process
        if process is not None and process.exitcode is None:
            process.terminate()

    def kill(self) -> None:
        self.stopping = True
        process = self.process
        if process is not None and process.exitcode is None:
            process.kill()
