"""The fleet simulator against the real thing: a real ``edged run`` daemon and a simulated
device on one real Mosquitto (mutual TLS) get the same signed commands and the same HTTPS
release (real nginx); what each publishes must use the same topics and schemas, and both must
refuse the same forged, replayed and misdirected commands. Then ``edged rollout`` drives 120
simulated devices through canary and waves over HTTPS artifacts (broker load per device
measured), and aborts when the simulated revert rate exceeds its policy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edged.bundle.keys import generate_key
from edged.bundle.trust import load_trust_state
from edged.fleet.artifacts import ArtifactStore
from edged.fleet.channel import (
    ManagerSettings,
    deploy_command,
    prepare_bundle,
    send_command,
    wait_online,
    wait_progress,
)
from edged.fleet.rollout import AbortPolicy, RolloutStore, drive, new_rollout
from edged.fleet.sim import FleetSim, SimSettings, Tally, Verdicts, sim_identities, tally_broker
from edged.transport.protocol import Command, Progress, encode_command, new_nonce
from edged.transport.topics import Target
from tests.support.broker import Broker
from tests.support.nginx import Nginx, Site, nginx_missing_reason, running_nginx
from tests.support.pki import FleetPki, SigningKeys
from tests.transport.conftest import Bundles, Devices

pytestmark = pytest.mark.integration


@pytest.fixture
def nginx(tmp_path: Path, pki: FleetPki) -> Iterator[Nginx]:
    reason = nginx_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    with running_nginx(tmp_path / "nginx", pki, [Site("store")]) as server:
        yield server


def sim_settings(
    broker: Broker, pki: FleetPki, signing: SigningKeys, names: list[str], work: Path, **kw: Any
) -> SimSettings:
    return SimSettings(
        host=broker.host,
        port=broker.port,
        identity=sim_identities(pki.ca, pki.ca_file, names, work / "sim-pki"),
        trust=load_trust_state(signing.root_bytes(), signing.signers_bytes()),
        artifact_ca_file=pki.ca_file,
        **kw,
    )


def _shape(value: Any) -> Any:
    """A JSON value's schema: keys and value types, recursively."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


def _by_device(tally_log: list[tuple[str, bytes]], device: str) -> list[tuple[str, Any]]:
    """(topic with the device id replaced, decoded payload) of what ``device`` published."""
    out = []
    for topic, payload in tally_log:
        if topic.endswith((f"/devices/{device}/status", f"/devices/{device}/progress")) and payload:
            out.append((topic.replace(device, "<id>"), json.loads(payload)))
        elif "/replies/" in topic and payload and json.loads(payload).get("device") == device:
            out.append(("<replies>", json.loads(payload)))
    return out


