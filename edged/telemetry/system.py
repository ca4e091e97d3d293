"""System metrics through psutil and sysfs: CPU load and frequency, memory, RSS, temperatures,
throttling. Anything the platform does not expose is reported as None or left out, never
guessed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil

from edged.telemetry._sysfs import read_int, read_text

logger = logging.getLogger(__name__)

__all__ = [
    "SystemSampler",
    "SystemSnapshot",
    "ThrottleState",
    "cpu_busy_percent",
    "read_throttle",
    "temperatures_from",
]

_T = TypeVar("_T")

# Linux counts guest time inside user/nice already; psutil reports it separately too.
_DOUBLE_COUNTED = ("guest", "guest_nice")
_IDLE = ("idle", "iowait")
_SENTINEL_BELOW_C = -100.0  # Jetson reports -256 °C for powered-off thermal zones

# Raspberry Pi firmware get_throttled bits (the "currently" half of the word).
_RPI_UNDER_VOLTAGE = 1 << 0
_RPI_FREQ_CAPPED = 1 << 1
_RPI_THROTTLED = 1 << 2
_RPI_SOFT_TEMP_LIMIT = 1 << 3


class _Temperature(Protocol):
    @property
    def label(self) -> str: ...

    @property
    def current(self) -> float | None: ...


@dataclass(frozen=True)
class ThrottleState:
    throttled: bool | None = None
    """Clocks are being held down right now (Raspberry Pi firmware)."""
    under_voltage: bool | None = None
    """The supply is below spec right now (Raspberry Pi firmware)."""
    events: int | None = None
    """Cumulative thermal throttling events across CPUs (x86 ``thermal_throttle``)."""


@dataclass(frozen=True)
class SystemSnapshot:
    cpu_percent: float | None
    """Busy share of all CPUs since the previous sample; None on the first."""
    cpu_percent_per_core: tuple[float, ...]
    cpu_freq_mhz: float | None
    cpu_freq_max_mhz: float | None
    memory_total_bytes: int | None
    memory_available_bytes: int | None
    memory_used_percent: float | None
    process_rss_bytes: int | None
    temperatures_c: Mapping[str, float] = field(default_factory=dict)
    throttle: ThrottleState = field(default_factory=ThrottleState)


def cpu_busy_percent(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """Busy percentage between two ``cpu_times()._asdict()`` readings; None if no time passed."""

    def split(times: Mapping[str, float]) -> tuple[float, float]:
        total = sum(v for k, v in times.items() if k not in _DOUBLE_COUNTED)
        idle = sum(times.get(k, 0.0) for k in _IDLE)
        return total, idle

    total_before, idle_before = split(before)
    total_after, idle_after = split(after)
    total = total_after - total_before
    if total <= 0:
        return None
    busy = total - (idle_after - idle_before)
    return min(100.0, max(0.0, busy / total * 100.0))


def temperatures_from(sensors: Mapping[str, Sequence[_Temperature]]) -> dict[str, float]:
    """``psutil.sensors_temperatures()`` as ``{"chip" or "chip/label": °C}``.

    Readings that are missing, not finite, or below -100 °C (a driver's "no value" sentinel)
    are left out.
    """
    temperatures: dict[str, float] = {}
    for chip, entries in sensors.items():
        for index, entry in enumerate(entries):
            current = entry.current
            if current is None or not math.isfinite(current) or current < _SENTINEL_BELOW_C:
                continue
            if len(entries) == 1 and not entry.label:
                name = chip
            else:
                name = f"{chip}/{entry.label or index}"
            while name in temperatures:
                name += "'"
            temperatures[name] = float(current)
    return temperatures


def read_throttle(root: Path) -> ThrottleState:
    """Throttling state from sysfs below ``root``, where the platform exposes it."""
    throttled = under_voltage = None
    text = read_text(root / "devices/platform/soc/soc:firmware/get_throttled")
    if text:
        try:
            bits = int(text, 16)
        except ValueError:
            logger.debug("unexpected get_throttled value %r", text)
        else:
            throttled = bool(bits & (_RPI_FREQ_CAPPED | _RPI_THROTTLED | _RPI_SOFT_TEMP_LIMIT))
            under_voltage = bool(bits & _RPI_UNDER_VOLTAGE)
    counts = [
        read_int(path)
        for path in root.glob("devices/system/cpu/cpu[0-9]*/thermal_throttle/core_throttle_count")
    ]
    known = [c for c in counts if c is not None]
    events = sum(known) if known else None
    return ThrottleState(throttled, under_voltage, events)


def _attempt(what: str, read: Callable[[], _T]) -> _T | None:
    try:
        return read()
    except (psutil.Error, OSError, NotImplementedError, AttributeError) as exc:
        logger.debug("cannot read %s: %s", what, exc)
        return None


class SystemSampler:
    """Takes :class:`SystemSnapshot` s; CPU percentages are over the time between samples.

    Keeps its own CPU-times baseline rather than ``psutil.cpu_percent(interval=None)``, whose
    baseline is shared by every caller in the process (such as ``edged top``).
    """

    def __init__(
        self, *, sysfs_root: Path = Path("/sys"), process: psutil.Process | None = None
    ) -> None:
        self._root = sysfs_root
        self._process = process or psutil.Process()
        self._last_total = self._cpu_times(percpu=False)
        self._last_per_core = self._cpu_times(percpu=True)

    @staticmethod
    def _cpu_times(*, percpu: bool) -> list[dict[str, float]]:
        rows: list[Any] | None
        if percpu:
            rows = _attempt("per-core cpu times", lambda: psutil.cpu_times(percpu=True))
        else:
            total = _attempt("cpu times", psutil.cpu_times)
            rows = None if total is None else [total]
        return [dict(row._asdict()) for row in rows or []]

    def sample(self) -> SystemSnapshot:
        """Blocking reads of /proc and /sys: call from a thread."""
        total = self._cpu_times(percpu=False)
        per_core = self._cpu_times(percpu=True)
        cpu_percent = (
            cpu_busy_percent(self._last_total[0], total[0]) if total and self._last_total else None
        )
        core_percents: tuple[float, ...] = ()
        if per_core and len(per_core) == len(self._last_per_core):
            values = [
                cpu_busy_percent(a, b) for a, b in zip(self._last_per_core, per_core, strict=True)
            ]
            if all(v is not None for v in values):
                core_percents = tuple(v for v in values if v is not None)
        self._last_total, self._last_per_core = total, per_core

        freq = _attempt("cpu frequency", psutil.cpu_freq)
        memory = _attempt("memory", psutil.virtual_memory)
        rss = _attempt("process memory", lambda: self._process.memory_info().rss)
        sensors = getattr(psutil, "sensors_temperatures", None)
        readings = _attempt("temperatures", sensors) if sensors is not None else None
        return SystemSnapshot(
            cpu_percent=cpu_percent,
            cpu_percent_per_core=core_percents,
            cpu_freq_mhz=float(freq.current) if freq and freq.current else None,
            cpu_freq_max_mhz=float(freq.max) if freq and freq.max else None,
            memory_total_bytes=int(memory.total) if memory else None,
            memory_available_bytes=int(memory.available) if memory else None,
            memory_used_percent=float(memory.percent) if memory else None,
            process_rss_bytes=int(rss) if rss is not None else None,
            temperatures_c=temperatures_from(readings) if readings else {},
            throttle=read_throttle(self._root),
        )
