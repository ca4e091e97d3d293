"""Per-model metrics: counters, histograms in microseconds, intervals, registry lifecycle."""

from __future__ import annotations

import threading

import pytest

from edged.telemetry.metrics import Counters, MetricsRegistry, ModelKey

from .helpers import FakeClock


def test_interval_reports_counts_latencies_and_qps_for_the_window() -> None:
    clock = FakeClock()
    registry = MetricsRegistry(clock=clock)
    metrics = registry.model("resnet", "3")
    for _ in range(40):
        metrics.observe_request(queue_s=0.002, compute_s=0.010, e2e_s=0.0125)
    metrics.observe_batch(8)
    metrics.observe_batch(8)
    metrics.observe_batch(4)
    metrics.count_error()
    metrics.count_rejected(3)
    metrics.count_timeout()
    metrics.set_queue_depth(5)
    clock.now += 10.0

    [snap] = registry.interval()
    assert snap.key == ModelKey("resnet", "3")
    assert snap.counters == Counters(requests=40, errors=1, rejected=3, timeouts=1)
    assert snap.qps == pytest.approx(4.0)
    assert snap.duration_s == pytest.approx(10.0)
    assert snap.queue_depth == 5
    assert snap.e2e_us.percentile(99) == pytest.approx(12_500, rel=0.01)
    assert snap.queue_us.percentile(50) == pytest.approx(2_000, rel=0.01)
    assert snap.compute_us.percentile(50) == pytest.approx(10_000, rel=0.01)
    assert dict(snap.batch_sizes.buckets()) == {4: 1, 8: 2}

    clock.now += 5.0
    metrics.observe_request(0.001, 0.001, 0.002)
    [second] = registry.interval()
    assert second.counters == Counters(requests=1)
    assert second.duration_s == pytest.approx(5.0)
    assert second.e2e_us.count == 1
    [cumulative] = registry.cumulative()
    assert cumulative.counters.requests == 41


def test_worker_thread_and_loop_thread_recording_is_not_lost() -> None:
    registry = MetricsRegistry()
    metrics = registry.model("yolo", "1")

    def worker() -> None:
        for _ in range(30_000):
            metrics.observe_request(0.001, 0.004, 0.005)
            metrics.observe_batch(1)

    t = threading.Thread(target=worker)
    t.start()
    for _ in range(30_000):
        metrics.count_rejected()
    t.join()
    [snap] = registry.interval()
    assert snap.counters.requests == 30_000
    assert snap.counters.rejected == 30_000
    assert snap.e2e_us.count == 30_000
    assert snap.batch_sizes.count == 30_000


def test_same_key_returns_the_same_metrics_object() -> None:
    registry = MetricsRegistry()
    assert registry.model("a", "1") is registry.model("a", "1")
    assert registry.model("a", "1") is not registry.model("a", "2")
    assert registry.keys() == [ModelKey("a", "1"), ModelKey("a", "2")]


def test_retired_version_reports_a_final_interval_then_disappears() -> None:
    registry = MetricsRegistry()
    old = registry.model("det", "1")
    registry.model("det", "2")
    old.observe_request(0.001, 0.001, 0.002)
    registry.retire("det", "1")
    snaps = registry.interval()
    assert [s.key.version for s in snaps] == ["1", "2"]
    assert snaps[0].counters.requests == 1
    assert [s.key.version for s in registry.interval()] == ["2"]


def test_re_registering_a_retiring_version_keeps_it() -> None:
    registry = MetricsRegistry()
    registry.model("det", "1")
    registry.retire("det", "1")
    registry.model("det", "1")
    registry.interval()
    assert registry.keys() == [ModelKey("det", "1")]
