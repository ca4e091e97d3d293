"""Probation that survives restarts, on real daemons with real ONNX models and live traffic:
a clean shutdown during probation resumes it to a verdict; the latency gate keeps its baseline
after reverted releases; a short probation at low traffic says the latency gate did not judge,
and a policy that requires that verdict waits for it."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.serve.probation import ProbationPolicy
from tests.integration.test_probation import (
    NEGATIVE_BODY,
    bundle,
    install,
    installs,
    policy_file,
    status,
    wait_probation_end,
)
from tests.support.cli import edged, trust_init
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.load import MLP_BODY, InferenceLoad
from tests.support.slowmodel import write_slow_mlp, write_sqrt_model

pytestmark = pytest.mark.integration


def good_release(keys: Path, tmp_path: Path, version: int, policy: ProbationPolicy) -> Path:
    source = tmp_path / "build" / str(version)
    write_onnx_mlp(source, SAMPLE_MLP_LAYERS, seed=0, bias_shift=version / 4)
    path = tmp_path / f"policy-{version}.json"
    return bundle(keys, tmp_path, source, version, policy_file(tmp_path, policy).rename(path))


def send(daemon: DaemonProcess, count: int, body: bytes = MLP_BODY) -> None:
    """``count`` requests one after the other: each its own batch (low traffic)."""
    for _ in range(count):
        request = urllib.request.Request(
            f"{daemon.url}/v2/models/mlp/infer", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200


def wait_watching_past(
    daemon: DaemonProcess, seconds: float, timeout_s: float = 60
) -> dict[str, Any]:
    """Bounded poll of the status until the running probation has watched ``seconds``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probation = status(daemon)["probation"]
        assert probation is not None, status(daemon)
        if probation["elapsed_s"] >= seconds and probation["reason"]:
            return dict(probation)
        time.sleep(0.1)
    raise AssertionError(f"probation never reached {seconds}s: {status(daemon)}")


def test_sigterm_during_probation_resumes_it_after_the_restart_to_a_verdict(
    model_repo: Path, tmp_path: Path, keys: Path
) -> None:
    work = tmp_path / "d"
    trust_init(keys, work / "state")
    # Latency off: this test is about the restart, not about a timing gate.
    policy = ProbationPolicy(
        min_s=1, max_s=300, min_requests=40, max_p99_latency_ratio_pct=0,
        max_energy_ratio_pct=150,
    )  # fmt: skip
    release = good_release(keys, tmp_path, 2, policy)
    (tmp_path / "no-rails").mkdir()  # a board without power sensors
    conf = f'[telemetry]\nsysfs_root = "{tmp_path / "no-rails"}"\n'
    with running_daemon(model_repo, work, conf) as daemon:
        send(daemon, 30)  # the baseline
        assert json.loads(install(daemon, release).stdout)["outcome"] == "installed"
        send(daemon, 10)  # seen before the shutdown: 10 of the 40 requests
        assert status(daemon)["probation"]["version"] == "2"
        daemon.signal(signal.SIGTERM)
        assert daemon.process.wait(60) == 0
    record = json.loads((work / "state" / "probation" / "mlp.json").read_text())
    assert (record["version"], record["crashes"], record["seen"]["requests"]) == ("2", 0, 10)
    with (
        running_daemon(model_repo, work, conf) as daemon,
        InferenceLoad(daemon.port, clients=2) as load,
    ):
        daemon.wait_for_log("probation of version 2 goes on after a restart")
        assert "version 1 loaded again" in daemon.log()
        outcome = wait_probation_end(daemon, "2")
        load.stop()
        assert outcome["decision"] == "promoted", outcome
        assert "passed probation" in outcome["reason"]
        assert "energy_ratio not judged (no power source)" in outcome["reason"]
        assert status(daemon)["version"] == "2"
        assert load.failures == {}
        entry = installs(daemon)[-1]
        assert (entry["action"], entry["outcome"], entry["version"]) == ("probation", "promoted", 2)
    assert not (work / "state" / "probation" / "mlp.json").exists()
    assert "released mlp version 1" in daemon.log()


