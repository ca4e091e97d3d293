"""A front end's connection to the engine: an ``InferenceBackend`` (see ``edged.api.backend``).

A request is validated here against the serving version's view, its tensors are copied once
into this front end's request arena, and a small frame names them. The answer's tensors are
read from the engine's response arena. The connection comes back by itself after the engine
restarts; meanwhile requests fail with ``EngineUnavailableError`` (503, Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, cast

import numpy as np

from edged._compat import TIMEOUT_ERRORS
from edged.engine import wire
from edged.engine.arena import Arena, RingAllocator
from edged.errors import (
    DeadlineExceededError,
    EngineUnavailableError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from edged.runtime.base import Array, TensorSpec
from edged.serve.manager import require_version, resolve_priority, validate_inputs
from edged.serve.scheduler import InferenceResult
from edged.serve.view import ModelView

log = logging.getLogger(__name__)

REQUEST_ARENA_BYTES = 16 * 1024 * 1024
ENGINE_GRACE_S = 2.0
FREE_BATCH = 64


def view_from(name: str, fields: dict[str, Any]) -> ModelView:
    return ModelView(
        model_name=name,
        version=fields["version"],
        platform=fields["platform"],
        inputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in fields["inputs"]),
        outputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in fields["outputs"]),
        dynamic_batch=fields["dynamic_batch"],
        max_batch_size=fields["max_batch_size"],
        max_queue_delay_us=fields["max_queue_delay_us"],
        priority_levels=fields["priority_levels"],
        default_priority=fields["default_priority"],
    )


class _Pending:
    __slots__ = ("future", "offsets")

    def __init__(self, future: asyncio.Future[InferenceResult], offsets: list[int]) -> None:
        self.future = future
        self.offsets = offsets


class EngineConnection(asyncio.Protocol):
    """One connection's worth of state; replaced when the engine restarts."""

    def __init__(self, client: EngineClient, requests: Arena, responses: Arena) -> None:
        self.client = client
        self.responses = responses
        self.requests = requests
        self.allocator = RingAllocator(REQUEST_ARENA_BYTES)
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, _Pending] = {}
        self.buffer = bytearray()
        self.freed: list[int] = []  # response slots read, for the engine to reuse
        self.loop = asyncio.get_running_loop()
        self.lost = self.loop.create_future()
        # Frames written in one turn of the event loop go out in one write: under load the
        # engine's reader wakes once for many requests, and the front end makes one syscall.
        self._outbox: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        freed = self.freed
        client = self.client
        for header, inline in wire.frames(self.buffer):
            kind = header["k"]
            if kind == wire.BATCH:
                self._batch(header, inline, freed)
            elif kind == wire.RESULT:
                self._result(header, inline, freed)
            elif kind == wire.VIEWS:
                client.update_views(header)
        # Freed response slots ride on the next request's frame; only a pile of them (no
        # requests going out) gets a frame of its own.
        if len(freed) >= FREE_BATCH:
            self.send(wire.frame({"k": wire.FREE, "o": freed}))
            self.freed = []

    def send(self, frame: bytes) -> None:
        if not self._outbox:
            if len(self.pending) <= 1 and self.transport is not None:
                self.transport.write(frame)  # a lone request: no turn of the loop to wait
                return
            self.loop.call_soon(self._flush)
        self._outbox.append(frame)

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def take_freed(self) -> list[int] | None:
        freed = self.freed
        if not freed:
            return None
        self.freed = []
        return freed

    def _batch(self, header: dict[str, Any], inline: bytes, freed: list[int]) -> None:
        view = self.responses.view
        # One copy of each output (the engine reuses the slot once it is freed), then a view
        # of its rows per request.
        outputs: dict[str, Array] = {}
        for ref in header["t"]:
            outputs[ref[0]] = np.array(wire.tensor_at(ref, view, inline))
            if ref[3] >= 0:
                freed.append(ref[3])
        ids, counts = header["i"], header["n"]
        version, batch_rows = header["v"], header["b"]
        free = self.allocator.free
        pending_of = self.pending.pop
        single = len(ids) == 1
        first = 0
        for request_id, count in zip(ids, counts, strict=True):
            pending = pending_of(request_id, None)
            if pending is not None:
                for offset in pending.offsets:
                    free(offset)
                part = (
                    outputs if single else {k: v[first : first + count] for k, v in outputs.items()}
                )
                if not pending.future.done():
                    pending.future.set_result(InferenceResult(part, version, batch_rows))
            first += count

    def _result(self, header: dict[str, Any], inline: bytes, freed: list[int]) -> None:
        pending = self.pending.pop(header["i"], None)
        if pending is None:
            return
        free = self.allocator.free
        for offset in pending.offsets:
            free(offset)
        refs = header.get("t")
        if refs is None:
            if not pending.future.done():
                pending.future.set_exception(wire.error_from(header))
            return
        view = self.responses.view
        outputs: dict[str, Array] = {}
        for ref in refs:
            # A copy: the engine reuses the slot as soon as it is freed.
            outputs[ref[0]] = np.array(wire.tensor_at(ref, view, inline))
            if ref[3] >= 0:
                freed.append(ref[3])
        if not pending.future.done():
            pending.future.set_result(InferenceResult(outputs, header["v"], header["b"]))

    def connection_lost(self, exc: Exception | None) -> None:
        error = EngineUnavailableError("the engine restarted while this request ran; retry")
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        self.pending.clear()
        if not self.lost.done():
            self.lost.set_result(None)


