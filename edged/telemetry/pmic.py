"""Raspberry Pi 5 power: the rails its PMIC measures, read with ``vcgencmd pmic_read_adc``.

The Pi 5 (and every BCM2712 board: CM5, Pi 500) has no power sensor in sysfs; its PMIC
(Renesas DA9091) samples the current and voltage of each output rail, and the firmware prints
them, one channel per line::

     VDD_CORE_A current(7)=2.51280000A
     VDD_CORE_V volt(15)=0.87256440V

A rail's watts are its ``_V`` times its ``_A`` line; channels with only a voltage (``EXT5V_V``,
the 5 V input; ``BATT_V``, the RTC battery) give no power. The rails do not nest, so their sum
is what the PMIC delivers (SoC, memory, on-board supplies): claimed as the total with scope
``pmic``. It leaves out what the 5 V input feeds directly (USB devices, fan, HATs) and the
PMIC's conversion losses, so it is a lower bound of the board's input power.

:func:`parse_pmic_adc` is pure. :class:`PmicSource` runs the command without a shell and with
a time limit; like every power source it blocks, so the telemetry loop calls it in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from edged.errors import PowerSourceError
from edged.telemetry.powersources import RANK_PMIC_RAILS, TotalClaim

logger = logging.getLogger(__name__)

__all__ = [
    "PMIC_COMPATIBLE",
    "VCGENCMD_TIMEOUT_S",
    "PmicChannels",
    "PmicSource",
    "parse_pmic_adc",
]

PMIC_COMPATIBLE = "brcm,bcm2712"
"""Device-tree ``compatible`` of the SoC of every board whose PMIC ``pmic_read_adc`` reads."""

VCGENCMD_TIMEOUT_S = 2.0
"""The command normally answers in a few ms; a hung mailbox must not hold the sampler."""

_LINE = re.compile(
    r"^\s*(?P<rail>[A-Za-z0-9_]+)_(?P<kind>[AV])\s+(?:current|volt)\((?P<channel>\d+)\)"
    r"=(?P<value>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?P<unit>[AV])\s*$"
)


@dataclass(frozen=True)
class PmicChannels:
    """One ``pmic_read_adc`` output: amps and volts per rail, as printed."""

    amps: Mapping[str, float]
    volts: Mapping[str, float]

    def watts(self) -> dict[str, float]:
        """Rail → watts for every rail with both a current and a voltage, in output order."""
        return {
            rail: amps * self.volts[rail] for rail, amps in self.amps.items() if rail in self.volts
        }


def parse_pmic_adc(text: str) -> PmicChannels:
    """Parse ``vcgencmd pmic_read_adc`` output; lines of another shape are ignored.

    A line whose unit does not match its name's suffix (``X_A ...=1.0V``) is ignored too: it
    is not the format this parser knows, and a wrong unit would give wrong watts.
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None or match["kind"] != match["unit"]:
            continue
        value = float(match["value"])
        (amps if match["kind"] == "A" else volts)[match["rail"]] = value
    return PmicChannels(amps, volts)


class PmicSource:
    """The PMIC rails of a Raspberry Pi 5 through ``vcgencmd pmic_read_adc``.

    ``vcgencmd`` is the path of the executable; it runs without a shell, in its own process
    group, killed with the group after ``timeout_s``. A failed read raises
    :class:`PowerSourceError` (``PowerMonitor`` skips the source for that sample).
    """

    def __init__(self, vcgencmd: str, *, timeout_s: float = VCGENCMD_TIMEOUT_S) -> None:
        self._argv = [vcgencmd, "pmic_read_adc"]
        self._timeout_s = timeout_s
        self._rails: list[str] = []

    @property
    def name(self) -> str:
        return "pmic:vcgencmd"

    @property
    def rails(self) -> list[str]:
        """The rails of the last successful read (none before the first)."""
        return list(self._rails)

    def read(self) -> dict[str, float]:
        rails = parse_pmic_adc(self._run()).watts()
        if not rails:
            raise PowerSourceError(
                f"'{' '.join(self._argv)}' printed no rail with both a current and a voltage; "
                "update the Raspberry Pi firmware (pmic_read_adc needs firmware from late 2023)"
            )
        self._rails = list(rails)
        return rails

    def claim_total(self, rails: Mapping[str, float]) -> TotalClaim | None:
        if not self._rails:
            return None
        present = all(rail in rails for rail in self._rails)
        watts = sum(rails[rail] for rail in self._rails) if present else None
        method = f"sum of {len(self._rails)} PMIC rails ({self.name})"
        return TotalClaim(watts, RANK_PMIC_RAILS, "pmic", method)

    def _run(self) -> str:
        command = " ".join(self._argv)
        try:
            process = subprocess.Popen(
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a timeout kills everything it started
            )
        except OSError as exc:
            raise PowerSourceError(f"cannot run '{command}': {exc}") from exc
        try:
            out, err = process.communicate(timeout=self._timeout_s)
        except subprocess.TimeoutExpired as exc:
            with contextlib.suppress(ProcessLookupError):  # it may have ended just now
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise PowerSourceError(
                f"'{command}' did not answer within {self._timeout_s:g} s; killed"
            ) from exc
        if process.returncode != 0:
            detail = (err or out).decode(errors="replace").strip() or "no output"
            raise PowerSourceError(
                f"'{command}' exited with {process.returncode}: {detail}; it needs read and "
                "write access to /dev/vcio (the 'video' group on Raspberry Pi OS)"
            )
        return out.decode(errors="replace")
