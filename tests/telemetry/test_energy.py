"""Energy attribution with synthetic power samples and compute intervals."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.telemetry.energy import EnergyAttributor, EnergyStats, Interpolation
from edged.telemetry.metrics import ModelKey

from .helpers import FakeClock

A = ModelKey("detector", "3")
B = ModelKey("classifier", "1")


def _attributor(
    interpolation: Interpolation = Interpolation.LINEAR,
    *,
    settle_delay_s: float = 0.0,
    max_sample_gap_s: float = 5.0,
) -> tuple[EnergyAttributor, FakeClock]:
    clock = FakeClock(0.0)
    attributor = EnergyAttributor(
        clock=clock,
        interpolation=interpolation,
        settle_delay_s=settle_delay_s,
        max_sample_gap_s=max_sample_gap_s,
    )
    return attributor, clock


def _samples(attributor: EnergyAttributor, points: list[tuple[float, float]]) -> None:
    for t, watts in points:
        attributor.add_power_sample(t, watts)


def test_constant_power_is_divided_among_the_requests_of_a_batch() -> None:
    attributor, _ = _attributor()
    _samples(attributor, [(float(t), 10.0) for t in range(0, 6)])
    attributor.add_compute(A, 1.0, 2.0, batch_size=4)
    stats = attributor.take(now=5.0)
    assert stats[A].energy_j == pytest.approx(10.0)
    assert (stats[A].requests, stats[A].batches, stats[A].unattributed_requests) == (4, 1, 0)
    assert stats[A].mj_per_inference == pytest.approx(2500.0)


@pytest.mark.parametrize(
    ("interpolation", "expected_j"),
    [
        # P(t) = t W sampled every second; compute from t=2 to t=4
        (Interpolation.LINEAR, 6.0),  # ∫ t dt from 2 to 4
        (Interpolation.HOLD, 5.0),  # 2 W for 1 s, then 3 W for 1 s
        (Interpolation.INTERVAL_AVERAGE, 7.0),  # sample at 3 covers (2,3], at 4 covers (3,4]
    ],
)
def test_interpolation_modes_integrate_a_ramp(
    interpolation: Interpolation, expected_j: float
) -> None:
    attributor, _ = _attributor(interpolation)
    _samples(attributor, [(float(t), float(t)) for t in range(0, 11)])
    attributor.add_compute(A, 2.0, 4.0, batch_size=1)
    assert attributor.take(now=10.0)[A].energy_j == pytest.approx(expected_j)


def test_interval_between_samples_uses_the_interpolated_power() -> None:
    attributor, _ = _attributor(max_sample_gap_s=20.0)
    _samples(attributor, [(0.0, 0.0), (10.0, 10.0)])
    attributor.add_compute(A, 2.5, 3.5, batch_size=2)
    stats = attributor.take(now=10.0)[A]
    assert stats.energy_j == pytest.approx((3.5**2 - 2.5**2) / 2)
    assert stats.mj_per_inference == pytest.approx(1500.0)


def test_concurrent_models_split_the_overlap_equally() -> None:
    attributor, _ = _attributor()
    _samples(attributor, [(float(t), 12.0) for t in range(0, 8)])
    attributor.add_compute(A, 0.0, 4.0, batch_size=1)
    attributor.add_compute(B, 2.0, 6.0, batch_size=3)
    stats = attributor.take(now=7.0)
    assert stats[A].energy_j == pytest.approx(24.0 + 12.0)
    assert stats[B].energy_j == pytest.approx(12.0 + 24.0)
    assert stats[B].mj_per_inference == pytest.approx(12_000.0)
    # nothing is counted twice: the two models together got 12 W × 6 s
    assert stats[A].energy_j + stats[B].energy_j == pytest.approx(72.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([A, B]),
            st.floats(min_value=0.0, max_value=50.0),
            st.floats(min_value=0.01, max_value=10.0),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_attributed_energy_equals_power_times_busy_time(
    intervals: list[tuple[ModelKey, float, float]],
) -> None:
    attributor, _ = _attributor()
    _samples(attributor, [(t * 0.5, 8.0) for t in range(0, 130)])
    spans = sorted((start, start + length) for _, start, length in intervals)
    for key, start, length in intervals:
        attributor.add_compute(key, start, start + length, batch_size=1)
    stats = attributor.take(now=64.0)
    busy = 0.0
    covered_until = 0.0
    for start, end in spans:
        busy += max(0.0, end - max(start, covered_until))
        covered_until = max(covered_until, end)
    assert sum(s.energy_j for s in stats.values()) == pytest.approx(8.0 * busy)
    assert sum(s.requests for s in stats.values()) == len(intervals)


def test_interval_past_the_last_sample_waits_for_the_next_sample() -> None:
    attributor, _ = _attributor()
    _samples(attributor, [(0.0, 5.0), (1.0, 5.0)])
    attributor.add_compute(A, 0.5, 1.5, batch_size=1)
    assert attributor.take(now=1.5) == {}
    attributor.add_power_sample(2.0, 5.0)
    assert attributor.take(now=2.0)[A].energy_j == pytest.approx(5.0)


def test_settle_delay_lets_intervals_reported_at_their_end_join_the_split() -> None:
    attributor, clock = _attributor(settle_delay_s=2.0)
    _samples(attributor, [(t * 0.5, 10.0) for t in range(0, 21)])
    attributor.add_compute(A, 1.0, 3.0, batch_size=1)
    clock.now = 3.0
    assert attributor.take() == {}  # B may still be computing since before t=3
    attributor.add_compute(B, 2.0, 4.0, batch_size=1)  # reported when it ended, at t=4
    clock.now = 10.0
    stats = attributor.take()
    assert stats[A].energy_j == pytest.approx(10.0 + 5.0)
    assert stats[B].energy_j == pytest.approx(5.0 + 10.0)


def test_interval_reported_after_its_time_was_settled_is_unattributed() -> None:
    attributor, _ = _attributor()
    _samples(attributor, [(float(t), 10.0) for t in range(0, 11)])
    attributor.add_compute(A, 1.0, 3.0, batch_size=2)
    first = attributor.take(now=5.0)
    assert first[A].energy_j == pytest.approx(20.0)
    attributor.add_compute(B, 2.0, 4.0, batch_size=3)  # entirely in settled time
    attributor.add_compute(A, 4.5, 6.0, batch_size=1)  # starts in settled time: late
    second = attributor.take(now=10.0)
    assert second[B] == EnergyStats(unattributed_requests=3)
    assert second[A] == EnergyStats(unattributed_requests=1)
    assert second[A].mj_per_inference is None


def test_a_gap_in_power_samples_leaves_the_covering_interval_unattributed() -> None:
    attributor, _ = _attributor(max_sample_gap_s=5.0)
    _samples(attributor, [(0.0, 4.0), (1.0, 4.0), (10.0, 4.0), (11.0, 4.0)])
    attributor.add_compute(A, 0.5, 10.5, batch_size=1)
    attributor.add_compute(B, 10.2, 10.8, batch_size=1)
    stats = attributor.take(now=11.0)
    assert stats[A] == EnergyStats(unattributed_requests=1)
    # A still computed during 10.2-10.5, so it takes its half there even though its own
    # total is unknown: B gets 4 W × 0.3 s / 2 + 4 W × 0.3 s
    assert stats[B].energy_j == pytest.approx(0.6 + 1.2)


def test_without_any_power_samples_energy_is_unknown_not_zero() -> None:
    attributor, clock = _attributor(settle_delay_s=1.0)
    attributor.add_compute(A, 0.5, 1.0, batch_size=8)
    clock.now = 30.0
    stats = attributor.take()
    assert stats[A] == EnergyStats(unattributed_requests=8)
    assert stats[A].mj_per_inference is None


def test_take_resets_and_later_intervals_accumulate_separately() -> None:
    attributor, _ = _attributor()
    _samples(attributor, [(float(t), 2.0) for t in range(0, 21)])
    attributor.add_compute(A, 1.0, 2.0, batch_size=1)
    assert attributor.take(now=5.0)[A].energy_j == pytest.approx(2.0)
    attributor.add_compute(A, 6.0, 9.0, batch_size=2)
    attributor.add_compute(A, 10.0, 11.0, batch_size=2)
    stats = attributor.take(now=20.0)[A]
    assert stats.energy_j == pytest.approx(8.0)
    assert (stats.requests, stats.batches) == (4, 2)
    assert attributor.take(now=20.0) == {}


def test_reports_from_a_worker_thread_are_all_accounted_for() -> None:
    attributor, _ = _attributor()
    _samples(attributor, [(t * 0.1, 3.0) for t in range(0, 2001)])
    taken: list[dict[ModelKey, EnergyStats]] = []

    def worker() -> None:
        for i in range(5000):
            attributor.add_compute(A, i * 0.02, i * 0.02 + 0.01, batch_size=2)

    thread = threading.Thread(target=worker)
    thread.start()
    for step in range(50):
        taken.append(attributor.take(now=step * 2.0))
    thread.join()
    taken.append(attributor.take(now=200.0))
    total = EnergyStats()
    for stats in taken:
        if A in stats:
            total = total.plus(stats[A])
    assert total.requests + total.unattributed_requests == 10_000
    assert total.batches * 2 == total.requests
    assert total.energy_j == pytest.approx(total.batches * 0.03)
