"""The fleet manager's side of the channel: push a bundle to a device or a group and follow
every device's progress, send signed commands and collect the replies, and read the fleet's
retained status. ``edged push`` and ``edged fleet`` are thin shells around these coroutines.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edged._backoff import Backoff
from edged.bundle.archive import ArchiveReader
from edged.bundle.canonical import Json
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.manifest import parse_manifest
from edged.bundle.reader import read_head
from edged.errors import (
    BrokerRefusedError,
    ConnectFailedError,
    ConnectionLostError,
    FleetMessageError,
    MqttTimeoutError,
    PushFailedError,
    TlsHandshakeError,
    TransportError,
)
from edged.fleet.artifacts import ArtifactStore
from edged.transport.client import ClientSettings, Message, MqttClient
from edged.transport.protocol import (
    FAILED,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    PROMOTED,
    REVERTED,
    SERVING,
    Command,
    Deployment,
    DeviceStatus,
    Progress,
    Reply,
    decode_json,
    encode_command,
    new_nonce,
)
from edged.transport.tls import TlsFiles, certificate_common_name, client_context
from edged.transport.topics import Target, Topics

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 1024
DEFAULT_PUSH_TIMEOUT_S = 300.0
DEFAULT_DISCOVERY_S = 1.5
PUBLISH_CONCURRENCY = 16

# Outcome states besides the device's own progress states.
WAITING = "waiting"
NO_ANSWER = "no answer"
REFUSED = "refused"


@dataclass(frozen=True)
class ManagerSettings:
    """How the fleet manager reaches the broker (its own client certificate, e.g. CN
    ``fleet-manager``)."""

    host: str
    port: int
    tls: TlsFiles
    topic_prefix: str = "edged"
    timeout_s: float = 10.0
    keepalive_s: int = 30

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def client_settings(self) -> ClientSettings:
        # A fresh client id per run: several pushes may run at once, each with its own
        # clean session and its own response topic.
        common_name = certificate_common_name(self.tls.cert_file)
        return ClientSettings(
            host=self.host,
            port=self.port,
            client_id=f"{common_name}-{secrets.token_hex(4)}",
            tls_context=client_context(self.tls),
            keepalive_s=self.keepalive_s,
            timeout_s=self.timeout_s,
            clean_start=True,
            session_expiry_s=0,
        )


# --- bundles -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedBundle:
    deployment: Deployment
    chunks: tuple[bytes, ...]


def prepare_bundle(
    data: bytes,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    deployment_id: str | None = None,
    limits: BundleLimits = DEFAULT_LIMITS,
    urls: Sequence[str] = (),
) -> PreparedBundle:
    """Split a signed bundle into chunks and describe it for the announcement. The bundle's
    own manifest and signatures travel along, so devices can refuse it before downloading.
    ``urls``: the mirrors that serve it as an artifact (then no chunk is published)."""
    if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise FleetMessageError(
            f"chunk size {chunk_size} is outside [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}] bytes"
        )
    head, _ = read_head(ArchiveReader(io.BytesIO(data), limits), limits)
    manifest = parse_manifest(head.manifest_bytes, limits)
    chunks = tuple(data[i : i + chunk_size] for i in range(0, len(data), chunk_size))
    deployment = Deployment(
        id=deployment_id or secrets.token_hex(16),
        model=manifest.model,
        version=manifest.version,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        chunk_size=chunk_size,
        chunks=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
        manifest=head.manifest_bytes.decode("ascii"),
        manifest_signatures=head.signatures,
        urls=tuple(urls),
    )
    return PreparedBundle(deployment, chunks)


def deploy_command(target: Target, deployment: Deployment, now: float | None = None) -> Command:
    return Command(
        "deploy",
        target,
        int(time.time() if now is None else now),
        new_nonce(),
        {"deployment": deployment.to_json()},
    )


# --- outcomes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceOutcome:
    device: str
    state: str = WAITING  # WAITING, a progress state, NO_ANSWER or REFUSED
    percent: int = 0
    chunks_done: int = 0
    chunks_total: int = 0
    chunks_fetched: int = 0
    reason: str = ""
    online: bool | None = None  # from the retained status, when known

    @property
    def ok(self) -> bool:
        # promoted: served, then passed probation (it may come before serving is seen)
        return self.state in (SERVING, PROMOTED)

    @property
    def finished(self) -> bool:
        return self.state in (SERVING, FAILED, REFUSED, PROMOTED, REVERTED)


@dataclass(frozen=True)
class PushResult:
    deployment_id: str
    target: Target
    model: str
    version: int
    outcomes: Mapping[str, DeviceOutcome]
    chunks_cleared: bool = False  # the retained chunks were removed from the broker

    @property
    def ok(self) -> bool:
        return bool(self.outcomes) and all(o.ok for o in self.outcomes.values())


ProgressCallback = Callable[[DeviceOutcome], None]


@dataclass
class _Fleet:
    """Everything the manager's message loop has learned so far."""

    topics: Topics
    statuses: dict[str, DeviceStatus] = field(default_factory=dict)
    progress: dict[str, Progress] = field(default_factory=dict)  # latest per device
    replies: dict[str, Reply] = field(default_factory=dict)  # by device
    chunks: set[str] = field(default_factory=set)  # retained chunk topics seen
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    last_message_at: float = 0.0
    listener: asyncio.Task[None] | None = None
    # Devices whose status, progress or reply arrived since the last ``take_touched()``: a
    # rollout over thousands of devices looks only at those.
    touched: set[str] = field(default_factory=set)
    # Only these devices' progress is kept (None: every device's).
    only: frozenset[str] | None = None

    def take(self, message: Message) -> None:
        self.last_message_at = time.monotonic()
        if self.topics.parse_chunk(message.topic) is not None:
            if message.payload and message.retain:
                self.chunks.add(message.topic)
            return
        if not message.payload:
            return
        device = self.topics.device_of(message.topic)
        try:
            value = decode_json(message.payload, message.topic)
            if device is not None and self.only is not None and device not in self.only:
                return
            if device is not None and message.topic == self.topics.status(device):
                status = DeviceStatus.from_json(value)
                self.statuses[device] = replace(status, device=device)
                self.touched.add(device)
            elif device is not None and message.topic == self.topics.progress(device):
                self.progress[device] = replace(Progress.from_json(value), device=device)
                self.touched.add(device)
            else:
                reply = Reply.from_json(value)
                self.replies[reply.device] = reply
                self.touched.add(reply.device)
        except FleetMessageError as exc:
            log.warning("ignoring a malformed message on %s: %s", message.topic, exc)
            return
        self.changed.set()

    def take_touched(self) -> set[str]:
        touched, self.touched = self.touched, set()
        return touched

    async def wait_change(self, timeout: float) -> None:
        """Wait for news (at most ``timeout``); raise the connection's error if it dropped."""
        if self.listener is not None and self.listener.done():
            self.listener.result()
            raise ConnectionLostError("the broker closed the connection")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)
        self.changed.clear()

    async def settle(self, window_s: float, quiet_s: float = 0.3) -> None:
        """Retained messages arrive right after SUBACK, with no end marker: wait for a quiet
        gap after the last one (or the whole window)."""
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            await self.wait_change(0.05)
            if self.last_message_at and time.monotonic() - self.last_message_at >= quiet_s:
                return


