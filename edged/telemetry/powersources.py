"""Power sources: one class per kind of sysfs power sensor, each turning it into rail watts
(the Raspberry Pi 5's PMIC, read through a command, is in :mod:`edged.telemetry.pmic`).

Every source reads below a sysfs root given to it at construction, so a fixture tree copied
from a device stands in for the device. ``read()`` does blocking file I/O (an INA3221 read
is an I2C transaction): call it from a thread, never from the event loop.

A source may also *claim* the board total (``claim_total``): it names the rail(s) that are
the input of the whole board, module or platform, with a rank. :class:`PowerMonitor` picks
the best-ranked claim instead of summing rails, because rails nest (``VDD_IN`` already
contains ``VDD_CPU_GPU_CV``; RAPL ``psys`` contains ``package-0``) and summing them counts
the same watts twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edged.telemetry._sysfs import read_int, read_text

logger = logging.getLogger(__name__)

__all__ = [
    "JETSON_MODULE_INPUT_RAILS",
    "RANK_BATTERY",
    "RANK_BOARD_INPUT",
    "RANK_MODULE_INPUT",
    "RANK_PMIC_RAILS",
    "RANK_RAPL_PACKAGES",
    "RANK_RAPL_PSYS",
    "RANK_SUPPLY_INPUT",
    "RANK_SYSTEM_METER",
    "HwmonPowerSource",
    "Ina238Source",
    "Ina3221HwmonSource",
    "Ina3221IioSource",
    "PowerSource",
    "PowerSupplySource",
    "RaplSource",
    "TotalClaim",
]

JETSON_MODULE_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
"""INA3221 channels that measure a Jetson module's whole input (Orin/Xavier NX/TX2; Nano)."""

# Lower rank wins. A dedicated input monitor beats anything derived from components.
RANK_BOARD_INPUT = 0  # Jetson Thor INA238 on VIN: module plus carrier board
RANK_MODULE_INPUT = 1  # Jetson INA3221 VDD_IN / POM_5V_IN: the module's input
RANK_SYSTEM_METER = 2  # ACPI power meter (hwmon "power_meter")
RANK_SUPPLY_INPUT = 3  # power_supply inputs (USB, Mains) that measure voltage and current
RANK_PMIC_RAILS = 4  # Raspberry Pi 5: the sum of the PMIC's output rails (edged.telemetry.pmic)
RANK_BATTERY = 5  # a discharging battery with nothing else plugged in
RANK_RAPL_PSYS = 6  # Intel RAPL platform domain
RANK_RAPL_PACKAGES = 7  # Intel RAPL package domains only (CPU scope)

_SKIPPED_LABELS = ("nc",)
_SKIPPED_LABEL_PREFIXES = ("sum of shunt",)


@dataclass(frozen=True)
class TotalClaim:
    """A source's claim to measure the board total; ``watts`` None = unreadable right now."""

    watts: float | None
    rank: int
    scope: str
    """What the total covers: board, module, system, platform, pmic or cpu-package."""
    method: str
    """Which rail(s) and source gave it, for the record's ``power.source``."""
    interval_average: bool = False
    """True when derived from an energy counter: the mean over the time since the last read."""


class PowerSource(Protocol):
    """A power sensor below a sysfs root."""

    @property
    def name(self) -> str: ...

    @property
    def rails(self) -> list[str]:
        """Every rail this source can report (a read may omit rails that failed)."""
        ...

    def read(self) -> dict[str, float]:
        """Rail name → watts for every rail that could be read now."""
        ...

    def claim_total(self, rails: Mapping[str, float]) -> TotalClaim | None:
        """The board total this source measures, given its latest ``read()``, if any."""
        ...


def _skip_label(label: str) -> bool:
    folded = label.strip().lower()
    return folded in _SKIPPED_LABELS or folded.startswith(_SKIPPED_LABEL_PREFIXES)


def _channel_number(filename: str, prefix: str, suffix: str) -> int | None:
    middle = filename[len(prefix) : len(filename) - len(suffix)]
    return int(middle) if middle.isdigit() else None