def test_the_simulator_speaks_what_a_real_daemon_speaks(
    tmp_path: Path,
    devices: Devices,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
    manager: ManagerSettings,
    nginx: Nginx,
    bundles: Bundles,
) -> None:
    real, simulated = "device-1", "sim-1"
    devices.start(real, artifact_ca_file=str(pki.ca_file))
    settings = sim_settings(broker, pki, signing, [simulated], tmp_path, groups=("lab",))
    data = bundles.mlp(2).path.read_bytes()
    store = ArtifactStore(nginx.root("store") / "artifacts", (nginx.base_url("store"),))
    store.publish(data)
    urls = store.urls(hashlib.sha256(data).hexdigest())
    seen: list[tuple[str, bytes]] = []

    async def scenario() -> dict[str, dict[str, str]]:
        sim = FleetSim(settings, [simulated])
        await sim.start(timeout_s=30)
        stop, ready = asyncio.Event(), asyncio.Event()
        client_settings = await asyncio.to_thread(manager.client_settings)
        listener = asyncio.create_task(_record(client_settings, seen, ready, stop))
        await ready.wait()
        errors: dict[str, dict[str, str]] = {}
        try:
            await wait_online(manager, [real, simulated], timeout_s=30)
            for device in (real, simulated):
                target = Target.device(device)
                ping = await send_command(
                    manager, [signing.signer], target, "ping", expected=[device]
                )
                assert ping.ok, ping.replies
                prepared = prepare_bundle(data, 16 * 1024, urls=urls)
                command = deploy_command(target, prepared.deployment)
                wire = encode_command(command, [signing.signer])
                sent = await send_command(
                    manager, [signing.signer], target, "deploy", command=command, payload=wire,
                    expected=[device],
                )  # fmt: skip
                assert sent.ok, sent.replies
                deployment_id = prepared.deployment.id

                def served(p: Progress, deployment_id: str = deployment_id) -> bool:
                    return p.deployment == deployment_id and p.terminal

                final = await wait_progress(manager, device, served, timeout_s=60)
                assert final.state == "serving" or final.state == "promoted", final
                assert final.chunks_done == final.chunks_total
                errors[device] = await _refusals(manager, signing, device, command, wire)
        finally:
            stop.set()
            await listener
            await sim.stop()
        return errors

    errors = asyncio.run(scenario())
    # The same forged, replayed and misdirected commands are refused the same way.
    assert errors[real] == errors[simulated]
    assert errors[real] == {
        "forged": "UnknownKeyError",
        "replayed": "ReplayedCommandError",
        "misdirected": "WrongTargetError",
        "stale": "StaleCommandError",
    }
    mine, theirs = _by_device(seen, real), _by_device(seen, simulated)
    assert {t for t, _ in mine} == {t for t, _ in theirs} == {
        "edged/devices/<id>/status", "edged/devices/<id>/progress", "<replies>",
    }  # fmt: skip
    for topic in ("edged/devices/<id>/status", "edged/devices/<id>/progress", "<replies>"):
        shapes_real = {json.dumps(_shape(v)) for t, v in mine if t == topic}
        shapes_sim = {json.dumps(_shape(v)) for t, v in theirs if t == topic}
        assert shapes_sim <= shapes_real, (topic, shapes_sim - shapes_real)
    states = [[v["state"] for t, v in msgs if t.endswith("/progress")] for msgs in (mine, theirs)]
    for sequence in states:
        assert sequence[0] == "received"
        at = sequence.index("verified")
        assert sequence[at : at + 3] == ["verified", "installed", "serving"], sequence
        assert set(sequence[:at]) == {"received"}


async def _record(
    settings: Any, seen: list[tuple[str, bytes]], ready: asyncio.Event, stop: asyncio.Event
) -> None:
    tally = Tally()
    original = tally.take

    def take(message: Any) -> None:
        seen.append((message.topic, message.payload))
        original(message)

    tally.take = take  # type: ignore[method-assign]
    await tally_broker(settings, "edged", tally, ready, stop)


async def _refusals(
    manager: ManagerSettings,
    signing: SigningKeys,
    device: str,
    accepted: Command,
    wire: bytes,
) -> dict[str, str]:
    """Send a forged, a replayed, a misdirected and a stale command; each one's error class."""
    target = Target.device(device)
    out: dict[str, str] = {}

    async def error_of(name: str, **kw: Any) -> None:
        result = await send_command(
            manager, [signing.signer], target, "ping", expected=[device], timeout_s=10, **kw
        )
        reply = result.replies[device]
        assert not reply.ok
        out[name] = reply.error.split(":", 1)[0]

    await error_of("forged", payload=encode_command(
        Command("ping", target, _now(), new_nonce()), [generate_key()]))  # fmt: skip
    await error_of("replayed", command=accepted, payload=wire)
    elsewhere = Command("ping", Target.device("someone-else"), _now(), new_nonce())
    await error_of("misdirected", command=elsewhere,
                   payload=encode_command(elsewhere, [signing.signer]))  # fmt: skip
    old = Command("ping", target, _now() - 3600, new_nonce())
    await error_of("stale", command=old, payload=encode_command(old, [signing.signer]))
    return out


