"""The broker side of the trust model, against a real Mosquitto: mutual TLS and the ACL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import ssl
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edged._net import free_ports
from edged.errors import SubscribeDeniedError, TlsHandshakeError
from edged.fleet.brokerconf import SHIPPED_FILES, render_mosquitto_conf
from edged.fleet.pki import ClientFiles, issue_client, make_ca, write_client
from edged.transport.client import ClientSettings, Message, MqttClient
from edged.transport.tls import TlsFiles, client_context
from tests.support.broker import Broker, mosquitto_missing_reason
from tests.support.daemon import REPO_ROOT
from tests.support.pki import FLEET_MANAGER, FleetPki

pytestmark = pytest.mark.integration


def settings(
    broker: Broker, context: ssl.SSLContext, client_id: str, **kw: object
) -> ClientSettings:
    return ClientSettings(broker.host, broker.port, client_id, context, timeout_s=5.0, **kw)  # type: ignore[arg-type]


def context_of(files: ClientFiles) -> ssl.SSLContext:
    return client_context(TlsFiles(files.ca_file, files.cert_file, files.key_file))


async def collect(client: MqttClient, seconds: float) -> list[Message]:
    got: list[Message] = []

    async def take() -> None:
        async for message in client.messages():
            got.append(message)

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(take(), seconds)
    return got


def test_a_client_without_a_certificate_is_refused(broker: Broker, pki: FleetPki) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca_file)

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(TlsHandshakeError, match="certificate required"):
            async with MqttClient(settings(broker, context, "anonymous")):
                pass
        assert time.monotonic() - started < 3.0  # noticed at once, not after the timeout

    asyncio.run(main())


def test_a_certificate_from_another_ca_is_refused(broker: Broker, pki: FleetPki) -> None:
    # Same CN as a real device, signed by a CA the broker does not trust.
    context = context_of(pki.foreign_client("device-1"))

    async def main() -> None:
        # The broker's "unknown ca" alert can be lost when it hangs up first (TLS 1.3): then the
        # refusal shows as the TLS connection ending before CONNACK.
        with pytest.raises(TlsHandshakeError, match="unknown ca|EOF occurred in violation"):
            async with MqttClient(settings(broker, context, "device-1")):
                pass

    asyncio.run(main())


def test_a_broker_certificate_for_another_host_is_refused(broker: Broker, pki: FleetPki) -> None:
    context = context_of(pki.client("device-1"))
    wrong = ClientSettings(broker.host, broker.wrong_host_port, "device-1", context, timeout_s=5.0)

    async def main() -> None:
        with pytest.raises(TlsHandshakeError, match="not valid for '127.0.0.1'"):
            async with MqttClient(wrong):
                pass

    asyncio.run(main())


def test_a_device_cannot_read_or_write_another_devices_topics(
    broker: Broker, pki: FleetPki
) -> None:
    """Under the shipped ACL: device-2 may subscribe to device-1's topics (Mosquitto 2.0 grants
    every SUBSCRIBE) but receives none of their messages, and its writes there are dropped."""
    topics = broker.topics

    async def main() -> None:
        async with (
            MqttClient(settings(broker, context_of(pki.client("device-1")), "device-1")) as d1,
            MqttClient(settings(broker, context_of(pki.client("device-2")), "device-2")) as d2,
            MqttClient(settings(broker, context_of(pki.client(FLEET_MANAGER)), "fm")) as fm,
        ):
            await d1.subscribe(["edged/devices/device-1/cmd"])
            spying = [
                "edged/devices/device-1/cmd",
                "edged/devices/device-1/#",
                "edged/groups/north/#",
                "edged/#",
            ]
            with contextlib.suppress(SubscribeDeniedError):  # a stricter broker refuses outright
                await d2.subscribe(spying)
            await d2.subscribe(["edged/groups/lab/cmd"])  # its own group: allowed
            await fm.subscribe([topics.status("device-1")])

            await fm.publish("edged/devices/device-1/cmd", b"for device-1 only")
            await fm.publish("edged/groups/north/cmd", b"for group north only")
            await fm.publish("edged/groups/lab/cmd", b"for group lab")
            # device-2 impersonates device-1's status and writes a command for device-1
            await d2.publish(topics.status("device-1"), b'{"forged": true}', retain=True)
            await d2.publish("edged/devices/device-1/cmd", b"forged command")

            seen_by_1, seen_by_2, seen_by_fm = await asyncio.gather(
                collect(d1, 1.0), collect(d2, 1.0), collect(fm, 1.0)
            )
        assert [m.payload for m in seen_by_1] == [b"for device-1 only"]
        # (twice, perhaps: it matches two of its subscriptions)
        assert {m.payload for m in seen_by_2} == {b"for group lab"}
        assert seen_by_fm == []  # the forged status never reached the broker's store

    asyncio.run(main())


def test_the_shipped_broker_config_is_the_generated_one() -> None:
    shipped = (REPO_ROOT / "docs" / "mosquitto" / "mosquitto.conf").read_text()
    assert shipped.split("\n", 1)[1] == render_mosquitto_conf(SHIPPED_FILES).split("\n", 1)[1]


def test_the_shipped_broker_config_binds_identities_and_keeps_the_listeners_apart(
    tmp_path: Path, pki: FleetPki
) -> None:
    """docs/mosquitto/mosquitto.conf with its paths pointed at a test PKI (and a managers' CA of
    its own): client certificates are required; a device certificate gets its CN as client id
    whatever it asks for, and is refused on the managers' listener."""
    reason = mosquitto_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    managers_ca = make_ca("test managers CA")
    managers_ca_file = tmp_path / "managers-ca.crt"
    managers_ca_file.write_bytes(managers_ca.cert_pem)
    manager = write_client(tmp_path, pki.ca_file, issue_client(managers_ca, FLEET_MANAGER), "fm")
    shipped = (REPO_ROOT / "docs" / "mosquitto" / "mosquitto.conf").read_text()
    port, manager_port = free_ports(2)
    (tmp_path / "data").mkdir()
    (tmp_path / "edged.acl").write_text(
        (REPO_ROOT / "docs" / "mosquitto" / "edged.acl").read_text()
    )
    files = SHIPPED_FILES
    text = (
        shipped.replace(str(files.acl_file), str(tmp_path / "edged.acl"))
        .replace(f"{files.persistence_dir}/", f"{tmp_path / 'data'}/")
        .replace(str(files.manager_ca_file), str(managers_ca_file))
        .replace(str(files.ca_file), str(pki.ca_file))
        .replace(str(files.cert_file), str(pki.server_cert))
        .replace(str(files.key_file), str(pki.server_key))
        .replace("listener 8883", f"listener {port} 127.0.0.1")
        .replace("listener 8884", f"listener {manager_port} 127.0.0.1")
    )
    assert "/etc" not in text and "/var/" not in text
    # The shipped config runs as mosquitto's own user, who owns /etc/mosquitto/certs there;
    # here the test's user owns the files (started as root, mosquitto drops to this user).
    text += f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
    broker = Broker(
        tmp_path, pki, {}, port=port, wrong_host_port=0, manager_port=manager_port,
        config_text=text,
    )  # fmt: skip
    try:
        broker.start()

        async def main() -> None:
            context = context_of(pki.client("device-9"))
            async with MqttClient(settings(broker, context, "device-1")) as client:
                await client.publish("edged/devices/device-9/status", json.dumps({}).encode())
            on_managers = ClientSettings(broker.host, manager_port, "x", context, timeout_s=5.0)
            with pytest.raises(TlsHandshakeError):
                async with MqttClient(on_managers):
                    pass
            fm = replace(on_managers, tls_context=context_of(manager), client_id="fm-1")
            async with MqttClient(fm) as client:
                await client.publish("edged/devices/device-9/cmd", b"{}")
            bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            bare.load_verify_locations(pki.ca_file)
            with pytest.raises(TlsHandshakeError):
                async with MqttClient(settings(broker, bare, "nobody")):
                    pass

        asyncio.run(main())
        assert "as device-9 (" in broker.log() and "as device-1 (" not in broker.log()
        assert "as fm-1 (" in broker.log()
    finally:
        broker.stop()
