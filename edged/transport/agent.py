"""The device side of the fleet channel: ``FleetAgent.run()`` is a daemon service.

It keeps one persistent MQTT session (``link``: reconnecting with jittered exponential
backoff), publishes the retained online status (``status``), runs signed commands
(``commands``), downloads announced bundles chunk by chunk, resuming after a disconnect or a
restart, installs them through the bundle ``Installer`` (``deployments``) and reports progress
(``progress``). Other services (telemetry) publish over the same connection with ``publish()``.
This module composes those parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from edged._compat import TaskGroup
from edged.bundle.device import detect_device_facts
from edged.bundle.install import Installer, SwapTarget
from edged.config import DaemonConfig
from edged.errors import TransportError
from edged.serve.watch import ProbationOutcome
from edged.transport.client import Message, MqttClient
from edged.transport.commands import NONCE_FILE, CommandHandler
from edged.transport.deployments import ACTIVE_FILE, DOWNLOADS_DIR, Deployments
from edged.transport.link import Link
from edged.transport.progress import ProgressReporter
from edged.transport.protocol import PROMOTED, REVERTED, SERVING, Progress
from edged.transport.settings import AgentSettings
from edged.transport.status import StatusPublisher, StatusSource
from edged.transport.tls import certificate_common_name, client_context
from edged.transport.topics import check_name

__all__ = [
    "ACTIVE_FILE",
    "DOWNLOADS_DIR",
    "NONCE_FILE",
    "TRANSPORT_DIR",
    "AgentSettings",
    "FleetAgent",
    "ServingSide",
    "StatusSource",
    "build_fleet_agent",
    "check_agent_files",
]

log = logging.getLogger(__name__)

TRANSPORT_DIR = "transport"


class ServingSide(StatusSource, SwapTarget, Protocol):
    """The daemon's ``ModelManager``: reports what serves, and swaps in installed versions."""


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
        self._link = Link(
            settings,
            on_connected=self._on_connected,
            on_message=self._dispatch,
            goodbye=self._goodbye,
            clock=clock,
        )
        self._status = StatusPublisher(settings, manager, self._link, clock=clock)
        self._progress = ProgressReporter(settings, self._link)
        self._deployments = Deployments(
            settings, self._link, self._status, self._progress, manager, installer, clock=clock
        )
        self._commands = CommandHandler(
            settings,
            self._link,
            self._status,
            self._progress,
            self._deployments,
            installer,
            clock=clock,
        )

    # --- public API -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._link.connected

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the agent is connected (``MqttTimeoutError`` after ``timeout``): live,
        not merely not yet noticed to be gone."""
        await self._link.wait_connected(timeout)

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
        await self._link.publish(topic_suffix, payload, qos, retain=retain, timeout=timeout)

    @property
    def last_progress(self) -> Progress | None:
        return self._progress.last

    async def report_probation(self, outcome: ProbationOutcome) -> None:
        """A probation ended: the deployment that installed the version says how, on its
        (retained) progress topic."""
        last = self._progress.last
        if (
            last is None
            or last.state != SERVING
            or last.model != outcome.model
            or str(last.version) != outcome.version
            or outcome.decision not in ("promoted", "reverted")
        ):
            return
        state = PROMOTED if outcome.decision == "promoted" else REVERTED
        progress = replace(last, state=state, reason=outcome.reason, at=int(time.time()))
        with contextlib.suppress(TransportError):
            await self._progress.report(progress)
        await self._status.refresh_now()

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
        self._link.start()
        async with TaskGroup() as tg:
            tasks = [
                tg.create_task(self._commands.worker(), name="fleet-commands"),
                tg.create_task(self._deployments.worker(), name="fleet-deployments"),
                tg.create_task(self._status.refresher(), name="fleet-status"),
                tg.create_task(self._link.run(), name="fleet-connection"),
            ]
            try:
                # Waiting on the tasks (never on a wait_for) cannot lose our own cancellation.
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                self._link.stop()
                await _cancel_until_done(tasks, self.settings.shutdown_publish_s + 1.0)

    # --- what happens on the link ---------------------------------------------------------

    async def _on_connected(self, client: MqttClient) -> None:
        self._status.forget()
        await self._status.publish(client)
        await self._progress.resend(client)

    def _goodbye(self) -> bytes:
        return self._status.goodbye()

    def _dispatch(self, message: Message) -> None:
        chunk = self.topics.parse_chunk(message.topic)
        if chunk is not None:
            _, deployment_id, index = chunk
            self._deployments.deliver_chunk(deployment_id, index, message.payload)
            return
        if message.topic.endswith(("/cmd", "/deploy")):
            self._commands.receive(message)
            return
        log.debug("ignoring a message on %s", message.topic)


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
