"""The fleet channel under faults, with a real Mosquitto and real ``edged run`` daemons: SIGTERM in
the middle of a download, a broker outage with operations in flight."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.bundle.build import BundleSpec, build_bundle_from_dir
from edged.demo.samples import write_onnx_mlp
from edged.fleet.channel import (
    ManagerSettings,
    PreparedBundle,
    clean_chunks,
    deploy_command,
    prepare_bundle,
    publish_chunks,
    push,
    send_command,
    wait_online,
    wait_progress,
)
from edged.transport.protocol import Progress
from edged.transport.topics import Target
from tests.support.broker import Broker
from tests.support.daemon import SAMPLE_MODELS, DaemonProcess, running_daemon
from tests.support.pki import FleetPki, SigningKeys
from tests.transport.conftest import CHUNK_BYTES, Bundles, Devices, mqtt_config
from tests.transport.helpers import DEVICE_1, cli, connection_args, run
from tests.transport.test_telemetry_publish import INTERVAL_S, Collector

pytestmark = pytest.mark.integration

# A larger MLP than the sample (same input and output): ~1.2 MB, ~4,700 chunks of 256 bytes, so
# that fifty restarts still find chunks left to fetch.
BIG_LAYERS = (64, 512, 512, 10)
SMALL_CHUNK = 256
SIGTERM_TRIES = 50
HANG_LIMIT_S = 60.0  # only a hang gets here: a clean stop takes about a second


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory: pytest.TempPathFactory, signing: SigningKeys) -> Path:
    directory = tmp_path_factory.mktemp("big-bundle")
    source = directory / "src" / "mlp" / "5"
    write_onnx_mlp(source, BIG_LAYERS, seed=1, bias_shift=0.5)
    shutil.copy(SAMPLE_MODELS / "mlp" / "config.toml", source.parent / "config.toml")
    out = directory / "mlp-5.bundle"
    build_bundle_from_dir(source, BundleSpec.starting_now("mlp", 5, 5), [signing.signer], out)
    return out


async def stage(manager: ManagerSettings, signing: SigningKeys, prepared: PreparedBundle) -> None:
    """Every chunk retained on the broker, then the signed announcement to device-1."""
    await publish_chunks(manager, DEVICE_1, prepared)
    command = deploy_command(DEVICE_1, prepared.deployment)
    result = await send_command(
        manager, [signing.signer], DEVICE_1, "deploy", command=command, expected=["device-1"]
    )
    assert result.ok, result.replies


def last_progress(manager: ManagerSettings) -> Progress:
    return run(wait_progress(manager, "device-1", lambda p: True, timeout_s=10))


@pytest.fixture
def device_work(tmp_path: Path, signing: SigningKeys) -> Path:
    work = tmp_path / "device-1"
    signing.install_trust(work / "state" / "trust")
    return work


def test_sigterm_during_a_download_always_stops_the_daemon_and_the_download_resumes(
    model_repo: Path,
    device_work: Path,
    broker: Broker,
    pki: FleetPki,
    manager: ManagerSettings,
    signing: SigningKeys,
    big_bundle: Path,
) -> None:
    prepared = prepare_bundle(big_bundle.read_bytes(), SMALL_CHUNK)
    d = prepared.deployment
    # A progress report per chunk keeps publishes in flight all the time; no drain grace
    # keeps each try short.
    config = (
        mqtt_config(broker, pki, "device-1", progress_interval_s=0)
        + "[server]\ndrain_grace_s = 0\n"
    )
    staged = False
    done_before = 0
    for attempt in range(SIGTERM_TRIES):
        with running_daemon(model_repo, device_work, config) as daemon:
            if not staged:
                run(wait_online(manager, ["device-1"], timeout_s=20))
                run(stage(manager, signing, prepared))
                staged = True

            def arriving(p: Progress, floor: int = done_before) -> bool:
                # A chunk fetched by this daemon (not the report it resumes with).
                return p.deployment == d.id and p.chunks_fetched > 0 and p.chunks_done > floor

            seen = run(wait_progress(manager, "device-1", arriving, timeout_s=60))
            assert seen.state == "received" and seen.chunks_done < d.chunk_count, seen
            daemon.signal(signal.SIGTERM)
            stopped_in = _wait_exit(daemon, attempt)
            assert stopped_in == 0, f"try {attempt}: exit {stopped_in}\n{daemon.log()[-3000:]}"
        done_before = last_progress(manager).chunks_done

    assert 0 < done_before < d.chunk_count
    calm = mqtt_config(broker, pki, "device-1")
    with running_daemon(model_repo, device_work, calm) as daemon:
        final = run(
            wait_progress(manager, "device-1", lambda p: p.terminal and p.deployment == d.id,
                          timeout_s=120)
        )  # fmt: skip
        assert final.state == "serving", final.reason
        assert final.chunks_fetched <= d.chunk_count - done_before  # resumed, not restarted
        assert "resuming deployment" in daemon.log()


def _wait_exit(daemon: DaemonProcess, attempt: int) -> int:
    try:
        return daemon.process.wait(HANG_LIMIT_S)
    except subprocess.TimeoutExpired:
        log = daemon.log()
        daemon.process.kill()
        daemon.process.wait()
        pytest.fail(f"try {attempt}: still running {HANG_LIMIT_S:g}s after SIGTERM\n{log[-3000:]}")


def test_after_a_broker_outage_downloads_and_telemetry_move_before_the_operation_timeout(
    model_repo: Path,
    device_work: Path,
    broker: Broker,
    pki: FleetPki,
    manager: ManagerSettings,
    signing: SigningKeys,
    big_bundle: Path,
    collector: Collector,
) -> None:
    operation_timeout_s = 60.0
    prepared = prepare_bundle(big_bundle.read_bytes(), SMALL_CHUNK)
    d = prepared.deployment
    config = (
        mqtt_config(
            broker, pki, "device-1", progress_interval_s=0, operation_timeout_s=operation_timeout_s
        )
        + f"[telemetry]\ninterval_s = {INTERVAL_S}\n"
    )
    with running_daemon(model_repo, device_work, config) as daemon:
        run(wait_online(manager, ["device-1"], timeout_s=20))
        collector.wait_for_seq(1)
        run(stage(manager, signing, prepared))
        run(
            wait_progress(
                manager, "device-1", lambda p: p.chunks_done > 50 and p.deployment == d.id
            )
        )
        broker.stop()  # publishes (progress, telemetry) are in flight
        back = time.monotonic()
        broker.start()
        # What reached the broker before it stopped, to see movement beyond it.
        moved_from = last_progress(manager).chunks_done
        seq_before = max(collector.seqs())
        run(
            wait_progress(manager, "device-1", lambda p: p.chunks_done > moved_from + 10,
                          timeout_s=operation_timeout_s)
        )  # fmt: skip
        download_delay_s = time.monotonic() - back
        collector.wait_for_seq(seq_before + 1, timeout_s=operation_timeout_s)
        telemetry_delay_s = time.monotonic() - back
        print(f"download moved {download_delay_s:.1f}s, telemetry {telemetry_delay_s:.1f}s after "
              f"the broker came back (operation timeout {operation_timeout_s:g}s)")  # fmt: skip
        assert download_delay_s < operation_timeout_s / 2
        assert telemetry_delay_s < operation_timeout_s / 2
        assert "never retrieved" not in daemon.log()


@pytest.fixture
def collector(broker: Broker, pki: FleetPki) -> Iterator[Collector]:
    c = Collector(broker, pki)
    c.start()
    yield c
    c.stop()


def test_edged_push_survives_a_broker_restart_and_then_clears_its_chunks(
    devices: Devices,
    manager: ManagerSettings,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
    big_bundle: Path,
) -> None:
    devices.start("device-1")
    run(wait_online(manager, ["device-1"], timeout_s=20))
    d = prepare_bundle(big_bundle.read_bytes(), SMALL_CHUNK).deployment
    pushing = subprocess.Popen(
        [sys.executable, "-m", "edged.cli.main", "push", str(big_bundle), "--device", "device-1",
         "--chunk-size", str(SMALL_CHUNK), "--timeout", "120",
         "--signing-key", str(signing.signer_file), *connection_args(broker, pki)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # The device downloads: the push has announced and is following its progress.
        run(wait_progress(manager, "device-1", lambda p: p.model == "mlp" and p.chunks_done > 100,
                          timeout_s=60))  # fmt: skip
        broker.restart()
        out, _ = pushing.communicate(timeout=150)
    finally:
        pushing.kill()
    assert pushing.returncode == 0, out
    assert "serving" in out and "reconnecting" in out
    left = run(clean_chunks(manager, settle_s=1.0))
    assert left.removed == {} and left.kept == {}, left  # the push cleared every chunk
    assert d.chunk_count > 100


def test_chunks_stay_for_a_silent_device_until_fleet_clean(
    devices: Devices,
    manager: ManagerSettings,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
    bundles: Bundles,
) -> None:
    devices.start("device-1")
    run(wait_online(manager, ["device-1"], timeout_s=20))
    v2 = bundles.mlp(2)
    result = run(
        push(
            manager,
            [signing.signer],
            v2.path,
            Target.group("lab"),
            chunk_size=CHUNK_BYTES,
            expected=["device-1", "device-2"],
            timeout_s=20,
        )
    )  # fmt: skip  (device-2 never connects)
    assert result.outcomes["device-1"].ok and result.outcomes["device-2"].state == "no answer"
    assert not result.chunks_cleared
    count = prepare_bundle(v2.path.read_bytes(), CHUNK_BYTES).deployment.chunk_count

    cleaned = cli("fleet", "clean", "--settle", "1", *connection_args(broker, pki))
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert f"removed {count} retained chunk(s) of deployment {result.deployment_id}" in (
        cleaned.stdout
    )
    again = cli("fleet", "clean", "--settle", "1", *connection_args(broker, pki))
    assert "no retained chunks" in again.stdout
