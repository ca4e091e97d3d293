"""HDR-style histogram: precision against numpy, merging, intervals, concurrent recording."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.errors import HistogramMismatchError
from edged.telemetry.histogram import (
    LATENCY_LAYOUT,
    Histogram,
    HistogramLayout,
    HistogramSnapshot,
)

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def _assert_within_bucket(reported: int | None, reference: float) -> None:
    # The histogram reports the top of the bucket holding the reference order statistic:
    # never below it, and at most one bucket width (1/128 of the value) above it.
    assert reported is not None
    assert reference <= reported <= reference * (1 + 1 / 128) + 1


def test_percentiles_match_numpy_within_bucket_precision() -> None:
    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=9.0, sigma=1.2, size=200_000).astype(np.int64)
    hist = Histogram()
    for value in values.tolist():
        hist.record(value)
    snap = hist.snapshot()
    assert snap.count == len(values)
    for p in PERCENTILES:
        reference = float(np.percentile(values, p, method="inverted_cdf"))
        _assert_within_bucket(snap.percentile(p), reference)
        # and, looser, within the advertised two significant digits of numpy's default
        assert snap.percentile(p) == pytest.approx(np.percentile(values, p), rel=0.01)


@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=300))
def test_any_percentile_lands_in_the_bucket_of_the_true_rank(values: list[int]) -> None:
    snap = HistogramSnapshot.from_values(values)
    for p in (0.0, 1.0, *PERCENTILES, 100.0):
        reference = float(np.percentile(values, p, method="inverted_cdf"))
        _assert_within_bucket(snap.percentile(p), reference)


def test_small_values_are_exact() -> None:
    snap = HistogramSnapshot.from_values(range(1, 201))
    assert snap.percentile(50) == 100
    assert snap.percentile(100) == 200
    assert snap.min == 1
    assert snap.max == 200
    assert snap.mean == pytest.approx(100.5)


def test_layout_buckets_cover_values_with_bounded_relative_width() -> None:
    layout = LATENCY_LAYOUT
    assert layout.counts_len == 3328
    previous_index = -1
    for value in [*range(0, 5000), *range(5000, 10**7, 997), layout.highest_trackable]:
        index = layout.index_of(value)
        low, high = layout.lowest_value_at(index), layout.highest_value_at(index)
        assert low <= value <= high
        assert high - low <= max(value / 128, 0)
        assert index >= previous_index
        previous_index = index
    assert layout.index_of(layout.highest_trackable) < layout.counts_len


def test_out_of_range_values_are_clamped_not_raised() -> None:
    hist = Histogram(HistogramLayout(highest_trackable=10_000))
    hist.record(-5)
    hist.record(10**12)
    snap = hist.snapshot()
    assert snap.count == 2
    assert snap.min == 0
    max_value = snap.max
    assert max_value is not None
    assert 10_000 <= max_value < 10_100


def test_merge_equals_recording_everything_in_one_histogram() -> None:
    rng = np.random.default_rng(1)
    a_values = rng.integers(1, 10**6, 5000).tolist()
    b_values = rng.integers(1, 10**4, 7000).tolist()
    merged = HistogramSnapshot.from_values(a_values).merge(HistogramSnapshot.from_values(b_values))
    together = HistogramSnapshot.from_values(a_values + b_values)
    assert merged == together
    assert merged.count == 12_000
    for p in PERCENTILES:
        assert merged.percentile(p) == together.percentile(p)


def test_merging_different_layouts_is_refused() -> None:
    a = HistogramSnapshot.empty(LATENCY_LAYOUT)
    b = HistogramSnapshot.empty(HistogramLayout(highest_trackable=1000))
    with pytest.raises(HistogramMismatchError, match="same HistogramLayout"):
        a.merge(b)


def test_empty_histogram_reports_no_percentiles() -> None:
    snap = Histogram().snapshot()
    assert snap.count == 0
    assert snap.percentile(99) is None
    assert snap.min is None
    assert snap.max is None
    assert snap.mean is None


def test_interval_returns_only_new_values_while_snapshot_stays_cumulative() -> None:
    hist = Histogram()
    for v in (10, 20, 30):
        hist.record(v)
    first = hist.interval()
    assert first.count == 3
    assert first.total == 60
    hist.record(1000)
    second = hist.interval()
    assert second.count == 1
    assert second.percentile(50) == LATENCY_LAYOUT.highest_value_at(LATENCY_LAYOUT.index_of(1000))
    assert hist.interval().count == 0
    assert hist.snapshot().count == 4


def test_concurrent_recording_from_many_threads_loses_no_counts() -> None:
    hist = Histogram()
    threads_n, per_thread = 8, 40_000
    start = threading.Barrier(threads_n + 1)
    intervals: list[HistogramSnapshot] = []
    stop_reader = threading.Event()

    def writer(seed: int) -> None:
        start.wait()
        for i in range(per_thread):
            hist.record((i * 31 + seed) % 50_000)

    def reader() -> None:
        start.wait()
        while not stop_reader.is_set():
            intervals.append(hist.interval())

    workers = [threading.Thread(target=writer, args=(s,)) for s in range(threads_n)]
    reading = threading.Thread(target=reader)
    for t in [*workers, reading]:
        t.start()
    for t in workers:
        t.join()
    stop_reader.set()
    reading.join()
    intervals.append(hist.interval())

    expected_total = sum((i * 31 + s) % 50_000 for s in range(threads_n) for i in range(per_thread))
    assert hist.snapshot().count == threads_n * per_thread
    assert hist.snapshot().total == expected_total
    # intervals taken concurrently with the writers partition the data exactly
    assert sum(i.count for i in intervals) == threads_n * per_thread
    assert sum(i.total for i in intervals) == expected_total


def test_shards_of_finished_threads_are_folded_and_keep_their_counts() -> None:
    hist = Histogram()

    def record_some() -> None:
        for _ in range(100):
            hist.record(5)

    for _ in range(20):
        t = threading.Thread(target=record_some)
        t.start()
        t.join()
    assert hist.snapshot().count == 2000
    assert len(hist._shards) == 0
    hist.record(7)
    assert hist.snapshot().count == 2001
    assert len(hist._shards) == 1


@given(st.lists(st.integers(min_value=-(10**3), max_value=10**10), max_size=200))
def test_recording_places_values_exactly_like_the_layout(values: list[int]) -> None:
    hist = Histogram()
    for value in values:
        hist.record(value)
    assert hist.snapshot() == HistogramSnapshot.from_values(values)
