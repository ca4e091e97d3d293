"""Prometheus ``GET /metrics``: the telemetry hub and the model manager in the text exposition
format, rendered on demand from cumulative snapshots (nothing is kept between scrapes).

Names follow Prometheus conventions: base units (seconds, bytes, joules, watts, ratios),
``_total`` counters, and the HDR microsecond histograms re-bucketed into fixed ``le`` bounds
in seconds. A value edged does not know (no power sensor, no board total, no sample yet) is
left out rather than reported as 0. See docs/telemetry.md.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from edged.telemetry.energy import EnergyStats
from edged.telemetry.histogram import LATENCY_LAYOUT, HistogramLayout, HistogramSnapshot
from edged.telemetry.hub import TelemetryHub
from edged.telemetry.metrics import BATCH_LAYOUT, Counters, ModelKey, ModelSnapshot
from edged.telemetry.power import PowerReading
from edged.telemetry.system import SystemSnapshot

__all__ = [
    "BATCH_BOUNDS",
    "CONTENT_TYPE",
    "LATENCY_BOUNDS_S",
    "PROBATION_DECISIONS",
    "SWAP_RESULTS",
    "MetricsInputs",
    "ModelStatusSource",
    "cumulative_buckets",
    "gather",
    "metric_families",
    "render_metrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""``generate_latest`` writes the classic text format; every Prometheus version reads it."""

LATENCY_BOUNDS_S = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""``le`` bounds of the latency histograms, 100 µs to 10 s (+Inf is added)."""

BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""``le`` bounds of the batch-size histogram, in rows (+Inf is added)."""

_MODEL_LABELS = ("model", "version")
SWAP_RESULTS = ("ok", "failed")
PROBATION_DECISIONS = ("promoted", "reverted", "superseded", "stopped")
"""How a probation ends (``edged.serve.watch.ProbationOutcome.decision``)."""


class ModelStatusSource(Protocol):
    """What the exporter needs from ``ModelManager``."""

    def status(self) -> dict[str, Any]: ...

    def queue_depths(self) -> dict[str, tuple[str | None, int]]: ...


@dataclass(frozen=True)
class StatusSnapshot:
    """A ``ModelStatusSource`` copied on the event loop, so that a scrape rendered in a thread
    never iterates the manager's live state while a swap changes it."""

    models_status: dict[str, Any]
    depths: dict[str, tuple[str | None, int]]

    @classmethod
    def of(cls, source: ModelStatusSource) -> StatusSnapshot:
        return cls(source.status(), source.queue_depths())

    def status(self) -> dict[str, Any]:
        return self.models_status

    def queue_depths(self) -> dict[str, tuple[str | None, int]]:
        return self.depths


@dataclass(frozen=True)
class MetricsInputs:
    """Everything one scrape reports, gathered first so that rendering is a pure function."""

    models: Sequence[ModelSnapshot] = ()
    """Cumulative snapshots (``MetricsRegistry.cumulative()``)."""
    serving: Sequence[tuple[str, str, str | None]] = ()
    """``(model, version, runtime description)`` of every model that is serving."""
    queue_depths: Mapping[str, int] = field(default_factory=dict)
    energy: Mapping[ModelKey, EnergyStats] = field(default_factory=dict)
    """Cumulative energy attributed per model version."""
    power_available: bool = False
    power: PowerReading | None = None
    system: SystemSnapshot | None = None
    spool_pending: int | None = None
    spool_bytes: int | None = None
    published: int = 0
    swaps: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    """``(model, version, ok|failed)`` → swaps to that version since start."""
    probation_verdicts: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    """``(model, version, decision)`` → probations of that version that ended so."""
    service_restarts: Mapping[str, int] = field(default_factory=dict)
    """Side service → restarts since start."""


@functools.lru_cache(maxsize=16)
def _bound_of_slot(
    layout: HistogramLayout, bounds: tuple[float, ...], scale: float
) -> tuple[int, ...]:
    """For each counts slot of ``layout``: the index of the first bound its highest value is
    within (``len(bounds)`` for none, i.e. only ``+Inf``)."""
    out = []
    for slot in range(layout.counts_len):
        highest = layout.highest_value_at(slot) * scale
        out.append(bisect.bisect_left(bounds, highest * (1 - 1e-12)))
    return tuple(out)


