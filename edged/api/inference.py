"""The Open Inference Protocol routes: server metadata and health, model metadata, config,
readiness, and ``infer`` (the hot route)."""

from __future__ import annotations

import asyncio
import json
import weakref

from aiohttp import web

from edged import __version__
from edged.api.context import (
    BACKEND,
    MAX_BODY,
    SHM,
    read_body,
)
from edged.api.tensors import (
    HEADER_LENGTH,
    OFFLOAD_JSON_BYTES,
    OFFLOAD_JSON_VALUES,
    encode_infer_response,
    json_request_bytes,
    json_response_values,
    parse_infer_request,
)
from edged.errors import (
    InvalidRequestError,
    ModelNotReadyError,
)
from edged.serve.view import ModelView


async def server_metadata(request: web.Request) -> web.Response:
    extensions = ["binary_tensor_data", "model_repository", "edged"]
    if request.app[SHM] is not None:
        extensions.append("system_shared_memory")
    return web.json_response({"name": "edged", "version": __version__, "extensions": extensions})


async def health_live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def health_ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[BACKEND].ready else 503)


# --- models -----------------------------------------------------------------------------------


_JSON_TEXT_HEADERS = {"Content-Type": "application/json; charset=utf-8"}  # as json_response
# A version's metadata never changes: encoded once per served version.
_METADATA: weakref.WeakKeyDictionary[ModelView, bytes] = weakref.WeakKeyDictionary()


async def model_metadata(request: web.Request) -> web.Response:
    view = request.app[BACKEND].view(request.match_info["name"], request.match_info.get("version"))
    body = _METADATA.get(view)
    if body is None:
        body = _METADATA[view] = json.dumps(view.metadata()).encode()
    return web.Response(body=body, headers=_JSON_TEXT_HEADERS)


async def model_config(request: web.Request) -> web.Response:
    view = request.app[BACKEND].view(request.match_info["name"], request.match_info.get("version"))
    return web.json_response(view.config())


async def model_ready(request: web.Request) -> web.Response:
    try:
        request.app[BACKEND].view(request.match_info["name"], request.match_info.get("version"))
    except ModelNotReadyError:
        return web.Response(status=503)
    return web.Response(status=200)


_JSON_HEADERS = {"Content-Type": "application/json"}


async def infer(request: web.Request) -> web.Response:
    app = request.app
    backend = app[BACKEND]
    match_info = request.match_info
    name = match_info["name"]
    body = await read_body(request, app[MAX_BODY])
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
    result = await backend.infer(
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
