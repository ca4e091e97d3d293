"""What every route of the local API shares: the app's keys, the admission gate that drains
requests at shutdown, reading a bounded body, and the one place where errors map to statuses.

Errors map to status codes here and nowhere else: bad input 400, unknown model 404 (400 on
infer, as Triton does), a subsystem turned off 404, an operator action over TCP 403, not ready
503, queue full 429 with Retry-After, deadline 504.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from edged._compat import TIMEOUT_ERRORS
from edged.api.backend import InferenceBackend
from edged.api.shm import SharedMemoryRegistry
from edged.bundle import Installer
from edged.errors import (
    DeadlineExceededError,
    EdgedError,
    FeatureDisabledError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    NotPermittedError,
    QueueFullError,
    SelfTestFailedError,
    ShuttingDownError,
)
from edged.telemetry.hub import TelemetryHub

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ManagerSide(Protocol):
    """What edged's own routes read and change of the serving side: an in-process
    ``ModelManager``, or the control plane's ``EngineProxy``."""

    def status(self) -> dict[str, Any]: ...

    def queue_depths(self) -> dict[str, tuple[str | None, int]]: ...

    async def index_async(self) -> list[dict[str, Any]]: ...

    async def load_model(self, name: str) -> str: ...

    async def unload(self, name: str) -> None: ...


MANAGER: web.AppKey[ManagerSide] = web.AppKey("manager")
BACKEND: web.AppKey[InferenceBackend] = web.AppKey("backend")
# Set on the control plane's private app: requests there were forwarded by a front end, which
# says in ``VIA_HEADER`` whether its client came over the Unix socket.
FORWARDED: web.AppKey[bool] = web.AppKey("forwarded", bool)
VIA_HEADER = "Edged-Client-Via"
# Before a scrape or a status answer: bring what another process holds up to date.
Refresh = Callable[[], Awaitable[object]]
REFRESH: web.AppKey[Refresh | None] = web.AppKey("refresh")
SHM: web.AppKey[SharedMemoryRegistry | None] = web.AppKey("shm", SharedMemoryRegistry)
MAX_BODY: web.AppKey[int] = web.AppKey("max_body", int)


class AdmissionGate:
    """Counts admitted requests; once draining, new requests get 503 and ``drained()`` waits
    for the admitted ones to finish. Listeners close only after that, so no request the daemon
    admitted is cut off."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start_draining(self) -> None:
        self.draining = True

    async def drained(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TIMEOUT_ERRORS:
            return False
        return True


GATE: web.AppKey[AdmissionGate] = web.AppKey("gate", AdmissionGate)
TELEMETRY: web.AppKey[TelemetryHub | None] = web.AppKey("telemetry", TelemetryHub)
INSTALLER: web.AppKey[Installer | None] = web.AppKey("installer", Installer)
StatusSource = Callable[[], dict[str, object]]
STATUS: web.AppKey[StatusSource | None] = web.AppKey("status")


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def status_for(exc: EdgedError, infer: bool) -> tuple[int, dict[str, str] | None]:
    if isinstance(exc, InvalidRequestError):
        return 400, None
    if isinstance(exc, ModelNotFoundError):
        return (400 if infer else 404), None
    if isinstance(exc, FeatureDisabledError):
        return 404, None
    if isinstance(exc, NotPermittedError):
        return 403, None
    if isinstance(exc, QueueFullError):
        return 429, {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, ModelNotReadyError | ShuttingDownError):
        return 503, {"Retry-After": "1"}
    if isinstance(exc, DeadlineExceededError):
        return 504, None
    if isinstance(exc, SelfTestFailedError | InsufficientMemoryError):
        return 409, None
    return 500, None


async def errors_middleware(
    request: web.Request, handler: Handler, gate: AdmissionGate | None = None
) -> web.StreamResponse:
    """Every route runs behind this: the admission gate, and EdgedError mapped to its status."""
    if gate is None:
        gate = request.app[GATE]
    if gate.draining:
        return error_response(
            503,
            "edged is shutting down; retry shortly",
            {"Retry-After": "1", "Connection": "close"},
        )
    gate.inflight += 1
    gate._idle.clear()
    try:
        return await handler(request)
    except EdgedError as exc:
        status, headers = status_for(exc, request.path.endswith("/infer"))
        if status >= 500 and status != 503:
            log.warning("%s %s -> %d: %s", request.method, request.path, status, exc)
        return error_response(status, str(exc), headers)
    finally:
        gate.inflight -= 1
        if not gate.inflight:
            gate._idle.set()


async def read_body(request: web.Request, limit: int | None = None) -> bytes:
    if limit is None:
        limit = request.app[MAX_BODY]
    length = request.content_length
    if length is not None and length > limit:
        raise InvalidRequestError(
            f"request body of {length} bytes exceeds the limit of {limit} bytes "
            "(server.max_body_bytes)"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise InvalidRequestError(
            f"request body exceeds the limit of {limit} bytes (server.max_body_bytes)"
        ) from exc


def came_over_unix_socket(request: web.Request) -> bool:
    """Whether the client reached edged over the Unix socket (whose file permissions say who
    may), also when a front end forwarded its request to the control plane."""
    if request.app.get(FORWARDED, False):
        return request.headers.get(VIA_HEADER) == "unix"
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return isinstance(sockname, str)