def cumulative_buckets(
    histogram: HistogramSnapshot, bounds: Sequence[float], scale: float = 1.0
) -> list[tuple[str, float]]:
    """Prometheus ``le`` buckets (cumulative, ending with ``+Inf``) of an HDR histogram.

    ``bounds`` ascending; ``scale`` converts a recorded value into their unit (1e-6 for
    microseconds to seconds). An HDR bucket counts toward a bound only when its highest value
    is within it, so a bound never claims a request was faster than it was; an HDR bucket is
    less than 1 % wide, which bounds how much later it may be counted.
    """
    bounds = tuple(bounds)
    slot_bound = _bound_of_slot(histogram.layout, bounds, scale)
    per_bound = [0] * (len(bounds) + 1)
    for count, bound_index in zip(histogram.counts, slot_bound, strict=True):
        if count:
            per_bound[bound_index] += count
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, per_bound, strict=False):
        running += count
        out.append((repr(float(bound)), float(running)))
    out.append(("+Inf", float(running + per_bound[-1])))
    return out


def _empty_snapshot(model: str, version: str) -> ModelSnapshot:
    latency = HistogramSnapshot.empty(LATENCY_LAYOUT)
    return ModelSnapshot(
        key=ModelKey(model, version),
        counters=Counters(),
        queue_us=latency,
        compute_us=latency,
        e2e_us=latency,
        batch_sizes=HistogramSnapshot.empty(BATCH_LAYOUT),
        queue_depth=0,
        duration_s=0.0,
    )


def _with_serving(
    models: Sequence[ModelSnapshot], serving: Iterable[tuple[str, str, str | None]]
) -> list[ModelSnapshot]:
    """The snapshots plus zeroed ones for serving versions that have not run a request yet,
    so their series exist (at 0) from the first scrape on."""
    out = list(models)
    seen = {snapshot.key for snapshot in out}
    for model, version, _ in serving:
        if ModelKey(model, version) not in seen:
            out.append(_empty_snapshot(model, version))
    return out


def _model_families(models: Sequence[ModelSnapshot]) -> Iterator[Metric]:
    counters = (
        ("requests", "Requests that completed successfully.", "requests"),
        ("errors", "Requests that failed in the runtime.", "errors"),
        ("rejected", "Requests refused at admission (queue full, not ready).", "rejected"),
        ("timeouts", "Requests whose deadline passed before they ran.", "timeouts"),
    )
    for name, doc, attribute in counters:
        family = CounterMetricFamily(f"edged_inference_{name}", doc, labels=_MODEL_LABELS)
        for snapshot in models:
            family.add_metric(list(snapshot.key), getattr(snapshot.counters, attribute))
        yield family

    latencies = (
        ("queue", "Time requests waited in the queue before their batch ran.", "queue_us"),
        ("compute", "Runtime time of the batch each request ran in.", "compute_us"),
        ("request", "Queue plus compute time of each successful request.", "e2e_us"),
    )
    for name, doc, attribute in latencies:
        histogram = HistogramMetricFamily(
            f"edged_inference_{name}_seconds", doc, labels=_MODEL_LABELS
        )
        for snapshot in models:
            hdr: HistogramSnapshot = getattr(snapshot, attribute)
            histogram.add_metric(
                list(snapshot.key),
                cumulative_buckets(hdr, LATENCY_BOUNDS_S, scale=1e-6),
                sum_value=hdr.total / 1e6,
            )
        yield histogram

    batches = HistogramMetricFamily(
        "edged_inference_batch_size",
        "Rows (samples) in each batch the runtime ran.",
        labels=_MODEL_LABELS,
    )
    for snapshot in models:
        batches.add_metric(
            list(snapshot.key),
            cumulative_buckets(snapshot.batch_sizes, BATCH_BOUNDS),
            sum_value=float(snapshot.batch_sizes.total),
        )
    yield batches


