"""The system shared-memory routes: register, unregister and status of regions."""

from __future__ import annotations

import json

from aiohttp import web

from edged.api.context import (
    SHM,
    read_body,
)
from edged.api.shm import SharedMemoryRegistry
from edged.errors import InvalidRequestError


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
        doc = json.loads(await read_body(request))
        key, offset, size = doc["key"], int(doc.get("offset", 0)), int(doc["byte_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequestError(f"register needs JSON with key and byte_size: {exc}") from exc
    registry.register(request.match_info["region"], str(key), offset, size)
    return web.json_response({})


async def shm_unregister(request: web.Request) -> web.Response:
    _shm(request).unregister(request.match_info.get("region"))
    return web.json_response({})
