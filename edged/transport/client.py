"""One MQTT v5 connection over mutual TLS, on aiomqtt, speaking edged's error family.

``MqttClient`` is an ``async with`` client that can be reused but not re-entered (like
aiomqtt's own); every operation takes ``timeout=`` (default: ``ClientSettings.timeout_s``) and
every aiomqtt / paho / OS error leaves it as the most specific ``TransportError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edged.errors import (
    BrokerRefusedError,
    ConnectFailedError,
    ConnectionLostError,
    MqttTimeoutError,
    SubscribeDeniedError,
    TlsHandshakeError,
    TransportError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_TIMED_OUT = "Operation timed out"


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us when we vanish without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class ClientSettings:
    host: str
    port: int
    client_id: str
    tls_context: ssl.SSLContext
    keepalive_s: int = 30
    timeout_s: float = 10.0  # default for every operation, connecting included
    # A persistent session (clean_start False, expiry > 0) keeps our subscriptions and the
    # QoS 1 messages sent to them while we are away.
    clean_start: bool = True
    session_expiry_s: int = 0
    will: Will | None = None


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


def _is_tls_problem(text: str) -> bool:
    # "EOF occurred in violation of protocol": under TLS 1.3 a broker that rejects our client
    # certificate may hang up before its alert reaches us; it is still a TLS refusal.
    return any(
        marker in text
        for marker in (
            "SSL",
            "TLS",
            "certificate",
            "CERTIFICATE",
            "Hostname mismatch",
            "handshake",
            "EOF occurred in violation of protocol",
        )
    )


def map_error(exc: BaseException, doing: str) -> TransportError:
    """The edged error for an aiomqtt/paho/OS error raised while ``doing`` something."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, MqttConnectError):
        return BrokerRefusedError(
            f"the broker refused the connection while {doing}: {exc} (is this certificate's "
            "CN allowed by the broker, and is its CA the one the broker requires?)"
        )
    text = str(exc)
    cause = exc.__cause__
    if cause is not None:
        text = f"{text} ({cause})" if text else str(cause)
    if isinstance(exc, ssl.SSLError) or _is_tls_problem(text):
        return TlsHandshakeError(
            f"TLS failed while {doing}: {text} (check mqtt.ca_file against the broker's "
            "certificate, that the certificate names the host, and that the broker accepts "
            "this client certificate)"
        )
    if text.startswith(_TIMED_OUT):
        return MqttTimeoutError(f"the broker did not answer in time while {doing}")
    if isinstance(exc, OSError):
        return ConnectFailedError(f"cannot reach the broker while {doing}: {text}")
    return ConnectionLostError(f"connection lost while {doing}: {text or type(exc).__name__}")


