"""The KServe model-repository routes: index, load (a hot swap), unload."""

from __future__ import annotations

from aiohttp import web

from edged.api.context import MANAGER


async def repository_index(request: web.Request) -> web.Response:
    return web.json_response(await request.app[MANAGER].index_async())


async def repository_load(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    version = await manager.load_model(request.match_info["name"])
    return web.json_response({"name": request.match_info["name"], "version": version})


async def repository_unload(request: web.Request) -> web.Response:
    await request.app[MANAGER].unload(request.match_info["name"])
    return web.json_response({})
