"""The pure probation gates: watch, promote or revert, and every revert names the gate, the
measured value and the limit."""

from __future__ import annotations

from edged.serve.probation import (
    GateResult,
    ProbationPolicy,
    ShadowPolicy,
    VersionWindow,
    judge,
)
from edged.serve.versionstats import VERSIONS_KEPT, WARMUP_BATCHES, VersionStats

POLICY = ProbationPolicy(min_s=10, max_s=100, min_requests=100, max_p99_latency_ratio_pct=200)
BASE = VersionWindow("1", requests=500, errors=0, nonfinite=0, latencies_s=(0.002,) * 500)


def window(**kw: object) -> VersionWindow:
    values: dict[str, object] = {
        "version": "2", "requests": 200, "errors": 0, "nonfinite": 0,
        "latencies_s": (0.0022,) * 200,
    }  # fmt: skip
    values.update(kw)
    return VersionWindow(**values)  # type: ignore[arg-type]


def test_a_healthy_version_is_watched_until_min_s_then_promoted() -> None:
    assert judge(POLICY, BASE, window(), 5).decision == "watch"
    verdict = judge(POLICY, BASE, window(), 10)
    assert verdict.decision == "promote"
    assert "1.10x" in verdict.reason


def test_too_few_requests_keep_watching_until_max_s_then_promote_saying_so() -> None:
    few = window(requests=10, latencies_s=(0.001,) * 10)
    assert judge(POLICY, BASE, few, 50).decision == "watch"
    verdict = judge(POLICY, BASE, few, 100)
    assert verdict.decision == "promote"
    assert "too little traffic" in verdict.reason


def test_a_slower_version_trips_the_latency_gate_with_value_and_limit() -> None:
    verdict = judge(POLICY, BASE, window(latencies_s=(0.007,) * 200), 10)
    assert verdict.decision == "revert"
    assert verdict.trip is not None
    assert (verdict.trip.gate, verdict.trip.measured, verdict.trip.limit) == (
        "p99_latency_ratio", "3.50x", "2.00x",
    )  # fmt: skip
    assert "measured 3.50x, limit 2.00x" in verdict.reason


def test_a_sub_millisecond_p99_increase_is_noise_not_a_regression() -> None:
    tiny = VersionWindow("1", 500, 0, 0, (0.00005,) * 500)
    verdict = judge(POLICY, tiny, window(latencies_s=(0.0004,) * 200), 10)
    assert verdict.decision == "promote"  # 8x, but only 0.35 ms more
    assert judge(POLICY, tiny, window(latencies_s=(0.002,) * 200), 10).decision == "revert"


def test_ratio_gates_wait_for_min_s_while_a_new_version_settles() -> None:
    """Right after a swap a version as fast as the old one can time slow for a moment (the
    install's own CPU, cold caches): the ratio gates judge from min_s on; NaN does not wait."""
    early = judge(POLICY, BASE, window(latencies_s=(0.007,) * 200), 1)
    assert early.decision == "watch"
    assert "p99_latency_ratio not judged (settling: ratios are judged from 10s on)" in early.reason
    energy = ProbationPolicy(min_s=10, min_requests=10, max_energy_ratio_pct=150)
    base = VersionWindow("1", 500, 0, 0, (0.002,) * 500, energy_j_per_inference=0.010)
    hungry = window(energy_j_per_inference=0.030)
    assert judge(energy, base, hungry, 1, power=True).decision == "watch"
    assert judge(energy, base, hungry, 10, power=True).decision == "revert"
    assert judge(POLICY, BASE, window(requests=3, nonfinite=1), 0.1).decision == "revert"


def test_the_latency_gate_waits_for_min_requests_and_a_baseline() -> None:
    slow_few = window(requests=50, latencies_s=(0.01,) * 50)
    assert judge(POLICY, BASE, slow_few, 1).decision == "watch"
    no_base = VersionWindow("1", 0, 0, 0, ())
    verdict = judge(POLICY, no_base, window(latencies_s=(0.01,) * 200), 10)
    assert verdict.decision == "promote"
    assert "p99_latency_ratio not judged (no baseline: version 1 has 0 of 20" in verdict.reason


def test_one_nan_answer_trips_a_zero_limit_at_once() -> None:
    verdict = judge(POLICY, BASE, window(requests=3, nonfinite=1), 0.1)
    assert verdict.decision == "revert"
    assert verdict.trip is not None and verdict.trip.gate == "nonfinite"
    assert "1 of 3" in verdict.reason


def test_the_error_rate_gate_judges_a_share_once_enough_requests_came() -> None:
    policy = ProbationPolicy(min_s=0, min_requests=100, max_error_permille=10)
    assert judge(policy, BASE, window(requests=50, errors=1), 1).decision == "watch"
    verdict = judge(policy, BASE, window(requests=180, errors=20), 1)
    assert verdict.decision == "revert"
    assert verdict.trip is not None and verdict.trip.gate == "error_rate"
    assert verdict.trip.limit == "10 permille"


def test_shadow_disagreement_is_not_promoted() -> None:
    policy = ProbationPolicy(min_s=0, min_requests=10, shadow=ShadowPolicy(min_compared=10))
    pending = judge(policy, BASE, window(shadow_compared=3, shadow_agreed=3), 5)
    assert pending.decision == "watch"
    verdict = judge(policy, BASE, window(shadow_compared=40, shadow_agreed=30), 5)
    assert verdict.decision == "revert"
    assert verdict.trip is not None and verdict.trip.gate == "shadow_agreement"
    assert judge(policy, BASE, window(shadow_compared=40, shadow_agreed=40), 5).decision == (
        "promote"
    )