@contextlib.asynccontextmanager
async def _connected(settings: ManagerSettings) -> AsyncIterator[tuple[MqttClient, _Fleet]]:
    """A fleet manager connection whose incoming messages feed a ``_Fleet``."""
    fleet = _Fleet(settings.topics)
    client_settings = await asyncio.to_thread(settings.client_settings)
    async with MqttClient(client_settings) as client:

        async def listen() -> None:
            async for message in client.messages():
                fleet.take(message)

        fleet.listener = asyncio.create_task(listen(), name="fleet-manager-listener")
        try:
            yield client, fleet
        finally:
            fleet.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                await fleet.listener


async def _members(
    client: MqttClient, fleet: _Fleet, target: Target, discovery_s: float
) -> list[str]:
    """The devices a target reaches: itself, or every device whose retained status lists the
    group."""
    if target.kind == "devices":
        return [target.name]
    await client.subscribe([fleet.topics.all_status()], qos=1)
    await fleet.settle(discovery_s)
    return sorted(d for d, s in fleet.statuses.items() if target.name in s.groups)


def _outcome(
    device: str, fleet: _Fleet, deployment: Deployment, nonce: str, previous: DeviceOutcome
) -> DeviceOutcome:
    status = fleet.statuses.get(device)
    outcome = replace(previous, online=status.online if status else previous.online)
    reply = fleet.replies.get(device)
    # A repeated announcement (sent again after a reconnect) is refused as a replay; the
    # first one's outcome is what counts.
    replayed = reply is not None and reply.error.startswith("ReplayedCommandError")
    if reply is not None and reply.nonce == nonce and not reply.ok and not replayed:
        outcome = replace(outcome, state=REFUSED, reason=reply.error)
    progress = fleet.progress.get(device)
    if progress is not None and progress.deployment == deployment.id:
        outcome = replace(
            outcome,
            state=progress.state,
            percent=progress.percent,
            chunks_done=progress.chunks_done,
            chunks_total=progress.chunks_total,
            chunks_fetched=progress.chunks_fetched,
            reason=progress.reason,
        )
    return outcome


