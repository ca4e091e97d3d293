"""Power monitoring: discover every power source below a sysfs root and read them together.

:func:`discover_power_sources` finds the sources; :class:`PowerMonitor` reads them into one
:class:`PowerReading` with per-rail watts and the board total chosen by rank (see
:mod:`edged.telemetry.powersources` and docs/telemetry.md for the rules). ``total_watts`` is
None whenever no source measures a total: edged never makes one up by summing rails.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edged.errors import PowerSourceError
from edged.telemetry._sysfs import is_readable, read_text
from edged.telemetry.pmic import PMIC_COMPATIBLE, PmicSource
from edged.telemetry.powersources import (
    HwmonPowerSource,
    Ina238Source,
    Ina3221HwmonSource,
    Ina3221IioSource,
    PowerSource,
    PowerSupplySource,
    RaplSource,
    TotalClaim,
)

logger = logging.getLogger(__name__)

__all__ = ["PowerMonitor", "PowerReading", "average_readings", "discover_power_sources"]

_INA238_NAMES = ("ina238", "ina237")
_BOARD_INPUT_LABELS = ("VIN",)
_TEGRA264 = "nvidia,tegra264"  # Jetson Thor: its single INA238 monitors VIN


@dataclass(frozen=True)
class PowerReading:
    """One read of every source at monotonic time ``t``."""

    t: float
    rails: dict[str, float] = field(default_factory=dict)
    total_watts: float | None = None
    total_source: str | None = None
    """The rail(s) and source the total came from, e.g. ``"VDD_IN (ina3221:1-0040)"``."""
    total_scope: str | None = None
    """board, module, system, platform, pmic, cpu-package or configured."""
    total_interval_average: bool = False
    """True when the total is a mean since the previous read (energy counters)."""


def average_readings(readings: Sequence[PowerReading]) -> PowerReading | None:
    """The mean of several readings (a reporting interval's samples), rail by rail.

    A rail or the total is averaged over the readings that had it; the total keeps the
    source of the latest reading that had one. None for no readings.
    """
    if not readings:
        return None
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for reading in readings:
        for rail, watts in reading.rails.items():
            sums[rail] = sums.get(rail, 0.0) + watts
            counts[rail] = counts.get(rail, 0) + 1
    with_total = [r for r in readings if r.total_watts is not None]
    latest = with_total[-1] if with_total else readings[-1]
    total = (
        sum(r.total_watts for r in with_total if r.total_watts is not None) / len(with_total)
        if with_total
        else None
    )
    return PowerReading(
        t=readings[-1].t,
        rails={rail: sums[rail] / counts[rail] for rail in sums},
        total_watts=total,
        total_source=latest.total_source,
        total_scope=latest.total_scope,
        total_interval_average=latest.total_interval_average,
    )


class PowerMonitor:
    """Reads a fixed list of sources; ``total_rails`` (configured) overrides the ranking."""

    def __init__(
        self,
        sources: Sequence[PowerSource],
        *,
        total_rails: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sources = list(sources)
        self._total_rails = tuple(total_rails)
        self._clock = clock
        self._failing: dict[str, str] = {}

    @property
    def available(self) -> bool:
        return bool(self.sources)

    @property
    def failures(self) -> dict[str, str]:
        """Source name → why its last read failed, for the sources failing now."""
        return dict(self._failing)

    def read(self) -> PowerReading:
        """Read every source (blocking sysfs I/O: call from a thread)."""
        t = self._clock()
        merged: dict[str, float] = {}
        best: TotalClaim | None = None
        for source in self.sources:
            try:
                rails = source.read()
                claim = source.claim_total(rails)
            except (OSError, PowerSourceError) as exc:
                self._report_failure(source.name, exc)
                continue
            self._failing.pop(source.name, None)
            for rail, watts in rails.items():
                merged[rail if rail not in merged else f"{rail}@{source.name}"] = watts
            if claim is not None and (best is None or claim.rank < best.rank):
                best = claim
        if self._total_rails:
            return self._configured_total(t, merged)
        if best is None:
            return PowerReading(t, merged)
        return PowerReading(t, merged, best.watts, best.method, best.scope, best.interval_average)

    def _configured_total(self, t: float, rails: dict[str, float]) -> PowerReading:
        present = all(r in rails for r in self._total_rails)
        watts = sum(rails[r] for r in self._total_rails) if present else None
        method = f"{'+'.join(self._total_rails)} (configured)"
        return PowerReading(t, rails, watts, method, "configured")

    def _report_failure(self, source: str, exc: OSError | PowerSourceError) -> None:
        if source not in self._failing:
            logger.warning("power source %s failed to read and is skipped: %s", source, exc)
        self._failing[source] = str(exc)


def _numeric_key(path: Path) -> tuple[object, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def _hwmon_dirs(root: Path) -> list[tuple[Path, str]]:
    """Every hwmon directory once (class/hwmon links into the i2c tree), with a device name."""
    seen: set[Path] = set()
    found: list[tuple[Path, str]] = []
    candidates = [
        *sorted(root.glob("bus/i2c/devices/*/hwmon/hwmon*"), key=str),
        *sorted(root.glob("class/hwmon/hwmon*"), key=_numeric_key),
    ]
    for path in candidates:
        resolved = path.resolve()
        if resolved in seen or not resolved.is_dir():
            continue
        seen.add(resolved)
        device = resolved.parent.parent.name if resolved.parent.name == "hwmon" else resolved.name
        found.append((resolved, device))
    return found


def _compatible(root: Path) -> list[str]:
    return (read_text(root / "firmware/devicetree/base/compatible") or "").split("\x00")


def _is_tegra264(root: Path) -> bool:
    return _TEGRA264 in _compatible(root)


def _pmic_source(root: Path) -> PmicSource | None:
    """A Raspberry Pi 5 (BCM2712) with ``vcgencmd`` on the PATH: its PMIC, read once now so
    that its rails are known (a failing read is logged; the source stays, and says why)."""
    if PMIC_COMPATIBLE not in _compatible(root):
        return None
    vcgencmd = shutil.which("vcgencmd")
    if vcgencmd is None:
        logger.warning(
            "this Raspberry Pi 5 reports power only through 'vcgencmd pmic_read_adc', and "
            "vcgencmd is not on the PATH: install it (Debian package raspi-utils) to measure power"
        )
        return None
    source = PmicSource(vcgencmd)
    try:
        source.read()
    except PowerSourceError as exc:
        logger.warning("power source %s failed its first read: %s", source.name, exc)
    return source


def _rapl_source(root: Path, clock: Callable[[], float]) -> RaplSource | None:
    zones_dir = root / "class/powercap"
    zone_paths = sorted(
        (p for p in zones_dir.glob("intel-rapl:*") if (p / "energy_uj").exists()),
        key=lambda p: tuple(int(x) for x in p.name.split(":")[1:] if x.isdigit()),
    )
    if not zone_paths:
        return None
    if not any(is_readable(p / "energy_uj") for p in zone_paths):
        logger.warning(
            "RAPL counters under %s are not readable (root-only since Linux 5.10); RAPL power "
            "is unavailable. Grant read access (e.g. a udev rule chmod o+r energy_uj) or run "
            "edged with CAP_DAC_READ_SEARCH to measure it.",
            zones_dir,
        )
        return None
    names: dict[str, str] = {}
    zones: list[tuple[str, Path]] = []
    for path in zone_paths:
        zone_name = read_text(path / "name") or path.name
        parts = path.name.split(":")
        names[path.name] = zone_name
        rail = zone_name
        if len(parts) > 2:
            parent = names.get(":".join(parts[:2]), ":".join(parts[:2]))
            rail = f"{parent}/{zone_name}"
        zones.append((rail, path))
    return RaplSource(zones, clock=clock)


def discover_power_sources(
    root: Path = Path("/sys"),
    *,
    total_rails: Sequence[str] = (),
    clock: Callable[[], float] = time.monotonic,
) -> PowerMonitor:
    """Find every power source below ``root`` (normally ``/sys``), and the PMIC of a
    Raspberry Pi 5 whose device tree is below ``root`` (through ``vcgencmd`` on the PATH).

    ``total_rails`` names rails whose sum is the board total, overriding the automatic choice
    (for boards such as AGX Orin whose INA3221 has no input channel); an unknown name raises
    :class:`PowerSourceError` listing the rails that exist.
    """
    sources: list[PowerSource] = []
    ina238: list[tuple[Path, str]] = []
    for hwmon_dir, device in _hwmon_dirs(root):
        hwmon_name = read_text(hwmon_dir / "name") or ""
        if hwmon_name == "ina3221":
            ina3221 = Ina3221HwmonSource(hwmon_dir, device)
            if ina3221.rails:
                sources.append(ina3221)
        elif hwmon_name in _INA238_NAMES:
            ina238.append((hwmon_dir, device))
        else:
            generic = HwmonPowerSource(hwmon_dir, hwmon_name or device, clock=clock)
            if generic.has_channels():
                sources.append(generic)

    thor = _is_tegra264(root)
    for hwmon_dir, device in ina238:
        label = read_text(hwmon_dir / "label") or read_text(hwmon_dir / "in1_label")
        if label:
            board_input = label.upper() in _BOARD_INPUT_LABELS
            sources.append(Ina238Source(hwmon_dir, device, label, board_input=board_input))
        elif thor and len(ina238) == 1:
            sources.append(Ina238Source(hwmon_dir, device, "VIN", board_input=True))
        else:
            sources.append(Ina238Source(hwmon_dir, device, f"ina238:{device}", board_input=False))

    for iio_dir in sorted(root.glob("bus/i2c/devices/*/iio:device*"), key=str):
        iio = Ina3221IioSource(iio_dir, iio_dir.parent.name)
        if iio.rails:
            sources.append(iio)

    rapl = _rapl_source(root, clock)
    if rapl is not None:
        sources.append(rapl)

    supplies = PowerSupplySource(root / "class/power_supply")
    if supplies.has_supplies():
        sources.append(supplies)

    pmic = _pmic_source(root)
    if pmic is not None:
        sources.append(pmic)

    if total_rails:
        known = {rail for source in sources for rail in source.rails}
        missing = [r for r in total_rails if r not in known]
        if missing:
            raise PowerSourceError(
                f"configured total rail(s) {', '.join(missing)} not found below {root}; "
                f"available rails: {', '.join(sorted(known)) or 'none'}"
            )
    if sources:
        logger.info("power sources: %s", ", ".join(s.name for s in sources))
    else:
        logger.info("no power sources below %s; power telemetry is unavailable", root)
    return PowerMonitor(sources, total_rails=total_rails, clock=clock)
