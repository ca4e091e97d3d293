"""Staged rollouts with ``edged rollout`` against a real Mosquitto (mutual TLS) and real device
daemons: a good release goes through every wave (the tool killed midway and resumed, a device
offline meanwhile converging when it returns); a release much slower on the canary is reverted
by its probation, the rollout aborts before wave 2 and no other device ever installs it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edged.bundle.build import BundleSpec, build_bundle_from_dir
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.fleet.channel import ManagerSettings, fleet_status, wait_online
from edged.fleet.rollout import (
    AbortPolicy,
    RolloutStore,
    abort_reason,
    drive,
    new_rollout,
    plan_waves,
)
from edged.serve.probation import ProbationPolicy
from tests.support.broker import Broker
from tests.support.daemon import SAMPLE_MODELS, DaemonProcess, wait_ready
from tests.support.load import InferenceLoad
from tests.support.pki import FleetPki, SigningKeys
from tests.support.slowmodel import write_slow_mlp
from tests.transport.conftest import Devices
from tests.transport.helpers import connection_args

EDGED = [sys.executable, "-m", "edged.cli.main"]
GROUP = "wave"


# --- the pure parts ----------------------------------------------------------------------


def test_waves_are_a_canary_then_cumulative_shares_of_the_group() -> None:
    members = [f"d{i:02}" for i in range(10)]
    waves = plan_waves(members, [10, 50])
    assert waves == [["d00"], ["d01", "d02", "d03", "d04"], ["d05", "d06", "d07", "d08", "d09"]]
    assert plan_waves(members, [30], canary="d05")[0] == ["d05"]
    assert sorted(d for w in plan_waves(members, [1, 2, 99]) for d in w) == members
    assert plan_waves(["a"], [10, 50]) == [["a"]]


def test_abort_needs_a_minimum_count_then_a_share_above_the_limit() -> None:
    policy = AbortPolicy(failed_permille=250, min_devices=4)
    states = {"a": "passed", "b": "reverted", "c": "passed"}
    assert abort_reason(policy, states, {}) == ""  # 3 decided < 4
    states["d"] = "passed"
    assert abort_reason(policy, states, {}) == ""  # 1 of 4 = 25 %, not above
    states["e"] = "failed"
    reason = abort_reason(policy, states, {"b": "gate p99_latency_ratio: measured 3.1x"})
    assert reason.startswith("2 of 5 devices failed or reverted")
    assert "b reverted: gate p99_latency_ratio" in reason
    assert abort_reason(AbortPolicy(), {"a": "reverted"}, {}) != ""  # default: the first


# --- real broker, real daemons -------------------------------------------------------------


def build_release(
    directory: Path, signing: SigningKeys, version: int, policy: ProbationPolicy, *, slow: bool
) -> Path:
    source = directory / "src" / "mlp" / str(version)
    if slow:
        write_slow_mlp(source)
    else:
        write_onnx_mlp(source, SAMPLE_MLP_LAYERS, seed=0, bias_shift=version / 4)
    (source.parent / "config.toml").write_bytes(
        (SAMPLE_MODELS / "mlp" / "config.toml").read_bytes()
    )
    out = directory / f"mlp-{version}.bundle"
    spec = dataclasses.replace(BundleSpec.starting_now("mlp", version, version), rollout=policy)
    build_bundle_from_dir(source, spec, [signing.signer], out)
    return out


def rollout_cli(
    broker: Broker, pki: FleetPki, signing: SigningKeys, state_dir: Path, *args: str
) -> list[str]:
    return [
        *EDGED, "rollout", *args, "--state-dir", str(state_dir),
        "--signing-key", str(signing.signer_file), *connection_args(broker, pki),
    ]  # fmt: skip


def wait_state(
    store: RolloutStore,
    rollout_id: str,
    until: Callable[[Any], bool],
    proc: subprocess.Popen[str],
    timeout_s: float = 120,
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = store.load(rollout_id)
        except Exception:  # not written yet
            state = None
        if state is not None and until(state):
            return state
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the rollout tool exited {proc.returncode}: {out}")
        time.sleep(0.1)
    raise AssertionError(f"rollout state never matched: {store.load(rollout_id)}")


def device_args(names: list[str]) -> list[str]:
    return [arg for name in names for arg in ("--device", name)]


def start_all(devices: Devices, names: list[str]) -> list[DaemonProcess]:
    """Start the group's daemons at once (they load their models in parallel)."""
    started = [devices.start(n, wait=False, groups=[GROUP]) for n in names]
    for daemon in started:
        wait_ready(daemon.url, daemon.process, daemon.log_path)
    return started


