"""The fleet channel end to end: real ``edged run`` daemons, a real Mosquitto, the fleet manager's
push and commands (library and CLI)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edged.bundle.keys import generate_key
from edged.errors import TransportError
from edged.fleet.channel import (
    CommandResult,
    DeviceOutcome,
    ManagerSettings,
    PreparedBundle,
    fleet_status,
    prepare_bundle,
    publish_chunks,
    push,
    send_command,
    wait_online,
    wait_progress,
)
from edged.transport.client import ClientSettings, MqttClient
from edged.transport.protocol import Command, Progress, encode_command, new_nonce
from edged.transport.tls import TlsFiles, client_context
from edged.transport.topics import Target
from tests.support.broker import Broker
from tests.support.pki import FleetPki, SigningKeys
from tests.transport.conftest import CHUNK_BYTES, Bundles, Devices
from tests.transport.helpers import (
    DEVICE_1,
    announce,
    cli,
    connection_args,
    for_deployment,
    infer,
    run,
    send_first_half,
    terminal,
)

pytestmark = pytest.mark.integration

# --- pushing ---------------------------------------------------------------------------------


def test_push_serves_the_new_version_end_to_end(
    devices: Devices,
    manager: ManagerSettings,
    bundles: Bundles,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
) -> None:
    daemon = devices.start("device-1")
    run(wait_online(manager, ["device-1"], timeout_s=20))
    v2 = bundles.mlp(2)
    conn = connection_args(broker, pki)

    pushed = cli(
        "push", str(v2.path), "--device", "device-1", "--chunk-size", str(CHUNK_BYTES),
        "--timeout", "60", "--signing-key", str(signing.signer_file), *conn,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "device-1" in pushed.stdout and "serving" in pushed.stdout

    x, expected = v2.vectors()
    version, got = infer(daemon, x)
    assert version == "2"
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)

    status = cli("fleet", "status", "--json", "--settle", "1", *conn)
    assert status.returncode == 0, status.stderr
    row = json.loads(status.stdout)["device-1"]
    assert row["status"]["online"] is True
    assert {"name": "mlp", "version": "2", "state": "READY"} in row["status"]["models"]
    assert row["last_deployment"]["state"] == "serving"


def test_one_group_push_reaches_three_daemons(
    devices: Devices, manager: ManagerSettings, bundles: Bundles, signing: SigningKeys
) -> None:
    names = ["device-1", "device-2", "device-3"]
    daemons = devices.start_many(names)
    run(wait_online(manager, names, timeout_s=30))
    v2 = bundles.mlp(2)
    seen: list[DeviceOutcome] = []

    result = run(
        push(
            manager,
            [signing.signer],
            v2.path,
            Target.group("lab"),
            chunk_size=CHUNK_BYTES,
            timeout_s=60,
            on_progress=seen.append,
        )
    )

    assert result.ok, result.outcomes
    assert sorted(result.outcomes) == names  # the members found from their retained status
    assert {o.device for o in seen if o.state == "received"} == set(names)
    x, expected = v2.vectors()
    for daemon in daemons:
        # One announcement on the group topic reached each of them.
        assert "deploy command" in daemon.log() and "from groups/lab accepted" in daemon.log()
        version, got = infer(daemon, x)
        assert version == "2"
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_push_exits_non_zero_when_a_device_does_not_answer(
    broker: Broker, pki: FleetPki, bundles: Bundles, signing: SigningKeys
) -> None:
    pushed = cli(
        "push",
        str(bundles.mlp(2).path),
        "--device",
        "device-9",
        "--timeout",
        "1",
        "--signing-key",
        str(signing.signer_file),
        *connection_args(broker, pki),
    )  # fmt: skip  (device-9 never connected)
    assert pushed.returncode == 1, pushed.stdout + pushed.stderr
    assert "no answer" in pushed.stdout and "never answered" in pushed.stdout


# --- resume ----------------------------------------------------------------------------------


def test_a_broker_restart_mid_transfer_resumes_with_only_the_missing_chunks(
    devices: Devices,
    manager: ManagerSettings,
    bundles: Bundles,
    broker: Broker,
    signing: SigningKeys,
) -> None:
    daemon = devices.start("device-1")
    run(wait_online(manager, ["device-1"], timeout_s=20))
    v2 = bundles.mlp(2)
    prepared = prepare_bundle(v2.path.read_bytes(), CHUNK_BYTES)
    d = prepared.deployment
    # The pusher gets through half the chunks before the broker goes down.
    half = run(send_first_half(manager, signing, prepared, "device-1"))
    broker.restart()  # persistence keeps the retained chunks and the device's session

    async def second_half() -> Progress:
        await publish_chunks(manager, DEVICE_1, prepared, range(half, d.chunk_count))
        return await wait_progress(manager, "device-1", for_deployment(d.id, terminal))

    final = run(second_half())
    assert final.state == "serving", final.reason
    assert 0 < final.chunks_fetched <= d.chunk_count - half < d.chunk_count
    assert "connection lost" in daemon.log()
    assert infer(daemon, v2.vectors()[0])[0] == "2"


def test_a_daemon_restart_mid_transfer_resumes_from_disk(
    devices: Devices, manager: ManagerSettings, bundles: Bundles, signing: SigningKeys
) -> None:
    first = devices.start("device-1")
    run(wait_online(manager, ["device-1"], timeout_s=20))
    v3 = bundles.mlp(3)
    prepared = prepare_bundle(v3.path.read_bytes(), CHUNK_BYTES)
    d = prepared.deployment
    half = run(send_first_half(manager, signing, prepared, "device-1"))
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    view = run(fleet_status(manager, settle_s=0.5))
    assert not view.statuses["device-1"].online  # the broker published the last will
    assert view.statuses["device-1"].reason == "connection lost"

    second = devices.start("device-1")

    async def second_half() -> Progress:
        await publish_chunks(manager, DEVICE_1, prepared, range(half, d.chunk_count))
        return await wait_progress(manager, "device-1", for_deployment(d.id, terminal))

    final = run(second_half())
    assert final.state == "serving", final.reason
    assert final.chunks_fetched <= d.chunk_count - half
    assert "resuming deployment" in second.log()
    assert infer(second, v3.vectors()[0])[0] == "3"


# --- failures --------------------------------------------------------------------------------


def test_a_stalled_download_ends_in_a_failure_report(
    devices: Devices, manager: ManagerSettings, bundles: Bundles, signing: SigningKeys
) -> None:
    daemon = devices.start("device-1", download_stall_timeout_s=1.5)
    run(wait_online(manager, ["device-1"], timeout_s=20))
    prepared = prepare_bundle(bundles.mlp(2).path.read_bytes(), CHUNK_BYTES)
    d = prepared.deployment

    async def stall() -> Progress:
        await publish_chunks(manager, DEVICE_1, prepared, range(3))  # and then nothing
        await announce(manager, signing, prepared, DEVICE_1)
        return await wait_progress(manager, "device-1", for_deployment(d.id, terminal))

    started = time.monotonic()
    final = run(stall())
    assert final.state == "failed"
    assert final.reason.startswith("DownloadStalledError: no chunk for 1.5s")
    assert time.monotonic() - started < 15
    assert infer(daemon, bundles.mlp(2).vectors()[0])[0] == "1"


def test_a_tampered_chunk_is_rejected_while_the_current_model_keeps_serving(
    devices: Devices, manager: ManagerSettings, bundles: Bundles, signing: SigningKeys
) -> None:
    daemon = devices.start("device-1")
    run(wait_online(manager, ["device-1"], timeout_s=20))
    v2 = bundles.mlp(2)
    prepared = prepare_bundle(v2.path.read_bytes(), CHUNK_BYTES)
    chunks = list(prepared.chunks)
    flipped = bytearray(chunks[7])
    flipped[100] ^= 0xFF
    chunks[7] = bytes(flipped)
    tampered = PreparedBundle(prepared.deployment, tuple(chunks))
    x = v2.vectors()[0]

    versions: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def keep_inferring() -> None:
        while not stop.is_set():
            try:
                versions.append(infer(daemon, x)[0])
            except Exception as exc:
                errors.append(exc)
            time.sleep(0.01)

    worker = threading.Thread(target=keep_inferring)
    worker.start()
    try:

        async def deliver() -> Progress:
            await publish_chunks(manager, DEVICE_1, tampered)
            await announce(manager, signing, tampered, DEVICE_1)
            done = for_deployment(tampered.deployment.id, terminal)
            return await wait_progress(manager, "device-1", done)

        final = run(deliver())
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join(10)
    assert final.state == "failed"
    assert final.reason.startswith("ChunkHashMismatchError: chunk 7 ")
    assert errors == []
    assert len(versions) > 10 and set(versions) == {"1"}


def test_replayed_stale_foreign_and_misdirected_commands_are_rejected(
    devices: Devices, manager: ManagerSettings, signing: SigningKeys
) -> None:
    daemon = devices.start("device-1")
    run(wait_online(manager, ["device-1"], timeout_s=20))
    now = int(time.time())
    ping = Command("ping", DEVICE_1, now, new_nonce())
    captured = encode_command(ping, [signing.signer])

    def send(command: Command, payload: bytes | None = None) -> tuple[bool, str]:
        result = run(
            send_command(
                manager, [signing.signer], DEVICE_1, command.type, command=command,
                payload=payload, expected=["device-1"], timeout_s=10,
            )
        )  # fmt: skip
        reply = result.replies["device-1"]
        return reply.ok, reply.error

    assert send(ping, captured) == (True, "")
    ok, error = send(ping, captured)
    assert not ok and error.startswith("ReplayedCommandError")
    ok, error = send(Command("ping", DEVICE_1, now - 3600, new_nonce()))
    assert not ok and error.startswith("StaleCommandError")
    foreign = Command("ping", DEVICE_1, now, new_nonce())
    ok, error = send(foreign, encode_command(foreign, [generate_key()]))
    assert not ok and error.startswith("UnknownKeyError")
    # Signed for device-2, published on device-1's topic by someone who captured it.
    other = Command("ping", Target.device("device-2"), now, new_nonce())
    ok, error = send(
        Command("ping", DEVICE_1, now, other.nonce), encode_command(other, [signing.signer])
    )
    assert not ok and error.startswith("WrongTargetError")

    # A clean stop leaves "offline" with the reason; the nonces outlive the restart.
    assert daemon.stop() == 0
    view = run(fleet_status(manager, settle_s=0.5))
    assert view.statuses["device-1"].online is False
    assert view.statuses["device-1"].reason == "shutdown"
    assert ("mlp", "1") in {(m.name, m.version) for m in view.statuses["device-1"].models}

    # A command sent while the device is away waits in its persistent session.
    queued: list[CommandResult] = []
    sender = threading.Thread(
        target=lambda: queued.append(
            run(send_command(manager, [signing.signer], DEVICE_1, "ping", timeout_s=30))
        )
    )
    sender.start()
    time.sleep(1.0)  # published (QoS 1) before the daemon is back
    devices.start("device-1")
    sender.join(40)
    assert queued and queued[0].ok, queued

    ok, error = send(ping, captured)
    assert not ok and error.startswith("ReplayedCommandError")


def test_rollback_and_report_commands(
    devices: Devices,
    manager: ManagerSettings,
    bundles: Bundles,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
) -> None:
    daemon = devices.start("device-1")
    run(wait_online(manager, ["device-1"], timeout_s=20))
    for version in (2, 3):
        result = run(
            push(manager, [signing.signer], bundles.mlp(version).path, DEVICE_1, timeout_s=60)
        )
        assert result.ok, result.outcomes
    assert infer(daemon, bundles.mlp(3).vectors()[0])[0] == "3"
    conn = connection_args(broker, pki)
    signing_args = ["--signing-key", str(signing.signer_file)]

    rolled = cli("fleet", "rollback", "mlp", "--device", "device-1", *signing_args, *conn)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert infer(daemon, bundles.mlp(2).vectors()[0])[0] == "2"

    report = cli("fleet", "report", "--device", "device-1", "--json", *signing_args, *conn)
    assert report.returncode == 0, report.stdout + report.stderr
    status = json.loads(report.stdout)["device-1"]["result"]["status"]
    assert {"name": "mlp", "version": "2", "state": "READY"} in status["models"]

    again = cli("fleet", "rollback", "mlp", "--device", "device-1", "--to-version", "9",
                *signing_args, *conn)  # fmt: skip
    assert again.returncode == 1
    assert "VersionNotHeldError" in again.stdout

    # The high-water mark stays at 3: re-pushing version 2 is refused before any download.
    refused = run(push(manager, [signing.signer], bundles.mlp(2).path, DEVICE_1, timeout_s=30))
    outcome = refused.outcomes["device-1"]
    assert outcome.state == "refused" and outcome.reason.startswith("RollbackError")
    assert outcome.chunks_done == 0


def test_a_key_readable_by_others_stops_the_daemon_at_start(
    devices: Devices, pki: FleetPki, tmp_path: Path
) -> None:
    files = pki.client("device-1")
    loose = tmp_path / "loose.key"
    shutil.copy(files.key_file, loose)
    os.chmod(loose, 0o644)
    daemon = devices.start("device-1", wait=False, key_file=str(loose))
    assert daemon.process.wait(60) != 0
    assert f"chmod 600 {loose}" in daemon.log()


# --- identities ------------------------------------------------------------------------------


def test_a_device_certificate_cannot_take_over_another_devices_session(
    devices: Devices, manager: ManagerSettings, broker: Broker, pki: FleetPki, signing: SigningKeys
) -> None:
    """device-9's certificate connecting as client id "device-1" gets its own CN as client id
    (use_username_as_clientid): device-1 stays connected and answers, and nothing device-9
    subscribed ends up in device-1's persistent session."""
    daemon = devices.start("device-1")
    run(wait_online(manager, ["device-1"], timeout_s=20))
    files = pki.client("device-9")
    context = client_context(TlsFiles(files.ca_file, files.cert_file, files.key_file))
    impostor = ClientSettings(
        broker.host, broker.port, "device-1", context, timeout_s=5.0,
        clean_start=False, session_expiry_s=3600,
    )  # fmt: skip

    async def take_over() -> None:
        for _ in range(5):
            # Unbound, the daemon's reconnect would in turn knock the impostor off.
            with contextlib.suppress(TransportError):
                async with MqttClient(impostor) as client:
                    await client.subscribe(["edged/devices/device-9/cmd"])

    run(take_over())
    result = run(send_command(manager, [signing.signer], DEVICE_1, "ping", timeout_s=10))
    assert result.ok, result
    assert "connection lost" not in daemon.log()
    impostor_lines = [line for line in broker.log().splitlines() if "u'device-9'" in line]
    assert len(impostor_lines) == 5 and all(" as device-9 " in line for line in impostor_lines)
