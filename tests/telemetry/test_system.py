"""System metrics: CPU arithmetic, temperatures, throttling fixtures, and a real psutil sample."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from edged.telemetry.system import (
    SystemSampler,
    ThrottleState,
    cpu_busy_percent,
    read_throttle,
    temperatures_from,
)

from .sysfs_trees import Tree

Sysfs = Callable[[Tree], Path]


class Temp(NamedTuple):
    label: str
    current: float | None
    high: float | None = None
    critical: float | None = None


def test_cpu_busy_percent_counts_iowait_as_idle_and_guest_once() -> None:
    before = {"user": 10.0, "system": 5.0, "idle": 80.0, "iowait": 5.0, "guest": 2.0}
    after = {"user": 30.0, "system": 10.0, "idle": 95.0, "iowait": 15.0, "guest": 12.0}
    # total Δ = 20 + 5 + 15 + 10 = 50 (guest is inside user); idle Δ = 25
    assert cpu_busy_percent(before, after) == pytest.approx(50.0)


def test_cpu_busy_percent_is_none_when_no_time_passed() -> None:
    times = {"user": 1.0, "idle": 1.0}
    assert cpu_busy_percent(times, times) is None


def test_temperatures_are_named_by_chip_and_label_and_sentinels_dropped() -> None:
    sensors = {
        "cpu_thermal": [Temp("", 52.1)],
        "coretemp": [Temp("Package id 0", 61.0), Temp("Core 0", 58.0), Temp("", 57.0)],
        "cv0-thermal": [Temp("", -256.0)],  # Jetson: engine powered off
        "iwlwifi_1": [Temp("", None)],
    }
    assert temperatures_from(sensors) == {
        "cpu_thermal": 52.1,
        "coretemp/Package id 0": 61.0,
        "coretemp/Core 0": 58.0,
        "coretemp/2": 57.0,
    }


def test_no_temperature_sensors_means_no_temperatures() -> None:
    assert temperatures_from({}) == {}


def test_missing_sensors_api_reports_no_temperatures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(psutil, "sensors_temperatures", raising=False)
    assert SystemSampler().sample().temperatures_c == {}


def test_raspberry_pi_firmware_throttle_bits(sysfs: Sysfs) -> None:
    path = "devices/platform/soc/soc:firmware/get_throttled"
    assert read_throttle(sysfs({path: "50005"})) == ThrottleState(
        throttled=True, under_voltage=True, events=None
    )
    assert read_throttle(sysfs({path: "50000"})) == ThrottleState(
        throttled=False, under_voltage=False, events=None
    )


def test_x86_thermal_throttle_counters_are_summed(sysfs: Sysfs) -> None:
    tree = {
        f"devices/system/cpu/cpu{n}/thermal_throttle/core_throttle_count": str(n * 3)
        for n in range(4)
    }
    tree["devices/system/cpu/cpufreq/policy0/scaling_cur_freq"] = "1800000"
    assert read_throttle(sysfs(tree)) == ThrottleState(events=18)


def test_no_throttle_information_is_none(sysfs: Sysfs) -> None:
    assert read_throttle(sysfs({"devices/system/cpu/online": "0-3"})) == ThrottleState()


def test_real_sample_has_sane_values(tmp_path: Path) -> None:
    sampler = SystemSampler(sysfs_root=tmp_path)
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        sum(range(10_000))  # burn some CPU so the interval is non-empty
    snap = sampler.sample()
    assert snap.cpu_percent is not None
    assert 0.0 <= snap.cpu_percent <= 100.0
    assert len(snap.cpu_percent_per_core) == len(psutil.cpu_times(percpu=True))
    assert all(0.0 <= p <= 100.0 for p in snap.cpu_percent_per_core)
    assert snap.memory_total_bytes is not None and snap.memory_total_bytes > 0
    assert snap.memory_available_bytes is not None
    assert 0 < snap.memory_available_bytes <= snap.memory_total_bytes
    assert snap.process_rss_bytes is not None and snap.process_rss_bytes > 1_000_000
    assert snap.throttle == ThrottleState()  # the empty sysfs root exposes nothing
