"""Signed commands: the target and signature/replay checks, execution (``ping``, ``status``,
``rollback``, ``deploy``) and the reply on the sender's response topic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from edged.bundle.install import Installer
from edged.errors import (
    EdgedError,
    FleetMessageError,
    ReplayedCommandError,
    TransportError,
)
from edged.transport.client import Message
from edged.transport.deployments import Deployments
from edged.transport.link import Link
from edged.transport.progress import ProgressReporter, deployment_progress, error_reason
from edged.transport.protocol import (
    REFUSED,
    Command,
    Reply,
    SignedCommand,
    check_command_target,
    decode_command,
    encode_json,
)
from edged.transport.replay import NonceStore
from edged.transport.settings import AgentSettings
from edged.transport.status import StatusPublisher
from edged.transport.topics import Target

log = logging.getLogger(__name__)

NONCE_FILE = "nonces.json"


class CommandHandler:
    def __init__(
        self,
        settings: AgentSettings,
        link: Link,
        status: StatusPublisher,
        progress: ProgressReporter,
        deployments: Deployments,
        installer: Installer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.topics = settings.topics
        self.installer = installer
        self.clock = clock
        self._link = link
        self._status = status
        self._progress = progress
        self._deployments = deployments
        self._nonces = NonceStore(settings.state_dir / NONCE_FILE, settings.mqtt.command_max_age_s)
        self._commands: asyncio.Queue[Message] = asyncio.Queue()

    def receive(self, message: Message) -> None:
        """A message on a ``cmd`` or ``deploy`` topic, from the message loop."""
        self._commands.put_nowait(message)

    async def worker(self) -> None:
        while True:
            message = await self._link.until_stopping(self._commands.get())
            try:
                await self._handle_command(message)
            except TransportError as exc:
                log.warning("command on %s: could not answer: %s", message.topic, exc)
            except Exception:
                # A bug in one command must not take the fleet channel (or the daemon) down.
                log.exception("command on %s failed unexpectedly", message.topic)

    def _check_target(self, target: Target, topic: str) -> None:
        check_command_target(self.topics, self.device_id, self.settings.mqtt.groups, target, topic)

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
            malformed = Reply(self.device_id, "unknown", "", False, error=error_reason(exc))
            await self._reply(message, malformed)
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
                    failed = deployment_progress(
                        self.device_id, d, REFUSED, reason=error_reason(exc)
                    )
                    await self._progress.report(failed)
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
            last = self._progress.last
            return {
                "status": self._status.current(True).to_json(),
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
            await self._status.refresh_now()
            return result.to_json()
        return await self._deployments.accept(command)

    async def _reply(self, message: Message, reply: Reply) -> None:
        topic = message.response_topic
        client = self._link.client
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


def _refusal(device: str, command: Command, exc: BaseException) -> Reply:
    return Reply(device, command.type, command.nonce, False, error=error_reason(exc))
