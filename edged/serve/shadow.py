"""Shadow comparison during probation: a sampled share of live requests also runs on the
replaced version, off the request path, and the two answers are compared.

The caller always gets the serving version's answer, before the shadow run starts. The extra
CPU is bounded: a sampling share, a token-bucket rate cap, one shadow run at a time, and none
while the model has requests waiting (shadow work is the first thing dropped under load).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import numpy as np

from edged.runtime.base import Array
from edged.serve.probation import ShadowPolicy
from edged.serve.slot import ModelSlot, ServedVersion
from edged.serve.versionstats import VersionStats

log = logging.getLogger(__name__)


def outputs_agree(policy: ShadowPolicy, served: dict[str, Array], shadow: dict[str, Array]) -> bool:
    """Same output names and shapes, and per output either the same arg-max in every row
    (``top1``) or a max absolute difference within ``max_abs_diff_micro`` / 1e6."""
    if served.keys() != shadow.keys():
        return False
    for name, a in served.items():
        b = shadow[name]
        if a.shape != b.shape:
            return False
        if policy.top1 and a.ndim >= 1 and a.size:
            rows_a = a.reshape(a.shape[0], -1).argmax(axis=1)
            rows_b = b.reshape(b.shape[0], -1).argmax(axis=1)
            if not np.array_equal(rows_a, rows_b):
                return False
        elif a.size:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            if not np.all(diff <= policy.max_abs_diff_micro / 1e6):  # NaN compares false
                return False
    return True


class ShadowRunner:
    """Runs sampled requests on ``baseline`` and records agreement for ``candidate``."""

    def __init__(
        self,
        policy: ShadowPolicy,
        slot: ModelSlot,
        baseline: ServedVersion,
        candidate_version: str,
        stats: VersionStats,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.slot = slot
        self.baseline = baseline
        self.candidate_version = candidate_version
        self.stats = stats
        self._rng = rng or random.Random()  # noqa: S311 (sampling, not security)
        self._tokens = float(policy.max_per_s)
        self._refilled = time.monotonic()
        self._busy = False
        self.dropped = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def _take_token(self) -> bool:
        now = time.monotonic()
        rate = float(self.policy.max_per_s)
        self._tokens = min(rate, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def offer(self, inputs: dict[str, Array], served: dict[str, Array], loaded: bool) -> None:
        """Maybe shadow this request (called on the loop after its answer was computed)."""
        if self._rng.randrange(1000) >= self.policy.sample_permille:
            return
        if self._busy or loaded or not self._take_token():
            self.dropped += 1
            return
        if not self.slot.hold(self.baseline):
            return  # already released (the probation ended)
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._run(inputs, served))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, inputs: dict[str, Array], served: dict[str, Array]) -> None:
        try:
            shadow = await asyncio.to_thread(self.baseline.model.run, inputs)
        except Exception as exc:  # the old version cannot take these inputs: not comparable
            log.info("shadow run on version %s failed: %s", self.baseline.version, exc)
            return
        finally:
            self.slot.release(self.baseline)
            self._busy = False
        agreed = outputs_agree(self.policy, served, shadow)
        self.stats.record_shadow(self.slot.name, self.candidate_version, agreed)
