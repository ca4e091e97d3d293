"""The crash gate: a restart during a probation counts as a crash of the release on probation.

A release that passes its test vectors and then kills the process on live inputs (a native
runtime crash, the OOM killer, a watchdog kill on a hang) would otherwise be current again at
the next start and crash again: a loop no gate sees. Boot counters for model swaps: every
start that finds a probation record (``edged.serve.probation_record``) and no clean-shutdown
mark counts one crash; at the policy's ``max_crashes`` the release is reverted before it
serves again, else the probation goes on.

Two ways to learn that a process ended badly, both counted the same:
* the process that supervises the engine saw it die (``CrashInfo.from_returncode``, with the
  signal or exit status);
* the daemon itself restarted without a clean shutdown: ``RunMarker`` is written at start and
  removed by a clean shutdown, so one still there at the next start is a crash (with how the
  process ended when something recorded it, e.g. systemd's ``$EXIT_CODE``/``$EXIT_STATUS``
  via ``CrashInfo.from_systemd`` and ``RunMarker.record_exit``).

``resume_or_revert_at_start`` is pure; ``RunMarker`` is the only I/O here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edged._fs import atomic_write, fsync_dir
from edged.serve.probation import GateTrip
from edged.serve.probation_record import ProbationRecord
from edged.serve.watch import ProbationOutcome

log = logging.getLogger(__name__)

RUN_MARKER = "running.json"
UNKNOWN_CAUSE = "restarted during probation"


@dataclass(frozen=True)
class CrashInfo:
    """How a process ended that did not shut down cleanly; both None: not known."""

    signal: int | None = None
    exit_status: int | None = None
    process: str = ""  # e.g. "engine", "edged"
    cause: str = ""  # what the supervisor says beyond that, e.g. systemd's "watchdog", "oom-kill"

    def describe(self) -> str:
        who = f"{self.process} " if self.process else ""
        extra = f" ({self.cause})" if self.cause else ""
        if self.signal is not None:
            try:
                name = f" ({signal.Signals(self.signal).name})"
            except ValueError:
                name = ""
            return f"{who}killed by signal {self.signal}{name}{extra} during probation"
        if self.exit_status is not None:
            return f"{who}exited with status {self.exit_status}{extra} during probation"
        return UNKNOWN_CAUSE + extra

    @classmethod
    def from_returncode(cls, returncode: int, process: str = "engine") -> CrashInfo:
        """From ``Popen.returncode`` / ``os.waitstatus_to_exitcode``: negative = a signal."""
        if returncode < 0:
            return cls(signal=-returncode, process=process)
        return cls(exit_status=returncode, process=process)

    @classmethod
    def from_systemd(cls, environ: Mapping[str, str]) -> CrashInfo | None:
        """From an ``ExecStopPost=`` command's environment (``edged record-exit``): None after
        a clean exit."""
        code, status = environ.get("EXIT_CODE", ""), environ.get("EXIT_STATUS", "")
        result = environ.get("SERVICE_RESULT", "")
        cause = result if result in ("watchdog", "oom-kill", "timeout", "start-limit-hit") else ""
        if code == "exited":
            number = int(status) if status.isdigit() else None
            if number == 0 and not cause:
                return None
            return cls(exit_status=number, process="edged", cause=cause)
        if code in ("killed", "dumped"):
            try:
                number = int(status) if status.isdigit() else signal.Signals[f"SIG{status}"].value
            except KeyError:
                return cls(process="edged", cause=cause)
            return cls(signal=number, process="edged", cause=cause)
        return None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StartDecision:
    """``resume``: go on with ``record`` (saved again); ``revert``: serve the held version,
    reported as ``outcome``."""

    action: Literal["resume", "revert"]
    record: ProbationRecord
    outcome: ProbationOutcome | None = None


def resume_or_revert_at_start(
    record: ProbationRecord, last_exit: CrashInfo | None, now: float | None = None
) -> StartDecision:
    """What to do with a probation found at start: ``last_exit`` None = the process before
    shut down cleanly (the probation goes on, nothing counted), else one more crash."""
    if last_exit is None:
        return StartDecision("resume", record)
    crashes = record.crashes + 1
    cause = last_exit.describe()
    counted = dataclasses.replace(
        record, crashes=crashes, crash_reasons=(*record.crash_reasons, cause)
    )
    limit = record.policy.max_crashes
    if crashes < limit:
        log.warning(
            "%s version %s: crash %d of %d during probation (%s); the probation goes on",
            record.model,
            record.version,
            crashes,
            limit,
            cause,
        )
        return StartDecision("resume", counted)
    trip = GateTrip("crashes", f"{crashes} crash{'es' * (crashes > 1)}", str(limit), cause)
    outcome = ProbationOutcome(
        model=record.model,
        version=record.version,
        previous_version=record.previous_version,
        decision="reverted",
        reason=trip.describe(),
        gate=trip.gate,
        measured=trip.measured,
        limit=trip.limit,
        at=time.time() if now is None else now,
    )
    return StartDecision("revert", counted, outcome)


class RunMarker:
    """``<state>/running.json`` while the daemon runs; removed by a clean shutdown."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / RUN_MARKER

    def begin(self) -> CrashInfo | None:
        """At start: how the previous run ended (None: cleanly, or never ran), then mark
        this one as running."""
        last: CrashInfo | None = None
        try:
            value = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            value = None
        except (OSError, ValueError) as exc:
            log.warning("unreadable %s (%s): the last run counts as a crash", self.path, exc)
            value = {}
        if value is not None:
            recorded = value.get("exit") if isinstance(value, dict) else None
            try:
                last = CrashInfo(**recorded) if isinstance(recorded, dict) else CrashInfo()
            except TypeError:
                last = CrashInfo()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        marker = {"pid": os.getpid(), "started_at": time.time()}
        atomic_write(self.path, json.dumps(marker).encode(), mode=0o600)
        return last

    def record_exit(self, info: CrashInfo) -> None:
        """Say how the run that left the marker ended (a supervisor or ``ExecStopPost``)."""
        if self.path.exists():
            atomic_write(self.path, json.dumps({"exit": info.to_json()}).encode(), mode=0o600)

    def end_cleanly(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
            fsync_dir(self.path.parent)
