"""Small test doubles shared by the telemetry tests."""

from __future__ import annotations


class FakeClock:
    """A settable clock standing in for ``time.monotonic`` or ``time.time``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
