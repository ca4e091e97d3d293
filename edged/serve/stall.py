"""Is an inference worker stuck? A timer the worker brackets each run with; the daemon's
watchdog asks it (``ModelManager.stuck_workers``) and withholds systemd pings while one is."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class StallDetector:
    """A ``Probe`` for one worker: unhealthy while a unit of work has run longer than a limit.

    The worker (typically an inference thread) brackets each unit of work with ``working()``;
    an idle worker is healthy. Thread-safe: the worker and the event loop may call concurrently.
    """

    def __init__(self, stuck_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if stuck_after_s <= 0:
            raise ValueError("stuck_after_s must be positive")
        self.stuck_after_s = stuck_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._completed = 0

    def started(self) -> None:
        with self._lock:
            self._busy_since = self._clock()

    def finished(self) -> None:
        with self._lock:
            self._busy_since = None
            self._completed += 1

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        self.started()
        try:
            yield
        finally:
            self.finished()

    @property
    def completed(self) -> int:
        """Units of work finished so far (progress counter, for diagnostics)."""
        return self._completed

    def busy_for_s(self) -> float:
        """How long the current unit of work has been running; 0 when idle."""
        with self._lock:
            since = self._busy_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def __call__(self) -> bool:
        return self.busy_for_s() <= self.stuck_after_s