class EngineClient:
    def __init__(self, path: str, name: str = "front end") -> None:
        self.path = path
        self.name = name
        self.views: dict[str, ModelView] = {}
        self._ready = False
        self._have_views = False  # the current connection's engine said what serves
        self._connection: EngineConnection | None = None
        self._ids = 0
        self._connected = asyncio.Event()

    # --- the connection --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connection is not None

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def run(self) -> None:
        """Keep a connection to the engine, reconnecting after it restarts (forever)."""
        delay = 0.02
        while True:
            try:
                connection = await self._connect()
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            delay = 0.02
            self._connection = connection
            self._connected.set()
            try:
                await connection.lost
            finally:
                self._connection = None
                self._connected.clear()
                self._ready = False
                self._have_views = False
                log.warning("%s: lost the engine; reconnecting", self.name)

    async def _connect(self) -> EngineConnection:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, self.path)
            requests, responses, frames, rest = await asyncio.to_thread(_handshake, sock)
            sock.setblocking(False)
            _, protocol = await loop.create_unix_connection(
                lambda: EngineConnection(self, requests, responses), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        for header, _ in frames:  # a views frame may have come with the hello
            if header.get("k") == wire.VIEWS:
                self.update_views(header)
        if rest:
            protocol.data_received(rest)
        return protocol

    def update_views(self, header: dict[str, Any]) -> None:
        self.views = {name: view_from(name, fields) for name, fields in header["models"].items()}
        self._ready = bool(header["ready"])
        self._have_views = True

    # --- InferenceBackend ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready and self._connection is not None

    def view(self, name: str, version: str | None = None) -> ModelView:
        view = self.views.get(name)
        if view is None:
            if self._connection is None or not self._have_views:
                # Not known yet is not unknown: the engine may still be loading it.
                raise EngineUnavailableError("the engine is (re)starting; retry shortly")
            raise ModelNotFoundError(f"unknown model {name!r}")
        require_version(name, version, view.version)
        return view

    async def infer(
        self,
        name: str,
        inputs: dict[str, Array],
        *,
        version: str | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> InferenceResult:
        connection = self._connection
        if connection is None or connection.transport is None or connection.transport.is_closing():
            raise EngineUnavailableError("the engine is restarting; retry shortly")
        view = self.view(name, version)
        priority = resolve_priority(name, priority, view.priority_levels, view.default_priority)
        dynamic = view.dynamic_batch
        rows, _ = validate_inputs(
            name, view.inputs, inputs, dynamic, view.max_batch_size if dynamic else 1
        )
        refs = []
        offsets: list[int] = []
        inline = bytearray()
        allocator = connection.allocator
        arena = connection.requests.view
        for tensor, value in inputs.items():
            flat = np.ascontiguousarray(value)
            nbytes = flat.nbytes
            offset = allocator.alloc(nbytes)
            if offset is None:
                refs.append(wire.describe(tensor, flat, -1, len(inline)))
                inline += flat.tobytes()
            else:
                arena[offset : offset + nbytes] = flat.reshape(-1).view(np.uint8).data
                offsets.append(offset)
                refs.append(wire.describe(tensor, flat, offset, 0))
        self._ids += 1
        request_id = self._ids
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        future: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        connection.pending[request_id] = _Pending(future, offsets)
        frame = wire.frame(
            {
                "k": wire.INFER,
                "i": request_id,
                "m": name,
                "v": version,
                "vv": view.version,
                "p": priority,
                "r": rows,
                "d": deadline,
                "t": refs,
                "f": connection.take_freed(),
            },
            inline,
        )
        connection.send(frame)
        if timeout_s is None:
            return await future
        try:
            # The engine answers 504 at the deadline itself (and counts it); this wait only
            # guards against an engine that cannot answer at all. The request's slots stay
            # allocated until the engine answers, whatever happens here.
            return await asyncio.wait_for(asyncio.shield(future), timeout_s + ENGINE_GRACE_S)
        except TIMEOUT_ERRORS as exc:
            raise DeadlineExceededError(
                f"request deadline of {timeout_s * 1000:.0f} ms passed"
            ) from exc

    async def index_async(self) -> list[dict[str, Any]]:
        raise ModelNotReadyError("the repository index is answered by the control plane")

    async def load_model(self, name: str) -> str:
        raise ModelNotReadyError("repository loads are answered by the control plane")

    async def unload(self, name: str) -> None:
        raise ModelNotReadyError("repository unloads are answered by the control plane")


def _handshake(
    sock: socket.socket,
) -> tuple[Arena, Arena, list[tuple[dict[str, Any], bytes]], bytes]:
    """Exchange arenas with the engine (blocking): ours for requests, its for answers."""
    sock.setblocking(True)
    sock.settimeout(10.0)
    requests = Arena.create("edged-requests", REQUEST_ARENA_BYTES)
    try:
        hello = wire.frame({"k": wire.HELLO, "arena": REQUEST_ARENA_BYTES, "pid": os.getpid()})
        socket.send_fds(sock, [hello], [requests.fd])
        message, fds, _, _ = socket.recv_fds(sock, 65536, 1)
    except BaseException:
        requests.close()
        raise
    buffer = bytearray(message)
    frames = list(wire.frames(buffer))
    if not fds or not frames or frames[0][0].get("k") != wire.HELLO:
        requests.close()
        raise OSError("the engine did not answer with a hello and its arena")
    responses = Arena(fds[0], int(frames[0][0]["arena"]))
    sock.settimeout(None)
    return requests, responses, frames[1:], bytes(buffer)
