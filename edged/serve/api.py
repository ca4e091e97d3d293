"""The local API: Open Inference Protocol (KServe v2) over REST, served by aiohttp on loopback
TCP and on a Unix socket. Existing clients such as ``tritonclient.http`` work unchanged.

Errors map to status codes here and nowhere else: bad input 400, unknown model 404 (400 on
infer, as Triton does), a subsystem turned off 404, an operator action over TCP 403, not ready
503, queue full 429 with Retry-After, deadline 504.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web

from edged import __version__
from edged._compat import TIMEOUT_ERRORS
from edged.bundle import Installer, InstallResult, receive_upload, upload_source
from edged.errors import (
    DeadlineExceededError,
    EdgedError,
    FeatureDisabledError,
    InstallBusyError,
    InsufficientMemoryError,
    InvalidRequestError,
    LimitExceededError,
    ModelNotFoundError,
    ModelNotReadyError,
    NotPermittedError,
    QueueFullError,
    SelfTestFailedError,
    ShuttingDownError,
)
from edged.runtime.base import backend_for
from edged.serve.manager import ModelManager
from edged.serve.shm import SharedMemoryRegistry
from edged.serve.slot import ServedVersion
from edged.serve.tensors import (
    HEADER_LENGTH,
    OFFLOAD_JSON_BYTES,
    OFFLOAD_JSON_VALUES,
    encode_infer_response,
    json_request_bytes,
    json_response_values,
    parse_infer_request,
)
from edged.telemetry.hub import TelemetryHub

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MANAGER: web.AppKey[ModelManager] = web.AppKey("manager", ModelManager)
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


def _status_for(exc: EdgedError, infer: bool) -> tuple[int, dict[str, str] | None]:
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
        status, headers = _status_for(exc, request.path.endswith("/infer"))
        if status >= 500 and status != 503:
            log.warning("%s %s -> %d: %s", request.method, request.path, status, exc)
        return error_response(status, str(exc), headers)
    finally:
        gate.inflight -= 1
        if not gate.inflight:
            gate._idle.set()


async def _read_body(request: web.Request, limit: int | None = None) -> bytes:
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


# --- server -----------------------------------------------------------------------------------


async def server_metadata(request: web.Request) -> web.Response:
    extensions = ["binary_tensor_data", "model_repository", "edged"]
    if request.app[SHM] is not None:
        extensions.append("system_shared_memory")
    return web.json_response({"name": "edged", "version": __version__, "extensions": extensions})


async def health_live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def health_ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[MANAGER].ready else 503)


# --- models -----------------------------------------------------------------------------------


_JSON_TEXT_HEADERS = {"Content-Type": "application/json; charset=utf-8"}  # as json_response
# A version's metadata never changes: built (with its one file probe) once per served version.
_METADATA: weakref.WeakKeyDictionary[ServedVersion, bytes] = weakref.WeakKeyDictionary()


def _metadata_body(current: ServedVersion) -> bytes:
    platform = backend_for(current.version_dir).platform
    return json.dumps(
        {
            "name": current.model_name,
            "versions": [current.version],
            "platform": platform,
            "inputs": [t.as_dict() for t in current.model.inputs],
            "outputs": [t.as_dict() for t in current.model.outputs],
        }
    ).encode()


async def model_metadata(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    name = request.match_info["name"]
    current = manager.serving(name, request.match_info.get("version"))
    body = _METADATA.get(current)
    if body is None:
        body = _METADATA[current] = await asyncio.to_thread(_metadata_body, current)
    return web.Response(body=body, headers=_JSON_TEXT_HEADERS)


async def model_config(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    name = request.match_info["name"]
    current = manager.serving(name, request.match_info.get("version"))
    batching = current.config.batching
    dynamic = current.model.dynamic_batch
    return web.json_response(
        {
            "name": name,
            "max_batch_size": batching.max_batch_size if dynamic else 0,
            "dynamic_batching": {"max_queue_delay_microseconds": batching.max_queue_delay_us}
            if dynamic
            else None,
            "input": [
                {
                    "name": t.name,
                    "data_type": f"TYPE_{t.datatype}",
                    "dims": list(t.shape[1:] if dynamic else t.shape),
                }
                for t in current.model.inputs
            ],
            "output": [
                {
                    "name": t.name,
                    "data_type": f"TYPE_{t.datatype}",
                    "dims": list(t.shape[1:] if dynamic else t.shape),
                }
                for t in current.model.outputs
            ],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    try:
        manager.serving(request.match_info["name"], request.match_info.get("version"))
    except ModelNotReadyError:
        return web.Response(status=503)
    return web.Response(status=200)


_JSON_HEADERS = {"Content-Type": "application/json"}


async def infer(request: web.Request) -> web.Response:
    app = request.app
    manager = app[MANAGER]
    match_info = request.match_info
    name = match_info["name"]
    body = await _read_body(request, app[MAX_BODY])
    headers = request.headers
    header = headers.get(HEADER_LENGTH)
    try:
        header_length = int(header) if header is not None else None
    except ValueError:
        raise InvalidRequestError(f"{HEADER_LENGTH} must be an integer, got {header!r}") from None
    shm = app[SHM]
    if json_request_bytes(body, header_length) > OFFLOAD_JSON_BYTES:
        parsed = await asyncio.to_thread(parse_infer_request, body, header_length, shm)
    else:
        parsed = parse_infer_request(body, header_length, shm)
    timeout_s = parsed.timeout_s
    deadline_header = headers.get("Edged-Timeout-Ms")
    if deadline_header is not None:
        try:
            timeout_s = float(deadline_header) / 1000.0
        except ValueError:
            raise InvalidRequestError("header Edged-Timeout-Ms must be a number") from None
    result = await manager.infer(
        name,
        parsed.inputs,
        version=match_info.get("version"),
        priority=parsed.priority,
        timeout_s=timeout_s,
    )
    if json_response_values(parsed, result.outputs) > OFFLOAD_JSON_VALUES:
        payload, header_len = await asyncio.to_thread(
            encode_infer_response, name, result.model_version, parsed, result.outputs, shm
        )
    else:
        payload, header_len = encode_infer_response(
            name, result.model_version, parsed, result.outputs, shm
        )
    if header_len is None:
        return web.Response(body=payload, headers=_JSON_HEADERS)
    return web.Response(
        body=payload,
        headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_len)},
    )


# --- repository -------------------------------------------------------------------------------


async def repository_index(request: web.Request) -> web.Response:
    return web.json_response(await request.app[MANAGER].index_async())


async def repository_load(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    version = await manager.load_model(request.match_info["name"])
    return web.json_response({"name": request.match_info["name"], "version": version})


async def repository_unload(request: web.Request) -> web.Response:
    await request.app[MANAGER].unload(request.match_info["name"])
    return web.json_response({})


# --- system shared memory ---------------------------------------------------------------------


def _shm(request: web.Request) -> SharedMemoryRegistry:
    registry = request.app[SHM]
    if registry is None:
        raise InvalidRequestError("shared memory is disabled (set server.shared_memory = true)")
    return registry


async def shm_status(request: web.Request) -> web.Response:
    return web.json_response(_shm(request).status(request.match_info.get("region")))


async def shm_register(request: web.Request) -> web.Response:
    registry = _shm(request)
    try:
        doc = json.loads(await _read_body(request))
        key, offset, size = doc["key"], int(doc.get("offset", 0)), int(doc["byte_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequestError(f"register needs JSON with key and byte_size: {exc}") from exc
    registry.register(request.match_info["region"], str(key), offset, size)
    return web.json_response({})


async def shm_unregister(request: web.Request) -> web.Response:
    _shm(request).unregister(request.match_info.get("region"))
    return web.json_response({})


# --- edged extensions -------------------------------------------------------------------------


async def edged_status(request: web.Request) -> web.Response:
    status = request.app[STATUS]
    return web.json_response(status() if status else request.app[MANAGER].status())


def _hub(request: web.Request) -> TelemetryHub:
    hub = request.app[TELEMETRY]
    if hub is None:
        raise FeatureDisabledError("telemetry is disabled ([telemetry] enabled = false)")
    return hub


async def edged_telemetry(request: web.Request) -> web.Response:
    # Off the event loop: the spool's lock may be held across an fsync.
    return web.json_response(await asyncio.to_thread(_hub(request).snapshot))


async def prometheus_metrics(request: web.Request) -> web.Response:
    from edged.telemetry.prometheus import StatusSnapshot, render_metrics

    # A scrape snapshots every histogram (milliseconds of work): not on the event loop. The
    # manager's state is copied here, on the loop, where swaps change it.
    hub = _hub(request)
    models = StatusSnapshot.of(request.app[MANAGER])
    body, content_type = await asyncio.to_thread(render_metrics, hub, models)
    return web.Response(body=body, headers={"Content-Type": content_type})


# --- bundles (operator actions: Unix socket only) ---------------------------------------------


def _installer(request: web.Request) -> Installer:
    """Installs and rollbacks change what the device serves: only over the Unix socket, whose
    file permissions say who may (the bundle itself is verified either way)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sockname, str):
        raise NotPermittedError("installs and rollbacks are accepted on the Unix socket only")
    installer = request.app[INSTALLER]
    if installer is None:
        raise InvalidRequestError("this daemon has no bundle store")
    return installer


