"""Per-model, per-version request metrics: counters, latency histograms, batch sizes, queue depth.

Recording methods are called from the model's inference worker thread and from the asyncio
loop; they take no lock (see :mod:`edged.telemetry.histogram` for the sharding argument).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from edged.telemetry.histogram import (
    LATENCY_LAYOUT,
    Histogram,
    HistogramLayout,
    HistogramSnapshot,
)

__all__ = [
    "BATCH_LAYOUT",
    "Counters",
    "MetricsRegistry",
    "ModelKey",
    "ModelMetrics",
    "ModelSnapshot",
]

BATCH_LAYOUT = HistogramLayout(lowest_discernible=1, highest_trackable=65_536)
"""Batch sizes: exact up to 255, two significant digits above."""

_REQUESTS, _ERRORS, _REJECTED, _TIMEOUTS = range(4)


class ModelKey(NamedTuple):
    model: str
    version: str


@dataclass(frozen=True)
class Counters:
    """Request outcomes; their sum is every request that reached the model.

    ``requests`` counts successful completions (the ones with latency samples), ``errors``
    runtime failures, ``rejected`` refusals at admission (queue full, not ready) and
    ``timeouts`` requests whose deadline passed before they ran.
    """

    requests: int = 0
    errors: int = 0
    rejected: int = 0
    timeouts: int = 0

    def since(self, earlier: Counters) -> Counters:
        return Counters(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            self.rejected - earlier.rejected,
            self.timeouts - earlier.timeouts,
        )


class _CounterShards:
    """Four per-thread integer counters summed on read (same argument as the histogram)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._shards: list[tuple[weakref.ref[threading.Thread], list[int]]] = []
        self._retired = [0, 0, 0, 0]
        self._lock = threading.Lock()

    def add(self, slot: int, amount: int = 1) -> None:
        try:
            counts: list[int] = self._local.counts
        except AttributeError:
            counts = [0, 0, 0, 0]
            with self._lock:
                self._shards.append((weakref.ref(threading.current_thread()), counts))
            self._local.counts = counts
        counts[slot] += amount

    def read(self) -> Counters:
        with self._lock:
            alive = []
            for owner_ref, counts in self._shards:
                owner = owner_ref()
                if owner is not None and owner.is_alive():
                    alive.append((owner_ref, counts))
                else:
                    self._retired = [a + b for a, b in zip(self._retired, counts, strict=True)]
            self._shards = alive
            columns = [self._retired] + [counts for _, counts in alive]
        totals = [sum(column) for column in zip(*columns, strict=True)]
        return Counters(*totals)


@dataclass(frozen=True)
class ModelSnapshot:
    """Metrics of one model version over ``duration_s`` (an interval, or since creation)."""

    key: ModelKey
    counters: Counters
    queue_us: HistogramSnapshot
    compute_us: HistogramSnapshot
    e2e_us: HistogramSnapshot
    batch_sizes: HistogramSnapshot
    queue_depth: int
    duration_s: float

    @property
    def qps(self) -> float | None:
        """Successful completions per second; None for a zero-length window."""
        if self.duration_s <= 0:
            return None
        return self.counters.requests / self.duration_s