def _now() -> int:
    return int(time.time())


def test_a_rollout_drives_simulated_devices_over_https_and_aborts_on_reverts(
    tmp_path: Path,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
    manager: ManagerSettings,
    nginx: Nginx,
    bundles: Bundles,
) -> None:
    n = 120
    names = [f"sim-{i:04}" for i in range(n)]
    # A tenth of the devices drop off while downloading and come back a second later.
    good = sim_settings(broker, pki, signing, names, tmp_path, groups=("fleet",), churn=0.1)
    release = bundles.mlp(3).path
    store = ArtifactStore(nginx.root("store") / "artifacts", (nginx.base_url("store"),))
    rollouts = RolloutStore(tmp_path / "rollouts")
    tally = Tally()

    async def rollout(settings: SimSettings, rollout_id: str, policy: AbortPolicy) -> Any:
        sim = FleetSim(settings, names)
        await sim.start(timeout_s=120)
        stop, ready = asyncio.Event(), asyncio.Event()
        client_settings = await asyncio.to_thread(manager.client_settings)
        listener = asyncio.create_task(tally_broker(client_settings, "edged", tally, ready, stop))
        try:
            await ready.wait()
            await wait_online(manager, names, timeout_s=60)
            tally.reset()  # what the release costs, not the retained statuses read at start
            new_rollout(rollouts, release, "fleet", names, percents=(10, 50), abort=policy,
                        rollout_id=rollout_id, artifacts=store)  # fmt: skip
            state = await drive(manager, [signing.signer], rollouts, rollout_id)
            # Every report sent before the verdict is through the broker by now.
            await send_command(manager, [signing.signer], Target.device(names[-1]), "ping",
                               expected=[names[-1]])  # fmt: skip
        finally:
            stop.set()
            await listener
            await sim.stop()
        return state, sim

    state, sim = asyncio.run(rollout(good, "wide", AbortPolicy(wave_timeout_s=120)))
    assert state.status == "done", state.reason
    assert [len(w) for w in state.waves] == [1, 11, 48, 60]
    assert set(sim.versions().values()) == {3}
    assert sim.counters.connects > n  # the churn happened
    assert (
        sim.counters.chunks_http == n * prepare_bundle(release.read_bytes()).deployment.chunk_count
    )
    assert "chunks" not in tally.messages  # not one chunk through the broker
    per_device = tally.total_messages / n
    assert per_device <= 20, tally.messages
    retained_per_device = tally.retained_bytes / n
    assert retained_per_device <= 4096, tally.retained
    print(f"per device: {per_device:.1f} messages, {tally.total_bytes / n:.0f} bytes through "
          f"the broker, {retained_per_device:.0f} retained bytes; {tally.messages}")  # fmt: skip
    nginx_206 = [r for r in nginx.requests() if r[1] == 206]
    assert len(nginx_206) >= n

    # A release that reverts on a third of the devices: aborted within the first waves.
    reverting = sim_settings(broker, pki, signing, names, tmp_path / "b", groups=("fleet",),
                             verdicts=Verdicts(promoted=2, reverted=1), seed=7,
                             serving_version=3)  # fmt: skip
    policy = AbortPolicy(failed_permille=100, min_devices=10, wave_timeout_s=120)
    release = bundles.mlp(4).path
    state, sim = asyncio.run(rollout(reverting, "bad", policy))
    assert state.status == "aborted", state.reason
    assert "failed or reverted" in state.reason
    untouched = [d for d, r in state.devices.items() if r.state == "pending"]
    assert untouched and all(state.devices[d].wave >= 2 for d in untouched)
    assert all(sim.versions()[d] == 3 for d in untouched)  # never heard of version 4
    took = [d for d, r in state.devices.items() if r.state in ("rolled-back", "passed")]
    assert all(sim.versions()[d] == 3 for d in took)  # rolled back to what they served
    assert all(r.state != "passed" for r in state.devices.values())
