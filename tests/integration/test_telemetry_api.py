"""``/metrics`` and ``/edged/v1/telemetry`` of a real ``edged run`` after real requests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.api.client import Endpoint, LocalClient
from tests.support.daemon import running_daemon
from tests.support.metrics import promtool_check, samples, value

pytestmark = pytest.mark.integration

TELEMETRY_EVERY_HALF_SECOND = "[telemetry]\ninterval_s = 0.5\n"
FC_INPUT = {"input": np.zeros((1, 16), np.float32)}
MLP_INPUT = {"input": np.ones((3, 64), np.float32)}


def scrape(client: LocalClient) -> tuple[bytes, str]:
    status, headers, body = client.request("GET", "/metrics")
    assert status == 200, body
    return body, headers["Content-Type"]


def test_metrics_count_exactly_the_requests_served_and_pass_promtool(
    model_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(model_repo, tmp_path / "d", TELEMETRY_EVERY_HALF_SECOND) as daemon:
        client = LocalClient(Endpoint(url=daemon.url))
        for _ in range(20):
            client.infer("fc", FC_INPUT)
        for _ in range(7):
            client.infer("mlp", MLP_INPUT)
        body, content_type = scrape(client)

    assert content_type.startswith("text/plain; version=0.0.4")
    fc = {"model": "fc", "version": "1"}
    mlp = {"model": "mlp", "version": "1"}
    assert value(body, "edged_inference_requests_total", **fc) == 20
    assert value(body, "edged_inference_requests_total", **mlp) == 7
    for counter in ("errors", "rejected", "timeouts"):
        assert value(body, f"edged_inference_{counter}_total", **fc) == 0
    for histogram in ("queue", "compute", "request"):
        assert value(body, f"edged_inference_{histogram}_seconds_count", **fc) == 20
        assert value(body, f"edged_inference_{histogram}_seconds_bucket", le="+Inf", **mlp) == 7
    assert value(body, "edged_inference_request_seconds_sum", **fc) > 0
    # One client sending one at a time: mlp ran 7 batches of one 3-row request each.
    assert value(body, "edged_inference_batch_size_count", **mlp) == 7
    assert value(body, "edged_inference_batch_size_sum", **mlp) == 21
    assert value(body, "edged_inference_batch_size_bucket", le="2.0", **mlp) == 0
    assert value(body, "edged_inference_batch_size_bucket", le="4.0", **mlp) == 7
    assert value(body, "edged_queue_depth", model="fc") == 0
    info = [labels for name, labels in samples(body) if name == "edged_model_info"]
    runtimes = {dict(labels)["model"]: dict(labels)["runtime"] for labels in info}
    assert runtimes["mlp"].startswith("onnxruntime")
    assert "litert" in runtimes["fc"]
    promtool_check(body)


def test_unknown_power_is_left_out_and_system_appears_after_the_first_record(
    model_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(model_repo, tmp_path / "d", TELEMETRY_EVERY_HALF_SECOND) as daemon:
        client = LocalClient(Endpoint(socket_path=daemon.socket_path))
        client.infer("fc", FC_INPUT)
        for _ in range(300):
            if client.json("GET", "/edged/v1/telemetry")["record"] is not None:
                break
            time.sleep(0.1)
        body, _ = scrape(client)
        power_available = client.json("GET", "/edged/v1/telemetry")["power_available"]

    names = {name for name, _ in samples(body)}
    assert "edged_memory_available_bytes" in names
    assert "edged_process_resident_memory_bytes" in names
    assert "edged_telemetry_spool_pending_records" in names
    assert value(body, "edged_telemetry_published_total") == 0  # no broker configured
    assert value(body, "edged_power_sensors_available") == (1 if power_available else 0)
    if not power_available:
        assert not any(n.startswith(("edged_power_watts", "edged_board_power")) for n in names)
        assert not any(n.startswith("edged_energy_") for n in names)
    promtool_check(body)


def test_disabled_telemetry_still_counts_requests_but_reports_no_samples(
    model_repo: Path, tmp_path: Path
) -> None:
    config = "[telemetry]\nenabled = false\n"
    with running_daemon(model_repo, tmp_path / "d", config) as daemon:
        client = LocalClient(Endpoint(socket_path=daemon.socket_path))
        for _ in range(5):
            client.infer("fc", FC_INPUT)
        body, _ = scrape(client)
    assert value(body, "edged_inference_requests_total", model="fc", version="1") == 5
    names = {name for name, _ in samples(body)}
    assert "edged_memory_available_bytes" not in names  # never sampled, so not reported
    assert "edged_telemetry_spool_pending_records" not in names
    promtool_check(body)


def record_with_fc_requests(client: LocalClient) -> dict[str, Any]:
    """Send fc requests until a telemetry record covers some of them (records come every
    0.5 s and show only their own interval)."""
    for _ in range(200):
        for _ in range(5):
            client.infer("fc", FC_INPUT)
        record = client.json("GET", "/edged/v1/telemetry")["record"]
        if record is not None and record["models"].get("fc", {}).get("requests", 0) > 0:
            return dict(record)
        time.sleep(0.05)
    raise AssertionError("no telemetry record ever showed an fc request")


def test_telemetry_endpoint_has_a_record_with_requests_and_latency_percentiles(
    model_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(model_repo, tmp_path / "d", TELEMETRY_EVERY_HALF_SECOND) as daemon:
        client = LocalClient(Endpoint(socket_path=daemon.socket_path))
        record = record_with_fc_requests(client)
        snapshot = client.json("GET", "/edged/v1/telemetry")

    assert record["v"] == 1
    assert record["type"] == "telemetry"
    assert isinstance(record["seq"], int)
    fc = record["models"]["fc"]
    assert fc["version"] == "1"
    assert fc["requests"] > 0
    assert fc["qps"] > 0
    for part in ("e2e", "queue", "compute"):
        percentiles = fc["latency_ms"][part]
        assert set(percentiles) == {"p50", "p90", "p99", "p999"}
        assert all(isinstance(v, float | int) for v in percentiles.values()), percentiles
        assert percentiles["p50"] <= percentiles["p90"] <= percentiles["p99"] <= percentiles["p999"]
    assert fc["latency_ms"]["e2e"]["p50"] > 0
    assert sum(fc["batch_sizes"].values()) > 0
    assert record["system"]["mem_total_bytes"] > 0
    assert snapshot["interval_s"] == 0.5
    assert snapshot["spool"]["pending"] >= 1
    assert isinstance(snapshot["power_available"], bool)
    if not snapshot["power_available"]:
        assert snapshot["power_total_w"] is None
        assert fc["energy_mj_per_inference"] is None
