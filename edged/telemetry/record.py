"""Build the telemetry record (schema version 1, docs/telemetry.md) from snapshots; pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edged.telemetry.energy import EnergyStats
from edged.telemetry.histogram import HistogramSnapshot
from edged.telemetry.metrics import ModelKey, ModelSnapshot
from edged.telemetry.power import PowerReading
from edged.telemetry.system import SystemSnapshot

__all__ = ["SCHEMA_VERSION", "build_record", "latency_ms"]

SCHEMA_VERSION = 1
_PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def latency_ms(histogram_us: HistogramSnapshot) -> dict[str, float | None]:
    """``{p50, p90, p99, p999}`` in milliseconds of a microsecond histogram; None when empty."""
    out: dict[str, float | None] = {}
    for name, percentile in _PERCENTILES:
        value = histogram_us.percentile(percentile)
        out[name] = None if value is None else round(value / 1000.0, 3)
    return out


def _model_entry(snapshot: ModelSnapshot, energy: EnergyStats | None) -> dict[str, Any]:
    counters = snapshot.counters
    return {
        "version": snapshot.key.version,
        "requests": counters.requests,
        "errors": counters.errors,
        "rejected": counters.rejected,
        "timeouts": counters.timeouts,
        "qps": _round(snapshot.qps, 3),
        "latency_ms": {
            "e2e": latency_ms(snapshot.e2e_us),
            "queue": latency_ms(snapshot.queue_us),
            "compute": latency_ms(snapshot.compute_us),
        },
        "batch_sizes": {str(size): count for size, count in snapshot.batch_sizes.buckets()},
        "queue_depth": snapshot.queue_depth,
        "energy_mj_per_inference": _round(energy.mj_per_inference if energy else None, 3),
        "energy_j": _round(energy.energy_j, 6) if energy and energy.requests else None,
    }


def _models(
    snapshots: Sequence[ModelSnapshot], energy: Mapping[ModelKey, EnergyStats]
) -> dict[str, Any]:
    newest: dict[str, ModelKey] = {}
    for snapshot in snapshots:
        newest[snapshot.key.model] = snapshot.key  # registry order: the last one is newest
    entries: dict[str, Any] = {}
    for snapshot in snapshots:
        key = snapshot.key
        name = key.model if newest[key.model] == key else f"{key.model}@{key.version}"
        entries[name] = _model_entry(snapshot, energy.get(key))
    return entries


def _system(system: SystemSnapshot) -> dict[str, Any]:
    return {
        "cpu_percent": _round(system.cpu_percent, 1),
        "cpu_percent_per_core": [round(p, 1) for p in system.cpu_percent_per_core],
        "cpu_freq_mhz": _round(system.cpu_freq_mhz, 0),
        "cpu_freq_max_mhz": _round(system.cpu_freq_max_mhz, 0),
        "mem_total_bytes": system.memory_total_bytes,
        "mem_available_bytes": system.memory_available_bytes,
        "mem_used_percent": _round(system.memory_used_percent, 1),
        "rss_bytes": system.process_rss_bytes,
        "temperatures_c": {k: round(v, 1) for k, v in system.temperatures_c.items()},
        "throttled": system.throttle.throttled,
        "under_voltage": system.throttle.under_voltage,
        "throttle_events": system.throttle.events,
    }


def _power(power: PowerReading | None) -> dict[str, Any]:
    if power is None:
        return {"total_w": None, "source": None, "scope": None, "rails": {}}
    return {
        "total_w": _round(power.total_watts, 3),
        "source": power.total_source,
        "scope": power.total_scope,
        "rails": {rail: round(watts, 3) for rail, watts in power.rails.items()},
    }


def build_record(
    *,
    ts: float,
    device: str,
    models: Sequence[ModelSnapshot],
    energy: Mapping[ModelKey, EnergyStats] | None = None,
    system: SystemSnapshot | None = None,
    power: PowerReading | None = None,
) -> dict[str, Any]:
    """One telemetry record; the spool adds ``seq`` when it is appended.

    ``models`` in registry order (:meth:`MetricsRegistry.interval`): the newest version of a
    model is keyed by its name, older versions still reporting during a hot swap by
    ``name@version``. ``ts`` is wall-clock Unix seconds.
    """
    return {
        "v": SCHEMA_VERSION,
        "type": "telemetry",
        "ts": round(ts, 3),
        "device": device,
        "models": _models(models, energy or {}),
        "system": _system(system) if system is not None else None,
        "power": _power(power),
    }