def test_version_windows_count_per_inference_and_skip_the_warm_up() -> None:
    stats = VersionStats()
    for _ in range(WARMUP_BATCHES):
        stats.record_batch("m", "2", 1, 0.5)  # warm-up: counted, not timed
    stats.record_batch("m", "2", 4, 0.008)
    stats.record_errors("m", "2", 2)
    window = stats.window("m", "2")
    assert (window.requests, window.errors) == (WARMUP_BATCHES + 4, 2)
    assert window.latencies_s == (0.002,) * 4
    stats.reset("m", "2")
    assert stats.window("m", "2").requests == 0


def test_the_energy_gate_judges_only_with_readings_for_both_versions() -> None:
    policy = ProbationPolicy(min_s=0, min_requests=10, max_energy_ratio_pct=150)
    base = VersionWindow("1", 500, 0, 0, (0.002,) * 500, energy_j_per_inference=0.010)
    hungry = window(energy_j_per_inference=0.020)
    verdict = judge(policy, base, hungry, 1, power=True)
    assert verdict.decision == "revert"
    assert verdict.trip is not None
    assert (verdict.trip.gate, verdict.trip.measured, verdict.trip.limit) == (
        "energy_ratio", "2.00x", "1.50x",
    )  # fmt: skip
    no_figure = VersionWindow("1", 500, 0, 0, (0.002,) * 500)
    unknown = judge(policy, no_figure, hungry, 1, power=True)
    assert unknown.decision == "promote"
    assert "energy_ratio not judged (no energy figures for both versions)" in unknown.reason
    # A power source, but no interval measured yet: waiting for figures, not "no power source".
    early = judge(policy, no_figure, window(), 1, power=True)
    waiting = GateResult("energy_ratio", "not judged", "no energy figures for both versions")
    assert early.gate("energy_ratio") == waiting
    none = judge(policy, no_figure, window(), 1)
    assert none.gate("energy_ratio") == GateResult("energy_ratio", "not judged", "no power source")


def test_every_gate_says_whether_it_judged_with_its_figure_or_why_not() -> None:
    verdict = judge(POLICY, BASE, window(), 10)
    statuses = {g.gate: g.status for g in verdict.gates}
    assert statuses == {
        "nonfinite": "passed", "error_rate": "passed", "p99_latency_ratio": "passed",
        "energy_ratio": "off", "shadow_agreement": "off",
    }  # fmt: skip
    assert "gates: nonfinite passed (0.0 permille, 0 of 200" in verdict.reason
    assert "p99_latency_ratio passed (1.10x" in verdict.reason
    slow = judge(POLICY, BASE, window(latencies_s=(0.007,) * 200), 10)
    assert slow.gate("p99_latency_ratio") is not None
    assert slow.gate("p99_latency_ratio").status == "tripped"  # type: ignore[union-attr]


def test_a_short_probation_at_low_traffic_says_the_latency_gate_did_not_judge() -> None:
    policy = ProbationPolicy(min_s=1, max_s=30, min_requests=10, max_p99_latency_ratio_pct=200)
    warm = window(requests=15, latencies_s=())  # every batch still a warm-up batch
    verdict = judge(policy, BASE, warm, 3)
    assert verdict.decision == "promote"
    assert "p99_latency_ratio not judged (too few timed batches: 0 of 20" in verdict.reason


def test_require_latency_verdict_extends_to_max_s_then_does_what_the_policy_says() -> None:
    policy = ProbationPolicy(
        min_s=1, max_s=30, min_requests=10, max_p99_latency_ratio_pct=200,
        require_latency_verdict=True,
    )  # fmt: skip
    warm = window(requests=15, latencies_s=())
    assert judge(policy, BASE, warm, 3).decision == "watch"
    assert judge(policy, BASE, window(), 3).decision == "promote"  # judged: 1.10x
    ended = judge(policy, BASE, warm, 30)
    assert ended.decision == "promote"
    assert "not judged by then: p99_latency_ratio not judged" in ended.reason
    strict = ProbationPolicy(**{**policy.__dict__, "at_max_s": "revert"})
    reverted = judge(strict, BASE, warm, 30)
    assert reverted.decision == "revert"
    assert reverted.trip is not None
    assert (reverted.trip.gate, reverted.trip.measured, reverted.trip.limit) == (
        "max_s",
        "30s",
        "30s",
    )


def test_the_serving_and_held_versions_windows_are_never_evicted() -> None:
    live = {"1"}
    stats = VersionStats(live=lambda model: live)
    for _ in range(WARMUP_BATCHES + 30):
        stats.record_batch("m", "1", 1, 0.001)
    for version in range(2, 2 + 3 * VERSIONS_KEPT):  # releases that came and went
        stats.reset("m", str(version))
        stats.record_batch("m", str(version), 1, 0.5)
    assert stats.window("m", "1").requests == WARMUP_BATCHES + 30
    assert len(stats.window("m", "1").latencies_s) == 30
    dropped = VersionStats()
    for _ in range(5):
        dropped.record_batch("m", "1", 1, 0.001)
    for version in range(2, 2 + VERSIONS_KEPT):
        dropped.reset("m", str(version))
    assert dropped.window("m", "1").requests == 0  # without the live set it would be lost