def _module_input_claim(
    source: str, channels: Sequence[str], rails: Mapping[str, float]
) -> TotalClaim | None:
    for rail in JETSON_MODULE_INPUT_RAILS:
        if rail in channels:
            return TotalClaim(rails.get(rail), RANK_MODULE_INPUT, "module", f"{rail} ({source})")
    return None


def _discover_channels(
    directory: Path, prefix: str, suffix: str, usable: Callable[[int], bool]
) -> dict[str, int]:
    """Label -> channel number for every ``{prefix}{K}{suffix}`` label file naming a rail that
    is connected (not ``NC``, not a sum channel) and ``usable``."""
    channels: dict[str, int] = {}
    for label_file in sorted(directory.glob(f"{prefix}*{suffix}")):
        k = _channel_number(label_file.name, prefix, suffix)
        label = read_text(label_file)
        if k is None or not label or _skip_label(label) or not usable(k):
            continue
        channels[label] = k
    return channels


class _Ina3221Source:
    """What both INA3221 drivers share: channels found by label, the module-input claim."""

    def __init__(self, directory: Path, name: str, channels: dict[str, int]) -> None:
        self._dir = directory
        self._name = name
        self._channels = channels

    @property
    def name(self) -> str:
        return self._name

    @property
    def rails(self) -> list[str]:
        return list(self._channels)

    def claim_total(self, rails: Mapping[str, float]) -> TotalClaim | None:
        return _module_input_claim(self._name, list(self._channels), rails)


class Ina3221HwmonSource(_Ina3221Source):
    """TI INA3221 through the mainline hwmon driver (JetPack 5 and later).

    Channels 1-3: ``in{K}_label``, bus voltage ``in{K}_input`` (mV) and ``curr{K}_input``
    (mA). Channel 7 ("sum of shunt voltages") and channels labelled ``NC`` are skipped.
    """

    def __init__(self, hwmon_dir: Path, device: str) -> None:
        def usable(k: int) -> bool:
            enabled = read_text(hwmon_dir / f"in{k}_enable") != "0"
            return enabled and (hwmon_dir / f"curr{k}_input").exists()

        channels = _discover_channels(hwmon_dir, "in", "_label", usable)
        super().__init__(hwmon_dir, f"ina3221:{device}", channels)

    def read(self) -> dict[str, float]:
        rails: dict[str, float] = {}
        for label, k in self._channels.items():
            millivolts = read_int(self._dir / f"in{k}_input")
            milliamps = read_int(self._dir / f"curr{k}_input")
            if millivolts is not None and milliamps is not None:
                rails[label] = millivolts * milliamps / 1e6
        return rails


class Ina3221IioSource(_Ina3221Source):
    """TI INA3221 through NVIDIA's iio driver ``ina3221x`` (JetPack 4 and earlier).

    Channels 0-2: ``rail_name_{K}``, ``in_power{K}_input`` (mW), or else
    ``in_voltage{K}_input`` (mV) times ``in_current{K}_input`` (mA).
    """

    def __init__(self, iio_dir: Path, device: str) -> None:
        channels = _discover_channels(iio_dir, "rail_name_", "", lambda k: True)
        super().__init__(iio_dir, f"ina3221x:{device}", channels)

    def read(self) -> dict[str, float]:
        rails: dict[str, float] = {}
        for label, k in self._channels.items():
            milliwatts = read_int(self._dir / f"in_power{k}_input")
            if milliwatts is None:
                millivolts = read_int(self._dir / f"in_voltage{k}_input")
                milliamps = read_int(self._dir / f"in_current{k}_input")
                if millivolts is None or milliamps is None:
                    continue
                rails[label] = millivolts * milliamps / 1e6
            else:
                rails[label] = milliwatts / 1e3
        return rails


