"""The daemon's telemetry: feeds the per-model metrics from the schedulers, samples power and
the system, builds a record every interval, spools it, and publishes the spool in order over
the fleet channel (rate-limited backfill after an outage).

``TelemetryHub`` is also what the local API reads for ``/metrics`` and ``/edged/v1/telemetry``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edged._compat import TIMEOUT_ERRORS, TaskGroup
from edged.config import TelemetryConfig
from edged.errors import EdgedError, SpoolError, SpoolRecordTooLargeError, TransportError
from edged.telemetry.energy import EnergyAttributor, EnergyStats, Interpolation
from edged.telemetry.metrics import MetricsRegistry, ModelKey, ModelMetrics
from edged.telemetry.power import (
    PowerMonitor,
    PowerReading,
    average_readings,
    discover_power_sources,
)
from edged.telemetry.ratelimit import TokenBucket
from edged.telemetry.record import build_record
from edged.telemetry.spool import Spool, summarise_records
from edged.telemetry.system import SystemSampler, SystemSnapshot

log = logging.getLogger(__name__)


class TelemetrySink(Protocol):
    """Where records go: the fleet channel. ``publish_telemetry`` returns once the broker has
    acknowledged the message (QoS 1) and raises ``TransportError`` when it could not."""

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self) -> None: ...

    async def publish_telemetry(self, payload: bytes) -> None: ...


class ModelObserver:
    """The scheduler's ``BatchObserver`` for one model: records into ``ModelMetrics`` of the
    version that ran and reports compute windows for energy attribution. Called from the
    model's worker thread; the metrics it records into take no locks."""

    def __init__(self, hub: TelemetryHub, model: str) -> None:
        self._hub = hub
        self._model = model
        self._version: str | None = None
        self._metrics: ModelMetrics | None = None

    def _for(self, version: str) -> ModelMetrics:
        if version != self._version or self._metrics is None:
            self._metrics = self._hub.registry.model(self._model, version)
            self._version = version
        return self._metrics

    def on_batch(
        self, version: str, rows: int, queue_s: list[float], start: float, end: float
    ) -> None:
        metrics = self._for(version)
        compute_s = end - start
        for waited in queue_s:
            metrics.observe_request(waited, compute_s, waited + compute_s)
        metrics.observe_batch(rows)
        if self._hub.attributes_energy:
            self._hub.energy.add_compute(ModelKey(self._model, version), start, end, rows)

    def on_outcome(self, outcome: str, count: int = 1) -> None:
        version = self._version
        if version is None:
            return  # nothing has run yet; the counters start with the first version
        metrics = self._for(version)
        if outcome == "rejected":
            metrics.count_rejected(count)
        elif outcome == "timeout":
            metrics.count_timeout(count)
        elif outcome == "error":
            metrics.count_error(count)


QueueDepths = Callable[[], dict[str, tuple[str | None, int]]]  # model -> (serving version, depth)
ServiceRestarts = Callable[[], dict[str, int]]  # side service -> restarts since start


