"""Energy per inference: integrate sampled board power over the windows each model computed.

Inputs are two time series on the same monotonic clock: power samples ``(t, watts)`` from the
power sampler, and compute intervals ``(model, start, end, batch size)`` from the inference
workers. Time is cut at every sample and interval boundary; the energy of each piece,
``∫ P dt`` under the chosen :class:`Interpolation`, is split equally among the intervals
computing during it, and an interval's energy is split equally among the requests in its
batch. Energy while nothing computes is idle energy and belongs to no model.

Attribution runs ``settle_delay_s`` behind the clock so that intervals reported at their end
are known before the time they cover is divided up. The method is stated in
docs/telemetry.md; it is pure (no I/O) and takes an injectable clock.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edged.telemetry.metrics import ModelKey

logger = logging.getLogger(__name__)

__all__ = ["EnergyAttributor", "EnergyStats", "Interpolation"]


class Interpolation(enum.Enum):
    """How power varies between two samples."""

    LINEAR = "linear"
    """Straight line between samples (trapezoid rule): for instantaneous sensors (INA3221)."""
    HOLD = "hold"
    """A sample's value holds until the next sample (zero-order hold)."""
    INTERVAL_AVERAGE = "interval-average"
    """A sample is the mean power since the previous sample: for energy counters (RAPL)."""


@dataclass(frozen=True)
class EnergyStats:
    """Energy attributed to one model version over a reporting interval."""

    energy_j: float = 0.0
    requests: int = 0
    """Requests whose compute intervals were fully covered by power samples."""
    batches: int = 0
    unattributed_requests: int = 0
    """Requests whose energy is unknown: no power samples covered them, or reported too late."""

    @property
    def mj_per_inference(self) -> float | None:
        if self.requests == 0:
            return None
        return self.energy_j * 1000.0 / self.requests

    def plus(self, other: EnergyStats) -> EnergyStats:
        return EnergyStats(
            self.energy_j + other.energy_j,
            self.requests + other.requests,
            self.batches + other.batches,
            self.unattributed_requests + other.unattributed_requests,
        )


class _Interval:
    __slots__ = ("batch_size", "covered", "end", "energy_j", "key", "late", "start")

    def __init__(self, key: ModelKey, start: float, end: float, batch_size: int) -> None:
        self.key = key
        self.start = start
        self.end = end
        self.batch_size = batch_size
        self.energy_j = 0.0
        self.covered = True
        self.late = False


