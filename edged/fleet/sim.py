"""A fleet simulator for tests and benchmarks: thousands of simulated devices in one process,
each with its own MQTT v5 connection and its own client certificate (CN = device id), speaking
the device protocol with the daemon's own code: subscriptions, last will, command target
checks, chunk checks and progress messages from ``edged.transport.protocol``, signature checks
from ``edged.bundle.trust``, the replay window from ``edged.transport.replay`` and the HTTPS
Range download from ``edged.transport.artifacts``. What it does not do is install: after the
download (every chunk checked against its signed hash, kept in memory only as the set of
chunks present) a device draws its verdict (``promoted`` / ``reverted`` / ``failed``) from
configured rates, after a simulated probation. It is a test tool, never a device.

Differences from a daemon, on purpose: no bundle is kept (the whole-file SHA-256 is implied by
the signed chunk hashes), probation takes ``probation_s``, and churn is a clean disconnect
(the daemon's goodbye status) followed by a reconnect ``churn_down_s`` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from edged import __version__
from edged._backoff import Backoff
from edged._compat import TIMEOUT_ERRORS
from edged.bundle.trust import TrustState
from edged.errors import DownloadStalledError, EdgedError, FleetMessageError, TransportError
from edged.fleet.pki import Issued, cert_pem, issue_client_for_key, new_key
from edged.transport.artifacts import HttpFetch
from edged.transport.client import ClientSettings, Message, MqttClient, Will
from edged.transport.protocol import (
    FAILED,
    INSTALLED,
    PROMOTED,
    RECEIVED,
    REVERTED,
    SERVING,
    VERIFIED,
    Command,
    Deployment,
    DeviceStatus,
    ModelVersion,
    Progress,
    Reply,
    check_chunk,
    check_command_target,
    decode_command,
    deployment_progress,
    device_subscriptions,
    encode_json,
    error_reason,
    will_status,
)
from edged.transport.replay import NonceWindow
from edged.transport.tls import TlsFiles, client_context
from edged.transport.topics import Target, Topics

log = logging.getLogger(__name__)

CHUNK_WINDOW = 64  # chunk topics subscribed at once, as the daemon


@dataclass(frozen=True)
class Verdicts:
    """How simulated probations end: relative weights of ``promoted``, ``reverted`` and
    ``failed`` (an install that fails, e.g. its self-test)."""

    promoted: float = 1.0
    reverted: float = 0.0
    failed: float = 0.0

    def draw(self, rng: random.Random) -> str:
        return rng.choices(
            (PROMOTED, REVERTED, FAILED), (self.promoted, self.reverted, self.failed)
        )[0]


@dataclass(frozen=True)
class SimSettings:
    host: str
    port: int
    identity: Callable[[str], TlsFiles]  # a device's CA, certificate and key files
    trust: TrustState  # the device trust store (signers of commands)
    topic_prefix: str = "edged"
    groups: tuple[str, ...] = ()
    model: str = "mlp"
    serving_version: int = 1
    verdicts: Verdicts = field(default_factory=Verdicts)
    artifact_ca_file: Path | None = None  # None: the system trust store
    probation_s: float = 0.0
    churn: float = 0.0  # chance that a device drops off while downloading
    churn_down_s: float = 1.0
    keepalive_s: int = 300
    operation_timeout_s: float = 30.0
    session_expiry_s: int = 3600
    command_max_age_s: float = 300.0
    download_stall_timeout_s: float = 60.0
    artifact_request_bytes: int = 8 * 1024 * 1024
    connect_concurrency: int = 32
    seed: int = 0

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


@dataclass
class Counters:
    """What the simulated fleet did, for the benchmark."""

    connects: int = 0
    commands: int = 0
    refused: int = 0
    published: int = 0
    published_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    chunks_mqtt: int = 0
    chunks_http: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)


class _MemoryPartial:
    """The chunks present, each checked against its signed hash; the bytes are dropped."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.have: set[int] = set()

    @property
    def complete(self) -> bool:
        return len(self.have) == self.deployment.chunk_count

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.deployment.chunk_count) if i not in self.have]

    def store_chunk(self, index: int, data: bytes) -> bool:
        if index in self.have:
            return False
        check_chunk(self.deployment, index, data)
        self.have.add(index)
        return True


