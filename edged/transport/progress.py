"""Deployment progress reports: the retained ``progress`` message, kept and sent again after a
reconnect when the broker did not take it."""

from __future__ import annotations

import logging

from edged.errors import TransportError
from edged.transport.client import MqttClient
from edged.transport.link import Link
from edged.transport.protocol import Progress, deployment_progress, encode_json, error_reason
from edged.transport.settings import AgentSettings

log = logging.getLogger(__name__)


class ProgressReporter:
    def __init__(self, settings: AgentSettings, link: Link) -> None:
        self.device_id = settings.device_id
        self.topics = settings.topics
        self._link = link
        self._last_progress: Progress | None = None
        self._progress_unsent = False

    @property
    def last(self) -> Progress | None:
        return self._last_progress

    async def report(self, progress: Progress) -> None:
        self._last_progress = progress
        self._progress_unsent = True
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
