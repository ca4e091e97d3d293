"""Telemetry: latency histograms, power and system sampling, energy per inference, and a
crash-safe spool of records for the publisher. See docs/telemetry.md.

Nothing here blocks the inference path: recording is lock-free, and everything that reads
sysfs or disk is meant to run in a thread owned by the telemetry loop.
"""

from edged.telemetry.energy import EnergyAttributor, EnergyStats, Interpolation
from edged.telemetry.histogram import LATENCY_LAYOUT, Histogram, HistogramLayout, HistogramSnapshot
from edged.telemetry.metrics import Counters, MetricsRegistry, ModelKey, ModelMetrics, ModelSnapshot
from edged.telemetry.power import (
    PowerMonitor,
    PowerReading,
    average_readings,
    discover_power_sources,
)
from edged.telemetry.powersources import PowerSource, TotalClaim
from edged.telemetry.ratelimit import TokenBucket
from edged.telemetry.record import SCHEMA_VERSION, build_record
from edged.telemetry.spool import Spool
from edged.telemetry.system import SystemSampler, SystemSnapshot, ThrottleState

__all__ = [
    "LATENCY_LAYOUT",
    "SCHEMA_VERSION",
    "Counters",
    "EnergyAttributor",
    "EnergyStats",
    "Histogram",
    "HistogramLayout",
    "HistogramSnapshot",
    "Interpolation",
    "MetricsRegistry",
    "ModelKey",
    "ModelMetrics",
    "ModelSnapshot",
    "PowerMonitor",
    "PowerReading",
    "PowerSource",
    "Spool",
    "SystemSampler",
    "SystemSnapshot",
    "ThrottleState",
    "TokenBucket",
    "TotalClaim",
    "average_readings",
    "build_record",
    "discover_power_sources",
]