@dataclass
class _PushState:
    """What a push has achieved so far; it survives reconnects."""

    outcomes: dict[str, DeviceOutcome] = field(default_factory=dict)
    devices: list[str] | None = None
    published: set[int] = field(default_factory=set)
    announced: bool = False
    cleared: set[int] = field(default_factory=set)
    connected_once: bool = False


# Connection problems a fleet tool waits out once it has connected at least once (a
# certificate the broker refuses is not one of them).
_RETRYABLE = (ConnectionLostError, MqttTimeoutError)


def _retryable(exc: TransportError) -> bool:
    if isinstance(exc, (TlsHandshakeError, BrokerRefusedError)):
        return False
    return isinstance(exc, (*_RETRYABLE, ConnectFailedError))


async def push(
    settings: ManagerSettings,
    signing_keys: Sequence[Ed25519PrivateKey],
    bundle: Path | bytes,
    target: Target,
    *,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    timeout_s: float = DEFAULT_PUSH_TIMEOUT_S,
    expected: Sequence[str] | None = None,
    discovery_s: float = DEFAULT_DISCOVERY_S,
    keep_chunks: bool = False,
    on_progress: ProgressCallback | None = None,
    artifacts: ArtifactStore | None = None,
) -> PushResult:
    """Publish a signed bundle to one device or a group, and follow it until every device
    serves it, fails, or ``timeout_s`` passes.

    Chunks go out first as retained messages (so a device subscribing late still gets them),
    then the signed announcement, once, on the target's deploy topic. ``expected`` names the
    devices to wait for; by default the device itself, or for a group every device whose
    retained status lists the group. If the connection drops (a broker restart), the push
    reconnects until ``timeout_s`` and goes on where it was: the chunks not yet acknowledged,
    the announcement if it was not, then following the devices (their progress is retained).
    Once every device has answered (serving, failed or refused) the retained chunks are
    cleared, unless ``keep_chunks``; if one has not, they stay for it (``clean_chunks`` /
    ``edged fleet clean`` removes them later).

    With ``artifacts``, the bundle is written into the artifact directory as
    ``<sha256>.bundle``, the announcement names its mirror URLs, and no chunk is published.
    """
    data = bundle if isinstance(bundle, bytes) else await asyncio.to_thread(bundle.read_bytes)
    urls: tuple[str, ...] = ()
    if artifacts is not None:
        await asyncio.to_thread(artifacts.publish, data)
        urls = artifacts.urls(hashlib.sha256(data).hexdigest())
    prepared = await asyncio.to_thread(prepare_bundle, data, chunk_size, None, DEFAULT_LIMITS, urls)
    deployment = prepared.deployment
    command = deploy_command(target, deployment)
    payload = encode_command(command, signing_keys)
    deadline = time.monotonic() + timeout_s
    state = _PushState()
    backoff = Backoff(0.2, 5.0)
    while True:
        try:
            async with _connected(settings) as (client, fleet):
                state.connected_once = True
                backoff.reset()
                await _push_session(
                    client, fleet, settings.topics, state, prepared, command, payload, target,
                    expected, discovery_s, deadline, keep_chunks, on_progress,
                )  # fmt: skip
            break
        except TransportError as exc:
            if not (state.connected_once and _retryable(exc)):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("push: no broker connection before the timeout: %s", exc)
                break
            delay = min(backoff.next_delay_s(), left)
            log.warning("push: %s; reconnecting in %.1fs", exc, delay)
            await asyncio.sleep(delay)
    for device, o in state.outcomes.items():
        if not o.finished:
            state.outcomes[device] = replace(o, state=NO_ANSWER, reason=_silence(o, timeout_s))
            if on_progress is not None:
                on_progress(state.outcomes[device])
    cleared = len(state.cleared) == len(prepared.chunks) or bool(prepared.deployment.urls)
    return PushResult(
        deployment.id,
        target,
        deployment.model,
        deployment.version,
        state.outcomes,
        chunks_cleared=cleared,
    )