class EnergyAttributor:
    """Attributes board energy to model versions; see the module docstring for the method.

    ``add_power_sample`` and ``add_compute`` may be called from any thread (they only append
    to a deque). ``settle`` and ``take`` belong to one consumer.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        interpolation: Interpolation = Interpolation.LINEAR,
        settle_delay_s: float = 5.0,
        max_sample_gap_s: float = 5.0,
    ) -> None:
        if settle_delay_s < 0:
            raise ValueError(f"settle_delay_s must be >= 0, got {settle_delay_s}")
        if max_sample_gap_s <= 0:
            raise ValueError(f"max_sample_gap_s must be > 0, got {max_sample_gap_s}")
        self._clock = clock
        self._interpolation = interpolation
        self._settle_delay_s = settle_delay_s
        self._max_gap_s = max_sample_gap_s
        self._sample_inbox: deque[tuple[float, float]] = deque()
        self._compute_inbox: deque[_Interval] = deque()
        self._samples: list[tuple[float, float]] = []
        self._pending: list[_Interval] = []
        self._finalized_until = clock()
        self._stats: dict[ModelKey, EnergyStats] = {}
        self._lock = threading.Lock()

    # --- producers (any thread) ---------------------------------------------------------

    def add_power_sample(self, t: float, watts: float) -> None:
        """Board power ``watts`` at monotonic time ``t``; samples must arrive in time order."""
        self._sample_inbox.append((t, watts))

    def add_compute(self, key: ModelKey, start: float, end: float, batch_size: int) -> None:
        """Model ``key`` computed a batch of ``batch_size`` requests from ``start`` to ``end``."""
        self._compute_inbox.append(_Interval(key, start, end, batch_size))

    # --- consumer -----------------------------------------------------------------------

    def take(self, now: float | None = None) -> dict[ModelKey, EnergyStats]:
        """Settle up to ``now`` and return the stats gathered since the previous ``take``."""
        with self._lock:
            self._settle(self._clock() if now is None else now)
            stats, self._stats = self._stats, {}
            return stats

    def settle(self, now: float | None = None) -> None:
        """Attribute all time that can be attributed by ``now`` (``take`` does this too)."""
        with self._lock:
            self._settle(self._clock() if now is None else now)

    def _settle(self, now: float) -> None:
        self._drain_inboxes()
        horizon = now - self._settle_delay_s
        if self._samples:
            last_t = self._samples[-1][0]
            if last_t < horizon and horizon - last_t <= self._max_gap_s:
                horizon = last_t  # the next sample will cover the rest; wait for it
        if horizon <= self._finalized_until:
            return
        self._attribute(self._finalized_until, horizon)
        still_pending: list[_Interval] = []
        for interval in self._pending:
            if interval.end <= horizon:
                self._finalize(interval)
            else:
                still_pending.append(interval)
        self._pending = still_pending
        self._finalized_until = horizon
        keep_from = 0
        for index, (t, _) in enumerate(self._samples):
            if t <= horizon:
                keep_from = index
        del self._samples[:keep_from]

    def _drain_inboxes(self) -> None:
        while self._sample_inbox:
            t, watts = self._sample_inbox.popleft()
            if self._samples and t <= self._samples[-1][0]:
                logger.debug("power sample at %.6f is not after the previous one; dropped", t)
                continue
            self._samples.append((t, watts))
        while self._compute_inbox:
            interval = self._compute_inbox.popleft()
            if interval.end <= interval.start or interval.end <= self._finalized_until:
                self._finalize_unattributed(interval)
                continue
            interval.late = interval.start < self._finalized_until
            self._pending.append(interval)

    def _attribute(self, begin: float, end: float) -> None:
        """Split the energy of (begin, end] among the intervals computing in each piece."""
        samples = self._samples
        cuts = {begin, end}
        for interval in self._pending:
            for edge in (interval.start, interval.end):
                if begin < edge < end:
                    cuts.add(edge)
        for t, _ in samples:
            if begin < t < end:
                cuts.add(t)
        points = sorted(cuts)
        by_start = sorted(self._pending, key=lambda i: i.start)
        next_start = 0
        active: list[_Interval] = []
        sample_index = 0
        for a, b in itertools.pairwise(points):
            while next_start < len(by_start) and by_start[next_start].start <= a:
                active.append(by_start[next_start])
                next_start += 1
            active = [i for i in active if i.end > a]
            if not active:
                continue
            while sample_index + 1 < len(samples) and samples[sample_index + 1][0] <= a:
                sample_index += 1
            energy = self._segment_energy(sample_index, a, b)
            if energy is None:
                for interval in active:
                    interval.covered = False
                continue
            share = energy / len(active)
            for interval in active:
                interval.energy_j += share

    def _segment_energy(self, index: int, a: float, b: float) -> float | None:
        """∫ P dt over [a, b], which lies between samples ``index`` and ``index + 1``."""
        samples = self._samples
        if index + 1 >= len(samples):
            return None
        (t0, w0), (t1, w1) = samples[index], samples[index + 1]
        if not (t0 <= a and b <= t1) or t1 - t0 > self._max_gap_s:
            return None
        if self._interpolation is Interpolation.HOLD:
            return w0 * (b - a)
        if self._interpolation is Interpolation.INTERVAL_AVERAGE:
            return w1 * (b - a)
        slope = (w1 - w0) / (t1 - t0)
        power_a = w0 + slope * (a - t0)
        power_b = w0 + slope * (b - t0)
        return (power_a + power_b) / 2.0 * (b - a)

    def _finalize(self, interval: _Interval) -> None:
        if not interval.covered or interval.late:
            self._finalize_unattributed(interval)
            return
        self._add(interval.key, EnergyStats(interval.energy_j, interval.batch_size, 1, 0))

    def _finalize_unattributed(self, interval: _Interval) -> None:
        self._add(interval.key, EnergyStats(0.0, 0, 0, interval.batch_size))

    def _add(self, key: ModelKey, stats: EnergyStats) -> None:
        self._stats[key] = self._stats.get(key, EnergyStats()).plus(stats)