class SimDevice:
    def __init__(
        self,
        device_id: str,
        settings: SimSettings,
        counters: Counters,
        artifact_ssl: ssl.SSLContext,
        rng: random.Random,
    ) -> None:
        self.id = device_id
        self.settings = settings
        self.topics = settings.topics
        self.counters = counters
        self.artifact_ssl = artifact_ssl
        self.rng = rng
        self.version = settings.serving_version
        self.held = [settings.serving_version]
        self.nonces = NonceWindow(settings.command_max_age_s)
        self.last_progress: Progress | None = None
        self.client: MqttClient | None = None
        self.connected = asyncio.Event()
        self._inbox: tuple[str, asyncio.Queue[tuple[int, bytes]]] | None = None
        self._jobs: asyncio.Queue[Deployment] = asyncio.Queue()
        self._stopping = False
        self._drop: asyncio.Event = asyncio.Event()
        self._handling: set[asyncio.Task[None]] = set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # --- messages out --------------------------------------------------------------------

    def status(self, online: bool = True, reason: str = "") -> DeviceStatus:
        models = (ModelVersion(self.settings.model, str(self.version), "READY"),)
        return DeviceStatus(
            self.id, online, int(time.time()), self.settings.groups, models, __version__, reason
        )

    async def _publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        client: MqttClient | None = None,
        **kw: Any,
    ) -> None:
        """Publish QoS 1; a failure is dropped (the progress is sent again on the next
        connection) unless ``client`` is given, then it is raised."""
        target = client or self.client
        if target is None:
            return
        try:
            await target.publish(topic, payload, qos=1, retain=retain, **kw)
        except TransportError:
            if client is not None:
                raise
            return
        self.counters.published += 1
        self.counters.published_bytes += len(payload) + len(topic)

    async def publish_status(self, client: MqttClient | None = None) -> None:
        await self._publish(
            self.topics.status(self.id),
            encode_json(self.status().to_json()),
            retain=True,
            client=client,
        )

    async def report(self, progress: Progress) -> None:
        self.last_progress = progress
        await self._publish(
            self.topics.progress(self.id), encode_json(progress.to_json()), retain=True
        )

    # --- the connection ------------------------------------------------------------------

    def client_settings(self) -> ClientSettings:
        s = self.settings
        will = will_status(self.id, s.groups, int(time.time()), __version__)
        return ClientSettings(
            host=s.host,
            port=s.port,
            client_id=self.id,
            tls_context=client_context(s.identity(self.id)),
            keepalive_s=s.keepalive_s,
            timeout_s=s.operation_timeout_s,
            clean_start=False,
            session_expiry_s=s.session_expiry_s,
            will=Will(self.topics.status(self.id), encode_json(will.to_json())),
        )

    async def run(self, gate: asyncio.Semaphore) -> None:
        backoff = Backoff(0.2, 5.0)
        worker = asyncio.create_task(self._worker(), name=f"sim-{self.id}-jobs")
        try:
            while not self._stopping:
                try:
                    async with gate:
                        settings = self.client_settings()
                        client = MqttClient(settings)
                        await client.__aenter__()
                    try:
                        backoff.reset()
                        await self._session(client)
                    finally:
                        self.client = None
                        self.connected.clear()
                        with contextlib.suppress(TransportError):
                            await client.__aexit__(None, None, None)
                except TransportError as exc:
                    log.debug("%s: %s", self.id, exc)
                if self.stopping:
                    break
                if self._drop.is_set():
                    self._drop.clear()
                    await asyncio.sleep(self.settings.churn_down_s)  # simulated time offline
                else:
                    await asyncio.sleep(backoff.next_delay_s())
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def _session(self, client: MqttClient) -> None:
        s = self.settings
        await client.subscribe(device_subscriptions(self.topics, self.id, s.groups), qos=1)
        await self.publish_status(client)  # the session fails (and reconnects) without it
        self.client = client
        self.counters.connects += 1
        if self.last_progress is not None:
            await self.report(self.last_progress)
        self.connected.set()
        messages = client.messages()
        drop = asyncio.ensure_future(self._drop.wait())
        try:
            while not self._stopping:
                nxt = asyncio.ensure_future(messages.__anext__())
                nxt.add_done_callback(_collect)
                done, _ = await asyncio.wait((nxt, drop), return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    await _discard(nxt)
                    await self.goodbye()
                    return
                self.take(nxt.result())
        finally:
            drop.cancel()

    async def goodbye(self) -> None:
        """What the daemon publishes when it stops: the retained offline status."""
        self.connected.clear()
        status = self.status(online=False, reason="shutdown")
        await self._publish(self.topics.status(self.id), encode_json(status.to_json()), retain=True)

    async def stop(self) -> None:
        self._stopping = True
        await self.goodbye()
        self._drop.set()

    # --- messages in ---------------------------------------------------------------------

    def take(self, message: Message) -> None:
        self.counters.received += 1
        self.counters.received_bytes += len(message.payload) + len(message.topic)
        chunk = self.topics.parse_chunk(message.topic)
        if chunk is not None:
            inbox = self._inbox
            if inbox is not None and inbox[0] == chunk[1] and message.payload:
                inbox[1].put_nowait((chunk[2], message.payload))
            return
        if message.topic.endswith(("/cmd", "/deploy")):
            task = asyncio.ensure_future(self._command(message))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)

    async def _command(self, message: Message) -> None:
        self.counters.commands += 1
        try:
            signed = decode_command(message.payload)
        except FleetMessageError as exc:
            await self._reply(
                message, Reply(self.id, "unknown", "", False, error=error_reason(exc))
            )
            return
        command = signed.command
        now = time.time()
        try:
            self.settings.trust.verify_command(signed.payload, signed.signatures, int(now))
            check_command_target(
                self.topics, self.id, self.settings.groups, command.target, message.topic
            )
            if command.type == "deploy":
                command.deployment  # noqa: B018 - parse now: a malformed one is refused whole
            self.nonces.check(command.nonce, command.issued_at, now)
            self.nonces.record(command.nonce, command.issued_at)
            result = self._execute(command)
        except EdgedError as exc:
            self.counters.refused += 1
            refusal = Reply(self.id, command.type, command.nonce, False, error=error_reason(exc))
            await self._reply(message, refusal)
            return
        await self._reply(message, Reply(self.id, command.type, command.nonce, True, result))
        if command.type == "rollback":
            await self.publish_status()

    def _execute(self, command: Command) -> dict[str, Any]:
        if command.type == "ping":
            return {"pong": True, "at": int(time.time())}
        if command.type == "status":
            last = self.last_progress
            return {
                "status": self.status().to_json(),
                "last_deployment": last.to_json() if last else None,
            }
        if command.type == "rollback":
            to_version = command.args.get("to_version")
            before = self.version
            if isinstance(to_version, int):
                self.version = to_version
            elif len(self.held) > 1:
                self.version = self.held[-2]
            return {"outcome": "rolled-back", "model": self.settings.model,
                    "from_version": before, "to_version": self.version}  # fmt: skip
        deployment = command.deployment
        self._jobs.put_nowait(deployment)
        return {"accepted": True, "deployment": deployment.id, "queued": self._jobs.qsize()}

    async def _reply(self, message: Message, reply: Reply) -> None:
        topic = message.response_topic
        if topic is None or not topic.startswith(self.topics.replies("")):
            return
        await self._publish(
            topic, encode_json(reply.to_json()), correlation_data=message.correlation_data
        )

    # --- deployments ---------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            d = await self._jobs.get()
            try:
                await self._deploy(d)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("%s: deployment %s failed: %s", self.id, d.id, exc)
                await self.report(deployment_progress(self.id, d, FAILED, reason=error_reason(exc)))

    async def _deploy(self, d: Deployment) -> None:
        partial = _MemoryPartial(d)
        await self.report(deployment_progress(self.id, d, RECEIVED, 0))
        if self.settings.churn and self.rng.random() < self.settings.churn:
            self._drop.set()  # drops off mid-download; the download goes on after it returns
        if d.urls:
            fetched = await self._fetch_http(partial)
            self.counters.chunks_http += fetched
        else:
            fetched = await self._fetch_mqtt(partial)
            self.counters.chunks_mqtt += fetched
        n = d.chunk_count
        await self.report(deployment_progress(self.id, d, RECEIVED, n, fetched))
        await self.report(deployment_progress(self.id, d, VERIFIED, n, fetched))
        verdict = self.settings.verdicts.draw(self.rng)
        self.counters.verdicts[verdict] = self.counters.verdicts.get(verdict, 0) + 1
        if verdict == FAILED:
            reason = "SelfTestFailedError: simulated self-test failure"
            await self.report(deployment_progress(self.id, d, FAILED, n, fetched, reason=reason))
            return
        before = self.version
        self.version = d.version
        self.held.append(d.version)
        await self.report(deployment_progress(self.id, d, INSTALLED, n, fetched, "installed"))
        await self.publish_status()
        await self.report(deployment_progress(self.id, d, SERVING, n, fetched))
        if self.settings.probation_s > 0:
            await asyncio.sleep(self.settings.probation_s)  # simulated probation
        if verdict == REVERTED:
            self.version = before
            reason = "error rate 0.31 > 0.05 (simulated)"
            await self.report(deployment_progress(self.id, d, REVERTED, n, fetched, reason))
            await self.publish_status()
        else:
            reason = "simulated probation passed"
            await self.report(deployment_progress(self.id, d, PROMOTED, n, fetched, reason))

    async def _fetch_http(self, partial: _MemoryPartial) -> int:
        s = self.settings
        d = partial.deployment
        interval = 0.5
        last = [0.0]

        async def on_stored(complete: bool) -> None:
            now = time.monotonic()
            if not complete and now - last[0] >= interval:
                last[0] = now
                await self.report(deployment_progress(self.id, d, RECEIVED, len(partial.have)))

        fetch = HttpFetch(
            partial,
            d.urls,
            self.artifact_ssl,
            stall_s=s.download_stall_timeout_s,
            request_bytes=s.artifact_request_bytes,
            on_stored=on_stored,
        )
        return await fetch.run()

    async def _fetch_mqtt(self, partial: _MemoryPartial) -> int:
        d = partial.deployment
        queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self._inbox = (d.id, queue)
        fetched = 0
        target = Target.device(self.id)
        try:
            while not partial.complete:
                await self.connected.wait()
                client = self.client
                if client is None:
                    continue
                window = partial.missing[:CHUNK_WINDOW]
                topics = [self.topics.chunk(target, d.id, i) for i in window]
                try:
                    await client.subscribe(topics, qos=1)
                except TransportError:
                    continue
                pending = set(window)
                deadline = time.monotonic() + self.settings.download_stall_timeout_s
                while pending and self.client is client:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DownloadStalledError(
                            f"no chunk for {self.settings.download_stall_timeout_s:g}s"
                        )
                    try:
                        index, data = await asyncio.wait_for(queue.get(), min(left, 1.0))
                    except TIMEOUT_ERRORS:
                        continue
                    if partial.store_chunk(index, data):
                        fetched += 1
                        deadline = time.monotonic() + self.settings.download_stall_timeout_s
                    pending.discard(index)
                with contextlib.suppress(TransportError):
                    await client.unsubscribe(topics)
        finally:
            self._inbox = None
        return fetched