async def _push_session(
    client: MqttClient,
    fleet: _Fleet,
    topics: Topics,
    state: _PushState,
    prepared: PreparedBundle,
    command: Command,
    payload: bytes,
    target: Target,
    expected: Sequence[str] | None,
    discovery_s: float,
    deadline: float,
    keep_chunks: bool,
    on_progress: ProgressCallback | None,
) -> None:
    deployment = prepared.deployment
    if state.devices is None:
        devices = list(expected or await _members(client, fleet, target, discovery_s))
        if not devices:
            raise PushFailedError(
                f"no device has reported membership of {target} (retained status on "
                f"{topics.all_status()}); name the devices to expect"
            )
        state.devices = devices
        state.outcomes = {d: DeviceOutcome(d, chunks_total=deployment.chunk_count) for d in devices}
        log.info(
            "pushing %s version %s (%d bytes, %d chunks) to %s: %s",
            deployment.model,
            deployment.version,
            deployment.size,
            deployment.chunk_count,
            target,
            ", ".join(devices),
        )
    devices = state.devices
    reply_topic = topics.replies(client.client_id)
    await client.subscribe(
        [topics.progress(d) for d in devices] + [topics.all_status(), reply_topic]
    )
    over_mqtt = not deployment.urls
    missing = [i for i in range(len(prepared.chunks)) if over_mqtt and i not in state.published]
    await _publish_chunks(
        client, topics, target, deployment.id, prepared.chunks, missing, state.published
    )
    if not state.announced:
        await client.publish(
            topics.deploy(target),
            payload,
            qos=1,
            response_topic=reply_topic,
            correlation_data=command.nonce.encode("ascii"),
        )
        state.announced = True
    outcomes = state.outcomes
    while True:
        for device, previous in outcomes.items():
            current = _outcome(device, fleet, deployment, command.nonce, previous)
            if current != previous:
                outcomes[device] = current
                if on_progress is not None:
                    on_progress(current)
        left = deadline - time.monotonic()
        if all(o.finished for o in outcomes.values()) or left <= 0:
            break
        await fleet.wait_change(min(left, 1.0))
    if keep_chunks or not over_mqtt:
        return
    if not all(o.finished for o in outcomes.values()):
        log.info(
            "keeping the retained chunks of deployment %s for the devices that did not answer "
            "('edged fleet clean' removes them)",
            deployment.id,
        )
        return
    # An empty retained message deletes the retained chunk.
    empty = tuple(b"" for _ in prepared.chunks)
    left_over = [i for i in range(len(empty)) if i not in state.cleared]
    await _publish_chunks(client, topics, target, deployment.id, empty, left_over, state.cleared)


