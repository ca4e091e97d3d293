"""A token bucket that paces spool backfill so it cannot starve live telemetry.

The publisher sends the live record of each interval immediately and spends tokens only on
backlog records read from the spool: after an outage the backlog drains at ``rate_per_s``
(plus an initial ``burst``) instead of flooding the broker and the uplink.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

__all__ = ["TokenBucket"]

# Refills are float arithmetic; without slack, 0.1 s × 10/s can leave 0.999… of a token and
# a caller waiting for the last femtosecond.
_EPSILON = 1e-9


class TokenBucket:
    """``rate_per_s`` tokens per second, at most ``burst`` banked; starts full."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_per_s > 0 or not math.isfinite(rate_per_s):
            raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s}")
        capacity = max(1.0, rate_per_s) if burst is None else burst
        if capacity < 1:
            raise ValueError(f"burst must be at least 1 token, got {burst}")
        self.rate_per_s = rate_per_s
        self.burst = capacity
        self._clock = clock
        self._tokens = capacity
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
        self._updated = now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def try_take(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if they are there now."""
        self._refill()
        if self._tokens + _EPSILON >= n:
            self._tokens = max(0.0, self._tokens - n)
            return True
        return False

    def take_up_to(self, max_n: int) -> int:
        """Take as many whole tokens as are available, at most ``max_n``; return how many."""
        self._refill()
        n = max(0, min(max_n, int(self._tokens + _EPSILON)))
        self._tokens = max(0.0, self._tokens - n)
        return n

    def wait_time_s(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens will be available (0 if they are now)."""
        self._check(n)
        self._refill()
        missing = n - self._tokens
        return 0.0 if missing <= _EPSILON else missing / self.rate_per_s

    async def take(
        self, n: float = 1.0, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        """Wait until ``n`` tokens are available and take them.

        Needs no timeout: the wait is bounded by ``n / rate_per_s`` because ``n <= burst``.
        """
        self._check(n)
        while not self.try_take(n):
            await sleep(self.wait_time_s(n))

    def _check(self, n: float) -> None:
        if n > self.burst:
            raise ValueError(f"cannot take {n} tokens from a bucket holding at most {self.burst}")