class Ina238Source:
    """TI INA238 through hwmon: ``power1_input`` (µW), else ``in1_input`` (mV) × ``curr1_input``
    (mA). On Jetson Thor it sits on VIN and is the board input (``board_input=True``)."""

    def __init__(self, hwmon_dir: Path, device: str, rail: str, *, board_input: bool) -> None:
        self._dir = hwmon_dir
        self._name = f"ina238:{device}"
        self._rail = rail
        self._board_input = board_input

    @property
    def name(self) -> str:
        return self._name

    @property
    def rails(self) -> list[str]:
        return [self._rail]

    def read(self) -> dict[str, float]:
        microwatts = read_int(self._dir / "power1_input")
        if microwatts is not None:
            return {self._rail: microwatts / 1e6}
        millivolts = read_int(self._dir / "in1_input")
        milliamps = read_int(self._dir / "curr1_input")
        if millivolts is None or milliamps is None:
            return {}
        return {self._rail: millivolts * milliamps / 1e6}

    def claim_total(self, rails: Mapping[str, float]) -> TotalClaim | None:
        if not self._board_input:
            return None
        return TotalClaim(
            rails.get(self._rail), RANK_BOARD_INPUT, "board", f"{self._rail} ({self._name})"
        )


class _EnergyCounter:
    """Turns readings of a monotonically increasing energy counter (µJ) into mean watts."""

    def __init__(self, max_range_uj: int | None) -> None:
        self._max_range_uj = max_range_uj
        self._last: tuple[float, int] | None = None

    def update(self, t: float, energy_uj: int) -> float | None:
        last, self._last = self._last, (t, energy_uj)
        if last is None:
            return None
        dt = t - last[0]
        delta = energy_uj - last[1]
        if delta < 0:
            if self._max_range_uj is None:
                return None  # counter reset, not a wrap we can correct
            delta += self._max_range_uj
        if dt <= 0:
            return None
        return delta / 1e6 / dt