def _silence(o: DeviceOutcome, timeout_s: float) -> str:
    where = f"last state {o.state} at {o.percent}%" if o.state != WAITING else "never answered"
    offline = " (offline)" if o.online is False else ""
    return f"no result within {timeout_s:g}s{offline}: {where}"


async def _publish_chunks(
    client: MqttClient,
    topics: Topics,
    target: Target,
    deployment_id: str,
    chunks: Sequence[bytes],
    indices: Sequence[int] | None = None,
    done: set[int] | None = None,
) -> None:
    """Publish chunks as retained QoS 1 messages, a bounded number in flight at once; each
    acknowledged index goes into ``done``."""
    semaphore = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def one(index: int) -> None:
        async with semaphore:
            await client.publish(
                topics.chunk(target, deployment_id, index), chunks[index], qos=1, retain=True
            )
        if done is not None:
            done.add(index)

    await asyncio.gather(*(one(i) for i in (range(len(chunks)) if indices is None else indices)))


async def publish_chunks(
    settings: ManagerSettings,
    target: Target,
    prepared: PreparedBundle,
    indices: Sequence[int] | None = None,
) -> None:
    """Publish (some of) a prepared bundle's chunks as retained messages (tools and tests
    that stage a delivery by hand)."""
    async with _connected(settings) as (client, _):
        await _publish_chunks(
            client, settings.topics, target, prepared.deployment.id, prepared.chunks, indices
        )


# --- commands ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    command: Command
    devices: tuple[str, ...]
    replies: Mapping[str, Reply]  # devices that answered

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(d for d in self.devices if d not in self.replies)

    @property
    def ok(self) -> bool:
        return bool(self.devices) and not self.missing and all(r.ok for r in self.replies.values())


async def send_command(
    settings: ManagerSettings,
    signing_keys: Sequence[Ed25519PrivateKey],
    target: Target,
    kind: str,
    args: Mapping[str, Json] | None = None,
    *,
    timeout_s: float = 30.0,
    expected: Sequence[str] | None = None,
    discovery_s: float = DEFAULT_DISCOVERY_S,
    command: Command | None = None,
    payload: bytes | None = None,
) -> CommandResult:
    """Send one signed command (``ping``, ``status``, ``rollback``, or ``deploy`` on the deploy
    topic) and collect the replies of every expected device until ``timeout_s``.

    ``command`` sends a command built by the caller (``kind`` and ``args`` are then ignored);
    ``payload`` sends its wire bytes prepared earlier, e.g. a captured command replayed.
    """
    if command is None:
        command = Command(kind, target, int(time.time()), new_nonce(), dict(args or {}))
    if payload is None:
        payload = encode_command(command, signing_keys)
    topics = settings.topics
    topic = topics.deploy(target) if command.type == "deploy" else topics.cmd(target)
    async with _connected(settings) as (client, fleet):
        devices = list(expected or await _members(client, fleet, target, discovery_s))
        reply_topic = topics.replies(client.client_id)
        await client.subscribe([reply_topic])
        fleet.replies.clear()
        await client.publish(
            topic,
            payload,
            qos=1,
            response_topic=reply_topic,
            correlation_data=command.nonce.encode("ascii"),
        )
        deadline = time.monotonic() + timeout_s
        while not all(d in fleet.replies for d in devices):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await fleet.wait_change(min(left, 1.0))
    replies = {d: r for d, r in fleet.replies.items() if d in devices}
    return CommandResult(command, tuple(devices), replies)


