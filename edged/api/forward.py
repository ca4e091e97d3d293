"""A front end's route for everything it does not answer itself: the request goes on to the
control plane's private socket, and its answer comes back unchanged. Operator actions stay
gated by where the client came from (``VIA_HEADER``), which only front ends may set."""

from __future__ import annotations

from aiohttp import ClientError, ClientSession, UnixConnector, web

from edged.api.context import VIA_HEADER, came_over_unix_socket, error_response

# Hop-by-hop headers (RFC 9110 7.6.1) and what aiohttp sets itself.
_DROP_REQUEST = {"connection", "keep-alive", "transfer-encoding", "host", VIA_HEADER.lower()}
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length"}
FORWARD_SESSION: web.AppKey[ClientSession] = web.AppKey("forward_session", ClientSession)


def add_forwarding(app: web.Application, control_socket: str) -> None:
    """Forward every request no earlier route matched to ``control_socket``."""

    async def open_session(app: web.Application) -> None:
        app[FORWARD_SESSION] = ClientSession(
            connector=UnixConnector(path=control_socket), auto_decompress=False
        )

    async def close_session(app: web.Application) -> None:
        await app[FORWARD_SESSION].close()

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_route("*", "/{tail:.*}", forward)


async def forward(request: web.Request) -> web.StreamResponse:
    session = request.app[FORWARD_SESSION]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
    headers[VIA_HEADER] = "unix" if came_over_unix_socket(request) else "tcp"
    body = request.content if request.body_exists else None
    try:
        async with session.request(
            request.method,
            f"http://edged{request.rel_url}",
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as answer:
            payload = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _DROP_RESPONSE}
            return web.Response(body=payload, status=answer.status, headers=out)
    except ClientError as exc:
        return error_response(503, f"the control plane did not answer: {exc}", {"Retry-After": "1"})
