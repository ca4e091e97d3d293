"""A staged rollout's plan and saved state: waves, the abort policy, each device's state, and
the store of ``<dir>/<id>.json`` with its control file and engine lock. Only the standard
library: ``edged rollout status`` reads a 10,000-device state file without loading the MQTT
client or the bundle code (``edged.fleet.rollout`` drives rollouts).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edged._fs import atomic_write
from edged.errors import ConfigError, RolloutError

# The device's own progress states this module names (``edged.transport.protocol``; a test
# checks they agree).
FAILED = "failed"
PROMOTED = "promoted"
REVERTED = "reverted"
DEFAULT_CHUNK_BYTES = 64 * 1024  # ``edged.fleet.channel.DEFAULT_CHUNK_BYTES``

# Rollout status.
RUNNING = "running"
PAUSED = "paused"
ABORTING = "aborting"
ABORTED = "aborted"
DONE = "done"

# Device states besides the device's own progress states.
PENDING = "pending"  # its wave has not started
OFFLINE = "offline"  # its wave started while it was offline: announced when it returns
ANNOUNCED = "announced"
PASSED = "passed"  # promoted after probation
REFUSED = "refused"
ROLLED_BACK = "rolled-back"
ROLLBACK_FAILED = "rollback-failed"  # e.g. the version before is not held in its store
BAD_STATES = frozenset({REVERTED, FAILED, REFUSED})
DECIDED_STATES = BAD_STATES | {PASSED}

ROLLOUT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


@dataclass(frozen=True)
class AbortPolicy:
    failed_permille: int = 0  # abort when failed/decided exceeds this (0: the first failure)
    min_devices: int = 1  # ... once at least this many devices decided
    wave_timeout_s: float = 600.0  # a wave whose announced devices did not all decide by then


DEFAULT_ABORT = AbortPolicy()


def plan_waves(
    devices: Sequence[str], percents: Sequence[int], canary: str | None = None
) -> list[list[str]]:
    """Waves of a group: one canary device, then cumulative percentages of the group (the
    last is always 100). Every device is in exactly one wave; empty waves are dropped."""
    members = sorted(set(devices))
    if not members:
        raise RolloutError("the group has no devices")
    if canary is not None and canary not in members:
        raise RolloutError(f"canary {canary!r} is not a member of the group")
    first = canary or members[0]
    rest = [d for d in members if d != first]
    waves: list[list[str]] = [[first]]
    taken = 1
    for percent in [*sorted(p for p in percents if 0 < p < 100), 100]:
        upto = min(len(members), max(taken, math.ceil(len(members) * percent / 100)))
        wave = rest[taken - 1 : upto - 1]
        if wave:
            waves.append(wave)
            taken = upto
    return waves


def abort_reason(policy: AbortPolicy, states: dict[str, str], reasons: dict[str, str]) -> str:
    """Why the rollout must abort now (empty: it need not)."""
    bad = sorted(d for d, s in states.items() if s in BAD_STATES)
    decided = sum(1 for s in states.values() if s in DECIDED_STATES)
    if decided < policy.min_devices or not bad:
        return ""
    if len(bad) * 1000 <= policy.failed_permille * decided:
        return ""
    first = bad[0]
    return (
        f"{len(bad)} of {decided} devices failed or reverted (limit "
        f"{policy.failed_permille / 10:g} % after {policy.min_devices}); "
        f"{first} {states[first]}: {reasons.get(first, '')}"
    )


@dataclass
class DeviceRecord:
    wave: int
    state: str = PENDING
    reason: str = ""
    previous_version: str | None = None  # what it served before: the rollback target
    at: float = 0.0


@dataclass
class RolloutState:
    id: str
    bundle: str
    bundle_sha256: str
    deployment: str
    model: str
    version: int
    group: str
    waves: list[list[str]]
    abort: AbortPolicy
    chunk_size: int = DEFAULT_CHUNK_BYTES
    status: str = RUNNING
    wave: int = 0
    wave_started_at: float = 0.0
    reason: str = ""
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    wave_started: list[float] = field(default_factory=list)  # Unix time each wave began
    wave_done_at: list[float] = field(default_factory=list)
    messages_sent: int = 0
    urls: list[str] = field(default_factory=list)  # artifact mirrors; empty: MQTT chunks

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> RolloutState:
        value = dict(value)
        value["abort"] = AbortPolicy(**value["abort"])
        value["devices"] = {d: DeviceRecord(**r) for d, r in value["devices"].items()}
        return cls(**value)

    @property
    def finished(self) -> bool:
        return self.status in (DONE, ABORTED)


class RolloutStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, rollout_id: str, suffix: str) -> Path:
        if not ROLLOUT_ID_RE.match(rollout_id):
            raise RolloutError(f"rollout id {rollout_id!r} is not valid")
        return self.directory / f"{rollout_id}{suffix}"

    def save(self, state: RolloutState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = json.dumps(state.to_json(), separators=(",", ":"), sort_keys=True).encode()
        atomic_write(self._path(state.id, ".json"), data)

    def load(self, rollout_id: str) -> RolloutState:
        path = self._path(rollout_id, ".json")
        try:
            return RolloutState.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError as exc:
            raise RolloutError(f"no rollout {rollout_id!r} in {self.directory}") from exc
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RolloutError(f"rollout state {path} is unreadable: {exc}") from exc

    def ids(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json"))

    def control(self, rollout_id: str) -> str:
        try:
            return self._path(rollout_id, ".control").read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return ""

    def set_control(self, rollout_id: str, value: str) -> None:
        self.load(rollout_id)  # must exist
        atomic_write(self._path(rollout_id, ".control"), value.encode("ascii"))

    @contextlib.contextmanager
    def engine_lock(self, rollout_id: str) -> Iterator[None]:
        """Held while an engine drives the rollout; raises if another one does."""
        path = self._path(rollout_id, ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise RolloutError(
                    f"rollout {rollout_id} is being driven by another edged process"
                ) from exc
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def is_driven(self, rollout_id: str) -> bool:
        try:
            with self.engine_lock(rollout_id):
                return False
        except RolloutError:
            return True


def wave_counts(state: RolloutState, wave: int) -> Counter[str]:
    return Counter(state.devices[d].state for d in state.waves[wave])


def summary_line(state: RolloutState) -> str:
    """``wave 3/4 (5000 devices): 4810 passed, 12 reverted, ...; fleet: 6020/10000 passed``."""
    wave = min(state.wave, len(state.waves) - 1)
    counts = wave_counts(state, wave)
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    passed = sum(1 for r in state.devices.values() if r.state == PASSED)
    return (
        f"wave {wave + 1}/{len(state.waves)} ({len(state.waves[wave])} devices): {parts}; "
        f"fleet: {passed}/{len(state.devices)} passed"
    )


def check_percents(values: Sequence[int]) -> list[int]:
    for value in values:
        if not 0 < value <= 100:
            raise ConfigError("--waves", f"percentages must be in 1..100, got {value}")
    return sorted(values)
