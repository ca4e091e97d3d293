"""The device side of the fleet channel: ``FleetAgent.run()`` is a daemon service.

It keeps one persistent MQTT session (reconnecting with jittered exponential backoff),
publishes the retained online status, runs signed commands, downloads announced bundles chunk
by chunk (resuming after a disconnect or a restart), installs them through the bundle
``Installer`` and reports progress. Other services (telemetry) publish over the same
connection with ``publish()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from edged import __version__
from edged._backoff import Backoff
from edged._compat import TaskGroup
from edged.bundle.device import detect_device_facts
from edged.bundle.install import Installer, SwapTarget
from edged.bundle.verify import verify_manifest
from edged.config import DaemonConfig, MqttConfig
from edged.errors import (
    ConfigError,
    ConnectFailedError,
    ConnectionLostError,
    DownloadStalledError,
    EdgedError,
    FleetMessageError,
    MqttTimeoutError,
    ReplayedCommandError,
    ShuttingDownError,
    TransportError,
    WrongTargetError,
)
from edged.serve.watch import ProbationOutcome
from edged.transport.client import ClientSettings, Message, MqttClient, Will
from edged.transport.download import PartialDownload, check_size, check_space, prune_downloads
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
    SignedCommand,
    decode_command,
    encode_json,
)
from edged.transport.replay import NonceStore
from edged.transport.tls import TlsFiles, certificate_common_name, client_context
from edged.transport.topics import Target, Topics, check_name

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSPORT_DIR = "transport"
NONCE_FILE = "nonces.json"
ACTIVE_FILE = "active.json"
DOWNLOADS_DIR = "downloads"

# Connection problems a download waits out (it resumes after the reconnect).
_LINK_ERRORS = (ConnectionLostError, ConnectFailedError, MqttTimeoutError)


class StatusSource(Protocol):
    """What the agent reads from the serving side (``ModelManager``)."""

    def status(self) -> dict[str, Any]: ...


class ServingSide(StatusSource, SwapTarget, Protocol):
    """The daemon's ``ModelManager``: reports what serves, and swaps in installed versions."""


@dataclass(frozen=True)
class AgentSettings:
    device_id: str
    mqtt: MqttConfig
    state_dir: Path  # <state>/transport
    chunk_window: int = 64  # chunk topics subscribed at once
    status_refresh_s: float = 2.0  # how often model changes are looked for
    resume_max_age_s: float = 7 * 24 * 3600  # a download older than this is not resumed
    shutdown_publish_s: float = 2.0  # time allowed for the "offline" status at shutdown

    @property
    def topics(self) -> Topics:
        return Topics(self.mqtt.topic_prefix)

    @property
    def tls(self) -> TlsFiles:
        m = self.mqtt
        if m.ca_file is None or m.cert_file is None or m.key_file is None:
            raise ConfigError("mqtt", "ca_file, cert_file and key_file are required")
        return TlsFiles(m.ca_file, m.cert_file, m.key_file)