class TelemetryHub:
    def __init__(
        self,
        config: TelemetryConfig,
        state_dir: Path,
        device_id: str | None = None,
    ) -> None:
        self.config = config
        self.device_id = device_id or socket.gethostname()
        self.registry = MetricsRegistry()
        self.power: PowerMonitor = discover_power_sources(
            config.sysfs_root, total_rails=config.total_rails
        )
        interpolation = (
            Interpolation.INTERVAL_AVERAGE
            if self._total_is_interval_average()
            else Interpolation.LINEAR
        )
        self.energy = EnergyAttributor(interpolation=interpolation)
        # Only the record loop drains the attributor: without it, or without a power sensor,
        # compute windows would pile up unread.
        self.attributes_energy = config.enabled and self.power.available
        self.system = SystemSampler(sysfs_root=config.sysfs_root)
        self.spool_dir = state_dir / "telemetry"
        self.spool: Spool | None = None
        self.sink: TelemetrySink | None = None
        self.queue_depths: QueueDepths = dict
        self.service_restarts: ServiceRestarts = dict
        # Counted on the event loop, copied by /metrics (dict() runs no Python code).
        self.swaps: dict[tuple[str, str, str], int] = {}  # (model, version, ok|failed)
        self.probation_verdicts: dict[tuple[str, str, str], int] = {}  # (model, version, decision)
        self.latest_record: dict[str, Any] | None = None
        self.latest_power: PowerReading | None = None
        self.latest_system: SystemSnapshot | None = None
        self.energy_totals: dict[ModelKey, EnergyStats] = {}
        self.published = 0
        self._readings: deque[PowerReading] = deque(maxlen=10_000)
        self._new_record = asyncio.Event()
        self._unwritten: dict[str, Any] | None = None  # gap for records a full disk refused
        self._spool_lock = threading.Lock()

    def _total_is_interval_average(self) -> bool:
        if not self.power.available:
            return False
        try:
            return self.power.read().total_interval_average
        except (OSError, EdgedError):
            return False

    def energy_per_inference_j(self, model: str, version: str) -> float | None:
        """Joules per inference of one version since it served (the probation's energy gate);
        None without a power source or before any of its requests was attributed."""
        if not self.attributes_energy:
            return None
        stats = self.energy_totals.get(ModelKey(model, version))
        mj = stats.mj_per_inference if stats is not None else None
        return mj / 1000.0 if mj is not None else None

    def observer(self, model: str) -> ModelObserver:
        return ModelObserver(self, model)

    def count_swap(self, model: str, version: str, ok: bool) -> None:
        """A switch to ``version`` (a first load included) that worked, or failed."""
        key = (model, version, "ok" if ok else "failed")
        self.swaps[key] = self.swaps.get(key, 0) + 1

    def count_probation_verdict(self, model: str, version: str, decision: str) -> None:
        """How the probation of ``version`` ended: promoted, reverted, superseded or stopped."""
        key = (model, version, decision)
        self.probation_verdicts[key] = self.probation_verdicts.get(key, 0) + 1

    # --- loops ----------------------------------------------------------------------------

    async def run(self) -> None:
        self.spool = await asyncio.to_thread(
            Spool, self.spool_dir, max_bytes=self.config.spool_max_bytes
        )
        log.info(
            "telemetry every %.1fs, power: %s, spool %s (%d pending)",
            self.config.interval_s,
            ", ".join(source.name for source in self.power.sources) or "no sensor found",
            self.spool_dir,
            self.spool.pending,
        )
        try:
            async with TaskGroup() as tg:
                tg.create_task(self._sample_loop(), name="telemetry-sample")
                tg.create_task(self._record_loop(), name="telemetry-record")
                if self.sink is not None:
                    tg.create_task(self._publish_loop(self.sink), name="telemetry-publish")
        finally:
            self.spool.close()

    async def _sample_loop(self) -> None:
        period = min(self.config.power_sample_s, self.config.interval_s)
        while True:
            if self.power.available:
                try:
                    reading = await asyncio.to_thread(self.power.read)
                except (OSError, EdgedError) as exc:
                    log.warning("power read failed: %s", exc)
                else:
                    self.latest_power = reading
                    self._readings.append(reading)
                    if reading.total_watts is not None:
                        self.energy.add_power_sample(reading.t, reading.total_watts)
            await asyncio.sleep(period)

    async def _record_loop(self) -> None:
        await asyncio.to_thread(self.system.sample)  # primes the CPU-busy baseline
        while True:
            await asyncio.sleep(self.config.interval_s)
            await self._record_once()

    async def _record_once(self) -> None:
        # What the event loop changes (queue depths, the power readings) is taken here, on the
        # loop; only the building and the disk write run in a thread.
        depths = self.queue_depths()
        readings = list(self._readings)
        self._readings.clear()
        record = await asyncio.to_thread(self.build_record, depths, readings)
        seq = await asyncio.to_thread(self._spool_record, record)
        if seq is not None:
            record["seq"] = seq
            self._new_record.set()
        self.latest_record = record

    async def flush(self, timeout_s: float) -> None:
        """Shutdown: spool one last record covering the interval so far (bounded wait)."""
        if self.spool is None:
            return
        try:
            await asyncio.wait_for(self._record_once(), max(timeout_s, 0.001))
        except TIMEOUT_ERRORS:
            log.warning("telemetry: the last record was not spooled within %.1fs", timeout_s)
        except EdgedError as exc:
            log.warning("telemetry: the last record was not spooled: %s", exc)

    def _spool_record(self, record: dict[str, Any]) -> int | None:
        """Append to the spool (worker thread). A spool that cannot be written (a full or
        read-only disk) pauses: records are folded into one gap marker, which is written
        first once the spool accepts writes again. Telemetry never stops serving."""
        assert self.spool is not None
        with self._spool_lock:  # the shutdown flush may run beside the record loop
            return self._spool_record_locked(record)

    def _spool_record_locked(self, record: dict[str, Any]) -> int | None:
        assert self.spool is not None
        try:
            if self._unwritten is not None:
                self.spool.append(self._unwritten)
                log.info(
                    "telemetry spool writable again; %d record(s) were summarised into a gap",
                    self._unwritten["dropped"],
                )
                self._unwritten = None
            return self.spool.append(record)
        except SpoolRecordTooLargeError:
            raise
        except SpoolError as exc:
            if self._unwritten is None:
                log.error("telemetry spool paused: %s", exc)
            folded = [record] if self._unwritten is None else [self._unwritten, record]
            self._unwritten = {
                "v": 1,
                "type": "gap",
                "ts": record.get("ts"),
                "reason": "spool-unwritable",
                **summarise_records(folded),
            }
            return None

    def build_record(
        self,
        depths: dict[str, tuple[str | None, int]],
        readings: list[PowerReading],
    ) -> dict[str, Any]:
        for name, (version, depth) in depths.items():
            if version is not None:
                self.registry.model(name, version).set_queue_depth(depth)
        energy = self.energy.take()
        for key, stats in energy.items():
            total = self.energy_totals.get(key, EnergyStats())
            self.energy_totals[key] = EnergyStats(
                total.energy_j + stats.energy_j,
                total.requests + stats.requests,
                total.batches + stats.batches,
                total.unattributed_requests + stats.unattributed_requests,
            )
        self.latest_system = self.system.sample()
        record = build_record(
            ts=time.time(),
            device=self.device_id,
            models=self.registry.interval(),
            energy=energy,
            system=self.latest_system,
            power=average_readings(readings),
        )
        serving = {name: version for name, (version, _) in depths.items()}
        for key in self.registry.keys():  # noqa: SIM118 - a method, not a dict
            if serving.get(key.model) != key.version:
                self.registry.retire(key.model, key.version)  # reported its last interval
        return record

    async def _publish_loop(self, sink: TelemetrySink) -> None:
        """Publish spooled records strictly in order; one at a time, acknowledged by the broker
        before the spool forgets it. A backlog drains at ``backfill_per_s``."""
        assert self.spool is not None
        spool = self.spool
        bucket = TokenBucket(self.config.backfill_per_s, burst=max(1.0, self.config.backfill_per_s))
        while True:
            await sink.wait_connected()
            pending = await asyncio.to_thread(spool.peek, 32)
            if not pending:
                self._new_record.clear()
                await self._new_record.wait()
                continue
            backlog = len(pending) > 1
            for record in pending:
                if backlog:
                    await bucket.take(1)
                payload = json.dumps(record, separators=(",", ":")).encode()
                try:
                    await sink.publish_telemetry(payload)
                except TransportError as exc:
                    log.info("telemetry publish deferred (seq %s): %s", record.get("seq"), exc)
                    await asyncio.sleep(1.0)
                    break
                await asyncio.to_thread(spool.ack, int(record["seq"]))
                self.published += 1

    # --- local API ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What ``edged top`` shows: the latest record plus live power and spool state."""
        spool = self.spool
        return {
            "record": self.latest_record,
            "power_available": self.power.available,
            "power_total_w": self.latest_power.total_watts if self.latest_power else None,
            "spool": {
                "pending": spool.pending if spool else None,
                "bytes": spool.size_bytes if spool else None,
                "max_bytes": self.config.spool_max_bytes,
            },
            "published": self.published,
            "interval_s": self.config.interval_s,
        }
