"""The device's retained status: built from what the daemon serves, published on each new
connection, republished when the served models change, and the "offline" goodbye at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from edged import __version__
from edged.errors import TransportError
from edged.transport.client import MqttClient
from edged.transport.link import Link
from edged.transport.protocol import DeviceStatus, ModelVersion, encode_json
from edged.transport.settings import AgentSettings


class StatusSource(Protocol):
    """What the agent reads from the serving side (``ModelManager``)."""

    def status(self) -> dict[str, Any]: ...


class StatusPublisher:
    def __init__(
        self,
        settings: AgentSettings,
        manager: StatusSource,
        link: Link,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.topics = settings.topics
        self.manager = manager
        self.clock = clock
        self._link = link
        self._last_status: dict[str, Any] | None = None

    def current(self, online: bool, reason: str = "") -> DeviceStatus:
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

    def forget(self) -> None:
        """A new connection: nothing is published on it yet."""
        self._last_status = None

    async def publish(self, client: MqttClient) -> None:
        status = self.current(True).to_json()
        await client.publish(
            self.topics.status(self.device_id), encode_json(status), qos=1, retain=True
        )
        self._last_status = status

    async def refresher(self) -> None:
        """Republish the retained status when the served models change (install, rollback,
        SIGHUP reload)."""
        while True:
            await asyncio.sleep(self.settings.status_refresh_s)
            client = self._link.client
            if client is None or self._last_status is None:
                continue
            current = self.current(True).to_json()
            if _without_time(current) != _without_time(self._last_status):
                with contextlib.suppress(TransportError):
                    await self.publish(client)

    async def refresh_now(self) -> None:
        client = self._link.client
        if client is not None:
            with contextlib.suppress(TransportError):
                await self.publish(client)

    def goodbye(self) -> bytes:
        """The retained "offline" status at shutdown (a clean DISCONNECT sends no will). The
        daemon has released its models by now: report the last ones published."""
        status = dict(self._last_status or self.current(True).to_json())
        status.update(online=False, reason="shutdown", at=int(self.clock()))
        return encode_json(status)


def _without_time(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "at"}
