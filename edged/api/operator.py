"""edged's own routes: status, telemetry, ``/metrics``, and the operator actions (bundle
installs, rollbacks, the install history), which the Unix socket alone accepts."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from edged.api.context import (
    INSTALLER,
    MANAGER,
    REFRESH,
    STATUS,
    TELEMETRY,
    came_over_unix_socket,
    error_response,
)
from edged.bundle import Installer, InstallResult, receive_upload, upload_source
from edged.errors import (
    EdgedError,
    FeatureDisabledError,
    InstallBusyError,
    InvalidRequestError,
    LimitExceededError,
    NotPermittedError,
)
from edged.telemetry.hub import TelemetryHub

log = logging.getLogger(__name__)


async def _refresh(request: web.Request) -> None:
    refresh = request.app.get(REFRESH)
    if refresh is not None:
        await refresh()


async def edged_status(request: web.Request) -> web.Response:
    await _refresh(request)
    status = request.app[STATUS]
    return web.json_response(status() if status else request.app[MANAGER].status())


def _hub(request: web.Request) -> TelemetryHub:
    hub = request.app[TELEMETRY]
    if hub is None:
        raise FeatureDisabledError("telemetry is disabled ([telemetry] enabled = false)")
    return hub


async def edged_telemetry(request: web.Request) -> web.Response:
    # Off the event loop: the spool's lock may be held across an fsync.
    await _refresh(request)
    return web.json_response(await asyncio.to_thread(_hub(request).snapshot))


async def prometheus_metrics(request: web.Request) -> web.Response:
    from edged.telemetry.prometheus import StatusSnapshot, render_metrics

    # A scrape snapshots every histogram (milliseconds of work): not on the event loop. The
    # manager's state is copied here, on the loop, where swaps change it.
    hub = _hub(request)
    await _refresh(request)
    models = StatusSnapshot.of(request.app[MANAGER])
    body, content_type = await asyncio.to_thread(render_metrics, hub, models)
    return web.Response(body=body, headers={"Content-Type": content_type})


# --- bundles (operator actions: Unix socket only) ---------------------------------------------


def _installer(request: web.Request) -> Installer:
    """Installs and rollbacks change what the device serves: only over the Unix socket, whose
    file permissions say who may (the bundle itself is verified either way)."""
    if not came_over_unix_socket(request):
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
        failed = installer.result_for(exc)  # this rollback's entry, never another request's
        if failed is None:
            raise
        log.warning("rollback refused: %s", exc)
        return _result_response(failed)
    return _result_response(result)


async def install_history(request: web.Request) -> web.Response:
    installer = request.app[INSTALLER]
    # The history is a file read (and parse) of the install journal: not on the event loop.
    return web.json_response(await asyncio.to_thread(installer.history) if installer else [])