def serving_version(daemon: DaemonProcess) -> str:
    out = subprocess.run(
        [*EDGED, "status", "--json", "--socket", str(daemon.socket_path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return str(next(m for m in json.loads(out)["models"] if m["name"] == "mlp")["version"])


def test_a_good_release_reaches_every_device_through_a_kill_resume_and_an_offline_device(
    tmp_path: Path,
    devices: Devices,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
    manager: ManagerSettings,
) -> None:
    names = [f"edge-{i}" for i in range(1, 6)]
    policy = ProbationPolicy(min_s=1, max_s=60, min_requests=0)
    release = build_release(tmp_path, signing, 2, policy, slow=False)
    daemons = dict(zip(names, start_all(devices, names), strict=True))
    asyncio.run(wait_online(manager, names, timeout_s=30))
    # edge-5 (last wave) is offline when the rollout starts (its retained status says so).
    daemons["edge-5"].stop()
    deadline = time.monotonic() + 30
    while asyncio.run(fleet_status(manager, settle_s=0.5)).statuses["edge-5"].online:
        assert time.monotonic() < deadline, "edge-5 still looks online"
    store = RolloutStore(tmp_path / "rollouts")
    start = subprocess.Popen(
        rollout_cli(broker, pki, signing, store.directory, "start", str(release), "--group", GROUP,
                    "--waves", "40", "--id", "good", *device_args(names)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # Kill the tool once the canary passed and wave 2 has started.
    wait_state(store, "good", lambda s: s.wave >= 1, start)
    start.send_signal(signal.SIGKILL)
    start.communicate(timeout=30)
    assert store.load("good").status == "running"

    resume = subprocess.Popen(
        rollout_cli(broker, pki, signing, store.directory, "resume", "good", "--offline-timeout", "120"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_state(store, "good", lambda s: s.devices["edge-5"].state == "offline", resume)
    assert all(store.load("good").devices[n].state == "passed" for n in ("edge-1", "edge-2"))
    daemons["edge-5"] = devices.start("edge-5", groups=[GROUP])  # back online
    out, _ = resume.communicate(timeout=180)
    assert resume.returncode == 0, out
    final = store.load("good")
    assert final.status == "done"
    assert {n: final.devices[n].state for n in names} == {n: "passed" for n in names}
    assert final.waves == [["edge-1"], ["edge-2"], ["edge-3", "edge-4", "edge-5"]]
    for name, daemon in daemons.items():
        assert serving_version(daemon) == "2", name
    status = subprocess.run(
        [*EDGED, "rollout", "status", "good", "--state-dir", str(store.directory)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert ": done" in status and status.count("passed probation") == 5


def test_a_slow_release_is_reverted_on_the_canary_and_the_rollout_aborts_before_wave_two(
    tmp_path: Path, devices: Devices, broker: Broker, pki: FleetPki, signing: SigningKeys
) -> None:
    names = ["edge-1", "edge-2", "edge-3"]
    policy = ProbationPolicy(min_s=1, max_s=300, min_requests=60, max_p99_latency_ratio_pct=300)
    slow = build_release(tmp_path, signing, 2, policy, slow=True)
    daemons = start_all(devices, names)
    canary = daemons[0]
    store = RolloutStore(tmp_path / "rollouts")
    with InferenceLoad(canary.port, clients=3) as load:
        load.wait_for_ok(200)
        done = subprocess.run(
            rollout_cli(broker, pki, signing, store.directory, "start", str(slow), "--group", GROUP,
                        "--canary", "edge-1", "--waves", "50", "--id", "slow",
                        *device_args(names)),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        load.wait_for_ok(20)
        load.stop()
        assert load.failures == {}, load.failures
    assert done.returncode == 1, done.stdout + done.stderr
    state = store.load("slow")
    assert state.status == "aborted"
    assert state.wave == 0
    assert state.devices["edge-1"].state == "reverted"
    assert "gate p99_latency_ratio: measured" in state.devices["edge-1"].reason
    assert "limit 3.00x" in state.devices["edge-1"].reason
    assert "gate p99_latency_ratio" in state.reason
    for name in ("edge-2", "edge-3"):
        assert state.devices[name].state == "pending"
    for daemon in daemons:
        assert serving_version(daemon) == "1"
    # No other device ever saw version 2: nothing in their install logs, nothing staged.
    for name in ("edge-2", "edge-3"):
        log = devices.workdir_of(name) / "state" / "install-log.jsonl"
        assert not log.exists() or '"version": 2' not in log.read_text()
        assert not (devices.workdir_of(name) / "state" / "models" / "mlp" / "2").exists()
    assert "aborted" in done.stdout


def test_an_operator_abort_rolls_back_every_device_that_took_the_release(
    tmp_path: Path,
    devices: Devices,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
    manager: ManagerSettings,
) -> None:
    names = ["edge-1", "edge-2", "edge-3"]
    policy = ProbationPolicy(min_s=1, max_s=60, min_requests=0)
    daemons = start_all(devices, names)
    asyncio.run(wait_online(manager, names, timeout_s=30))
    # Version 2 first, so that each device's store holds the version a rollback returns to.
    first = build_release(tmp_path, signing, 2, policy, slow=False)
    for name in names:
        pushed = subprocess.run(
            [*EDGED, "push", str(first), "--device", name, "--timeout", "60",
             "--signing-key", str(signing.signer_file), *connection_args(broker, pki)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    release = build_release(tmp_path, signing, 3, policy, slow=False)
    store = RolloutStore(tmp_path / "rollouts")
    start = subprocess.Popen(
        rollout_cli(broker, pki, signing, store.directory, "start", str(release), "--group", GROUP,
                    "--waves", "50", "--id", "stop", *device_args(names)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_state(store, "stop", lambda s: s.devices["edge-1"].state == "passed", start)
    start.send_signal(signal.SIGKILL)
    start.communicate(timeout=30)

    aborted = subprocess.run(
        rollout_cli(broker, pki, signing, store.directory, "abort", "stop"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    state = store.load("stop")
    assert state.status == "aborted"
    assert state.reason == "aborted by the operator"
    took = [n for n in names if state.devices[n].state != "pending"]
    assert "edge-1" in took
    for name in took:
        assert state.devices[name].previous_version == "2"
        assert state.devices[name].state == "rolled-back", state.devices[name]
        assert state.devices[name].reason == "rolled back"
    for daemon, name in zip(daemons, names, strict=True):
        assert serving_version(daemon) == "2", name  # never 3 any more, and nothing older
    # Resuming a finished rollout changes nothing.
    again = subprocess.run(
        rollout_cli(broker, pki, signing, store.directory, "resume", "stop"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 1
    assert store.load("stop").status == "aborted"


def test_an_offline_canary_holds_the_rollout_and_resume_goes_on_when_it_returns(
    tmp_path: Path,
    devices: Devices,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
    manager: ManagerSettings,
) -> None:
    names = ["edge-1", "edge-2"]
    policy = ProbationPolicy(min_s=1, max_s=60, min_requests=0)
    release = build_release(tmp_path, signing, 2, policy, slow=False)
    daemons = start_all(devices, names)
    asyncio.run(wait_online(manager, names, timeout_s=30))
    daemons[0].stop()
    deadline = time.monotonic() + 30
    while asyncio.run(fleet_status(manager, settle_s=0.5)).statuses["edge-1"].online:
        assert time.monotonic() < deadline, "edge-1 still looks online"
    store = RolloutStore(tmp_path / "rollouts")
    new_rollout(store, release, GROUP, names, percents=(), rollout_id="held")
    held = asyncio.run(drive(manager, [signing.signer], store, "held", offline_timeout_s=1.0))
    assert held.status == "running"
    assert (held.devices["edge-1"].state, held.devices["edge-2"].state) == ("offline", "pending")
    devices.start("edge-1", groups=[GROUP])
    done = asyncio.run(drive(manager, [signing.signer], store, "held", offline_timeout_s=60))
    assert done.status == "done"
    assert [done.devices[n].state for n in names] == ["passed", "passed"]
