"""``edged top``: the frame rendered from fixed documents, request rates, and one real frame."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from edged.api.client import Endpoint, LocalClient
from edged.cli.top import Sample, render_frame, request_counts, request_rates
from edged.errors import InvalidRequestError
from edged.telemetry import MetricsRegistry
from edged.telemetry.prometheus import MetricsInputs, metric_families
from tests.support.daemon import running_daemon

from .helpers import FakeClock


def text_of(renderable: Any) -> str:
    console = Console(record=True, width=160, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


STATUS: dict[str, Any] = {
    "ready": True,
    "models": [
        {
            "name": "detector",
            "state": "READY",
            "version": "3",
            "runtime": "onnxruntime",
            "dynamic_batch": True,
            "queue_depth": 2,
            "last_error": None,
        },
        {
            "name": "fc",
            "state": "READY",
            "version": "1",
            "runtime": "litert",
            "dynamic_batch": False,
            "queue_depth": 0,
            "last_error": None,
        },
    ],
    "events": [],
}


def model_entry(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "version": "3",
        "requests": 1200,
        "errors": 1,
        "rejected": 4,
        "timeouts": 0,
        "qps": 120.0,
        "latency_ms": {
            "e2e": {"p50": 6.51, "p90": 7.94, "p99": 11.2, "p999": 19.8},
            "queue": {"p50": 0.52, "p90": 1.3, "p99": 3.1, "p999": 7.9},
            "compute": {"p50": 5.9, "p90": 6.4, "p99": 8.0, "p999": 11.9},
        },
        "batch_sizes": {"1": 210, "4": 240},
        "queue_depth": 3,
        "energy_mj_per_inference": 41.7,
        "energy_j": 49.9,
    }
    entry.update(overrides)
    return entry


def telemetry(
    *,
    power_available: bool = True,
    total_w: float | None = 7.512,
    models: dict[str, Any] | None = None,
    record: bool = True,
) -> dict[str, Any]:
    """A ``/edged/v1/telemetry`` document shaped like docs/telemetry.md's example."""
    doc: dict[str, Any] = {
        "record": None,
        "power_available": power_available,
        "power_total_w": total_w,
        "spool": {"pending": 2, "bytes": 4096, "max_bytes": 16 * 1024 * 1024},
        "published": 17,
        "interval_s": 10.0,
    }
    if record:
        doc["record"] = {
            "seq": 4812,
            "v": 1,
            "type": "telemetry",
            "ts": 1732520000.123,
            "device": "jetson-17",
            "models": models if models is not None else {"detector": model_entry()},
            "system": {
                "cpu_percent": 37.2,
                "cpu_percent_per_core": [50.0, 24.5],
                "cpu_freq_mhz": 1510.0,
                "cpu_freq_max_mhz": 1984.0,
                "mem_total_bytes": 8000000000,
                "mem_available_bytes": 5000000000,
                "mem_used_percent": 37.5,
                "rss_bytes": 123456789,
                "temperatures_c": {"cpu-thermal": 48.6, "gpu-thermal": 46.0},
                "throttled": None,
                "under_voltage": None,
                "throttle_events": None,
            },
            "power": {
                "total_w": total_w,
                "source": "VDD_IN (ina3221:1-0040)" if total_w is not None else None,
                "scope": "module" if total_w is not None else None,
                "rails": {"VDD_IN": 7.512} if power_available else {},
            },
        }
    return doc


def row_of(text: str, model: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] == model:
            return cells
    raise AssertionError(f"no row for {model!r} in:\n{text}")


def test_frame_shows_each_model_with_rate_latency_queue_and_energy() -> None:
    text = text_of(render_frame(STATUS, telemetry(), {"detector": 118.44, "fc": 0.0}))
    detector = row_of(text, "detector")
    assert detector == ["detector", "3", "READY", "118.4", "6.51", "11.20", "2", "5", "41.70"]
    fc = row_of(text, "fc")
    assert fc[:4] == ["fc", "1", "READY", "0.0"]
    assert fc[4:6] == ["-", "-"]  # no requests in the record: no percentiles


def test_header_shows_device_cpu_hottest_sensor_power_and_spool() -> None:
    text = text_of(render_frame(STATUS, telemetry(), {}))
    assert "jetson-17" in text
    assert "ready" in text
    assert "CPU 37 % @ 1510 MHz" in text
    assert "48.6 °C (cpu-thermal)" in text
    assert "7.51 W (VDD_IN (ina3221:1-0040), module)" in text
    assert "2 pending, 17 published" in text


def test_power_and_energy_are_unavailable_without_a_sensor() -> None:
    doc = telemetry(
        power_available=False,
        total_w=None,
        models={"detector": model_entry(energy_mj_per_inference=None, energy_j=None)},
    )
    text = text_of(render_frame(STATUS, doc, {"detector": 1.0}))
    assert "power unavailable (no power sensor)" in text
    assert row_of(text, "detector")[-1] == "unavailable"
    assert " W " not in text and " W (" not in text


def test_rails_without_a_board_total_show_no_power_number() -> None:
    doc = telemetry(
        total_w=None,
        models={"detector": model_entry(energy_mj_per_inference=None, energy_j=None)},
    )
    text = text_of(render_frame(STATUS, doc, {}))
    assert "power unavailable (no sensor measures the board total)" in text
    assert row_of(text, "detector")[-1] == "unavailable"


