"""The durable record of a probation: what a restart needs to go on judging a release.

``<state>/probation/<model>.json`` is written atomically (``edged._fs.atomic_write``) *before*
the slot switches to the release, kept while the probation runs (refreshed at a clean
shutdown with what the gates saw so far), and removed once the probation ended in a verdict.
A record found at start-up means the release was on probation when the process ended: the
crash gate (``edged.serve.crashgate``) decides whether it goes on or is reverted.

No daemon imports: the engine process and the control plane both read it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged._fs import atomic_write, fsync_dir, remove_temp_files
from edged.errors import ProbationRecordError
from edged.serve.probation import ProbationPolicy, ShadowPolicy, VersionWindow
from edged.serve.watch import ProbationOutcome

log = logging.getLogger(__name__)

PROBATION_DIR = "probation"
DECIDED_DIR = "decided"  # verdicts reached outside the serving process (the crash gate)
FORMAT = 1


@dataclass(frozen=True)
class ProbationRecord:
    """One model's running probation. ``seen``: what the release did before the last save
    (counts; its latencies are measured afresh after a restart); ``baseline``: the held
    version's window when the probation began (it does not serve meanwhile)."""

    model: str
    version: str  # the release on probation
    version_dir: str
    previous_version: str  # the held version a revert serves again
    previous_dir: str
    policy: ProbationPolicy
    started_at: float  # Unix seconds (informational; the clock may jump)
    elapsed_s: float = 0.0  # probation time served before the last save
    baseline: VersionWindow | None = None
    seen: VersionWindow | None = None
    crashes: int = 0  # restarts during this probation that were not clean shutdowns
    crash_reasons: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        value = dataclasses.asdict(self)
        value["format"] = FORMAT
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ProbationRecord:
        if value.get("format") != FORMAT:
            raise ValueError(f"format {value.get('format')!r}, expected {FORMAT}")
        policy = dict(value["policy"])
        shadow = policy.pop("shadow", None)
        return cls(
            model=str(value["model"]),
            version=str(value["version"]),
            version_dir=str(value["version_dir"]),
            previous_version=str(value["previous_version"]),
            previous_dir=str(value["previous_dir"]),
            policy=ProbationPolicy(
                **policy, shadow=ShadowPolicy(**shadow) if shadow is not None else None
            ),
            started_at=float(value["started_at"]),
            elapsed_s=float(value["elapsed_s"]),
            baseline=_window(value.get("baseline")),
            seen=_window(value.get("seen")),
            crashes=int(value["crashes"]),
            crash_reasons=tuple(str(r) for r in value.get("crash_reasons", ())),
        )


def _window(value: dict[str, Any] | None) -> VersionWindow | None:
    if value is None:
        return None
    return VersionWindow(**{**value, "latencies_s": tuple(value["latencies_s"])})


class ProbationRecords:
    """The records of one state directory, one file per model."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, model: str) -> Path:
        return self.directory / f"{model}.json"

    def save(self, record: ProbationRecord) -> None:
        """Write ``record`` durably (temp file, fsync, rename, fsync the directory)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            data = json.dumps(record.to_json(), sort_keys=True).encode()
            atomic_write(self.path(record.model), data, mode=0o600)
        except OSError as exc:
            raise ProbationRecordError(
                f"cannot write the probation record of {record.model} version {record.version} "
                f"to {self.path(record.model)}: {exc}"
            ) from exc

    def remove(self, model: str) -> None:
        """The probation ended in a verdict (or was superseded): nothing to resume."""
        path = self.path(model)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ProbationRecordError(f"cannot remove {path}: {exc}") from exc
        fsync_dir(self.directory)

    def load(self, model: str) -> ProbationRecord | None:
        path = self.path(model)
        try:
            return ProbationRecord.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ProbationRecordError(
                f"the probation record {path} is unreadable ({exc}); remove it to serve "
                "the release without probation"
            ) from exc

    def load_all(self) -> list[ProbationRecord]:
        """Every record; an unreadable one is logged and skipped (never blocks start-up)."""
        if not self.directory.is_dir():
            return []
        remove_temp_files(self.directory)
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = self.load(path.stem)
            except ProbationRecordError as exc:
                log.error("%s", exc)
                continue
            if record is not None:
                records.append(record)
        return records

    # --- verdicts reached before the serving process (re)started ---------------------------

    def save_decided(self, outcome: ProbationOutcome) -> None:
        """A verdict the serving process did not reach itself (the crash gate's revert at
        start-up): it shows it like its own once it (re)starts (``take_decided``)."""
        directory = self.directory / DECIDED_DIR
        try:
            directory.mkdir(parents=True, exist_ok=True)
            data = json.dumps(outcome.to_json(), sort_keys=True).encode()
            atomic_write(directory / f"{outcome.model}.json", data, mode=0o600)
        except OSError as exc:
            raise ProbationRecordError(f"cannot write {directory}: {exc}") from exc

    def take_decided(self) -> list[ProbationOutcome]:
        """The verdicts ``save_decided`` kept, removed as they are read."""
        directory = self.directory / DECIDED_DIR
        if not directory.is_dir():
            return []
        remove_temp_files(directory)
        outcomes = []
        for path in sorted(directory.glob("*.json")):
            try:
                outcomes.append(ProbationOutcome(**json.loads(path.read_bytes())))
            except (OSError, ValueError, TypeError) as exc:
                log.error("ignoring the unreadable probation verdict %s: %s", path, exc)
            path.unlink(missing_ok=True)
        if outcomes:
            fsync_dir(directory)
        return outcomes