@dataclass
class _Job:
    command: Command
    deployment: Deployment
    accepted_at: float
    fetched: int = 0  # chunks stored since the last (re)connect or resume

    def to_json(self) -> dict[str, Any]:
        return {
            "target": str(self.command.target),
            "nonce": self.command.nonce,
            "issued_at": self.command.issued_at,
            "deployment": self.deployment.to_json(),
            "accepted_at": self.accepted_at,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> _Job:
        deployment = Deployment.from_json(value["deployment"])
        command = Command(
            "deploy",
            Target.parse(str(value["target"])),
            int(value["issued_at"]),
            str(value["nonce"]),
            {"deployment": deployment.to_json()},
        )
        return cls(command, deployment, float(value["accepted_at"]))


@dataclass
class _Inbox:
    """Chunks for the deployment being downloaded, handed over by the message loop."""

    deployment_id: str
    queue: asyncio.Queue[tuple[int, bytes]] = field(default_factory=asyncio.Queue)


class FleetAgent:
    def __init__(
        self,
        settings: AgentSettings,
        manager: StatusSource,
        installer: Installer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.topics = settings.topics
        self.manager = manager
        self.installer = installer
        self.clock = clock
        self._nonces = NonceStore(settings.state_dir / NONCE_FILE, settings.mqtt.command_max_age_s)
        self._client: MqttClient | None = None
        self._connected = asyncio.Event()
        # Set when run() is cancelled. Every wait that could outlast the connection (for a
        # link, a command, a job) also waits on this, so a cancellation that an await lost
        # (asyncio.wait_for before 3.12 can swallow one) still ends the service.
        self._stopping = asyncio.Event()
        self._generation = 0
        # Resolved (and replaced) whenever a connection comes or goes.
        self._link_change: asyncio.Future[None] | None = None
        self._commands: asyncio.Queue[Message] = asyncio.Queue()
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._inbox: _Inbox | None = None
        self._last_progress: Progress | None = None
        self._progress_unsent = False
        self._last_status: dict[str, Any] | None = None

    # --- public API -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        client = self._client
        return self._connected.is_set() and client is not None and client.is_connected

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the agent is connected (``MqttTimeoutError`` after ``timeout``): live,
        not merely not yet noticed to be gone. ``asyncio.wait``, not ``wait_for``, so that the
        caller's cancellation is never lost."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.connected:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise MqttTimeoutError(f"not connected to the broker within {timeout}s")
            await asyncio.wait((self._next_link_change(),), timeout=left)

    async def publish(
        self,
        topic_suffix: str,
        payload: bytes,
        qos: int = 0,
        *,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish on ``<p>/devices/<id>/<topic_suffix>`` (e.g. ``telemetry/power``) over the
        agent's connection. ``ConnectionLostError`` when offline: the caller spools."""
        client = self._client
        if client is None or not self.connected:
            raise ConnectionLostError("not connected to the broker")
        topic = self.topics.device_topic(self.device_id, topic_suffix)
        await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)

    @property
    def last_progress(self) -> Progress | None:
        return self._last_progress

    async def run(self) -> None:
        """Run until cancelled (the daemon's shutdown)."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "fleet agent for device %s (groups: %s) -> %s:%d",
            self.device_id,
            ", ".join(self.settings.mqtt.groups) or "none",
            self.settings.mqtt.host,
            self.settings.mqtt.port,
        )
        self._stopping.clear()
        async with TaskGroup() as tg:
            tasks = [
                tg.create_task(self._command_worker(), name="fleet-commands"),
                tg.create_task(self._deployment_worker(), name="fleet-deployments"),
                tg.create_task(self._status_refresher(), name="fleet-status"),
                tg.create_task(self._connection_loop(), name="fleet-connection"),
            ]
            try:
                # Waiting on the tasks (never on a wait_for) cannot lose our own cancellation.
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                self._stopping.set()
                await _cancel_until_done(tasks, self.settings.shutdown_publish_s + 1.0)

    # --- connection -----------------------------------------------------------------------

    def _client_settings(self) -> ClientSettings:
        m = self.settings.mqtt
        will = DeviceStatus(
            self.device_id,
            online=False,
            at=int(self.clock()),
            groups=m.groups,
            reason="connection lost",
            edged_version=__version__,
        )
        return ClientSettings(
            host=m.host,
            port=m.port,
            client_id=self.device_id,
            tls_context=self._tls_context(),
            keepalive_s=m.keepalive_s,
            timeout_s=m.operation_timeout_s,
            clean_start=False,
            session_expiry_s=m.session_expiry_s,
            will=Will(self.topics.status(self.device_id), encode_json(will.to_json())),
        )

    def _tls_context(self) -> ssl.SSLContext:
        # Re-read on every connect: a renewed certificate is picked up without a restart.
        return client_context(self.settings.tls)

    async def _connection_loop(self) -> None:
        m = self.settings.mqtt
        backoff = Backoff(m.reconnect_min_s, max(m.reconnect_min_s, m.reconnect_max_s))
        while not self._stopping.is_set():
            was_connected = False
            try:
                settings = await asyncio.to_thread(self._client_settings)
                async with MqttClient(settings) as client:
                    was_connected = True
                    backoff.reset()
                    await self._session(client)
            except TransportError as exc:
                what = "connection lost" if was_connected else "cannot connect"
                log.warning("%s: %s", what, exc)
            except Exception:
                # Whatever went wrong, the fleet channel reconnects rather than stop the daemon.
                log.exception("fleet connection failed unexpectedly")
            finally:
                self._client = None
                self._connected.clear()
            delay = backoff.next_delay_s()
            log.info("reconnecting in %.1fs", delay)
            await self._until_stopping(asyncio.sleep(delay))
        raise asyncio.CancelledError

    async def _until_stopping(self, call: Awaitable[T]) -> T:
        """``call``'s result, or ``CancelledError`` as soon as the agent is stopping."""
        if self._stopping.is_set():
            if inspect.iscoroutine(call):
                call.close()
            raise asyncio.CancelledError
        task = asyncio.ensure_future(call)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise asyncio.CancelledError
        return task.result()

    def _subscriptions(self) -> list[str]:
        targets = [Target.device(self.device_id)]
        targets += [Target.group(g) for g in self.settings.mqtt.groups]
        return [
            t for target in targets for t in (self.topics.cmd(target), self.topics.deploy(target))
        ]

    async def _session(self, client: MqttClient) -> None:
        await client.subscribe(self._subscriptions(), qos=1)
        self._client = client
        self._generation += 1
        self._last_status = None
        try:
            await self._publish_status(client)
            if self._progress_unsent and self._last_progress is not None:
                await self._send_progress(client, self._last_progress)
            self._connected.set()
            self._signal_link_change()
            log.info("connected to %s:%d", self.settings.mqtt.host, self.settings.mqtt.port)
            try:
                async for message in client.messages():
                    self._dispatch(message)
                    if self._stopping.is_set():
                        break
            except asyncio.CancelledError:
                await self._say_goodbye(client)
                raise
            if self._stopping.is_set():
                await self._say_goodbye(client)
                raise asyncio.CancelledError
        finally:
            # Before the DISCONNECT is awaited: nothing may start on a closing connection.
            self._connected.clear()
            self._client = None
            self._signal_link_change()

    def _signal_link_change(self) -> None:
        change, self._link_change = self._link_change, None
        if change is not None and not change.done():
            change.set_result(None)

    def _next_link_change(self) -> asyncio.Future[None]:
        if self._link_change is None:
            self._link_change = asyncio.get_running_loop().create_future()
        return self._link_change

    async def _say_goodbye(self, client: MqttClient) -> None:
        self._connected.clear()
        with contextlib.suppress(TransportError):
            await client.publish(
                self.topics.status(self.device_id),
                self._goodbye(),
                qos=1,
                retain=True,
                timeout=self.settings.shutdown_publish_s,
            )

    def _goodbye(self) -> bytes:
        """The retained "offline" status at shutdown (a clean DISCONNECT sends no will). The
        daemon has released its models by now: report the last ones published."""
        status = dict(self._last_status or self._status(True).to_json())
        status.update(online=False, reason="shutdown", at=int(self.clock()))
        return encode_json(status)

    def _dispatch(self, message: Message) -> None:
        chunk = self.topics.parse_chunk(message.topic)
        if chunk is not None:
            _, deployment_id, index = chunk
            inbox = self._inbox
            if inbox is not None and inbox.deployment_id == deployment_id and message.payload:
                inbox.queue.put_nowait((index, message.payload))
            return
        if message.topic.endswith(("/cmd", "/deploy")):
            self._commands.put_nowait(message)
            return
        log.debug("ignoring a message on %s", message.topic)

    # --- status ---------------------------------------------------------------------------

    def _status(self, online: bool, reason: str = "") -> DeviceStatus:
        models: list[ModelVersion] = []
        for m in self.manager.status().get("models", []):
            version = m.get("version")
            models.append(
                ModelVersion(
                    str(m["name"]), None if version is None else str(version), str(m["state"])
                )
            )
        return DeviceStatus(
            self.device_id,
            online=online,
            at=int(self.clock()),
            groups=self.settings.mqtt.groups,
            models=tuple(models),
            edged_version=__version__,
            reason=reason,
        )

    async def _publish_status(
        self, client: MqttClient, online: bool = True, reason: str = ""
    ) -> None:
        status = self._status(online, reason).to_json()
        await client.publish(
            self.topics.status(self.device_id), encode_json(status), qos=1, retain=True
        )
        self._last_status = status

    async def _status_refresher(self) -> None:
        """Republish the retained status when the served models change (install, rollback,
        SIGHUP reload)."""
        while True:
            await asyncio.sleep(self.settings.status_refresh_s)
            client = self._client
            if client is None or self._last_status is None:
                continue
            current = self._status(True).to_json()
            if _without_time(current) != _without_time(self._last_status):
                with contextlib.suppress(TransportError):
                    await self._publish_status(client)

    async def _refresh_status_now(self) -> None:
        client = self._client
        if client is not None:
            with contextlib.suppress(TransportError):
                await self._publish_status(client)

    # --- commands -------------------------------------------------------------------------

    async def _command_worker(self) -> None:
        while True:
            message = await self._until_stopping(self._commands.get())
            try:
                await self._handle_command(message)
            except TransportError as exc:
                log.warning("command on %s: could not answer: %s", message.topic, exc)
            except Exception:
                # A bug in one command must not take the fleet channel (or the daemon) down.
                log.exception("command on %s failed unexpectedly", message.topic)

    def _check_target(self, target: Target, topic: str) -> None:
        mine = target == Target.device(self.device_id) or (
            target.kind == "groups" and target.name in self.settings.mqtt.groups
        )
        if not mine:
            raise WrongTargetError(
                f"command is signed for {target}, this is device {self.device_id} in groups "
                f"{', '.join(self.settings.mqtt.groups) or 'none'}"
            )
        if not topic.startswith(self.topics.base(target) + "/"):
            raise WrongTargetError(f"command signed for {target} arrived on {topic}")

    async def _verify(self, signed: SignedCommand, topic: str) -> None:
        """Signatures (trust store signers, k of n), target, freshness, nonce."""
        command = signed.command
        now = self.clock()
        trust = await asyncio.to_thread(self.installer.load_trust)
        trust.verify_command(signed.payload, signed.signatures, int(now))
        self._check_target(command.target, topic)
        if command.type == "deploy":
            command.deployment  # noqa: B018 - parse now: a malformed one is refused whole
        await asyncio.to_thread(
            self._nonces.check_and_record, command.nonce, command.issued_at, now
        )

    async def _handle_command(self, message: Message) -> None:
        try:
            signed = decode_command(message.payload)
        except FleetMessageError as exc:
            log.warning("malformed command on %s: %s", message.topic, exc)
            await self._reply(message, Reply(self.device_id, "unknown", "", False, error=_err(exc)))
            return
        command = signed.command
        try:
            await self._verify(signed, message.topic)
        except EdgedError as exc:
            log.warning("%s command %s refused: %s", command.type, command.nonce, exc)
            await self._reply(message, _refusal(self.device_id, command, exc))
            if command.type == "deploy" and not isinstance(exc, ReplayedCommandError):
                with contextlib.suppress(FleetMessageError):
                    d = command.deployment
                    await self._report(_progress(self.device_id, d, FAILED, reason=_err(exc)))
            return
        log.info("%s command %s from %s accepted", command.type, command.nonce, command.target)
        try:
            result = await self._execute(command)
        except EdgedError as exc:
            log.warning("%s command %s failed: %s", command.type, command.nonce, exc)
            await self._reply(message, _refusal(self.device_id, command, exc))
            return
        await self._reply(message, Reply(self.device_id, command.type, command.nonce, True, result))

    async def _execute(self, command: Command) -> dict[str, Any]:
        if command.type == "ping":
            return {"pong": True, "at": int(self.clock())}
        if command.type == "status":
            last = self._last_progress
            return {
                "status": self._status(True).to_json(),
                "last_deployment": last.to_json() if last else None,
            }
        if command.type == "rollback":
            model = command.args.get("model")
            to_version = command.args.get("to_version")
            if not isinstance(model, str) or not (
                to_version is None or isinstance(to_version, int)
            ):
                raise FleetMessageError("rollback args must be {model: str, to_version?: int}")
            result = await self.installer.rollback(model, to_version)
            await self._refresh_status_now()
            return result.to_json()
        deployment = command.deployment
        job = _Job(command, deployment, self.clock())
        await self._jobs.put(job)
        return {"accepted": True, "deployment": deployment.id, "queued": self._jobs.qsize()}

    async def _reply(self, message: Message, reply: Reply) -> None:
        topic = message.response_topic
        client = self._client
        if topic is None or client is None:
            return
        if not topic.startswith(self.topics.replies("")) or any(c in topic for c in "+#"):
            log.warning(
                "not answering on response topic %r: not under %s", topic, self.topics.replies("")
            )
            return
        await client.publish(
            topic,
            encode_json(reply.to_json()),
            qos=1,
            correlation_data=message.correlation_data,
        )

    # --- deployments ----------------------------------------------------------------------

    @property
    def _downloads(self) -> Path:
        return self.settings.state_dir / DOWNLOADS_DIR

    @property
    def _active_file(self) -> Path:
        return self.settings.state_dir / ACTIVE_FILE

    def _load_active(self) -> _Job | None:
        try:
            value = json.loads(self._active_file.read_bytes())
            job = _Job.from_json(value)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, EdgedError) as exc:
            log.error("ignoring unreadable %s: %s", self._active_file, exc)
            return None
        if self.clock() - job.accepted_at > self.settings.resume_max_age_s:
            log.info("not resuming deployment %s: accepted too long ago", job.deployment.id)
            return None
        return job

    def _save_active(self, job: _Job | None) -> None:
        from edged._fs import atomic_write

        if job is None:
            self._active_file.unlink(missing_ok=True)
        else:
            atomic_write(self._active_file, encode_json(job.to_json()), mode=0o600)

    async def _deployment_worker(self) -> None:
        job = await asyncio.to_thread(self._load_active)
        if job is not None:
            log.info("resuming deployment %s after a restart", job.deployment.id)
        while True:
            if job is None:
                job = await self._until_stopping(self._jobs.get())
            try:
                await self._run_job(job)
            except Exception:
                log.exception("deployment %s: unexpected error", job.deployment.id)
            job = None

    def _probation_state(self, d: Deployment) -> tuple[str, str] | None:
        """After ``serving``: how the probation already ended, that there is none, or None
        while it runs (``report_probation`` reports its end)."""
        for m in self.manager.status().get("models", []):
            if m.get("name") != d.model:
                continue
            watching = m.get("probation")
            if watching and str(watching.get("version")) == str(d.version):
                return None
            last = m.get("last_probation")
            if last and str(last.get("version")) == str(d.version):
                if last.get("decision") == "reverted":
                    return REVERTED, str(last.get("reason", ""))
                return PROMOTED, str(last.get("reason", ""))
        return PROMOTED, "no probation: no earlier version to compare with"

    async def report_probation(self, outcome: ProbationOutcome) -> None:
        """A probation ended: the deployment that installed the version says how."""
        last = self._last_progress
        if (
            last is None
            or last.state != SERVING
            or last.model != outcome.model
            or str(last.version) != outcome.version
            or outcome.decision not in ("promoted", "reverted")
        ):
            return
        state = PROMOTED if outcome.decision == "promoted" else REVERTED
        progress = dataclasses.replace(
            last, state=state, reason=outcome.reason, at=int(time.time())
        )
        with contextlib.suppress(TransportError):
            await self._report(progress)
        await self._refresh_status_now()

    async def _report(self, progress: Progress) -> None:
        self._last_progress = progress
        self._progress_unsent = True
        client = self._client
        if client is not None:
            await self._send_progress(client, progress)

    async def _send_progress(self, client: MqttClient, progress: Progress) -> None:
        try:
            await client.publish(
                self.topics.progress(self.device_id),
                encode_json(progress.to_json()),
                qos=1,
                retain=True,
            )
        except TransportError as exc:
            log.debug("progress not sent (sent again after reconnecting): %s", exc)
            return
        if progress is self._last_progress:
            self._progress_unsent = False

    async def _run_job(self, job: _Job) -> None:
        d = job.deployment
        m = self.settings.mqtt
        log.info(
            "deployment %s: %s version %s, %d bytes in %d chunks",
            d.id,
            d.model,
            d.version,
            d.size,
            d.chunk_count,
        )
        download: PartialDownload | None = None
        keep_partial = True
        try:
            await asyncio.to_thread(self._save_active, job)
            await asyncio.to_thread(self._preverify, d)
            check_size(d, m.max_bundle_bytes)
            download = await asyncio.to_thread(PartialDownload.open, self._downloads, d)
            await asyncio.to_thread(
                check_space, d, self._downloads, m.download_reserve_bytes, download.bytes_present
            )
            if download.resumed:
                log.info(
                    "deployment %s: resuming with %d of %d chunks already on disk",
                    d.id,
                    len(download.have),
                    d.chunk_count,
                )
            await self._report(_progress(self.device_id, d, RECEIVED, len(download.have)))
            await self._fetch(job, download)
            path = await asyncio.to_thread(download.finish)
            keep_partial = False
            n, fetched = d.chunk_count, job.fetched
            await self._report(_progress(self.device_id, d, VERIFIED, n, fetched))
            result = await self.installer.install_file(path)
            await self._report(
                _progress(self.device_id, d, INSTALLED, n, fetched, reason=result.outcome)
            )
            await self._refresh_status_now()
            self._check_serving(d)
            await self._report(_progress(self.device_id, d, SERVING, n, fetched))
            log.info("deployment %s: %s version %s is serving", d.id, d.model, d.version)
            ended = self._probation_state(d)
            if ended is not None:
                state, reason = ended
                await self._report(_progress(self.device_id, d, state, n, fetched, reason=reason))
        except asyncio.CancelledError:
            raise  # shutdown: active.json stays, the download resumes at the next start
        except ShuttingDownError as exc:
            # Not the deployment's failure: active.json stays and it resumes at the next start.
            log.info("deployment %s: %s; it resumes at the next start", d.id, exc)
            return
        except Exception as exc:
            if isinstance(exc, EdgedError):
                log.warning("deployment %s failed: %s", d.id, exc)
            else:
                log.exception("deployment %s failed unexpectedly", d.id)
            done = len(download.have) if download is not None else 0
            failed = _progress(self.device_id, d, FAILED, done, job.fetched, reason=_err(exc))
            with contextlib.suppress(TransportError):
                await self._report(failed)
        await asyncio.to_thread(self._finish_job, d, keep_partial)

    def _finish_job(self, d: Deployment, keep_partial: bool) -> None:
        self._save_active(None)
        keep = {d.transfer_key} if keep_partial else set()
        if not keep_partial:
            PartialDownload(self._downloads / d.transfer_key, d).discard()
        prune_downloads(self._downloads, keep, older_than_s=self.settings.resume_max_age_s)

    def _preverify(self, d: Deployment) -> None:
        """The bundle's own signed manifest, checked like the installer will (signatures,
        expiry, release counter, targets) before a byte is downloaded."""
        installer = self.installer
        verified = verify_manifest(
            d.manifest.encode("ascii"),
            d.manifest_signatures,
            installer.load_trust(),
            installer.store.read_high_water(),
            installer.device,
            int(self.clock()),
            installer.limits,
        )
        manifest = verified.manifest
        if (manifest.model, manifest.version) != (d.model, d.version):
            raise FleetMessageError(
                f"deployment {d.id} announces {d.model} version {d.version} but its bundle "
                f"manifest is {manifest.model} version {manifest.version}"
            )

    def _check_serving(self, d: Deployment) -> None:
        serving = None
        for m in self.manager.status().get("models", []):
            if m.get("name") == d.model and m.get("version") is not None:
                serving = str(m["version"])
        if serving != str(d.version):
            raise TransportError(
                f"installed {d.model} version {d.version} but the daemon serves {serving}"
            )

    async def _wait_link(self, after_generation: int = 0) -> tuple[MqttClient, int]:
        """The live connection, newer than ``after_generation`` (one that already failed);
        ``CancelledError`` once the agent is stopping. No timeout: the connection loop
        reconnects forever, and the stall watchdog only counts time while connected (a broker
        outage is not a stuck download)."""
        while True:
            if self._stopping.is_set():
                raise asyncio.CancelledError
            client = self._client
            if self.connected and client is not None and self._generation > after_generation:
                return client, self._generation
            # The client may have dropped without the session noticing yet; the messages loop
            # ends it within one iteration and signals the change.
            await self._until_stopping(asyncio.shield(self._next_link_change()))

    async def _fetch(self, job: _Job, download: PartialDownload) -> None:
        """Fetch every missing chunk, across as many reconnects as it takes."""
        inbox = _Inbox(job.deployment.id)
        self._inbox = inbox
        failed_generation = 0
        try:
            while not download.complete:
                client, generation = await self._wait_link(failed_generation)
                try:
                    await self._fetch_connected(job, download, inbox, client, generation)
                except _LINK_ERRORS as exc:
                    log.info(
                        "deployment %s: %s; resuming after the reconnect", job.deployment.id, exc
                    )
                    if not isinstance(exc, MqttTimeoutError):
                        failed_generation = generation
        finally:
            self._inbox = None

    async def _fetch_connected(
        self,
        job: _Job,
        download: PartialDownload,
        inbox: _Inbox,
        client: MqttClient,
        generation: int,
    ) -> None:
        """Fetch over one connection: subscribe to a window of missing chunk topics (the broker
        sends their retained chunks), store what arrives, then the next window."""
        d = job.deployment
        stall_s = self.settings.mqtt.download_stall_timeout_s
        interval_s = self.settings.mqtt.progress_interval_s
        job.fetched = 0
        last_chunk_at = time.monotonic()
        reported, last_report_at = -1, 0.0

        async def report_received(force: bool) -> None:
            nonlocal reported, last_report_at
            done, now = len(download.have), time.monotonic()
            if done != reported and (force or now - last_report_at >= interval_s):
                reported, last_report_at = done, now
                await self._report(_progress(self.device_id, d, RECEIVED, done, job.fetched))

        while not download.complete:
            window = download.missing[: self.settings.chunk_window]
            topics = [self.topics.chunk(job.command.target, d.id, i) for i in window]
            await client.subscribe(topics, qos=1)
            try:
                pending = set(window)
                while pending:
                    if self._stopping.is_set():
                        raise asyncio.CancelledError
                    if self._generation != generation or not self.connected:
                        raise ConnectionLostError("the connection was replaced")
                    left = stall_s - (time.monotonic() - last_chunk_at)
                    if left <= 0:
                        raise DownloadStalledError(
                            f"no chunk for {stall_s:g}s while connected ({len(download.have)} "
                            f"of {d.chunk_count} received); the chunks may have been cleared "
                            "or never published"
                        )
                    item = await _get_within(inbox.queue, min(left, 0.25))
                    if item is None:
                        await report_received(force=True)  # what the interval held back
                        continue
                    index, data = item
                    if await asyncio.to_thread(download.store_chunk, index, data):
                        job.fetched += 1
                        last_chunk_at = time.monotonic()
                    pending.discard(index)
                    await report_received(force=download.complete)
            finally:
                with contextlib.suppress(TransportError):
                    await client.unsubscribe(topics)


async def _get_within(queue: asyncio.Queue[T], timeout_s: float) -> T | None:
    """The next item, or None after ``timeout_s``. Not ``wait_for``: before 3.12 it returns
    the item and drops a cancellation that arrives as the item does."""
    getter = asyncio.ensure_future(queue.get())
    try:
        done, _ = await asyncio.wait((getter,), timeout=timeout_s)
    finally:
        if not getter.done():
            getter.cancel()  # Queue.get() leaves the item queued when cancelled
    return getter.result() if getter in done else None


async def _cancel_until_done(tasks: list[asyncio.Task[Any]], patience_s: float) -> None:
    """Cancel ``tasks`` and wait until all have ended, cancelling again every ``patience_s``:
    a task whose cancellation was lost in a library's ``wait_for`` must still end. Our own
    cancellation meanwhile does not leave them running."""
    pending = {t for t in tasks if not t.done()}
    cancelled_again = False
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=patience_s)
        except asyncio.CancelledError:
            cancelled_again = True
    if cancelled_again:
        raise asyncio.CancelledError


