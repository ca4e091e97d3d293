"""Telemetry over the fleet channel with a real Mosquitto: records arrive in order, and a broker
outage or a ``kill -9`` of the daemon loses none of them (they wait in the on-disk spool)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.transport.tls import TlsFiles, client_context
from tests.support.broker import Broker
from tests.support.daemon import running_daemon
from tests.support.pki import FLEET_MANAGER, FleetPki, SigningKeys
from tests.transport.conftest import mqtt_config

pytestmark = pytest.mark.integration

TELEMETRY_TOPIC = "edged/devices/device-1/telemetry"
INTERVAL_S = 0.3


class Collector:
    """The fleet manager's side: a persistent MQTT v5 session subscribed to one device's
    telemetry, so the broker queues QoS 1 records while this client is away."""

    def __init__(self, broker: Broker, pki: FleetPki, topic: str = TELEMETRY_TOPIC) -> None:
        files = pki.client(FLEET_MANAGER)
        self._topic = topic
        self._tls = client_context(TlsFiles(files.ca_file, files.cert_file, files.key_file))
        self._broker = broker
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        while not self._stop.is_set():
            try:
                async with aiomqtt.Client(
                    self._broker.host,
                    self._broker.manager_port,
                    identifier="telemetry-collector",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    tls_context=self._tls,
                    clean_start=False,
                    properties=properties,
                ) as client:
                    await client.subscribe(self._topic, qos=1)
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        self.records.append(json.loads(message.payload))
                        if self._stop.is_set():
                            return
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def seqs(self) -> list[int]:
        return [int(r["seq"]) for r in self.records if r.get("type") == "telemetry"]

    def wait_for_seq(self, seq: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(s >= seq for s in self.seqs()):
                return
            time.sleep(0.05)
        raise AssertionError(f"no record with seq >= {seq} arrived; got {self.seqs()}")


@pytest.fixture
def collector(broker: Broker, pki: FleetPki) -> Iterator[Collector]:
    c = Collector(broker, pki)
    c.start()
    time.sleep(0.5)
    yield c
    c.stop()


def device_config(broker: Broker, pki: FleetPki) -> str:
    return mqtt_config(broker, pki, "device-1") + f"[telemetry]\ninterval_s = {INTERVAL_S}\n"


def spool_next_seq(state: Path) -> int:
    from edged.telemetry.spool import Spool

    with Spool(state / "telemetry") as spool:
        return spool.next_seq


def test_broker_outage_loses_no_record(
    tmp_path: Path,
    model_repo: Path,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
    collector: Collector,
) -> None:
    work = tmp_path / "device-1"
    signing.install_trust(work / "state" / "trust")
    with running_daemon(model_repo, work, device_config(broker, pki)):
        collector.wait_for_seq(3)
        before = max(collector.seqs())
        broker.stop()
        outage_s = 8 * INTERVAL_S
        time.sleep(outage_s)  # about 8 records go to the spool meanwhile
        broker.start()
        collector.wait_for_seq(before + 10)
    seqs = collector.seqs()
    first = seqs[0]
    assert seqs == list(range(first, first + len(seqs))), seqs  # in order, no gap, no duplicate
    assert seqs[-1] >= before + 10


def test_kill_9_with_records_in_the_spool_then_restart_delivers_them(
    tmp_path: Path,
    model_repo: Path,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
    collector: Collector,
) -> None:
    work = tmp_path / "device-1"
    signing.install_trust(work / "state" / "trust")
    config = device_config(broker, pki)
    with running_daemon(model_repo, work, config) as daemon:
        collector.wait_for_seq(2)
        broker.stop()
        time.sleep(6 * INTERVAL_S)
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(10)
    spooled_upto = spool_next_seq(work / "state") - 1
    assert spooled_upto >= max(collector.seqs()) + 3  # records were waiting in the spool
    broker.start()
    with running_daemon(model_repo, work, config):
        collector.wait_for_seq(spooled_upto + 2)
    seqs = collector.seqs()
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert set(range(seqs[0], spooled_upto + 1)) <= set(seqs)