class ModelMetrics:
    """Metrics of one model version. Hold on to the instance on the hot path."""

    def __init__(
        self,
        key: ModelKey,
        *,
        clock: Callable[[], float] = time.monotonic,
        latency_layout: HistogramLayout = LATENCY_LAYOUT,
    ) -> None:
        self.key = key
        self._clock = clock
        self._counters = _CounterShards()
        self._queue = Histogram(latency_layout)
        self._compute = Histogram(latency_layout)
        self._e2e = Histogram(latency_layout)
        self._batches = Histogram(BATCH_LAYOUT)
        self._queue_depth = 0
        self._created = clock()
        self._last_interval_at = self._created
        self._last_counters = Counters()

    # --- hot path ---------------------------------------------------------------------

    def observe_request(self, queue_s: float, compute_s: float, e2e_s: float) -> None:
        """A request completed successfully: its queue, compute and end-to-end times."""
        self._queue.record(int(queue_s * 1_000_000))
        self._compute.record(int(compute_s * 1_000_000))
        self._e2e.record(int(e2e_s * 1_000_000))
        self._counters.add(_REQUESTS)

    def observe_batch(self, size: int) -> None:
        """A batch of ``size`` requests was run."""
        self._batches.record(size)

    def count_error(self, n: int = 1) -> None:
        self._counters.add(_ERRORS, n)

    def count_rejected(self, n: int = 1) -> None:
        self._counters.add(_REJECTED, n)

    def count_timeout(self, n: int = 1) -> None:
        self._counters.add(_TIMEOUTS, n)

    def set_queue_depth(self, depth: int) -> None:
        """Current queue length; a gauge, so a plain (atomic) attribute store."""
        self._queue_depth = depth

    # --- readers ----------------------------------------------------------------------

    def cumulative(self) -> ModelSnapshot:
        """Everything since creation (for Prometheus-style monotonic counters)."""
        return ModelSnapshot(
            key=self.key,
            counters=self._counters.read(),
            queue_us=self._queue.snapshot(),
            compute_us=self._compute.snapshot(),
            e2e_us=self._e2e.snapshot(),
            batch_sizes=self._batches.snapshot(),
            queue_depth=self._queue_depth,
            duration_s=self._clock() - self._created,
        )

    def interval(self) -> ModelSnapshot:
        """What happened since the previous ``interval`` call (or creation).

        Only one consumer (the telemetry sampler) should call this.
        """
        now = self._clock()
        counters = self._counters.read()
        snapshot = ModelSnapshot(
            key=self.key,
            counters=counters.since(self._last_counters),
            queue_us=self._queue.interval(),
            compute_us=self._compute.interval(),
            e2e_us=self._e2e.interval(),
            batch_sizes=self._batches.interval(),
            queue_depth=self._queue_depth,
            duration_s=now - self._last_interval_at,
        )
        self._last_counters = counters
        self._last_interval_at = now
        return snapshot


class MetricsRegistry:
    """All model versions' metrics, in registration order (a hot swap registers the new
    version after the old one, so the last registered version of a name is the newest)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        latency_layout: HistogramLayout = LATENCY_LAYOUT,
    ) -> None:
        self._clock = clock
        self._latency_layout = latency_layout
        self._models: dict[ModelKey, ModelMetrics] = {}
        self._retiring: set[ModelKey] = set()
        self._lock = threading.Lock()

    def model(self, model: str, version: str) -> ModelMetrics:
        """The metrics of ``model``/``version``, created on first use."""
        key = ModelKey(model, version)
        with self._lock:
            metrics = self._models.get(key)
            if metrics is None:
                metrics = ModelMetrics(key, clock=self._clock, latency_layout=self._latency_layout)
                self._models[key] = metrics
            self._retiring.discard(key)
            return metrics

    def retire(self, model: str, version: str) -> None:
        """Drop a version after its final interval has been reported."""
        with self._lock:
            if ModelKey(model, version) in self._models:
                self._retiring.add(ModelKey(model, version))

    def keys(self) -> list[ModelKey]:
        with self._lock:
            return list(self._models)

    def interval(self) -> list[ModelSnapshot]:
        """Interval snapshots of every version, then forget retired versions."""
        with self._lock:
            models = list(self._models.values())
            retiring = set(self._retiring)
        snapshots = [m.interval() for m in models]
        with self._lock:
            # Only versions retired before their final snapshot was taken may go.
            for key in retiring & self._retiring:
                self._models.pop(key, None)
            self._retiring -= retiring
        return snapshots

    def cumulative(self) -> list[ModelSnapshot]:
        with self._lock:
            models = list(self._models.values())
        return [m.cumulative() for m in models]
