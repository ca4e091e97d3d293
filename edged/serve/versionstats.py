"""Per-version live statistics: what each version of a model did on the device's own traffic.

The probation gates read these windows. Recording is cheap (a lock, a few counters, a bounded
deque) because it runs for every batch on the worker thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection

from edged.serve.probation import VersionWindow
from edged.serve.scheduler import BatchObserver

LATENCY_SAMPLES = 2048  # per version: the most recent compute times per inference
# The first batches of a version that just started serving pay for warm-up (first-touch page
# faults of mapped weights, allocator growth): not counted in its latency window.
WARMUP_BATCHES = 20
VERSIONS_KEPT = 4  # per model: older versions' windows are forgotten, never a live one's

# model -> the versions whose windows must be kept: the one serving and the one held for a
# probation's revert (the baseline), however many versions came and went since.
LiveVersions = Callable[[str], Collection[str]]


def _none_live(model: str) -> Collection[str]:
    return ()


class _Counters:
    __slots__ = (
        "batches",
        "errors",
        "latencies",
        "nonfinite",
        "requests",
        "shadow_agreed",
        "shadow_compared",
    )

    def __init__(self) -> None:
        self.batches = 0
        self.requests = 0
        self.errors = 0
        self.nonfinite = 0
        self.shadow_compared = 0
        self.shadow_agreed = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)


class VersionStats:
    """Counters and latency windows per (model, version); safe to call from any thread."""

    def __init__(self, live: LiveVersions = _none_live) -> None:
        self._lock = threading.Lock()
        self._data: dict[tuple[str, str], _Counters] = {}
        self._live = live

    def _get(self, model: str, version: str) -> _Counters:
        counters = self._data.get((model, version))
        if counters is None:
            counters = self._data[(model, version)] = _Counters()
            keep = {version, *self._live(model)}
            mine = [key for key in self._data if key[0] == model and key[1] not in keep]
            for key in mine[: max(0, len(mine) + len(keep) - VERSIONS_KEPT)]:
                del self._data[key]
        return counters

    def record_batch(self, model: str, version: str, rows: int, compute_s: float) -> None:
        """One batch: its rows answered, and its compute time per row, once per row (a
        version that batches more under load is compared per inference, not per batch)."""
        with self._lock:
            counters = self._get(model, version)
            counters.requests += rows
            counters.batches += 1
            if counters.batches > WARMUP_BATCHES:
                counters.latencies.extend([compute_s / rows] * min(rows, LATENCY_SAMPLES))

    def record_errors(self, model: str, version: str, count: int) -> None:
        with self._lock:
            self._get(model, version).errors += count

    def record_nonfinite(self, model: str, version: str) -> None:
        with self._lock:
            self._get(model, version).nonfinite += 1

    def record_shadow(self, model: str, version: str, agreed: bool) -> None:
        with self._lock:
            counters = self._get(model, version)
            counters.shadow_compared += 1
            counters.shadow_agreed += int(agreed)

    def reset(self, model: str, version: str) -> None:
        """Start a version's window afresh (it starts serving now)."""
        with self._lock:
            self._data.pop((model, version), None)
            self._get(model, version)

    def window(self, model: str, version: str) -> VersionWindow:
        with self._lock:
            c = self._get(model, version)
            return VersionWindow(
                version=version,
                requests=c.requests,
                errors=c.errors,
                nonfinite=c.nonfinite,
                latencies_s=tuple(c.latencies),
                shadow_compared=c.shadow_compared,
                shadow_agreed=c.shadow_agreed,
            )


class StatsObserver:
    """Wraps a model's telemetry observer and records each batch per version as well."""

    def __init__(
        self,
        inner: BatchObserver,
        stats: VersionStats,
        model: str,
        serving_version: Callable[[], str | None],
    ) -> None:
        self.inner = inner
        self._stats = stats
        self._model = model
        self._serving_version = serving_version

    def on_batch(
        self, version: str, rows: int, queue_s: list[float], start: float, end: float
    ) -> None:
        self._stats.record_batch(self._model, version, rows, end - start)
        self.inner.on_batch(version, rows, queue_s, start, end)

    def on_outcome(self, outcome: str, count: int = 1) -> None:
        if outcome == "error":
            # The scheduler does not say which version failed; it is the one serving, except
            # for a batch that straddles a swap.
            version = self._serving_version()
            if version is not None:
                self._stats.record_errors(self._model, version, count)
        self.inner.on_outcome(outcome, count)