class RaplSource:
    """Intel RAPL through powercap: ``energy_uj`` counters, wrapping at ``max_energy_range_uj``.

    Power is Δenergy/Δt between two reads, so the first read returns no rails. Sub-zones are
    named ``<parent>/<zone>`` (``package-0/core``). Sample more often than the counter can wrap
    (``max_energy_range_uj`` / peak power, tens of minutes for a package) or a wrap is lost.
    """

    def __init__(
        self, zones: Sequence[tuple[str, Path]], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._zones = list(zones)
        self._clock = clock
        self._counters = {
            rail: _EnergyCounter(read_int(path / "max_energy_range_uj")) for rail, path in zones
        }

    @property
    def name(self) -> str:
        return "rapl"

    @property
    def rails(self) -> list[str]:
        return [rail for rail, _ in self._zones]

    def read(self) -> dict[str, float]:
        t = self._clock()
        rails: dict[str, float] = {}
        for rail, path in self._zones:
            energy = read_int(path / "energy_uj")
            if energy is None:
                continue
            watts = self._counters[rail].update(t, energy)
            if watts is not None:
                rails[rail] = watts
        return rails

    def claim_total(self, rails: Mapping[str, float]) -> TotalClaim | None:
        names = self.rails
        if "psys" in names:
            return TotalClaim(
                rails.get("psys"), RANK_RAPL_PSYS, "platform", "psys (rapl)", interval_average=True
            )
        packages = [n for n in names if n.startswith("package-") and "/" not in n]
        if not packages:
            return None
        watts = sum(rails[p] for p in packages) if all(p in rails for p in packages) else None
        return TotalClaim(
            watts, RANK_RAPL_PACKAGES, "cpu-package", f"{'+'.join(packages)} (rapl)", True
        )


class HwmonPowerSource:
    """Any other hwmon device with ``power{K}_input``/``power{K}_average`` (µW) or
    ``energy{K}_input`` (µJ, differenced like RAPL). An ACPI ``power_meter`` claims the
    system total."""

    def __init__(
        self, hwmon_dir: Path, hwmon_name: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._dir = hwmon_dir
        self._hwmon_name = hwmon_name
        self._name = f"hwmon:{hwmon_name}"
        self._clock = clock
        self._power: dict[str, Path] = {}
        self._energy: dict[str, tuple[Path, _EnergyCounter]] = {}
        numbered: dict[int, Path] = {}
        for attr in ("average", "input"):  # prefer _input when both exist
            for path in hwmon_dir.glob(f"power*_{attr}"):
                k = _channel_number(path.name, "power", f"_{attr}")
                if k is not None:
                    numbered[k] = path
        for k, path in sorted(numbered.items()):
            self._power[self._rail_name("power", k)] = path
        for path in sorted(hwmon_dir.glob("energy*_input")):
            k = _channel_number(path.name, "energy", "_input")
            if k is None or k in numbered:
                continue
            self._energy[self._rail_name("energy", k)] = (path, _EnergyCounter(None))

    def _rail_name(self, kind: str, k: int) -> str:
        label = read_text(self._dir / f"{kind}{k}_label")
        return f"{self._hwmon_name}/{label or f'{kind}{k}'}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def rails(self) -> list[str]:
        return [*self._power, *self._energy]

    def has_channels(self) -> bool:
        return bool(self._power or self._energy)

    def read(self) -> dict[str, float]:
        rails: dict[str, float] = {}
        for rail, path in self._power.items():
            microwatts = read_int(path)
            if microwatts is not None:
                rails[rail] = microwatts / 1e6
        t = self._clock()
        for rail, (path, counter) in self._energy.items():
            energy = read_int(path)
            if energy is not None:
                watts = counter.update(t, energy)
                if watts is not None:
                    rails[rail] = watts
        return rails

    def claim_total(self, rails: Mapping[str, float]) -> TotalClaim | None:
        if self._hwmon_name != "power_meter" or not self._power:
            return None
        names = list(self._power)
        watts = sum(rails[n] for n in names) if all(n in rails for n in names) else None
        return TotalClaim(watts, RANK_SYSTEM_METER, "system", f"{'+'.join(names)} (acpi)")


@dataclass(frozen=True)
class _Supply:
    name: str
    path: Path
    kind: str


class PowerSupplySource:
    """``class/power_supply/*``: ``power_now`` (µW), else ``voltage_now`` (µV) ×
    ``current_now`` (µA), magnitude only (drivers disagree on the sign of battery current).

    UCSI ports (``ucsi-source-psy-*``) are skipped: they report the negotiated USB-PD contract,
    not a measurement.
    """

    def __init__(self, supplies_dir: Path) -> None:
        self._supplies: list[_Supply] = []
        for path in sorted(supplies_dir.glob("*")):
            if path.name.startswith("ucsi-source-psy-"):
                continue
            measured = (path / "power_now").exists() or (
                (path / "voltage_now").exists() and (path / "current_now").exists()
            )
            if measured:
                kind = read_text(path / "type") or "Unknown"
                self._supplies.append(_Supply(path.name, path, kind))

    @property
    def name(self) -> str:
        return "power_supply"

    @property
    def rails(self) -> list[str]:
        return [s.name for s in self._supplies]

    def has_supplies(self) -> bool:
        return bool(self._supplies)

    def read(self) -> dict[str, float]:
        rails: dict[str, float] = {}
        for supply in self._supplies:
            microwatts = read_int(supply.path / "power_now")
            if microwatts is not None:
                rails[supply.name] = abs(microwatts) / 1e6
                continue
            microvolts = read_int(supply.path / "voltage_now")
            microamps = read_int(supply.path / "current_now")
            if microvolts is not None and microamps is not None:
                rails[supply.name] = abs(microvolts * microamps) / 1e12
        return rails

    def claim_total(self, rails: Mapping[str, float]) -> TotalClaim | None:
        inputs = [
            s
            for s in self._supplies
            if s.kind != "Battery" and read_text(s.path / "online") not in ("0",)
        ]
        if inputs:
            names = [s.name for s in inputs]
            watts = sum(rails[n] for n in names) if all(n in rails for n in names) else None
            return TotalClaim(watts, RANK_SUPPLY_INPUT, "board", f"{'+'.join(names)} (supply)")
        discharging = [
            s
            for s in self._supplies
            if s.kind == "Battery" and read_text(s.path / "status") == "Discharging"
        ]
        if discharging:
            names = [s.name for s in discharging]
            watts = sum(rails[n] for n in names) if all(n in rails for n in names) else None
            return TotalClaim(watts, RANK_BATTERY, "system", f"{'+'.join(names)} (battery)")
        return None
