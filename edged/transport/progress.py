"""Deployment progress reports: the retained ``progress`` message, kept and sent again after a
reconnect when the broker did not take it."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import fields

from edged._fs import atomic_write
from edged.errors import TransportError
from edged.transport.client import MqttClient
from edged.transport.link import Link
from edged.transport.protocol import (
    TERMINAL_STATES,
    Progress,
    deployment_progress,
    encode_json,
    error_reason,
)
from edged.transport.settings import AgentSettings

log = logging.getLogger(__name__)


# The last ``serving`` (or final) report, kept across restarts: a probation that ends after a
# restart (the crash gate's revert, a resumed probation's verdict) is still reported on the
# deployment's progress topic.
LAST_PROGRESS_FILE = "last-progress.json"


class ProgressReporter:
    def __init__(self, settings: AgentSettings, link: Link) -> None:
        self.device_id = settings.device_id
        self.topics = settings.topics
        self._link = link
        self._file = settings.state_dir / LAST_PROGRESS_FILE
        self._last_progress: Progress | None = self._load()
        self._progress_unsent = False

    def _load(self) -> Progress | None:
        try:
            value = json.loads(self._file.read_bytes())
            known = {f.name for f in fields(Progress)}
            return Progress(**{k: v for k, v in value.items() if k in known})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", self._file, exc)
            return None

    def _keep(self, progress: Progress) -> None:
        if progress.state not in TERMINAL_STATES:
            return
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self._file, encode_json(progress.to_json()), mode=0o600)
        except OSError as exc:
            log.warning("last progress report not kept in %s: %s", self._file, exc)

    @property
    def last(self) -> Progress | None:
        return self._last_progress

    async def report(self, progress: Progress) -> None:
        self._last_progress = progress
        self._progress_unsent = True
        await asyncio.to_thread(self._keep, progress)
        client = self._link.client
        if client is not None:
            await self._send(client, progress)

    async def resend(self, client: MqttClient) -> None:
        """On a new connection: the last report, if the broker has not taken it yet."""
        if self._progress_unsent and self._last_progress is not None:
            await self._send(client, self._last_progress)

    async def _send(self, client: MqttClient, progress: Progress) -> None:
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


__all__ = ["ProgressReporter", "deployment_progress", "error_reason"]
