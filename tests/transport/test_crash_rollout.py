"""Crash-safe rollouts against a real Mosquitto (mutual TLS) and real device daemons: a release
whose probation is cut by a SIGKILL of the daemon is reverted at the restart, before it serves
again (the crash gate), reported ``reverted`` so that the rollout aborts before wave 2, and the
device serves the held version with no failed request."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from edged.bundle.build import BundleSpec, build_bundle_from_dir
from edged.fleet.rollout import RolloutStore
from edged.serve.probation import ProbationPolicy
from tests.support.broker import Broker
from tests.support.daemon import SAMPLE_MODELS, DaemonProcess
from tests.support.load import InferenceLoad
from tests.support.pki import FleetPki, SigningKeys
from tests.support.slowmodel import write_hanging_mlp
from tests.transport.conftest import Devices
from tests.transport.helpers import connection_args
from tests.transport.test_rollout import (
    EDGED,
    GROUP,
    build_release,
    device_args,
    rollout_cli,
    serving_version,
    start_all,
)


def mlp_status(daemon: DaemonProcess) -> dict[str, object]:
    out = subprocess.run(
        [*EDGED, "status", "--json", "--socket", str(daemon.socket_path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return dict(next(m for m in json.loads(out)["models"] if m["name"] == "mlp"))


def wait_probation_running(
    daemon: DaemonProcess, workdir: Path, tool: subprocess.Popen[str], timeout_s: float = 120
) -> None:
    """Bounded poll: version 2 on probation and its deployment job finished (serving)."""
    active = workdir / "state" / "transport" / "active.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probation = mlp_status(daemon)["probation"]
        if isinstance(probation, dict) and probation["version"] == "2" and not active.exists():
            return
        if tool.poll() is not None:
            raise AssertionError(f"the rollout tool exited early: {tool.communicate()[0]}")
        time.sleep(0.1)
    raise AssertionError(f"no probation of version 2: {mlp_status(daemon)}\n{daemon.log()}")


def test_sigkill_during_probation_reverts_at_restart_and_the_rollout_aborts(
    tmp_path: Path, devices: Devices, broker: Broker, pki: FleetPki, signing: SigningKeys
) -> None:
    names = ["edge-1", "edge-2"]
    policy = ProbationPolicy(min_s=600, max_s=900, min_requests=0)  # still running when killed
    release = build_release(tmp_path, signing, 2, policy, slow=False)
    canary, _ = start_all(devices, names)
    store = RolloutStore(tmp_path / "rollouts")
    tool = subprocess.Popen(
        rollout_cli(broker, pki, signing, store.directory, "start", str(release), "--group", GROUP,
                    "--canary", "edge-1", "--waves", "50", "--id", "crash", *device_args(names)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_probation_running(canary, devices.workdir_of("edge-1"), tool)
        canary.signal(signal.SIGKILL)  # e.g. the OOM killer on an input the vectors never had
        assert canary.process.wait(30) == -signal.SIGKILL
        restarted = devices.start("edge-1", groups=[GROUP])
        out, _ = tool.communicate(timeout=120)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.communicate()
    assert tool.returncode == 1, out
    assert "aborted" in out
    state = store.load("crash")
    assert state.status == "aborted"
    assert state.wave == 0
    canary_state = state.devices["edge-1"]
    assert canary_state.state == "reverted", canary_state
    assert "gate crashes: measured 1 crash, limit 1 (restarted during probation)" in (
        canary_state.reason
    )
    assert state.devices["edge-2"].state == "pending"
    # The held version serves, nothing failed after the restart.
    assert serving_version(restarted) == "1"
    with InferenceLoad(restarted.port, clients=2) as load:
        load.wait_for_ok(100)
        load.stop()
        assert load.failures == {}, load.failures
    last = mlp_status(restarted)["last_probation"]
    assert isinstance(last, dict)
    assert (last["decision"], last["gate"], last["measured"]) == ("reverted", "crashes", "1 crash")
    entries = subprocess.run(
        [*EDGED, "installs", "--json", "--socket", str(restarted.socket_path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    value = json.loads(entries)
    entry = (value["entries"] if isinstance(value, dict) else value)[-1]
    assert (entry["action"], entry["outcome"], entry["version"]) == ("probation", "reverted", 2)
    assert entry["error"] == "ProbationFailedError"
    model_store = devices.workdir_of("edge-1") / "state" / "models" / "mlp"
    assert (model_store / "CURRENT").read_text().strip() == "1"
    assert not (model_store / "2").exists()
    assert "reverted to 1 before it serves again" in restarted.log()
    assert "now serving version 2" not in restarted.log()  # never served after the crash


def wait_install_attempt(daemon: DaemonProcess, workdir: Path, attempt: int) -> None:
    """Bounded poll of ``active.json`` until the install's ``attempt``-th start is counted."""
    active = workdir / "state" / "transport" / "active.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads(active.read_text()).get("install_attempts") == attempt:
                return
        except (FileNotFoundError, ValueError):
            pass
        assert daemon.process.poll() is None, daemon.log()
        time.sleep(0.02)
    raise AssertionError(f"install attempt {attempt} never started:\n{daemon.log()}")


def test_an_install_that_crashes_the_daemon_is_retried_at_most_n_times_then_failed(
    tmp_path: Path, devices: Devices, broker: Broker, pki: FleetPki, signing: SigningKeys
) -> None:
    source = tmp_path / "src" / "mlp" / "2"
    write_hanging_mlp(source)  # its self-test never returns: a watchdog or OOM kill follows
    (source.parent / "config.toml").write_bytes(
        (SAMPLE_MODELS / "mlp" / "config.toml").read_bytes()
    )
    release = tmp_path / "mlp-2.bundle"
    build_bundle_from_dir(source, BundleSpec.starting_now("mlp", 2, 2), [signing.signer], release)
    work = devices.workdir_of("edge-1")
    daemon = devices.start("edge-1", max_install_crashes=2)
    push = subprocess.Popen(
        [*EDGED, "push", str(release), "--device", "edge-1", "--timeout", "120",
         "--signing-key", str(signing.signer_file), *connection_args(broker, pki)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for attempt in (1, 2):
            wait_install_attempt(daemon, work, attempt)
            daemon.signal(signal.SIGKILL)
            assert daemon.process.wait(30) == -signal.SIGKILL
            daemon = devices.start("edge-1", max_install_crashes=2)
        out, _ = push.communicate(timeout=120)
    finally:
        if push.poll() is None:
            push.kill()
            push.communicate()
    assert push.returncode == 1, out
    assert "failed" in out and "InstallCrashLoopError" in out, out
    assert "interrupted by a crash of the daemon 2 times" in daemon.log()
    assert not (work / "state" / "transport" / "active.json").exists()
    assert serving_version(daemon) == "1"
    with InferenceLoad(daemon.port, clients=2) as load:
        load.wait_for_ok(50)
        load.stop()
        assert load.failures == {}, load.failures
    assert not (work / "state" / "models" / "mlp" / "2").exists()
