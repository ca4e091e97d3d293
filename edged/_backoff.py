"""Jittered exponential backoff between reconnect attempts (pure: the caller sleeps)."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays ``min_s, 2·min_s, 4·min_s, ...`` capped at ``max_s``, each scaled by a random
    factor in ``[1 - jitter, 1]`` so that a fleet that lost its broker at once does not come
    back in lockstep. ``reset()`` after a connection that worked."""

    def __init__(
        self,
        min_s: float,
        max_s: float,
        *,
        jitter: float = 0.5,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got {min_s} and {max_s}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be within [0, 1], got {jitter}")
        self.min_s = min_s
        self.max_s = max_s
        self.jitter = jitter
        self._uniform = uniform
        self.attempt = 0

    def next_delay_s(self) -> float:
        ceiling = min(self.max_s, self.min_s * 2.0 ** min(self.attempt, 62))
        self.attempt += 1
        return ceiling * self._uniform(1.0 - self.jitter, 1.0)

    def reset(self) -> None:
        self.attempt = 0
