"""The Prometheus exporter: names, units, bucket conversion, and what is left out when unknown."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edged.config import TelemetryConfig
from edged.telemetry import (
    EnergyStats,
    HistogramSnapshot,
    MetricsRegistry,
    ModelKey,
    PowerReading,
    SystemSnapshot,
    ThrottleState,
)
from edged.telemetry.hub import TelemetryHub
from edged.telemetry.metrics import BATCH_LAYOUT
from edged.telemetry.prometheus import (
    BATCH_BOUNDS,
    CONTENT_TYPE,
    LATENCY_BOUNDS_S,
    MetricsInputs,
    cumulative_buckets,
    metric_families,
    render_metrics,
)
from tests.support.metrics import promtool_check, samples, value

from .helpers import FakeClock
from .sysfs_trees import EMPTY, ORIN_NANO, Tree


def render(inputs: MetricsInputs) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    class Fixed:
        def collect(self) -> Any:
            return metric_families(inputs)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    return generate_latest(registry)


def types(body: bytes) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


def names(body: bytes) -> set[str]:
    return {name for name, _ in samples(body)}


@pytest.fixture
def registry() -> MetricsRegistry:
    """fc/1 with three requests (0.9 ms, 4 ms, 30 ms end to end) in two batches, one error."""
    registry = MetricsRegistry(clock=FakeClock())
    fc = registry.model("fc", "1")
    fc.observe_request(0.0002, 0.0007, 0.0009)
    fc.observe_request(0.001, 0.003, 0.004)
    fc.observe_request(0.010, 0.020, 0.030)
    fc.observe_batch(1)
    fc.observe_batch(2)
    fc.count_error()
    fc.count_rejected(2)
    return registry


SERVING = (("fc", "1", "ai-edge-litert delegate=XNNPACK threads=1"),)


def test_counters_carry_model_and_version_labels_and_the_total_suffix(
    registry: MetricsRegistry,
) -> None:
    body = render(MetricsInputs(models=registry.cumulative(), serving=SERVING))
    assert value(body, "edged_inference_requests_total", model="fc", version="1") == 3
    assert value(body, "edged_inference_errors_total", model="fc", version="1") == 1
    assert value(body, "edged_inference_rejected_total", model="fc", version="1") == 2
    assert value(body, "edged_inference_timeouts_total", model="fc", version="1") == 0
    assert types(body)["edged_inference_requests"] == "counter"
    promtool_check(body)


def test_latency_histograms_are_in_seconds_with_fixed_le_bounds(
    registry: MetricsRegistry,
) -> None:
    body = render(MetricsInputs(models=registry.cumulative(), serving=SERVING))
    fc = {"model": "fc", "version": "1"}
    request = "edged_inference_request_seconds"
    assert types(body)[request] == "histogram"
    assert value(body, f"{request}_count", **fc) == 3
    assert value(body, f"{request}_sum", **fc) == pytest.approx(0.0349, rel=0.01)
    buckets = {
        labels: v
        for (name, labels), v in samples(body).items()
        if name == f"{request}_bucket" and ("model", "fc") in labels
    }
    assert len(buckets) == len(LATENCY_BOUNDS_S) + 1
    by_le = {dict(labels)["le"]: v for labels, v in buckets.items()}
    assert by_le["0.0005"] == 0
    assert by_le["0.001"] == 1
    assert by_le["0.005"] == 2
    assert by_le["0.025"] == 2
    assert by_le["0.05"] == 3
    assert by_le["10.0"] == 3
    assert by_le["+Inf"] == 3
    assert value(body, "edged_inference_queue_seconds_count", **fc) == 3
    assert value(body, "edged_inference_compute_seconds_sum", **fc) == pytest.approx(
        0.0237, rel=0.01
    )
    promtool_check(body)


def test_batch_sizes_are_a_histogram_of_requests_per_batch(registry: MetricsRegistry) -> None:
    body = render(MetricsInputs(models=registry.cumulative(), serving=SERVING))
    fc = {"model": "fc", "version": "1"}
    assert value(body, "edged_inference_batch_size_count", **fc) == 2
    assert value(body, "edged_inference_batch_size_sum", **fc) == 3
    assert value(body, "edged_inference_batch_size_bucket", le="1.0", **fc) == 1
    assert value(body, "edged_inference_batch_size_bucket", le="2.0", **fc) == 2
    assert value(body, "edged_inference_batch_size_bucket", le="+Inf", **fc) == 2


def test_cumulative_buckets_convert_microseconds_and_end_with_inf() -> None:
    hdr = HistogramSnapshot.from_values([50, 100, 150, 900, 2_000_000, 20_000_000])
    buckets = dict(cumulative_buckets(hdr, LATENCY_BOUNDS_S, scale=1e-6))
    assert buckets["0.0001"] == 2
    assert buckets["0.00025"] == 3
    assert buckets["0.001"] == 4
    assert buckets["1.0"] == 4
    assert buckets["2.5"] == 5
    assert buckets["10.0"] == 5
    assert buckets["+Inf"] == 6
    assert list(buckets.values()) == sorted(buckets.values())


def test_a_value_never_lands_below_its_true_bound() -> None:
    # 1,000,001 µs falls in the HDR bucket 999,424..1,003,519 µs, which straddles 1 s: the
    # whole bucket counts above the bound, so nothing slower than 1 s is reported as <= 1 s.
    hdr = HistogramSnapshot.from_values([1_000_001])
    buckets = dict(cumulative_buckets(hdr, LATENCY_BOUNDS_S, scale=1e-6))
    assert buckets["1.0"] == 0
    assert buckets["2.5"] == 1


def test_empty_histogram_has_zero_buckets() -> None:
    buckets = cumulative_buckets(HistogramSnapshot.empty(BATCH_LAYOUT), BATCH_BOUNDS)
    assert [count for _, count in buckets] == [0.0] * (len(BATCH_BOUNDS) + 1)


def test_a_serving_version_without_requests_is_exported_at_zero() -> None:
    serving = (("fc", "1", "litert"), ("mlp", "2", "onnxruntime"))
    body = render(MetricsInputs(serving=serving, queue_depths={"fc": 0, "mlp": 4}))
    assert value(body, "edged_inference_requests_total", model="mlp", version="2") == 0
    assert value(body, "edged_inference_request_seconds_count", model="mlp", version="2") == 0
    assert value(body, "edged_model_info", model="mlp", version="2", runtime="onnxruntime") == 1
    assert value(body, "edged_queue_depth", model="mlp") == 4
    promtool_check(body)


def test_label_values_with_quotes_and_backslashes_round_trip() -> None:
    runtime = 'onnxruntime providers="CUDA\\TensorRT"\nlean'
    body = render(MetricsInputs(serving=(("m", "1", runtime),)))
    assert value(body, "edged_model_info", model="m", version="1", runtime=runtime) == 1
    promtool_check(body)


def test_without_power_sensor_no_power_or_energy_value_is_made_up(
    registry: MetricsRegistry,
) -> None:
    energy = {ModelKey("fc", "1"): EnergyStats(0.0, 0, 0, unattributed_requests=3)}
    body = render(MetricsInputs(models=registry.cumulative(), serving=SERVING, energy=energy))
    assert value(body, "edged_power_sensors_available") == 0
    present = names(body)
    assert not {n for n in present if n.startswith(("edged_power_watts", "edged_board_power"))}
    assert not {n for n in present if n.startswith("edged_energy")}
    promtool_check(body)


def test_rails_without_a_measured_total_give_no_board_power() -> None:
    reading = PowerReading(t=1.0, rails={"VDD_CPU": 2.0, "VDD_SOC": 1.5})
    body = render(MetricsInputs(power_available=True, power=reading))
    assert value(body, "edged_power_sensors_available") == 1
    assert value(body, "edged_power_watts", rail="VDD_CPU") == 2.0
    assert value(body, "edged_power_watts", rail="VDD_SOC") == 1.5
    assert not {n for n in names(body) if n.startswith("edged_board_power")}


def test_measured_total_and_energy_are_exported_with_their_source(
    registry: MetricsRegistry,
) -> None:
    reading = PowerReading(
        t=1.0,
        rails={"VDD_IN": 7.5, "VDD_SOC": 2.8},
        total_watts=7.5,
        total_source="VDD_IN (ina3221:1-0040)",
        total_scope="module",
    )
    energy = {ModelKey("fc", "1"): EnergyStats(0.12, 3, 2)}
    body = render(
        MetricsInputs(
            models=registry.cumulative(),
            serving=SERVING,
            energy=energy,
            power_available=True,
            power=reading,
        )
    )
    board = value(body, "edged_board_power_watts", source="VDD_IN (ina3221:1-0040)", scope="module")
    assert board == 7.5
    assert value(body, "edged_energy_joules_total", model="fc", version="1") == 0.12
    assert value(body, "edged_energy_attributed_requests_total", model="fc", version="1") == 3
    assert types(body)["edged_energy_joules"] == "counter"
    promtool_check(body)


def test_system_metrics_use_base_units_and_omit_what_is_unknown() -> None:
    system = SystemSnapshot(
        cpu_percent=37.5,
        cpu_percent_per_core=(50.0, 25.0),
        cpu_freq_mhz=1510.0,
        cpu_freq_max_mhz=None,
        memory_total_bytes=8_000_000_000,
        memory_available_bytes=5_000_000_000,
        memory_used_percent=37.5,
        process_rss_bytes=123_456_789,
        temperatures_c={"cpu-thermal": 48.6, "gpu-thermal": 45.0},
        throttle=ThrottleState(throttled=False, under_voltage=None, events=7),
    )
    body = render(MetricsInputs(system=system))
    assert value(body, "edged_cpu_utilization_ratio") == 0.375
    assert value(body, "edged_cpu_core_utilization_ratio", core="1") == 0.25
    assert value(body, "edged_cpu_frequency_hertz") == 1.51e9
    assert value(body, "edged_memory_available_bytes") == 5e9
    assert value(body, "edged_process_resident_memory_bytes") == 123_456_789
    assert value(body, "edged_temperature_celsius", sensor="cpu-thermal") == 48.6
    assert value(body, "edged_throttled") == 0
    assert value(body, "edged_cpu_throttle_events_total") == 7
    present = names(body)
    assert "edged_cpu_frequency_max_hertz" not in present
    assert "edged_under_voltage" not in present
    promtool_check(body)


def test_first_cpu_sample_has_no_utilization() -> None:
    system = SystemSnapshot(None, (), None, None, None, None, None, None)
    present = names(render(MetricsInputs(system=system)))
    assert "edged_cpu_utilization_ratio" not in present
    assert "edged_memory_available_bytes" not in present


def test_spool_metrics_only_once_the_spool_is_open() -> None:
    closed = names(render(MetricsInputs(published=0)))
    assert "edged_telemetry_spool_pending_records" not in closed
    assert "edged_telemetry_published_total" in closed
    body = render(MetricsInputs(spool_pending=4, spool_bytes=2048, published=9))
    assert value(body, "edged_telemetry_spool_pending_records") == 4
    assert value(body, "edged_telemetry_published_total") == 9


class StatusOf:
    """``ModelManager``'s status documents for a fixed set of models (the real manager runs in
    the integration tests)."""

    def __init__(self, models: list[dict[str, Any]]) -> None:
        self._models = models

    def status(self) -> dict[str, Any]:
        return {"ready": True, "models": self._models, "events": []}

    def queue_depths(self) -> dict[str, tuple[str | None, int]]:
        return {m["name"]: (m["version"], m["queue_depth"]) for m in self._models}


@pytest.mark.parametrize(("tree", "has_total"), [(ORIN_NANO, True), (EMPTY, False)])
def test_render_metrics_reads_a_real_hub_and_passes_promtool(
    tmp_path: Path, sysfs: Callable[[Tree], Path], tree: Tree, has_total: bool
) -> None:
    hub = TelemetryHub(TelemetryConfig(sysfs_root=sysfs(tree)), tmp_path / "state")
    metrics = hub.registry.model("fc", "1")
    for _ in range(5):
        metrics.observe_request(0.0001, 0.002, 0.0021)
    if hub.power.available:
        hub.latest_power = hub.power.read()
    manager = StatusOf(
        [
            {"name": "fc", "version": "1", "runtime": "litert", "queue_depth": 0},
            {"name": "mlp", "version": None, "runtime": None, "queue_depth": 0},
        ]
    )
    body, content_type = render_metrics(hub, manager)
    assert content_type == CONTENT_TYPE
    assert value(body, "edged_inference_requests_total", model="fc", version="1") == 5
    assert value(body, "edged_model_info", model="fc", version="1", runtime="litert") == 1
    assert ("edged_model_info", (("model", "mlp"),)) not in samples(body)
    assert any(n.startswith("edged_board_power_watts") for n in names(body)) is has_total
    assert value(body, "edged_power_sensors_available") == (1 if has_total else 0)
    promtool_check(body)


def test_every_sample_name_is_prefixed_and_in_base_units(registry: MetricsRegistry) -> None:
    body = render(MetricsInputs(models=registry.cumulative(), serving=SERVING, published=1))
    parsed: list[Sample] = [
        s for f in text_string_to_metric_families(body.decode()) for s in f.samples
    ]
    assert parsed
    for sample in parsed:
        assert sample.name.startswith("edged_")
        assert "_ms" not in sample.name
        assert "_us" not in sample.name


def test_swaps_verdicts_and_restarts_are_counters_zeroed_for_serving_versions(
    tmp_path: Path,
) -> None:
    hub = TelemetryHub(TelemetryConfig(sysfs_root=tmp_path / "none"), tmp_path / "state")
    hub.count_swap("fc", "1", ok=True)
    hub.count_swap("fc", "2", ok=False)
    hub.count_probation_verdict("fc", "1", "promoted")
    hub.service_restarts = lambda: {"telemetry": 0, "fleet": 3}

    class Serving:
        def status(self) -> dict[str, Any]:
            return {"models": [{"name": "fc", "version": "1", "runtime": "litert"}]}

        def queue_depths(self) -> dict[str, tuple[str | None, int]]:
            return {"fc": ("1", 0)}

    body, _ = render_metrics(hub, Serving())
    assert types(body)["edged_model_swaps"] == "counter"
    assert value(body, "edged_model_swaps_total", model="fc", version="1", result="ok") == 1
    assert value(body, "edged_model_swaps_total", model="fc", version="1", result="failed") == 0
    assert value(body, "edged_model_swaps_total", model="fc", version="2", result="failed") == 1
    for decision, count in (("promoted", 1), ("reverted", 0), ("superseded", 0), ("stopped", 0)):
        assert (
            value(
                body, "edged_probation_verdicts_total", model="fc", version="1", decision=decision
            )
            == count
        )
    assert value(body, "edged_service_restarts_total", service="fleet") == 3
    assert value(body, "edged_service_restarts_total", service="telemetry") == 0
