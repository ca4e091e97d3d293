"""Probation on a real daemon with real ONNX models, installed through ``edged install``: a
release that passes its test vectors but is much slower, or answers NaN on some live inputs, is
reverted by the hot swap with zero failed requests; a good one is promoted and the old version
released. Every revert reason names the gate, the measured value and the limit."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from edged.bundle.rollout_policy import rollout_json
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.serve.probation import ProbationPolicy
from tests.support.cli import edged, trust_init
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.load import InferenceLoad
from tests.support.slowmodel import write_slow_mlp, write_sqrt_model

pytestmark = pytest.mark.integration

NEGATIVE_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [-0.5] * 64}]}
).encode()


def policy_file(tmp_path: Path, policy: ProbationPolicy) -> Path:
    path = tmp_path / "rollout.json"
    path.write_text(json.dumps(rollout_json(policy)))
    return path


def bundle(keys: Path, tmp_path: Path, model_dir: Path, version: int, policy: Path) -> Path:
    out = tmp_path / f"mlp-{version}.bundle"
    edged(
        "bundle", "build", "--model-dir", str(model_dir),
        "--config", str(tmp_path / "models" / "mlp" / "config.toml"),
        "--name", "mlp", "--version", str(version), "--counter", str(version),
        "--key", str(keys / "signer.key"), "--rollout", str(policy), "-o", str(out),
    )  # fmt: skip
    return out


def status(daemon: DaemonProcess) -> dict[str, Any]:
    out = edged("status", "--json", "--socket", str(daemon.socket_path)).stdout
    doc: dict[str, Any] = json.loads(out)
    return next(m for m in doc["models"] if m["name"] == "mlp")


def wait_probation_end(
    daemon: DaemonProcess, version: str, timeout_s: float = 120.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = status(daemon).get("last_probation")
        if last and last["version"] == version and last["decision"] in ("promoted", "reverted"):
            return dict(last)
        time.sleep(0.2)
    raise AssertionError(f"probation of {version} did not end: {status(daemon)}\n{daemon.log()}")


def install(daemon: DaemonProcess, path: Path, check: bool = True) -> Any:
    done = edged("install", str(path), "--socket", str(daemon.socket_path), "--json", check=check)
    return done


def installs(daemon: DaemonProcess) -> list[dict[str, Any]]:
    out = edged("installs", "--json", "--socket", str(daemon.socket_path)).stdout
    value = json.loads(out)
    return list(value["entries"] if isinstance(value, dict) else value)


def assert_reverted(
    daemon: DaemonProcess, work: Path, bad: Path, gate: str, limit: str
) -> dict[str, Any]:
    outcome = wait_probation_end(daemon, "2")
    assert outcome["decision"] == "reverted", outcome
    assert (outcome["gate"], outcome["limit"]) == (gate, limit)
    assert outcome["measured"]
    assert f"gate {gate}: measured {outcome['measured']}, limit {limit}" in outcome["reason"]
    model = status(daemon)
    assert model["version"] == "1"
    assert model["probation"] is None
    text = edged("status", "--socket", str(daemon.socket_path)).stdout
    assert "probation" in text and "reverted" in text
    entry = installs(daemon)[-1]
    assert (entry["action"], entry["outcome"], entry["version"]) == ("probation", "reverted", 2)
    assert f"gate {gate}" in entry["message"]
    assert entry["error"] == "ProbationFailedError"
    store = work / "state" / "models" / "mlp"
    assert (store / "CURRENT").read_text().strip() == "1"
    assert not (store / "2").exists()
    # Never re-installed by itself, nor by a re-push of the same release.
    again = install(daemon, bad, check=False)
    assert again.returncode != 0
    assert "RevertedReleaseError" in again.stdout + again.stderr
    assert status(daemon)["version"] == "1"
    return outcome


def test_a_much_slower_release_is_reverted_by_the_latency_gate_without_failed_requests(
    model_repo: Path, tmp_path: Path, keys: Path
) -> None:
    work = tmp_path / "d"
    trust_init(keys, work / "state")
    slow_dir = tmp_path / "build" / "2"
    write_slow_mlp(slow_dir)
    policy = ProbationPolicy(min_s=1, max_s=300, min_requests=60, max_p99_latency_ratio_pct=300)
    slow = bundle(keys, tmp_path, slow_dir, 2, policy_file(tmp_path, policy))
    with running_daemon(model_repo, work) as daemon, InferenceLoad(daemon.port, clients=3) as load:
        load.wait_for_ok(200)  # the baseline's window
        assert json.loads(install(daemon, slow).stdout)["outcome"] == "installed"
        outcome = assert_reverted(daemon, work, slow, "p99_latency_ratio", "3.00x")
        assert float(outcome["measured"].rstrip("x")) > 3.0
        load.wait_for_ok(50)  # serving goes on, on version 1
        load.stop()
        assert load.failures == {}, load.failures
        assert "released mlp version 2" in daemon.log()


def test_a_release_answering_nan_on_live_inputs_is_reverted_by_the_nan_gate(
    model_repo: Path, tmp_path: Path, keys: Path
) -> None:
    work = tmp_path / "d"
    trust_init(keys, work / "state")
    nan_dir = tmp_path / "build" / "2"
    write_sqrt_model(nan_dir)
    policy = ProbationPolicy(min_s=1, max_s=300, min_requests=1000)
    bad = bundle(keys, tmp_path, nan_dir, 2, policy_file(tmp_path, policy))
    with (
        running_daemon(model_repo, work) as daemon,
        InferenceLoad(daemon.port, clients=2) as positive,
        InferenceLoad(daemon.port, body=NEGATIVE_BODY, clients=1) as negative,
    ):
        positive.wait_for_ok(50)
        assert json.loads(install(daemon, bad).stdout)["outcome"] == "installed"
        assert_reverted(daemon, work, bad, "nonfinite", "0 permille")
        positive.wait_for_ok(20)
        positive.stop()
        negative.stop()
        assert positive.failures == {} and negative.failures == {}


def test_a_good_release_is_promoted_and_the_old_version_released(
    model_repo: Path, tmp_path: Path, keys: Path
) -> None:
    work = tmp_path / "d"
    trust_init(keys, work / "state")
    good_dir = tmp_path / "build" / "2"
    write_onnx_mlp(good_dir, SAMPLE_MLP_LAYERS, seed=0, bias_shift=1.0)
    # Enough requests on both sides that p99 is a percentile, not the one slowest request: on a
    # loaded 2-core CI machine one scheduling hiccup can be 10x a 1 ms inference.
    policy = ProbationPolicy(min_s=1, max_s=300, min_requests=400, max_p99_latency_ratio_pct=1000)
    good = bundle(keys, tmp_path, good_dir, 2, policy_file(tmp_path, policy))
    with running_daemon(model_repo, work) as daemon, InferenceLoad(daemon.port, clients=2) as load:
        load.wait_for_ok(400)
        assert json.loads(install(daemon, good).stdout)["outcome"] == "installed"
        assert status(daemon)["probation"] is not None or status(daemon)["last_probation"]
        outcome = wait_probation_end(daemon, "2")
        assert outcome["decision"] == "promoted", outcome
        assert "passed probation" in outcome["reason"]
        assert status(daemon)["version"] == "2"
        entry = installs(daemon)[-1]
        assert (entry["action"], entry["outcome"], entry["version"]) == ("probation", "promoted", 2)
        load.stop()
        assert load.failures == {}
    assert "released mlp version 1" in daemon.log()