class FleetSim:
    """Many ``SimDevice`` in one event loop."""

    def __init__(self, settings: SimSettings, devices: Sequence[str]) -> None:
        self.settings = settings
        self.counters = Counters()
        rng = random.Random(settings.seed)  # noqa: S311 - simulated verdicts, not secrets
        context = ssl.create_default_context(
            cafile=None if settings.artifact_ca_file is None else str(settings.artifact_ca_file)
        )
        self.devices = {
            d: SimDevice(d, settings, self.counters, context, random.Random(rng.random()))  # noqa: S311
            for d in devices
        }
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout_s: float = 600.0) -> None:
        """Connect every device (a bounded number of TLS handshakes at once) and wait until
        each has published its online status."""
        gate = asyncio.Semaphore(self.settings.connect_concurrency)
        self._tasks = [
            asyncio.create_task(device.run(gate), name=f"sim-{d}")
            for d, device in self.devices.items()
        ]
        waits = [asyncio.ensure_future(dev.connected.wait()) for dev in self.devices.values()]
        _, pending = await asyncio.wait(waits, timeout=timeout_s)
        for w in pending:
            w.cancel()
        if pending:
            raise TransportError(f"{len(pending)} simulated devices not connected in {timeout_s}s")

    async def stop(self) -> None:
        await asyncio.gather(*(d.stop() for d in self.devices.values()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def versions(self) -> dict[str, int]:
        return {d: dev.version for d, dev in self.devices.items()}


def sim_identities(
    ca: Issued, ca_file: Path, names: Iterable[str], directory: Path
) -> Callable[[str], TlsFiles]:
    """A client certificate (CN = device id) for each simulated device, issued by ``ca``.
    The simulated devices share one private key (issuing 10,000 certificates then takes
    seconds); the broker still binds each connection to its own certificate's CN."""
    directory.mkdir(parents=True, exist_ok=True)
    key = new_key()
    key_file = directory / "sim-devices.key"
    Issued(issue_client_for_key(ca, "sim-key", key.public_key()), key).write(
        directory / "sim-key.crt", key_file
    )
    for name in names:
        cert: x509.Certificate = issue_client_for_key(ca, name, key.public_key())
        (directory / f"{name}.crt").write_bytes(cert_pem(cert))
    return lambda name: TlsFiles(ca_file, directory / f"{name}.crt", key_file)


@dataclass
class Tally:
    """Messages and bytes the broker delivered on the edged topics, by kind (``status``,
    ``progress``, ``deploy``, ``cmd``, ``chunks``, ``replies``...), as a manager subscribed
    to everything sees them, and the retained bytes (current and peak) of what it saw."""

    messages: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    retained: dict[str, int] = field(default_factory=dict)  # topic -> retained payload bytes
    retained_bytes: int = 0
    peak_retained_bytes: int = 0

    def take(self, message: Message) -> None:
        parts = message.topic.split("/")
        kind = parts[3] if len(parts) > 3 and parts[1] in ("devices", "groups") else parts[1]
        self.messages[kind] = self.messages.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + len(message.payload) + len(message.topic)
        if message.retain or kind in ("status", "progress", "chunks"):
            size = len(message.payload) + len(message.topic) if message.payload else 0
            self.retained_bytes += size - self.retained.pop(message.topic, 0)
            if size:
                self.retained[message.topic] = size
            self.peak_retained_bytes = max(self.peak_retained_bytes, self.retained_bytes)

    def reset(self) -> None:
        self.messages.clear()
        self.bytes.clear()
        self.peak_retained_bytes = self.retained_bytes

    @property
    def total_messages(self) -> int:
        return sum(self.messages.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": dict(self.messages),
            "bytes": dict(self.bytes),
            "retained_bytes": self.retained_bytes,
            "peak_retained_bytes": self.peak_retained_bytes,
            "retained_topics": len(self.retained),
        }


async def tally_broker(
    settings: ClientSettings, prefix: str, tally: Tally, ready: asyncio.Event, stop: asyncio.Event
) -> None:
    """Count everything under ``<prefix>/#`` into ``tally`` until ``stop``."""
    async with MqttClient(settings) as client:
        await client.subscribe([f"{prefix}/#"], qos=1)
        ready.set()
        messages = client.messages()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(messages.__anext__())
                nxt.add_done_callback(_collect)
                done, _ = await asyncio.wait((nxt, stopped), return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    await _discard(nxt)
                    return
                tally.take(nxt.result())
        finally:
            stopped.cancel()


async def _discard(future: asyncio.Future[Any]) -> None:
    """Cancel a pending ``__anext__`` and collect whatever it ended with (a connection that
    dropped at the same moment)."""
    future.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, TransportError):
        await future


def _collect(future: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a message wait that nobody may be awaiting any more (its
    owner was cancelled while the connection dropped): no 'never retrieved' noise."""
    if not future.cancelled():
        future.exception()