def test_the_latency_gate_keeps_its_baseline_after_three_reverted_releases(
    model_repo: Path, tmp_path: Path, keys: Path
) -> None:
    work = tmp_path / "d"
    trust_init(keys, work / "state")
    nan_policy = policy_file(tmp_path, ProbationPolicy(min_s=1, max_s=300, min_requests=1000))
    nans = []
    for version in (2, 3, 4):
        write_sqrt_model(tmp_path / "build" / str(version))
        nans.append(bundle(keys, tmp_path, tmp_path / "build" / str(version), version, nan_policy))
    slow_dir = tmp_path / "build" / "5"
    write_slow_mlp(slow_dir)
    latency = ProbationPolicy(min_s=1, max_s=300, min_requests=60, max_p99_latency_ratio_pct=300)
    slow = bundle(keys, tmp_path, slow_dir, 5, policy_file(tmp_path, latency))
    with running_daemon(model_repo, work) as daemon, InferenceLoad(daemon.port, clients=3) as load:
        load.wait_for_ok(200)
        for version, path in zip((2, 3, 4), nans, strict=True):
            assert json.loads(install(daemon, path).stdout)["outcome"] == "installed"
            send(daemon, 1, NEGATIVE_BODY)  # NaN: the nonfinite gate reverts it at once
            outcome = wait_probation_end(daemon, str(version))
            assert (outcome["decision"], outcome["gate"]) == ("reverted", "nonfinite"), outcome
            load.wait_for_ok(20)
        assert json.loads(install(daemon, slow).stdout)["outcome"] == "installed"
        outcome = wait_probation_end(daemon, "5")
        load.stop()
        assert (outcome["decision"], outcome["gate"]) == ("reverted", "p99_latency_ratio"), outcome
        assert float(outcome["measured"].rstrip("x")) > 3.0
        assert status(daemon)["version"] == "1"
        assert load.failures == {}, load.failures


def test_a_short_probation_at_low_traffic_says_latency_was_not_judged_unless_required(
    model_repo: Path, tmp_path: Path, keys: Path
) -> None:
    work = tmp_path / "d"
    trust_init(keys, work / "state")
    # A limit no hiccup of a loaded CI machine reaches: this test is about whether the gate
    # judged, not about its figure.
    short = ProbationPolicy(min_s=1, max_s=300, min_requests=10, max_p99_latency_ratio_pct=10000)
    required = ProbationPolicy(**{**short.__dict__, "require_latency_verdict": True})
    v2 = good_release(keys, tmp_path, 2, short)
    v3 = good_release(keys, tmp_path, 3, required)
    with running_daemon(model_repo, work) as daemon:
        send(daemon, 45)  # 25 timed inferences after the 20 warm-up batches: a baseline
        assert json.loads(install(daemon, v2).stdout)["outcome"] == "installed"
        send(daemon, 12)  # enough requests, but every batch is a warm-up batch
        outcome = wait_probation_end(daemon, "2")
        assert outcome["decision"] == "promoted", outcome
        assert "p99_latency_ratio not judged (too few timed batches" in outcome["reason"]
        send(daemon, 45 - 12)  # version 2's own baseline for the next release
        assert json.loads(install(daemon, v3).stdout)["outcome"] == "installed"
        send(daemon, 12)
        watching = wait_watching_past(daemon, 1.5)  # past min_s with enough requests
        assert watching["verdict"] == "watch"
        assert "p99_latency_ratio not judged (too few timed batches" in watching["reason"]
        assert status(daemon)["probation"]["version"] == "3"  # not promoted without it
        send(daemon, 30)  # now past the warm-up: the latency gate judges
        outcome = wait_probation_end(daemon, "3")
        assert outcome["decision"] == "promoted", outcome
        assert "p99_latency_ratio passed" in outcome["reason"]


def engine_pid(daemon: DaemonProcess) -> int:
    out = edged("status", "--json", "--socket", str(daemon.socket_path)).stdout
    rows = json.loads(out).get("processes") or []
    engine = next((r for r in rows if r["role"] == "engine"), None)
    if engine is None or engine["pid"] is None:
        pytest.skip("the daemon runs without an engine process (server.workers = 0)")
    return int(engine["pid"])


def test_a_killed_engine_reverts_the_release_before_the_engine_restarts(
    model_repo: Path, tmp_path: Path, keys: Path
) -> None:
    work = tmp_path / "d"
    trust_init(keys, work / "state")
    policy = ProbationPolicy(min_s=600, max_s=900, min_requests=0)  # still running when killed
    release = good_release(keys, tmp_path, 2, policy)
    with running_daemon(model_repo, work) as daemon:
        send(daemon, 5)
        assert json.loads(install(daemon, release).stdout)["outcome"] == "installed"
        assert status(daemon)["probation"]["version"] == "2"
        os.kill(engine_pid(daemon), signal.SIGSEGV)  # a native crash of the runtime
        outcome = wait_probation_end(daemon, "2")
        assert (outcome["decision"], outcome["gate"]) == ("reverted", "crashes"), outcome
        assert outcome["reason"] == (
            "gate crashes: measured 1 crash, limit 1 "
            "(engine killed by signal 11 (SIGSEGV) during probation)"
        )
        assert status(daemon)["version"] == "1"
        with InferenceLoad(daemon.port, clients=2) as load:
            load.wait_for_ok(50)
            load.stop()
            assert load.failures == {}, load.failures
        entry = installs(daemon)[-1]
        assert (entry["action"], entry["outcome"], entry["version"]) == ("probation", "reverted", 2)
        assert daemon.process.poll() is None  # the control plane never went down
    assert not (work / "state" / "models" / "mlp" / "2").exists()
