"""Power source discovery and reading over sysfs fixture trees copied from real devices."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from edged.errors import PowerSourceError
from edged.telemetry import power as power_module
from edged.telemetry.power import (
    PowerMonitor,
    PowerReading,
    average_readings,
    discover_power_sources,
)
from edged.telemetry.powersources import TotalClaim

from .helpers import FakeClock
from .sysfs_trees import (
    AGX_ORIN,
    EMPTY,
    ENERGY_HWMON,
    INTEL_LAPTOP,
    NANO_JP4,
    ORIN_NANO,
    RASPBERRY_PI_LIKE,
    SERVER,
    THOR,
    TX2_JP4,
    Tree,
)

Sysfs = Callable[[Tree], Path]


def test_orin_nano_reads_rails_skips_shunt_sum_and_takes_vdd_in_as_total(sysfs: Sysfs) -> None:
    monitor = discover_power_sources(sysfs(ORIN_NANO))
    # class/hwmon/hwmon1 links to the same INA3221: found once
    assert [s.name for s in monitor.sources] == ["ina3221:1-0040"]
    reading = monitor.read()
    assert reading.rails == pytest.approx({"VDD_IN": 7.5, "VDD_CPU_GPU_CV": 2.0, "VDD_SOC": 2.8})
    assert reading.total_watts == pytest.approx(7.5)
    assert reading.total_source == "VDD_IN (ina3221:1-0040)"
    assert reading.total_scope == "module"
    assert reading.total_interval_average is False


def test_agx_orin_skips_nc_and_ucsi_and_reports_no_total_rather_than_a_sum(sysfs: Sysfs) -> None:
    reading = discover_power_sources(sysfs(AGX_ORIN)).read()
    assert reading.rails == pytest.approx(
        {"VDD_GPU_SOC": 6.0, "VDD_CPU_CV": 3.0, "VIN_SYS_5V0": 4.0, "VDDQ_VDD2_1V8AO": 1.0}
    )
    assert reading.total_watts is None
    assert reading.total_source is None


def test_configured_total_rails_override_the_automatic_choice(sysfs: Sysfs) -> None:
    rails = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO")
    reading = discover_power_sources(sysfs(AGX_ORIN), total_rails=rails).read()
    assert reading.total_watts == pytest.approx(14.0)
    assert reading.total_scope == "configured"
    assert reading.total_source == "VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO (configured)"


def test_unknown_configured_total_rail_is_an_error_naming_the_choices(sysfs: Sysfs) -> None:
    with pytest.raises(PowerSourceError, match=r"VDD_NOPE.*available rails: VDDQ_VDD2_1V8AO"):
        discover_power_sources(sysfs(AGX_ORIN), total_rails=("VDD_NOPE",))


def test_nano_jetpack4_iio_layout_uses_milliwatt_power_files(sysfs: Sysfs) -> None:
    monitor = discover_power_sources(sysfs(NANO_JP4))
    assert [s.name for s in monitor.sources] == ["ina3221x:6-0040"]
    reading = monitor.read()
    assert reading.rails == pytest.approx({"POM_5V_IN": 4.0, "POM_5V_GPU": 0.6, "POM_5V_CPU": 1.5})
    assert reading.total_watts == pytest.approx(4.0)
    assert reading.total_source == "POM_5V_IN (ina3221x:6-0040)"


def test_tx2_finds_vdd_in_on_the_second_monitor_and_derives_missing_power(sysfs: Sysfs) -> None:
    reading = discover_power_sources(sysfs(TX2_JP4)).read()
    assert reading.rails["VDD_SYS_DDR"] == pytest.approx(19.0 * 0.030)  # from V × I
    assert reading.rails["VDD_SYS_GPU"] == pytest.approx(1.9)
    assert len(reading.rails) == 6
    assert reading.total_watts == pytest.approx(4.75)
    assert reading.total_source == "VDD_IN (ina3221x:0-0041)"


def test_thor_ina238_on_vin_is_the_board_total(sysfs: Sysfs) -> None:
    reading = discover_power_sources(sysfs(THOR)).read()
    assert reading.rails == pytest.approx({"VIN": 60.45, "VDD_GPU": 20.0, "VDD_CPU_SOC_MSS": 10.0})
    assert reading.total_watts == pytest.approx(60.45)
    assert reading.total_scope == "board"
    assert reading.total_source == "VIN (ina238:2-0044)"


def test_labelled_ina238_on_vin_is_the_total_on_any_board(sysfs: Sysfs) -> None:
    tree = {k: v for k, v in THOR.items() if "compatible" not in k}
    tree["bus/i2c/devices/2-0044/hwmon/hwmon4/label"] = "VIN"
    del tree["bus/i2c/devices/2-0044/hwmon/hwmon4/power1_input"]
    reading = discover_power_sources(sysfs(tree)).read()
    assert reading.total_watts == pytest.approx(19.5 * 3.1)  # from in1 × curr1
    assert reading.total_source == "VIN (ina238:2-0044)"


def test_unlabelled_ina238_elsewhere_is_a_rail_but_not_a_total(sysfs: Sysfs) -> None:
    tree = {k: v for k, v in THOR.items() if "compatible" not in k}
    reading = discover_power_sources(sysfs(tree)).read()
    assert reading.rails["ina238:2-0044"] == pytest.approx(60.45)
    assert reading.total_watts is None


def _write(root: Path, relative: str, value: str) -> None:
    (root / relative).write_text(value + "\n", encoding="utf-8")


def test_rapl_needs_two_reads_and_corrects_counter_wrap(sysfs: Sysfs, clock: FakeClock) -> None:
    root = sysfs(INTEL_LAPTOP)
    monitor = discover_power_sources(root, clock=clock)
    assert [s.name for s in monitor.sources] == ["rapl", "power_supply"]

    first = monitor.read()
    assert "package-0" not in first.rails  # no rate from a single counter value
    assert first.rails["BAT0"] == pytest.approx(18.9)
    assert first.total_watts is None  # psys claims the total but has no rate yet
    assert first.total_source == "psys (rapl)"

    clock.advance(2.0)
    wrapped = 262_143_000_000 + 30_000_000 - 262_143_328_850  # +30 J across the wrap
    _write(root, "class/powercap/intel-rapl:0/energy_uj", str(wrapped))
    _write(root, "class/powercap/intel-rapl:0:0/energy_uj", str(1_000_000 + 10_000_000))
    _write(root, "class/powercap/intel-rapl:0:1/energy_uj", str(500_000 + 2_000_000))
    _write(root, "class/powercap/intel-rapl:1/energy_uj", str(7_000_000 + 40_000_000))
    second = monitor.read()
    assert second.rails == pytest.approx(
        {
            "package-0": 15.0,
            "package-0/core": 5.0,
            "package-0/uncore": 1.0,
            "psys": 20.0,
            "BAT0": 18.9,
        }
    )
    # psys already contains package-0: the total is psys, not psys + package-0
    assert second.total_watts == pytest.approx(20.0)
    assert second.total_scope == "platform"
    assert second.total_interval_average is True


def test_discharging_battery_outranks_rapl_as_the_system_total(
    sysfs: Sysfs, clock: FakeClock
) -> None:
    root = sysfs(INTEL_LAPTOP)
    monitor = discover_power_sources(root, clock=clock)
    _write(root, "class/power_supply/AC/online", "0")
    _write(root, "class/power_supply/BAT0/status", "Discharging")
    reading = monitor.read()
    assert reading.total_watts == pytest.approx(18.9)
    assert reading.total_source == "BAT0 (battery)"
    assert reading.total_scope == "system"


def test_unreadable_rapl_counters_are_skipped_with_advice(
    sysfs: Sysfs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(power_module, "is_readable", lambda _path: False)
    with caplog.at_level(logging.WARNING):
        monitor = discover_power_sources(sysfs(INTEL_LAPTOP))
    assert [s.name for s in monitor.sources] == ["power_supply"]
    assert "not readable" in caplog.text
    assert "udev" in caplog.text


def test_server_acpi_power_meter_outranks_rapl_packages(sysfs: Sysfs, clock: FakeClock) -> None:
    reading = discover_power_sources(sysfs(SERVER), clock=clock).read()
    assert reading.rails["power_meter/power1"] == pytest.approx(285.0)
    assert reading.total_watts == pytest.approx(285.0)
    assert reading.total_scope == "system"


def test_rapl_packages_sum_across_sockets_without_dram_subzones(
    sysfs: Sysfs, clock: FakeClock
) -> None:
    tree = {k: v for k, v in SERVER.items() if "hwmon2" not in k}
    root = sysfs(tree)
    monitor = discover_power_sources(root, clock=clock)
    monitor.read()
    clock.advance(1.0)
    _write(root, "class/powercap/intel-rapl:0/energy_uj", str(1_000_000 + 90_000_000))
    _write(root, "class/powercap/intel-rapl:0:0/energy_uj", str(1_000_000 + 20_000_000))
    _write(root, "class/powercap/intel-rapl:1/energy_uj", str(2_000_000 + 80_000_000))
    _write(root, "class/powercap/intel-rapl:1:0/energy_uj", str(2_000_000 + 10_000_000))
    reading = monitor.read()
    assert reading.rails["package-0/dram"] == pytest.approx(20.0)
    assert reading.rails["package-1/dram"] == pytest.approx(10.0)
    assert reading.total_watts == pytest.approx(170.0)
    assert reading.total_source == "package-0+package-1 (rapl)"
    assert reading.total_scope == "cpu-package"


def test_raspberry_pi_like_usb_supply_is_the_board_input(sysfs: Sysfs) -> None:
    monitor = discover_power_sources(sysfs(RASPBERRY_PI_LIKE))
    assert [s.name for s in monitor.sources] == ["power_supply"]
    reading = monitor.read()
    assert reading.rails == pytest.approx({"usb": 6.912})
    assert reading.total_watts == pytest.approx(6.912)
    assert reading.total_scope == "board"


def test_hwmon_energy_counter_is_differenced_into_watts(sysfs: Sysfs, clock: FakeClock) -> None:
    root = sysfs(ENERGY_HWMON)
    monitor = discover_power_sources(root, clock=clock)
    assert monitor.read().rails == {}
    clock.advance(1.5)
    _write(root, "class/hwmon/hwmon3/energy1_input", str(5_000_000 + 3_000_000))
    reading = monitor.read()
    assert reading.rails == pytest.approx({"amd_energy/Esocket0": 2.0})
    assert reading.total_watts is None


def test_empty_tree_means_power_is_unavailable(sysfs: Sysfs) -> None:
    monitor = discover_power_sources(sysfs(EMPTY))
    assert not monitor.available
    reading = monitor.read()
    assert reading.rails == {}
    assert reading.total_watts is None
    assert reading.total_source is None


def test_missing_root_means_power_is_unavailable(tmp_path: Path) -> None:
    assert not discover_power_sources(tmp_path / "nonexistent").available


def test_total_rail_failing_a_read_gives_no_total_not_another_rail(sysfs: Sysfs) -> None:
    root = sysfs(ORIN_NANO)
    monitor = discover_power_sources(root)
    (root / "bus/i2c/devices/1-0040/hwmon/hwmon1/curr1_input").unlink()
    reading = monitor.read()
    assert "VDD_IN" not in reading.rails
    assert reading.rails["VDD_SOC"] == pytest.approx(2.8)
    assert reading.total_watts is None
    assert reading.total_source == "VDD_IN (ina3221:1-0040)"


class _FixedSource:
    def __init__(self, name: str, rails: dict[str, float], *, fail: bool = False) -> None:
        self._name = name
        self._rails = rails
        self.fail = fail

    @property
    def name(self) -> str:
        return self._name

    @property
    def rails(self) -> list[str]:
        return list(self._rails)

    def read(self) -> dict[str, float]:
        if self.fail:
            raise OSError(5, "Input/output error")
        return dict(self._rails)

    def claim_total(self, rails: Mapping[str, float]) -> TotalClaim | None:
        return None


def test_a_failing_source_is_skipped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    broken = _FixedSource("broken", {"X": 1.0}, fail=True)
    monitor = PowerMonitor([broken, _FixedSource("ok", {"Y": 2.0})])
    with caplog.at_level(logging.WARNING):
        assert monitor.read().rails == {"Y": 2.0}
        assert monitor.read().rails == {"Y": 2.0}
    assert caplog.text.count("power source broken failed") == 1
    broken.fail = False
    assert monitor.read().rails == {"X": 1.0, "Y": 2.0}


def test_colliding_rail_names_from_two_sources_are_qualified() -> None:
    monitor = PowerMonitor([_FixedSource("a", {"usb": 1.0}), _FixedSource("b", {"usb": 2.0})])
    assert monitor.read().rails == {"usb": 1.0, "usb@b": 2.0}


def test_average_readings_averages_each_rail_and_the_total_where_present() -> None:
    readings = [
        PowerReading(1.0, {"VDD_IN": 6.0, "VDD_SOC": 2.0}, 6.0, "VDD_IN (x)", "module"),
        PowerReading(2.0, {"VDD_IN": 8.0}, None, "VDD_IN (x)", "module"),
        PowerReading(3.0, {"VDD_IN": 10.0, "VDD_SOC": 4.0}, 10.0, "VDD_IN (x)", "module"),
    ]
    average = average_readings(readings)
    assert average is not None
    assert average.t == 3.0
    assert average.rails == pytest.approx({"VDD_IN": 8.0, "VDD_SOC": 3.0})
    assert average.total_watts == pytest.approx(8.0)
    assert average.total_source == "VDD_IN (x)"
    assert average_readings([]) is None
    unavailable = average_readings([PowerReading(1.0)])
    assert unavailable is not None
    assert unavailable.total_watts is None
