"""Probation gates: a pure function from two versions' telemetry windows to a verdict.

After a hot swap the new version (the *candidate*) serves while the version it replaced (the
*baseline*) stays ready. ``judge`` compares what each did on the device's own traffic and
answers keep watching, promote, or revert naming the gate, the measured value and the limit.
No I/O and no clock: the caller passes the elapsed time.

Every verdict lists each gate as passed with its figure, tripped with its figure, not judged
with why (too few requests or timed batches, no baseline, no power source), or off.

Limits are integers (they travel in the signed manifest, whose canonical JSON has no floats):
shares in per mille, ratios in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

# A latency ratio needs this many timed inferences of each version; fewer and it is not judged.
MIN_BASELINE_SAMPLES = 20
MIN_TIMED_SAMPLES = MIN_BASELINE_SAMPLES
# A p99 less than this above the baseline's is scheduler noise, never a regression: with
# sub-millisecond models a ratio alone would trip on a single preemption.
LATENCY_NOISE_FLOOR_S = 0.001


@dataclass(frozen=True)
class ShadowPolicy:
    """Compare a sampled share of live requests on the other version (off when absent)."""

    sample_permille: int = 100  # share of requests also run on the baseline
    max_per_s: int = 5  # rate cap on shadow runs
    max_abs_diff_micro: int = 1000  # outputs agree when max |a - b| <= this / 1e6
    top1: bool = False  # classifiers: agree when the arg-max of every row matches
    min_agreement_permille: int = 990  # below this share of agreeing comparisons: revert
    min_compared: int = 20  # comparisons needed before the gate judges


@dataclass(frozen=True)
class ProbationPolicy:
    """How a release is judged on the device. The defaults apply when a release says nothing."""

    min_s: int = 60  # watch at least this long before promoting
    max_s: int = 900  # promote (or revert) by then at the latest
    min_requests: int = 100  # answered requests before promotion and before ratios are judged
    max_error_permille: int = 10  # failed requests / all requests
    max_nonfinite_permille: int = 0  # answers holding NaN or Inf / answered requests
    max_p99_latency_ratio_pct: int = 200  # candidate p99 / baseline p99; 0 = off
    max_energy_ratio_pct: int = 0  # candidate J per inference / baseline; 0 = off
    shadow: ShadowPolicy | None = None
    # Promote only once the latency gate judged (else watch on until max_s).
    require_latency_verdict: bool = False
    # At max_s without a verdict of every gate it needs: "promote" or "revert".
    at_max_s: str = "promote"
    # Restarts of the device during probation (crashes) that revert the release at start-up.
    max_crashes: int = 1


@dataclass(frozen=True)
class VersionWindow:
    """What one version did on live traffic (counts since it started serving)."""

    version: str
    requests: int  # answered
    errors: int  # failed in the runtime
    nonfinite: int  # answered, but an output held NaN or Inf
    latencies_s: tuple[float, ...]  # the most recent per-request compute times
    energy_j_per_inference: float | None = None
    shadow_compared: int = 0
    shadow_agreed: int = 0

    @property
    def p99_s(self) -> float | None:
        if not self.latencies_s:
            return None
        return float(np.percentile(np.asarray(self.latencies_s), 99))


@dataclass(frozen=True)
class GateTrip:
    gate: str  # nonfinite | error_rate | p99_latency_ratio | energy_ratio | shadow_agreement
    # | max_s (no verdict by then, policy at_max_s = revert) | crashes (the crash gate)
    measured: str
    limit: str
    detail: str = ""

    def describe(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"gate {self.gate}: measured {self.measured}, limit {self.limit}{extra}"


GateStatus = Literal["passed", "tripped", "not judged", "off"]


@dataclass(frozen=True)
class GateResult:
    """One gate in a verdict: ``figure`` is what it measured (passed, tripped) or why it could
    not judge (not judged)."""

    gate: str
    status: GateStatus
    figure: str = ""

    def describe(self) -> str:
        return f"{self.gate} {self.status}" + (f" ({self.figure})" if self.figure else "")


Decision = Literal["watch", "promote", "revert"]


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    trip: GateTrip | None = None
    gates: tuple[GateResult, ...] = ()

    def gate(self, name: str) -> GateResult | None:
        return next((g for g in self.gates if g.gate == name), None)


def _permille(part: int, whole: int) -> float:
    return 1000.0 * part / whole if whole else 0.0


def _share(
    gate: str, part: int, whole: int, limit: int, enough: bool, what: str, waiting: str
) -> tuple[GateResult, GateTrip | None]:
    """A zero limit trips on the first occurrence; otherwise only once enough were seen."""
    figure = f"{_permille(part, whole):.1f} permille, {part} of {whole} {what}"
    if part and (limit == 0 or (enough and _permille(part, whole) > limit)):
        trip = GateTrip(
            gate, f"{_permille(part, whole):.1f} permille", f"{limit} permille", f"{part} of "
            f"{whole} {what}"
        )  # fmt: skip
        return GateResult(gate, "tripped", figure), trip
    if limit == 0 or enough:
        return GateResult(gate, "passed", figure), None
    return GateResult(gate, "not judged", waiting), None


def judge(
    policy: ProbationPolicy,
    baseline: VersionWindow | None,
    candidate: VersionWindow,
    elapsed_s: float,
    power: bool = False,
) -> Verdict:
    """Watch, promote or revert ``candidate``, which replaced ``baseline`` ``elapsed_s`` ago.
    ``power``: the daemon measures energy (the energy gate waits for figures rather than
    saying there is no power source)."""
    total = candidate.requests + candidate.errors
    enough = total >= policy.min_requests
    waiting = f"{total} of {policy.min_requests} requests"
    checks = [
        _share(
            "nonfinite", candidate.nonfinite, candidate.requests,
            policy.max_nonfinite_permille, enough, "answers held NaN/Inf", waiting,
        ),
        _share(
            "error_rate", candidate.errors, total, policy.max_error_permille, enough,
            "requests failed", waiting,
        ),
        _latency(policy, baseline, candidate, enough, waiting, elapsed_s),
        _energy(policy, baseline, candidate, enough, waiting, power, elapsed_s),
        _shadow(policy.shadow, candidate),
    ]  # fmt: skip
    gates = tuple(result for result, _ in checks)
    trip = next((t for _, t in checks if t is not None), None)
    listing = "; gates: " + ", ".join(g.describe() for g in gates)
    if trip is not None:
        return Verdict("revert", trip.describe() + listing, trip, gates)
    summary = f"{total} requests, {candidate.errors} failed, {candidate.nonfinite} NaN/Inf"
    pending = [g for g in gates if g.status == "not judged" and _needed(policy, g.gate)]
    if elapsed_s >= policy.min_s and enough and not pending:
        return Verdict(
            "promote", f"passed probation after {elapsed_s:.0f}s: {summary}{listing}", None, gates
        )
    if elapsed_s >= policy.max_s:
        why = (
            f"too little traffic to judge ({waiting})"
            if not enough
            else "not judged by then: " + ", ".join(g.describe() for g in pending)
        )
        if policy.at_max_s == "revert":
            trip = GateTrip("max_s", f"{elapsed_s:.0f}s", f"{policy.max_s}s", why)
            return Verdict("revert", trip.describe() + listing, trip, gates)
        return Verdict(
            "promote",
            f"probation ended after {elapsed_s:.0f}s with {why}: {summary}{listing}",
            None,
            gates,
        )
    return Verdict("watch", f"watching for {elapsed_s:.0f}s: {summary}{listing}", None, gates)


def _needed(policy: ProbationPolicy, gate: str) -> bool:
    """Gates that must have judged before a promotion (before max_s)."""
    if gate == "shadow_agreement":
        return True
    return gate == "p99_latency_ratio" and policy.require_latency_verdict


def _settling(policy: ProbationPolicy, elapsed_s: float) -> str | None:
    """Why a ratio gate does not judge yet, before ``min_s``: right after a swap the new
    version's first timings carry the install's own CPU and cold caches, and a noisy moment
    on a small board must not revert a release that is as fast as the one it replaced."""
    if elapsed_s >= policy.min_s:
        return None
    return f"settling: ratios are judged from {policy.min_s}s on"


def _latency(
    policy: ProbationPolicy,
    baseline: VersionWindow | None,
    candidate: VersionWindow,
    enough: bool,
    waiting: str,
    elapsed_s: float,
) -> tuple[GateResult, GateTrip | None]:
    gate = "p99_latency_ratio"
    limit = policy.max_p99_latency_ratio_pct
    if not limit:
        return GateResult(gate, "off"), None
    if not enough:
        return GateResult(gate, "not judged", waiting), None
    if settling := _settling(policy, elapsed_s):
        return GateResult(gate, "not judged", settling), None
    if baseline is None or len(baseline.latencies_s) < MIN_BASELINE_SAMPLES:
        timed = len(baseline.latencies_s) if baseline is not None else 0
        which = f"version {baseline.version}" if baseline is not None else "the replaced version"
        return GateResult(
            gate, "not judged", f"no baseline: {which} has {timed} of {MIN_BASELINE_SAMPLES} "
            "timed inferences"
        ), None  # fmt: skip
    if len(candidate.latencies_s) < MIN_TIMED_SAMPLES:
        return GateResult(
            gate, "not judged", f"too few timed batches: {len(candidate.latencies_s)} of "
            f"{MIN_TIMED_SAMPLES} timed inferences of version {candidate.version} (a version's "
            "first batches are warm-up)"
        ), None  # fmt: skip
    base, cand = baseline.p99_s or 0.0, candidate.p99_s or 0.0
    ratio = cand / base if base > 0 else math.inf
    detail = (
        f"p99 {cand * 1000:.2f} ms on version {candidate.version} vs {base * 1000:.2f} ms "
        f"on version {baseline.version}"
    )
    if ratio * 100 > limit and cand - base > LATENCY_NOISE_FLOOR_S:
        trip = GateTrip(gate, f"{ratio:.2f}x", f"{limit / 100:.2f}x", detail)
        return GateResult(gate, "tripped", f"{ratio:.2f}x, {detail}"), trip
    return GateResult(gate, "passed", f"{ratio:.2f}x, {detail}"), None


def _energy(
    policy: ProbationPolicy,
    baseline: VersionWindow | None,
    candidate: VersionWindow,
    enough: bool,
    waiting: str,
    power: bool,
    elapsed_s: float,
) -> tuple[GateResult, GateTrip | None]:
    gate = "energy_ratio"
    limit = policy.max_energy_ratio_pct
    if not limit:
        return GateResult(gate, "off"), None
    base = baseline.energy_j_per_inference if baseline else None
    cand = candidate.energy_j_per_inference
    if not power:
        return GateResult(gate, "not judged", "no power source"), None
    if base is None or cand is None or base <= 0 or not math.isfinite(cand):
        return GateResult(gate, "not judged", "no energy figures for both versions"), None
    if not enough:
        return GateResult(gate, "not judged", waiting), None
    if settling := _settling(policy, elapsed_s):
        return GateResult(gate, "not judged", settling), None
    ratio = cand / base
    detail = f"{cand * 1000:.3f} mJ vs {base * 1000:.3f} mJ per inference"
    if ratio * 100 > limit:
        trip = GateTrip(gate, f"{ratio:.2f}x", f"{limit / 100:.2f}x", detail)
        return GateResult(gate, "tripped", f"{ratio:.2f}x, {detail}"), trip
    return GateResult(gate, "passed", f"{ratio:.2f}x, {detail}"), None


def _shadow(
    shadow: ShadowPolicy | None, candidate: VersionWindow
) -> tuple[GateResult, GateTrip | None]:
    gate = "shadow_agreement"
    if shadow is None:
        return GateResult(gate, "off"), None
    compared, agreed = candidate.shadow_compared, candidate.shadow_agreed
    if compared < shadow.min_compared:
        return GateResult(
            gate, "not judged", f"{compared} of {shadow.min_compared} shadow comparisons"
        ), None
    share = _permille(agreed, compared)
    figure = f"agreement {share:.1f} permille of {compared}"
    if share < shadow.min_agreement_permille:
        trip = GateTrip(
            gate,
            f"{share:.1f} permille",
            f"at least {shadow.min_agreement_permille} permille",
            f"{agreed} of {compared} shadowed requests agreed",
        )
        return GateResult(gate, "tripped", figure), trip
    return GateResult(gate, "passed", figure), None