class _ErrorMemory(logging.Handler):
    """Keeps paho's last error line (e.g. the TLS alert that closed the socket)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()
        log.debug("paho: %s", self.last)


class _AioClient(aiomqtt.Client):
    """aiomqtt's client, failing the connect at once when the socket closes before CONNACK
    (instead of waiting for the timeout): a broker that rejects our certificate under TLS 1.3
    does so only after the handshake has completed on our side."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.errors = _ErrorMemory()
        logger = logging.Logger(f"{__name__}.paho", logging.WARNING)
        logger.addHandler(self.errors)
        logger.propagate = False
        super().__init__(*args, logger=logger, **kwargs)
        context: ssl.SSLContext | None = kwargs.get("tls_context")
        if context is not None:
            self._close_socket_on_failed_handshake(context)

    def _close_socket_on_failed_handshake(self, context: ssl.SSLContext) -> None:
        # paho's _ssl_wrap_socket leaves the socket open when the handshake fails (a refused
        # broker certificate leaks a descriptor per reconnect attempt). The same steps for a
        # context that checks the hostname itself, closing the socket on failure.
        paho_client = self._client

        def wrap(tcp_sock: socket.socket) -> ssl.SSLSocket:
            ssl_sock = context.wrap_socket(
                tcp_sock, server_hostname=paho_client._host, do_handshake_on_connect=False
            )
            try:
                ssl_sock.settimeout(paho_client._connect_timeout)
                ssl_sock.do_handshake()
            except BaseException:
                ssl_sock.close()
                raise
            return ssl_sock

        paho_client._ssl_wrap_socket = wrap  # type: ignore[method-assign]

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if not self._connected.done():
            detail = self.errors.last or str(reason_code)
            self._connected.set_exception(
                aiomqtt.MqttError(f"the broker closed the connection before CONNACK: {detail}")
            )
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    # aiomqtt replaces its "disconnected" future on connect, dropping a failed one nobody has
    # looked at (asyncio then logs "Future exception was never retrieved"): mark it seen.
    @property
    def _disconnected(self) -> asyncio.Future[None]:
        return self._lost

    @_disconnected.setter
    def _disconnected(self, future: asyncio.Future[None]) -> None:
        if hasattr(self, "_lost"):
            self.forget_disconnect_error()
        self._lost = future

    @property
    def lost(self) -> asyncio.Future[None]:
        """Done once the connection has ended (aiomqtt's own ``messages`` iterator waits on
        it the same way; its publish/subscribe calls do not)."""
        return self._lost

    @property
    def paho_connected(self) -> bool:
        return self._client.is_connected()

    def forget_disconnect_error(self) -> None:
        # Nobody awaits the future when the connection ended outside ``messages`` (e.g. during
        # a publish): mark its error as seen, or asyncio logs "exception was never retrieved".
        if self._lost.done() and not self._lost.cancelled():
            self._lost.exception()