def _serving_families(inputs: MetricsInputs) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "edged_model_info",
        "The model versions being served, with their runtime (always 1).",
        labels=("model", "version", "runtime"),
    )
    for model, version, runtime in inputs.serving:
        info.add_metric([model, version, runtime or ""], 1)
    yield info

    depth = GaugeMetricFamily(
        "edged_queue_depth", "Requests waiting in the model's queue.", labels=("model",)
    )
    for model, waiting in sorted(inputs.queue_depths.items()):
        depth.add_metric([model], waiting)
    yield depth


def _zeroed(
    counts: Mapping[tuple[str, str, str], int],
    serving: Iterable[tuple[str, str, str | None]],
    outcomes: Sequence[str],
) -> list[tuple[tuple[str, str, str], int]]:
    """``counts`` plus a 0 for each outcome of every serving version not counted yet, so a
    dashboard's ``increase()`` has a series from the first scrape on."""
    out = dict(counts)
    for model, version, _ in serving:
        for outcome in outcomes:
            out.setdefault((model, version, outcome), 0)
    return sorted(out.items())


def _event_families(inputs: MetricsInputs) -> Iterator[Metric]:
    swaps = CounterMetricFamily(
        "edged_model_swaps",
        "Switches to a model version (first loads included), by result: ok, or failed (the "
        "version in service stayed).",
        labels=(*_MODEL_LABELS, "result"),
    )
    for labels, count in _zeroed(inputs.swaps, inputs.serving, SWAP_RESULTS):
        swaps.add_metric(list(labels), count)
    yield swaps
    verdicts = CounterMetricFamily(
        "edged_probation_verdicts",
        "Probations that ended, by the version judged and the decision: promoted, reverted, "
        "superseded (a newer version came) or stopped (shutdown).",
        labels=(*_MODEL_LABELS, "decision"),
    )
    for labels, count in _zeroed(inputs.probation_verdicts, inputs.serving, PROBATION_DECISIONS):
        verdicts.add_metric(list(labels), count)
    yield verdicts
    restarts = CounterMetricFamily(
        "edged_service_restarts",
        "Restarts of each supervised side service (telemetry, fleet, reload, watchdog) after a "
        "failure; inference keeps serving through them.",
        labels=("service",),
    )
    for service, count in sorted(inputs.service_restarts.items()):
        restarts.add_metric([service], count)
    yield restarts


def _energy_families(energy: Mapping[ModelKey, EnergyStats]) -> Iterator[Metric]:
    measured = [(key, stats) for key, stats in energy.items() if stats.requests > 0]
    joules = CounterMetricFamily(
        "edged_energy_joules",
        "Board energy attributed to the model version's requests (docs/telemetry.md).",
        labels=_MODEL_LABELS,
    )
    attributed = CounterMetricFamily(
        "edged_energy_attributed_requests",
        "Requests whose energy was measured; joules / these = energy per inference.",
        labels=_MODEL_LABELS,
    )
    for key, stats in measured:
        joules.add_metric(list(key), stats.energy_j)
        attributed.add_metric(list(key), stats.requests)
    yield joules
    yield attributed


def _power_families(available: bool, power: PowerReading | None) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "edged_power_sensors_available",
        "1 when edged found a power sensor, 0 when power is not measured on this device.",
        value=1 if available else 0,
    )
    rails = GaugeMetricFamily("edged_power_watts", "Power of each rail read.", labels=("rail",))
    if power is not None:
        for rail, watts in sorted(power.rails.items()):
            rails.add_metric([rail], watts)
    yield rails
    if power is not None and power.total_watts is not None:
        board = GaugeMetricFamily(
            "edged_board_power_watts",
            "Board (or module, platform...) input power as measured by one sensor; absent "
            "when no sensor measures a total.",
            labels=("source", "scope"),
        )
        board.add_metric([power.total_source or "", power.total_scope or ""], power.total_watts)
        yield board


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=value)