def _without_time(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "at"}


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _refusal(device: str, command: Command, exc: BaseException) -> Reply:
    return Reply(device, command.type, command.nonce, False, error=_err(exc))


def _progress(
    device: str,
    d: Deployment,
    state: str,
    chunks_done: int = 0,
    chunks_fetched: int = 0,
    reason: str = "",
) -> Progress:
    return Progress(
        device=device,
        deployment=d.id,
        model=d.model,
        version=d.version,
        state=state,
        chunks_done=chunks_done,
        chunks_total=d.chunk_count,
        chunks_fetched=chunks_fetched,
        reason=reason,
        at=int(time.time()),
    )


def check_agent_files(config: DaemonConfig) -> str:
    """What the daemon checks of ``[mqtt]`` before it starts (also ``edged config check``):
    the CA, certificate and key load, the key is readable by its owner only, and the
    certificate's CN is a valid device id, which it returns."""
    settings = AgentSettings("", config.mqtt, config.state.directory / TRANSPORT_DIR)
    client_context(settings.tls)
    common_name = certificate_common_name(settings.tls.cert_file)
    return check_name(common_name, "device id (the client certificate's CN)")


def build_fleet_agent(
    config: DaemonConfig, manager: ServingSide, installer: Installer | None = None
) -> FleetAgent:
    """The daemon's fleet agent. Checks the TLS files now, so that a missing file or a key
    readable by others stops the daemon at start with a clear message; the device id is the
    client certificate's CN. Makes an ``Installer`` on the state directory with ``manager`` as
    its swap target unless one is given."""
    settings = AgentSettings("", config.mqtt, config.state.directory / TRANSPORT_DIR)
    device_id = check_agent_files(config)
    if installer is None:
        installer = Installer(
            config.state.directory,
            manager,
            detect_device_facts,
            keep_previous=max(1, config.state.keep_versions - 1),
        )
    return FleetAgent(replace(settings, device_id=device_id), manager, installer)
