"""Supervision of the daemon's side services (telemetry, fleet channel, reload, watchdog).

A side service that fails is logged with its traceback, reported (``status()``, which
``edged status`` and the fleet channel show, and the ``on_failure`` hook), backed off and
restarted. It never ends the task group that serves inference: only cancellation stops a
supervised service. A service that returns normally is finished and is not restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edged._backoff import Backoff

log = logging.getLogger(__name__)

Service = Callable[[], Awaitable[None]]
FailureHook = Callable[[str, BaseException], None]

# A service that ran this long since its last start is healthy again: the next failure
# starts the backoff from the beginning.
HEALTHY_AFTER_S = 60.0


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # starting | running | backing-off | finished | stopped
    restarts: int
    last_error: str | None
    last_failure_at: float | None  # wall-clock seconds

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_failure_at": self.last_failure_at,
        }


class _Supervised:
    def __init__(self, name: str, service: Service, backoff: Backoff) -> None:
        self.name = name
        self.service = service
        self.backoff = backoff
        self.state = "starting"
        self.restarts = 0
        self.last_error: str | None = None
        self.last_failure_at: float | None = None

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            self.name, self.state, self.restarts, self.last_error, self.last_failure_at
        )


class Supervisor:
    """Runs named services; ``run_service`` never raises anything but ``CancelledError``."""

    def __init__(
        self,
        *,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        on_failure: FailureHook | None = None,
    ) -> None:
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self.on_failure = on_failure
        self._services: dict[str, _Supervised] = {}
        self._changed = asyncio.Event()

    def add(self, name: str, service: Service) -> None:
        if name in self._services:
            raise ValueError(f"service {name!r} is already supervised")
        backoff = Backoff(self._min_backoff_s, self._max_backoff_s)
        self._services[name] = _Supervised(name, service, backoff)

    @property
    def names(self) -> list[str]:
        return list(self._services)

    def status(self) -> list[ServiceStatus]:
        return [s.status() for s in self._services.values()]

    @property
    def failures(self) -> int:
        return sum(s.restarts for s in self._services.values())

    async def wait_changed(self) -> None:
        """Returns after the next state change of any service (tests, status refreshers)."""
        self._changed.clear()
        await self._changed.wait()

    def _set_state(self, supervised: _Supervised, state: str) -> None:
        supervised.state = state
        self._changed.set()

    async def run_service(self, name: str) -> None:
        supervised = self._services[name]
        while True:
            self._set_state(supervised, "running")
            started = time.monotonic()
            try:
                await supervised.service()
            except asyncio.CancelledError:
                self._set_state(supervised, "stopped")
                raise
            except Exception as exc:  # supervise, don't propagate: inference keeps serving
                self._record_failure(supervised, exc, time.monotonic() - started)
            else:
                self._set_state(supervised, "finished")
                return
            delay = supervised.backoff.next_delay_s()
            log.warning("service %s restarts in %.1fs", name, delay)
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self._set_state(supervised, "stopped")
                raise

    def _record_failure(self, supervised: _Supervised, exc: Exception, ran_s: float) -> None:
        if ran_s >= HEALTHY_AFTER_S:
            supervised.backoff.reset()
        supervised.restarts += 1
        supervised.last_error = f"{type(exc).__name__}: {exc}"
        supervised.last_failure_at = time.time()
        self._set_state(supervised, "backing-off")
        log.error(
            "service %s failed (restart %d); inference keeps serving: %s",
            supervised.name,
            supervised.restarts,
            supervised.last_error,
            exc_info=exc,
        )
        if self.on_failure is not None:
            try:
                self.on_failure(supervised.name, exc)
            except Exception:
                log.exception("reporting the failure of service %s failed", supervised.name)