def _system_families(system: SystemSnapshot | None) -> Iterator[Metric]:
    if system is None:
        return
    cpu = None if system.cpu_percent is None else system.cpu_percent / 100.0
    yield from _gauge(
        "edged_cpu_utilization_ratio", "Busy share of all CPUs over the last interval.", cpu
    )
    if system.cpu_percent_per_core:
        cores = GaugeMetricFamily(
            "edged_cpu_core_utilization_ratio",
            "Busy share of each CPU over the last interval.",
            labels=("core",),
        )
        for index, percent in enumerate(system.cpu_percent_per_core):
            cores.add_metric([str(index)], percent / 100.0)
        yield cores
    freq = None if system.cpu_freq_mhz is None else system.cpu_freq_mhz * 1e6
    yield from _gauge("edged_cpu_frequency_hertz", "Current CPU frequency.", freq)
    freq_max = None if system.cpu_freq_max_mhz is None else system.cpu_freq_max_mhz * 1e6
    yield from _gauge("edged_cpu_frequency_max_hertz", "Maximum CPU frequency.", freq_max)
    yield from _gauge(
        "edged_memory_total_bytes", "Physical memory of the device.", system.memory_total_bytes
    )
    yield from _gauge(
        "edged_memory_available_bytes",
        "Memory available to new processes without swapping.",
        system.memory_available_bytes,
    )
    yield from _gauge(
        "edged_process_resident_memory_bytes",
        "Resident memory of the edged process.",
        system.process_rss_bytes,
    )
    temperatures = GaugeMetricFamily(
        "edged_temperature_celsius", "Temperature of each sensor.", labels=("sensor",)
    )
    for sensor, celsius in sorted(system.temperatures_c.items()):
        temperatures.add_metric([sensor], celsius)
    yield temperatures
    throttle = system.throttle
    for name, doc, flag in (
        ("edged_throttled", "1 while the firmware holds clocks down.", throttle.throttled),
        ("edged_under_voltage", "1 while the supply is below spec.", throttle.under_voltage),
    ):
        yield from _gauge(name, doc, None if flag is None else float(flag))
    if throttle.events is not None:
        yield CounterMetricFamily(
            "edged_cpu_throttle_events",
            "Thermal throttling events across CPUs.",
            value=throttle.events,
        )


def _spool_families(inputs: MetricsInputs) -> Iterator[Metric]:
    yield from _gauge(
        "edged_telemetry_spool_pending_records",
        "Telemetry records spooled and not yet acknowledged by the broker.",
        inputs.spool_pending,
    )
    yield from _gauge(
        "edged_telemetry_spool_bytes", "Size of the telemetry spool on disk.", inputs.spool_bytes
    )
    yield CounterMetricFamily(
        "edged_telemetry_published",
        "Telemetry records the broker acknowledged since start.",
        value=inputs.published,
    )


def metric_families(inputs: MetricsInputs) -> list[Metric]:
    """The metric families of one scrape; pure."""
    models = _with_serving(inputs.models, inputs.serving)
    return [
        *_model_families(models),
        *_serving_families(inputs),
        *_event_families(inputs),
        *_energy_families(inputs.energy),
        *_power_families(inputs.power_available, inputs.power),
        *_system_families(inputs.system),
        *_spool_families(inputs),
    ]


class _Snapshot:
    """A collector that yields families computed beforehand."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def gather(hub: TelemetryHub, manager: ModelStatusSource) -> MetricsInputs:
    """Read the hub and the manager once."""
    status = manager.status()
    serving = [
        (m["name"], m["version"], m.get("runtime"))
        for m in status.get("models", [])
        if m.get("version") is not None
    ]
    spool = hub.spool
    return MetricsInputs(
        models=hub.registry.cumulative(),
        serving=serving,
        queue_depths={name: depth for name, (_, depth) in manager.queue_depths().items()},
        # The record thread replaces entries; dict() copies without running Python code.
        energy=dict(hub.energy_totals),
        power_available=hub.power.available,
        power=hub.latest_power,
        system=hub.latest_system,
        spool_pending=spool.pending if spool is not None else None,
        spool_bytes=spool.size_bytes if spool is not None else None,
        published=hub.published,
        swaps=dict(hub.swaps),
        probation_verdicts=dict(hub.probation_verdicts),
        service_restarts=hub.service_restarts(),
    )


def render_metrics(hub: TelemetryHub, manager: ModelStatusSource) -> tuple[bytes, str]:
    """The ``/metrics`` body and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(metric_families(gather(hub, manager))))
    return generate_latest(registry), CONTENT_TYPE