# --- fleet status --------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetView:
    statuses: Mapping[str, DeviceStatus]
    progress: Mapping[str, Progress]  # each device's last deployment


async def fleet_status(settings: ManagerSettings, *, settle_s: float = 2.0) -> FleetView:
    """Every device's retained status and last deployment progress."""
    async with _connected(settings) as (client, fleet):
        await client.subscribe([settings.topics.all_status(), settings.topics.all_progress()])
        await fleet.settle(settle_s)
    return FleetView(dict(fleet.statuses), dict(fleet.progress))


async def wait_online(
    settings: ManagerSettings, devices: Sequence[str], *, timeout_s: float = 30.0
) -> FleetView:
    """Wait until every device in ``devices`` has published a retained "online" status."""

    def offline(fleet: _Fleet) -> list[str]:
        return [d for d in devices if d not in fleet.statuses or not fleet.statuses[d].online]

    async with _connected(settings) as (client, fleet):
        await client.subscribe([settings.topics.all_status()])
        deadline = time.monotonic() + timeout_s
        while offline(fleet):
            left = deadline - time.monotonic()
            if left <= 0:
                raise PushFailedError(
                    f"device(s) {', '.join(offline(fleet))} not online within {timeout_s:g}s"
                )
            await fleet.wait_change(min(left, 1.0))
    return FleetView(dict(fleet.statuses), dict(fleet.progress))


async def wait_progress(
    settings: ManagerSettings,
    device: str,
    until: Callable[[Progress], bool],
    *,
    timeout_s: float = 30.0,
) -> Progress:
    """Follow a device's (retained) progress topic until ``until(progress)`` holds."""
    async with _connected(settings) as (client, fleet):
        await client.subscribe([settings.topics.progress(device)])
        deadline = time.monotonic() + timeout_s
        while True:
            progress = fleet.progress.get(device)
            if progress is not None and until(progress):
                return progress
            left = deadline - time.monotonic()
            if left <= 0:
                raise MqttTimeoutError(
                    f"{device}: progress did not reach the awaited state within {timeout_s:g}s "
                    f"(last: {progress})"
                )
            await fleet.wait_change(min(left, 1.0))


# --- retained chunks -----------------------------------------------------------------------


@dataclass(frozen=True)
class CleanResult:
    removed: Mapping[str, int]  # deployment -> chunks removed
    kept: Mapping[str, int]  # deployment -> chunks kept (a device is still downloading it)


async def clean_chunks(
    settings: ManagerSettings,
    *,
    deployment: str | None = None,
    force: bool = False,
    settle_s: float = 2.0,
) -> CleanResult:
    """Remove retained bundle chunks left on the broker (a push that some device never
    answered, ``--keep-chunks``, a push that was killed). Chunks of a deployment that a
    device's retained progress shows as still downloading are kept unless ``force``."""
    topics = settings.topics
    removed: dict[str, int] = {}
    kept: dict[str, int] = {}
    async with _connected(settings) as (client, fleet):
        p = topics.prefix
        await client.subscribe(
            [topics.all_progress(), f"{p}/devices/+/chunks/#", f"{p}/groups/+/chunks/#"]
        )
        await fleet.settle(settle_s)
        busy = {pr.deployment for pr in fleet.progress.values() if not pr.terminal}
        for topic in sorted(fleet.chunks):
            parsed = topics.parse_chunk(topic)
            if parsed is None:
                continue
            deployment_id = parsed[1]
            if deployment is not None and deployment_id != deployment:
                continue
            if deployment_id in busy and not force:
                kept[deployment_id] = kept.get(deployment_id, 0) + 1
                continue
            await client.publish(topic, b"", qos=1, retain=True)
            removed[deployment_id] = removed.get(deployment_id, 0) + 1
    return CleanResult(removed, kept)
