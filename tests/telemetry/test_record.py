"""The telemetry record built from snapshots: schema, naming, JSON-safety, spool round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edged.telemetry.energy import EnergyStats
from edged.telemetry.metrics import MetricsRegistry, ModelKey
from edged.telemetry.power import PowerReading
from edged.telemetry.record import SCHEMA_VERSION, build_record
from edged.telemetry.spool import Spool
from edged.telemetry.system import SystemSnapshot, ThrottleState

from .helpers import FakeClock

SYSTEM = SystemSnapshot(
    cpu_percent=37.25,
    cpu_percent_per_core=(50.0, 24.5),
    cpu_freq_mhz=1510.4,
    cpu_freq_max_mhz=1984.0,
    memory_total_bytes=8_000_000_000,
    memory_available_bytes=5_000_000_000,
    memory_used_percent=37.5,
    process_rss_bytes=123_456_789,
    temperatures_c={"cpu-thermal": 48.56},
    throttle=ThrottleState(),
)
POWER = PowerReading(
    t=10.0,
    rails={"VDD_IN": 7.51234, "VDD_SOC": 2.8},
    total_watts=7.51234,
    total_source="VDD_IN (ina3221:1-0040)",
    total_scope="module",
)


def _registry(clock: FakeClock) -> MetricsRegistry:
    registry = MetricsRegistry(clock=clock)
    det = registry.model("detector", "3")
    for i in range(100):
        det.observe_request(queue_s=0.001, compute_s=0.004 + i * 1e-5, e2e_s=0.006 + i * 1e-5)
    for _ in range(25):
        det.observe_batch(4)
    det.count_error()
    det.count_rejected(2)
    det.set_queue_depth(3)
    registry.model("classifier", "1")  # loaded but idle
    clock.advance(10.0)
    return registry


def test_record_follows_the_documented_schema() -> None:
    clock = FakeClock(0.0)
    snapshots = _registry(clock).interval()
    energy = {ModelKey("detector", "3"): EnergyStats(energy_j=3.0, requests=100, batches=25)}
    record = build_record(
        ts=1_700_000_000.123456,
        device="jetson-17",
        models=snapshots,
        energy=energy,
        system=SYSTEM,
        power=POWER,
    )
    assert record["v"] == SCHEMA_VERSION == 1
    assert record["type"] == "telemetry"
    assert record["ts"] == 1_700_000_000.123
    assert record["device"] == "jetson-17"
    det = record["models"]["detector"]
    assert det["version"] == "3"
    assert (det["requests"], det["errors"], det["rejected"], det["timeouts"]) == (100, 1, 2, 0)
    assert det["qps"] == 10.0
    assert set(det["latency_ms"]) == {"e2e", "queue", "compute"}
    assert set(det["latency_ms"]["e2e"]) == {"p50", "p90", "p99", "p999"}
    assert det["latency_ms"]["e2e"]["p50"] == pytest.approx(6.5, rel=0.01)
    assert det["latency_ms"]["e2e"]["p99"] == pytest.approx(6.99, rel=0.01)
    assert det["latency_ms"]["queue"]["p50"] == pytest.approx(1.0, rel=0.01)
    assert det["batch_sizes"] == {"4": 25}
    assert det["queue_depth"] == 3
    assert det["energy_mj_per_inference"] == 30.0
    assert det["energy_j"] == 3.0

    idle = record["models"]["classifier"]
    assert idle["requests"] == 0
    assert idle["qps"] == 0.0
    assert idle["latency_ms"]["e2e"] == {"p50": None, "p90": None, "p99": None, "p999": None}
    assert idle["energy_mj_per_inference"] is None

    assert record["power"] == {
        "total_w": 7.512,
        "source": "VDD_IN (ina3221:1-0040)",
        "scope": "module",
        "rails": {"VDD_IN": 7.512, "VDD_SOC": 2.8},
    }
    system = record["system"]
    assert system["cpu_percent"] == 37.2
    assert system["temperatures_c"] == {"cpu-thermal": 48.6}
    assert system["rss_bytes"] == 123_456_789
    assert system["throttled"] is None
    # strict JSON: no NaN or infinity can sneak in
    assert json.loads(json.dumps(record, allow_nan=False)) == record


def test_missing_power_and_system_are_explicit_nulls() -> None:
    record = build_record(ts=1.0, device="pi", models=[])
    assert record["models"] == {}
    assert record["system"] is None
    assert record["power"] == {"total_w": None, "source": None, "scope": None, "rails": {}}


def test_hot_swap_keys_the_newest_version_by_name_and_older_by_name_at_version() -> None:
    clock = FakeClock(0.0)
    registry = MetricsRegistry(clock=clock)
    registry.model("detector", "3").observe_request(0.001, 0.002, 0.003)
    registry.model("detector", "4").observe_request(0.001, 0.002, 0.003)
    registry.retire("detector", "3")
    clock.advance(1.0)
    record = build_record(ts=1.0, device="d", models=registry.interval())
    assert record["models"]["detector"]["version"] == "4"
    assert record["models"]["detector@3"]["version"] == "3"


def test_record_round_trips_through_the_spool(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    record = build_record(
        ts=5.0, device="d", models=_registry(clock).interval(), system=SYSTEM, power=POWER
    )
    with Spool(tmp_path / "spool") as spool:
        seq = spool.append(record)
        [stored] = spool.peek(1)
    assert stored == {"seq": seq, **record}