def _result_response(result: InstallResult) -> web.Response:
    return web.json_response(result.to_json(), status=200 if result.ok else 409)


async def install_bundle(request: web.Request) -> web.Response:
    installer = _installer(request)
    source = upload_source(request.headers.get("Edged-Bundle-Name"))
    try:
        result = await receive_upload(
            installer, request.content.iter_chunked(1 << 20), source, request.content_length
        )
    except InstallBusyError as exc:
        return error_response(429, str(exc), {"Retry-After": "5"})
    except LimitExceededError as exc:
        log.warning("upload of %s refused: %s", source, exc)
        return error_response(413, str(exc))
    if not result.ok:
        log.warning("install of %s rejected: %s", source, result.message)
    return _result_response(result)


async def rollback_model(request: web.Request) -> web.Response:
    installer = _installer(request)
    to = request.query.get("to")
    try:
        to_version = int(to) if to is not None else None
    except ValueError:
        raise InvalidRequestError(f"'to' must be a version number, got {to!r}") from None
    try:
        result = await installer.rollback(request.match_info["name"], to_version)
    except EdgedError as exc:
        failed = installer.last_result
        if failed is None:
            raise
        log.warning("rollback refused: %s", exc)
        return _result_response(failed)
    return _result_response(result)


async def install_history(request: web.Request) -> web.Response:
    installer = request.app[INSTALLER]
    # The history is a file read (and parse) of the install journal: not on the event loop.
    return web.json_response(await asyncio.to_thread(installer.history) if installer else [])


