"""Probation gates: a pure function from two versions' telemetry windows to a verdict.

After a hot swap the new version (the *candidate*) serves while the version it replaced (the
*baseline*) stays ready. ``judge`` compares what each did on the device's own traffic and
answers keep watching, promote, or revert naming the gate, the measured value and the limit.
No I/O and no clock: the caller passes the elapsed time.

Limits are integers (they travel in the signed manifest, whose canonical JSON has no floats):
shares in per mille, ratios in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

# A latency ratio needs this many samples of the baseline; fewer and the gate is not judged.
MIN_BASELINE_SAMPLES = 20
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
    measured: str
    limit: str
    detail: str = ""

    def describe(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"gate {self.gate}: measured {self.measured}, limit {self.limit}{extra}"


Decision = Literal["watch", "promote", "revert"]


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    trip: GateTrip | None = None


def _permille(part: int, whole: int) -> float:
    return 1000.0 * part / whole if whole else 0.0


def _share_trip(gate: str, part: int, whole: int, limit: int, what: str) -> GateTrip:
    return GateTrip(
        gate,
        f"{_permille(part, whole):.1f} permille",
        f"{limit} permille",
        f"{part} of {whole} {what}",
    )


def _check_share(
    gate: str, part: int, whole: int, limit: int, judged: bool, what: str
) -> GateTrip | None:
    """A zero limit trips on the first occurrence; otherwise only once enough were seen."""
    if part == 0:
        return None
    if limit == 0 or (judged and _permille(part, whole) > limit):
        return _share_trip(gate, part, whole, limit, what)
    return None


def judge(
    policy: ProbationPolicy,
    baseline: VersionWindow | None,
    candidate: VersionWindow,
    elapsed_s: float,
) -> Verdict:
    """Watch, promote or revert ``candidate``, which replaced ``baseline`` ``elapsed_s`` ago."""
    total = candidate.requests + candidate.errors
    enough = total >= policy.min_requests
    trip = _check_share(
        "nonfinite",
        candidate.nonfinite,
        candidate.requests,
        policy.max_nonfinite_permille,
        enough,
        "answers held NaN/Inf",
    ) or _check_share(
        "error_rate", candidate.errors, total, policy.max_error_permille, enough, "requests failed"
    )
    notes: list[str] = []
    if trip is None:
        trip = _latency_trip(policy, baseline, candidate, enough, notes)
    if trip is None:
        trip = _energy_trip(policy, baseline, candidate, enough, notes)
    if trip is None and policy.shadow is not None:
        trip = _shadow_trip(policy.shadow, candidate, notes)
    if trip is not None:
        return Verdict("revert", trip.describe(), trip)
    summary = (
        f"{total} requests, {candidate.errors} failed, {candidate.nonfinite} NaN/Inf"
        + "".join(f"; {n}" for n in notes)
    )
    shadow_pending = (
        policy.shadow is not None and candidate.shadow_compared < policy.shadow.min_compared
    )
    if elapsed_s >= policy.min_s and enough and not shadow_pending:
        return Verdict("promote", f"passed probation after {elapsed_s:.0f}s: {summary}")
    if elapsed_s >= policy.max_s:
        return Verdict(
            "promote",
            f"probation ended after {elapsed_s:.0f}s with too little traffic to judge "
            f"({total} of {policy.min_requests} requests"
            + (", too few shadow comparisons" if shadow_pending else "")
            + f"): {summary}",
        )
    return Verdict("watch", f"watching for {elapsed_s:.0f}s: {summary}")


def _latency_trip(
    policy: ProbationPolicy,
    baseline: VersionWindow | None,
    candidate: VersionWindow,
    enough: bool,
    notes: list[str],
) -> GateTrip | None:
    limit = policy.max_p99_latency_ratio_pct
    if not limit or not enough:
        return None
    if baseline is None or len(baseline.latencies_s) < MIN_BASELINE_SAMPLES:
        notes.append("p99 latency not compared (no baseline traffic)")
        return None
    base, cand = baseline.p99_s, candidate.p99_s
    if base is None or cand is None or base <= 0:
        return None
    ratio = cand / base
    detail = (
        f"p99 {cand * 1000:.2f} ms on version {candidate.version} vs {base * 1000:.2f} ms "
        f"on version {baseline.version}"
    )
    if ratio * 100 > limit and cand - base > LATENCY_NOISE_FLOOR_S:
        return GateTrip("p99_latency_ratio", f"{ratio:.2f}x", f"{limit / 100:.2f}x", detail)
    notes.append(f"p99 latency {ratio:.2f}x of version {baseline.version}")
    return None


def _energy_trip(
    policy: ProbationPolicy,
    baseline: VersionWindow | None,
    candidate: VersionWindow,
    enough: bool,
    notes: list[str],
) -> GateTrip | None:
    limit = policy.max_energy_ratio_pct
    if not limit or not enough:
        return None
    base = baseline.energy_j_per_inference if baseline else None
    cand = candidate.energy_j_per_inference
    if base is None or cand is None or base <= 0 or not math.isfinite(cand):
        notes.append("energy not compared (no power readings for both versions)")
        return None
    ratio = cand / base
    if ratio * 100 > limit:
        return GateTrip(
            "energy_ratio",
            f"{ratio:.2f}x",
            f"{limit / 100:.2f}x",
            f"{cand * 1000:.3f} mJ vs {base * 1000:.3f} mJ per inference",
        )
    notes.append(f"energy {ratio:.2f}x")
    return None


def _shadow_trip(
    shadow: ShadowPolicy, candidate: VersionWindow, notes: list[str]
) -> GateTrip | None:
    compared, agreed = candidate.shadow_compared, candidate.shadow_agreed
    if compared < shadow.min_compared:
        notes.append(f"{compared} shadow comparisons")
        return None
    share = _permille(agreed, compared)
    if share < shadow.min_agreement_permille:
        return GateTrip(
            "shadow_agreement",
            f"{share:.1f} permille",
            f"at least {shadow.min_agreement_permille} permille",
            f"{agreed} of {compared} shadowed requests agreed",
        )
    notes.append(f"agreement {share:.1f} permille of {compared}")
    return None
