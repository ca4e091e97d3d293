"""The agent's one persistent MQTT session: the connection loop (reconnecting with jittered
exponential backoff), link generations, waiting for a live link, and the stop flag that every
wait of the agent also obeys."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from edged import __version__
from edged._backoff import Backoff
from edged.errors import ConnectionLostError, MqttTimeoutError, TransportError
from edged.transport.client import ClientSettings, Message, MqttClient, Will
from edged.transport.protocol import device_subscriptions, encode_json, will_status
from edged.transport.settings import AgentSettings
from edged.transport.tls import client_context

log = logging.getLogger(__name__)

T = TypeVar("T")


class Link:
    """Owns the connection. The owner says what happens on it: ``on_connected`` runs on each new
    connection before it counts as live, ``on_message`` gets every message, ``goodbye`` is the
    retained status published at shutdown."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        on_connected: Callable[[MqttClient], Awaitable[None]],
        on_message: Callable[[Message], None],
        goodbye: Callable[[], bytes],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.topics = settings.topics
        self.clock = clock
        self._on_connected = on_connected
        self._on_message = on_message
        self._goodbye = goodbye
        self._client: MqttClient | None = None
        self._connected = asyncio.Event()
        # Set when the agent stops. Every wait that could outlast the connection (for a link,
        # a command, a job) also waits on this, so a cancellation that an await lost
        # (asyncio.wait_for before 3.12 can swallow one) still ends the service.
        self._stopping = asyncio.Event()
        self._generation = 0
        # Resolved (and replaced) whenever a connection comes or goes.
        self._link_change: asyncio.Future[None] | None = None

    # --- state ----------------------------------------------------------------------------

    @property
    def client(self) -> MqttClient | None:
        """The current connection, set from its SUBACK on (before it counts as live)."""
        return self._client

    @property
    def generation(self) -> int:
        """Counts connections: a new number means a new connection."""
        return self._generation

    @property
    def connected(self) -> bool:
        client = self._client
        return self._connected.is_set() and client is not None and client.is_connected

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        """Clear the stop flag at the start of a run."""
        self._stopping.clear()

    def stop(self) -> None:
        """Set the stop flag: every wait through ``until_stopping`` ends at once."""
        self._stopping.set()

    # --- waits ----------------------------------------------------------------------------

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

    async def until_stopping(self, call: Awaitable[T]) -> T:
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

    async def wait_live(self, after_generation: int = 0) -> tuple[MqttClient, int]:
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
            await self.until_stopping(asyncio.shield(self._next_link_change()))

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

    # --- connection -----------------------------------------------------------------------

    def _client_settings(self) -> ClientSettings:
        m = self.settings.mqtt
        will = will_status(self.device_id, m.groups, int(self.clock()), __version__)
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

    async def run(self) -> None:
        """The connection loop: connect, run the session, reconnect after a backoff; ends with
        ``CancelledError`` once the agent is stopping."""
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
            await self.until_stopping(asyncio.sleep(delay))
        raise asyncio.CancelledError

    def _subscriptions(self) -> list[str]:
        return device_subscriptions(self.topics, self.device_id, self.settings.mqtt.groups)

    async def _session(self, client: MqttClient) -> None:
        await client.subscribe(self._subscriptions(), qos=1)
        self._client = client
        self._generation += 1
        try:
            await self._on_connected(client)
            self._connected.set()
            self._signal_link_change()
            log.info("connected to %s:%d", self.settings.mqtt.host, self.settings.mqtt.port)
            try:
                async for message in client.messages():
                    self._on_message(message)
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