class MqttClient:
    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._client: _AioClient | None = None

    @property
    def client_id(self) -> str:
        return self.settings.client_id

    def _make_client(self) -> _AioClient:
        s = self.settings
        connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_properties.SessionExpiryInterval = s.session_expiry_s
        will = None
        if s.will is not None:
            will = aiomqtt.Will(s.will.topic, s.will.payload, s.will.qos, s.will.retain)
        return _AioClient(
            s.host,
            s.port,
            identifier=s.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            clean_start=s.clean_start,
            keepalive=s.keepalive_s,
            timeout=s.timeout_s,
            properties=connect_properties,
            tls_context=s.tls_context,
            tls_insecure=False,
        )

    async def __aenter__(self) -> MqttClient:
        if self._client is not None:
            raise TransportError("MqttClient is reusable but not reentrant")
        client = self._make_client()
        where = f"connecting to {self.settings.host}:{self.settings.port}"
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            if str(exc).startswith(_TIMED_OUT):
                raise ConnectFailedError(
                    f"no CONNACK within {self.settings.timeout_s:g}s while {where}"
                ) from exc
            raise map_error(exc, where) from exc
        except OSError as exc:
            raise map_error(exc, where) from exc
        if not client.paho_connected:
            # Dropped between CONNACK and now (e.g. another client took the session over):
            # aiomqtt has reset its "disconnected" future and would wait on it for ever.
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
            raise ConnectionLostError(f"the broker dropped the connection at once while {where}")
        self._client = client
        log.debug(
            "connected to %s:%d as %s", self.settings.host, self.settings.port, self.client_id
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await client.__aexit__(exc_type, exc, tb)
        except aiomqtt.MqttError as error:
            if exc is None:
                raise map_error(error, "disconnecting") from error
            log.debug("error while disconnecting after %r: %s", exc, error)
        finally:
            client.forget_disconnect_error()

    @property
    def is_connected(self) -> bool:
        """Inside ``async with`` and the broker has not dropped the connection."""
        return self._client is not None and not self._client.lost.done()

    def _connected(self) -> _AioClient:
        if self._client is None:
            raise ConnectionLostError("not connected to the broker")
        return self._client

    async def _until_lost(self, client: _AioClient, call: Awaitable[T], timeout: float) -> T:
        """``call``'s result; ``ConnectionLostError`` as soon as the connection drops (a
        PUBACK or SUBACK that was in flight will never come, and waiting out ``timeout``
        would only delay the retry on the next connection), ``MqttTimeoutError`` after
        ``timeout``. ``asyncio.wait`` rather than ``wait_for``: before 3.12 ``wait_for`` can
        swallow a cancellation that arrives as the call completes."""
        task = asyncio.ensure_future(call)
        lost = client.lost
        try:
            done, _ = await asyncio.wait(
                (task, lost), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        if lost in done:
            reason = None if lost.cancelled() else lost.exception()
            detail = f": {reason}" if reason is not None else ""
            raise ConnectionLostError(f"the connection to the broker dropped{detail}")
        raise MqttTimeoutError(f"the broker did not answer within {timeout:g}s")

    def _timeout(self, timeout: float | None) -> float:
        return self.settings.timeout_s if timeout is None else timeout

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK."""
        properties = None
        if response_topic is not None or correlation_data is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
        client = self._connected()
        call = client.publish(
            topic, payload, qos=qos, retain=retain, properties=properties, timeout=math.inf
        )
        try:
            await self._until_lost(client, call, self._timeout(timeout))
        except (aiomqtt.MqttError, OSError, TransportError) as exc:
            raise _with_context(exc, f"publishing to {topic}") from exc

    async def subscribe(
        self, topics: Sequence[str], *, qos: int = 1, timeout: float | None = None
    ) -> None:
        """Subscribe to every topic in one SUBSCRIBE; ``SubscribeDeniedError`` names the
        topics the broker refused (the others stay subscribed)."""
        if not topics:
            return
        client = self._connected()
        call = client.subscribe([(t, qos) for t in topics], timeout=math.inf)
        try:
            codes = await self._until_lost(client, call, self._timeout(timeout))
        except (aiomqtt.MqttError, OSError, TransportError) as exc:
            raise _with_context(exc, f"subscribing to {', '.join(topics)}") from exc
        results: list[int | ReasonCode] = list(codes)
        denied = tuple(t for t, code in zip(topics, results, strict=True) if _refused(code))
        if denied:
            raise SubscribeDeniedError(
                f"the broker refused the subscription to {', '.join(denied)} (not allowed by "
                "its ACL for this certificate's CN?)",
                denied,
            )

    async def unsubscribe(self, topics: Sequence[str], *, timeout: float | None = None) -> None:
        if not topics:
            return
        client = self._connected()
        call = client.unsubscribe(list(topics), timeout=math.inf)
        try:
            await self._until_lost(client, call, self._timeout(timeout))
        except (aiomqtt.MqttError, OSError, TransportError) as exc:
            raise _with_context(exc, f"unsubscribing from {', '.join(topics)}") from exc

    async def messages(self) -> AsyncIterator[Message]:
        """Incoming messages until the connection drops (``ConnectionLostError``)."""
        iterator = self._connected().messages
        while True:
            try:
                message = await iterator.__anext__()
            except (aiomqtt.MqttError, OSError) as exc:
                raise map_error(exc, "waiting for messages") from exc
            yield _convert(message)

    def pending_messages(self) -> int:
        return len(self._connected().messages)


def _with_context(exc: BaseException, doing: str) -> TransportError:
    if isinstance(exc, TransportError):
        return type(exc)(f"{exc} while {doing}")
    return map_error(exc, doing)


def _refused(code: int | ReasonCode) -> bool:
    value = code.value if isinstance(code, ReasonCode) else code
    return value >= 0x80


def _convert(message: aiomqtt.Message) -> Message:
    response_topic: str | None = None
    correlation: bytes | None = None
    properties = message.properties
    if properties is not None:
        response_topic = getattr(properties, "ResponseTopic", None)
        raw = getattr(properties, "CorrelationData", None)
        correlation = bytes(raw) if raw is not None else None
    return Message(
        str(message.topic),
        bytes(message.payload),
        message.qos,
        message.retain,
        response_topic,
        correlation,
    )