def test_unknown_rate_and_missing_record_render_as_dashes() -> None:
    text = text_of(render_frame(STATUS, telemetry(record=False), {"detector": None}))
    assert "no telemetry record yet" in text
    assert row_of(text, "detector")[3:] == ["-", "-", "-", "2", "-", "-"]


def test_not_ready_daemon_is_flagged() -> None:
    text = text_of(render_frame({**STATUS, "ready": False}, telemetry(), {}))
    assert "NOT READY" in text


def sample(t: float, counts: dict[tuple[str, str], float]) -> Sample:
    return Sample(t, STATUS, telemetry(), counts)


def test_rate_is_the_counter_delta_over_the_time_between_samples() -> None:
    before = sample(10.0, {("detector", "3"): 100.0, ("fc", "1"): 7.0})
    after = sample(12.0, {("detector", "3"): 340.0, ("fc", "1"): 7.0})
    assert request_rates(before, after) == {"detector": 120.0, "fc": 0.0}


def test_rate_sums_versions_and_counts_a_new_version_from_zero() -> None:
    before = sample(0.0, {("detector", "2"): 50.0})
    after = sample(1.0, {("detector", "2"): 60.0, ("detector", "3"): 30.0})
    assert request_rates(before, after)["detector"] == 40.0


def test_rate_is_unknown_without_a_previous_sample_or_after_a_restart() -> None:
    first = sample(0.0, {("detector", "3"): 500.0})
    assert request_rates(None, first) == {"detector": None, "fc": None}
    restarted = sample(1.0, {("detector", "3"): 3.0})
    assert request_rates(first, restarted)["detector"] is None
    assert request_rates(first, sample(0.0, {}))["detector"] is None


def test_request_counts_read_the_exporters_output() -> None:
    registry = MetricsRegistry(clock=FakeClock())
    for _ in range(3):
        registry.model("fc", "1").observe_request(0.001, 0.001, 0.002)
    families = metric_families(
        MetricsInputs(models=registry.cumulative(), serving=(("mlp", "2", "onnxruntime"),))
    )
    from prometheus_client import CollectorRegistry, generate_latest

    class Fixed:
        def collect(self) -> Any:
            return families

    prom = CollectorRegistry(auto_describe=False)
    prom.register(Fixed())
    counts = request_counts(generate_latest(prom).decode())
    assert counts == {("fc", "1"): 3.0, ("mlp", "2"): 0.0}


def test_request_counts_reject_text_that_is_not_an_exposition() -> None:
    with pytest.raises(InvalidRequestError):
        request_counts('edged_inference_requests_total{model="fc" 3\n')


def edged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged.cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin", "TERM": "dumb"},
    )


def test_unreachable_daemon_is_one_error_line(tmp_path: Path) -> None:
    done = edged("top", "--once", "--socket", str(tmp_path / "absent.sock"))
    assert done.returncode == 1
    assert done.stderr.strip().startswith("edged: error: cannot reach the edged daemon")
    assert len(done.stderr.strip().splitlines()) == 1


def test_interval_must_be_positive(tmp_path: Path) -> None:
    done = edged("top", "--once", "--interval", "0", "--socket", str(tmp_path / "s"))
    assert done.returncode == 1
    assert "--interval must be positive" in done.stderr


@pytest.mark.integration
def test_once_against_a_real_daemon_under_load_shows_models_versions_and_rate(
    model_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(model_repo, tmp_path / "d", "[telemetry]\ninterval_s = 0.5\n") as d:
        client = LocalClient(Endpoint(socket_path=d.socket_path))
        stop = threading.Event()
        failures: list[BaseException] = []

        def load() -> None:
            try:
                while not stop.is_set():
                    client.infer("fc", {"input": np.zeros((1, 16), np.float32)})
                    client.infer("mlp", {"input": np.zeros((2, 64), np.float32)})
            except BaseException as exc:
                failures.append(exc)

        # A first request of each model before top starts, so both counters exist.
        client.infer("fc", {"input": np.zeros((1, 16), np.float32)})
        client.infer("mlp", {"input": np.zeros((2, 64), np.float32)})
        worker = threading.Thread(target=load)
        worker.start()
        try:
            done = edged("top", "--once", "--interval", "0.5", "--socket", str(d.socket_path))
        finally:
            stop.set()
            worker.join()
        assert not failures
        assert done.returncode == 0, done.stderr
        for model in ("fc", "mlp"):
            row = row_of(done.stdout, model)
            assert row[1] == "1"
            assert row[2] == "READY"
            assert float(row[3]) > 0, done.stdout
        assert "power" in done.stdout


def test_frame_shows_the_serving_processes_with_restarts_and_last_exit() -> None:
    processes = [
        {"name": "engine", "role": "engine", "pid": 4242, "state": "running",
         "uptime_s": 12.0, "restarts": 1, "last_exit": "killed by SIGSEGV"},
        {"name": "front-end-1", "role": "front-end", "pid": 4243, "state": "running",
         "uptime_s": 30.0, "restarts": 0, "last_exit": None},
    ]  # fmt: skip
    text = text_of(render_frame({**STATUS, "processes": processes}, telemetry(), {}))
    engine = next(line for line in text.splitlines() if "engine" in line and "4242" in line)
    assert "killed by SIGSEGV" in engine
    assert "front-end-1" in text and "4243" in text
    assert "processes" not in text_of(render_frame(STATUS, telemetry(), {}))