class _GuardedRoutes:
    """Adds routes whose handlers run inside ``errors_middleware``. A wrapper per route instead
    of an aiohttp middleware: aiohttp's middleware chain cost the event loop about 5 µs per
    request, 8 % of all it does per inference under load."""

    def __init__(self, router: web.UrlDispatcher, gate: AdmissionGate) -> None:
        self._router = router
        self._gate = gate

    def add_get(self, path: str, handler: Handler) -> None:
        self._router.add_get(path, partial(errors_middleware, handler=handler, gate=self._gate))

    def add_post(self, path: str, handler: Handler) -> None:
        self._router.add_post(path, partial(errors_middleware, handler=handler, gate=self._gate))


def build_app(
    manager: ModelManager,
    max_body_bytes: int,
    shared_memory: bool,
    telemetry: TelemetryHub | None = None,
    installer: Installer | None = None,
    status: StatusSource | None = None,
) -> web.Application:
    """``status``: what ``/edged/v1/status`` answers (the daemon adds its services' health to
    the manager's status); the manager's status alone when ``None``."""
    # aiohttp's own limit sits above ours so that we answer with a clear 400 instead.
    app = web.Application(client_max_size=max_body_bytes + 1)
    app[MANAGER] = manager
    app[SHM] = SharedMemoryRegistry() if shared_memory else None
    app[MAX_BODY] = max_body_bytes
    app[GATE] = AdmissionGate()
    app[TELEMETRY] = telemetry
    app[INSTALLER] = installer
    app[STATUS] = status
    r = _GuardedRoutes(app.router, app[GATE])
    # aiohttp tries the routes under one static prefix in the order they were added: infer,
    # the hot route, first.
    r.add_post("/v2/models/{name}/infer", infer)
    r.add_post("/v2/models/{name}/versions/{version}/infer", infer)
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", health_live)
    r.add_get("/v2/health/ready", health_ready)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_get(prefix, model_metadata)
        r.add_get(prefix + "/config", model_config)
        r.add_get(prefix + "/ready", model_ready)
    r.add_post("/v2/repository/index", repository_index)
    r.add_post("/v2/repository/models/{name}/load", repository_load)
    r.add_post("/v2/repository/models/{name}/unload", repository_unload)
    r.add_get("/v2/systemsharedmemory/status", shm_status)
    r.add_get("/v2/systemsharedmemory/region/{region}/status", shm_status)
    r.add_post("/v2/systemsharedmemory/region/{region}/register", shm_register)
    r.add_post("/v2/systemsharedmemory/region/{region}/unregister", shm_unregister)
    r.add_post("/v2/systemsharedmemory/unregister", shm_unregister)
    r.add_get("/edged/v1/status", edged_status)
    r.add_get("/edged/v1/telemetry", edged_telemetry)
    r.add_get("/metrics", prometheus_metrics)
    r.add_post("/edged/v1/bundles", install_bundle)
    r.add_post("/edged/v1/models/{name}/rollback", rollback_model)
    r.add_get("/edged/v1/installs", install_history)
    return app
