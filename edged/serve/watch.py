"""Probation on the device: after a swap, watch the new version and promote or revert it.

The version it replaced stays loaded (held by one extra handle) while the new one serves; a
task asks the pure gate function (``edged.serve.probation.judge``) at a fixed interval. A
tripped gate swaps the held version back in by the same atomic slot switch as any swap, so
requests already running finish on the new version and none fails; a passed probation
releases the held version. When the memory policy unloaded the old version first, a revert
reloads it from its directory instead (with its self-test).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edged.serve.probation import ProbationPolicy, Verdict, VersionWindow, judge
from edged.serve.shadow import ShadowRunner
from edged.serve.slot import ModelSlot, ServedVersion
from edged.serve.versionstats import VersionStats

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.2


@dataclass(frozen=True)
class ProbationOutcome:
    """How a probation ended. ``decision``: promoted | reverted | superseded | stopped."""

    model: str
    version: str
    previous_version: str
    decision: str
    reason: str
    gate: str | None
    measured: str | None
    limit: str | None
    at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Reverter = Callable[["ProbationWatch"], Awaitable[None]]
# (model, version) -> joules per inference of that version, None where not known yet. A daemon
# without a power source has none (the energy gate then says so).
EnergyFigure = Callable[[str, str], "float | None"]
Listener = Callable[[ProbationOutcome], Awaitable[None]]


class ProbationWatch:
    def __init__(
        self,
        model: str,
        slot: ModelSlot,
        candidate: ServedVersion,
        previous_version: str,
        previous_dir: Path,
        held: ServedVersion | None,
        policy: ProbationPolicy,
        baseline: VersionWindow | None,
        stats: VersionStats,
        carried: VersionWindow | None = None,
        elapsed_before_s: float = 0.0,
        energy: EnergyFigure | None = None,
    ) -> None:
        """``carried`` and ``elapsed_before_s``: what the release did, and for how long,
        before a restart (a probation resumed from its durable record)."""
        self.model = model
        self.slot = slot
        self.candidate = candidate
        self.previous_version = previous_version
        self.previous_dir = previous_dir
        self.held = held
        self.policy = policy
        self.baseline = baseline
        self.stats = stats
        self.started = time.monotonic() - elapsed_before_s
        self.carried = carried
        self.energy = energy
        self.last: Verdict | None = None
        self.task: asyncio.Task[None] | None = None
        self.shadow: ShadowRunner | None = None
        if policy.shadow is not None and held is not None:
            self.shadow = ShadowRunner(policy.shadow, slot, held, candidate.version, stats)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def verdict(self) -> Verdict:
        window = _merged(self.carried, self.stats.window(self.model, self.candidate.version))
        if self.energy is not None:
            window = replace(
                window, energy_j_per_inference=self.energy(self.model, self.candidate.version)
            )
            baseline = self.baseline
            if baseline is not None and baseline.energy_j_per_inference is None:
                # No figure yet when the swap came (a release pushed right after a start): the
                # replaced version's figure, measured before the swap, may have come since.
                self.baseline = replace(
                    baseline, energy_j_per_inference=self.energy(self.model, baseline.version)
                )
        power = self.energy is not None
        self.last = judge(self.policy, self.baseline, window, self.elapsed_s, power)
        return self.last

    def release_held(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            self.slot.release(held)

    def outcome(self, decision: str, verdict: Verdict | None, reason: str = "") -> ProbationOutcome:
        trip = verdict.trip if verdict is not None else None
        return ProbationOutcome(
            model=self.model,
            version=self.candidate.version,
            previous_version=self.previous_version,
            decision=decision,
            reason=reason or (verdict.reason if verdict is not None else ""),
            gate=trip.gate if trip else None,
            measured=trip.measured if trip else None,
            limit=trip.limit if trip else None,
            at=time.time(),
        )

    def status(self) -> dict[str, Any]:
        verdict = self.last
        return {
            "version": self.candidate.version,
            "previous_version": self.previous_version,
            "elapsed_s": round(self.elapsed_s, 1),
            "previous_loaded": self.held is not None,
            "shadow_dropped": self.shadow.dropped if self.shadow is not None else None,
            "verdict": verdict.decision if verdict else "watch",
            "reason": verdict.reason if verdict else "",
        }

    async def run(self, revert: Reverter, finish: Callable[[ProbationOutcome], None]) -> None:
        """Judge until a decision; revert or promote; then report the outcome."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            verdict = self.verdict()
            if verdict.decision == "watch":
                continue
            if verdict.decision == "promote":
                self.release_held()
                log.info(
                    "model %s: version %s promoted: %s",
                    self.model,
                    self.candidate.version,
                    verdict.reason,
                )
                finish(self.outcome("promoted", verdict))
                return
            log.warning(
                "model %s: version %s failed probation, reverting to %s: %s",
                self.model,
                self.candidate.version,
                self.previous_version,
                verdict.reason,
            )
            await revert(self)
            finish(self.outcome("reverted", verdict))
            return


def _merged(before: VersionWindow | None, now: VersionWindow) -> VersionWindow:
    """The counts of a release's window before a restart added to those since."""
    if before is None:
        return now
    return VersionWindow(
        version=now.version,
        requests=before.requests + now.requests,
        errors=before.errors + now.errors,
        nonfinite=before.nonfinite + now.nonfinite,
        latencies_s=now.latencies_s,
        energy_j_per_inference=now.energy_j_per_inference,
        shadow_compared=before.shadow_compared + now.shadow_compared,
        shadow_agreed=before.shadow_agreed + now.shadow_agreed,
    )


def seen_so_far(watch: ProbationWatch) -> VersionWindow:
    """What a durable record keeps of the release's window (counts; not the latencies)."""
    window = _merged(watch.carried, watch.stats.window(watch.model, watch.candidate.version))
    return VersionWindow(
        version=window.version,
        requests=window.requests,
        errors=window.errors,
        nonfinite=window.nonfinite,
        latencies_s=(),
        shadow_compared=window.shadow_compared,
        shadow_agreed=window.shadow_agreed,
    )
