"""The engine's side of the front ends' connections: requests in, answers out, on threads.

One reader thread per front end parses its frames and queues each request on the model's
scheduler; the model's worker thread writes the answers of a batch into the front end's
response arena and sends them in one write. The event loop is not on this path (it holds only
what needs it: the result cache, probation and shadow runs), so no request waits for a
thread hand-off to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from typing import Any

import numpy as np

from edged.engine import wire
from edged.engine.arena import Arena, RingAllocator
from edged.errors import (
    DeadlineExceededError,
    EdgedError,
    ModelNotFoundError,
    ModelNotReadyError,
    ShuttingDownError,
)
from edged.runtime.base import Array
from edged.serve.manager import ModelManager
from edged.serve.scheduler import (
    BatchObserver,
    InferenceResult,
    PendingRequest,
    RemoteWaiter,
    Scheduler,
    thread_cpu_s,
)
from edged.serve.view import ModelView

log = logging.getLogger(__name__)

RESPONSE_ARENA_BYTES = 16 * 1024 * 1024
# The requests of one read from a front end, per model: (request, priority).
Queued = dict[Scheduler, list[tuple[PendingRequest, int]]]
RECV_BYTES = 256 * 1024


def view_fields(view: ModelView) -> dict[str, Any]:
    return {
        "version": view.version,
        "platform": view.platform,
        "inputs": [[t.name, t.datatype, list(t.shape)] for t in view.inputs],
        "outputs": [[t.name, t.datatype, list(t.shape)] for t in view.outputs],
        "dynamic_batch": view.dynamic_batch,
        "max_batch_size": view.max_batch_size,
        "max_queue_delay_us": view.max_queue_delay_us,
        "priority_levels": view.priority_levels,
        "default_priority": view.default_priority,
    }


class FrontEndConnection:
    """One front end, as the engine sees it. A ``ReplySink`` for its requests' answers."""

    def __init__(self, engine: DataPlane, sock: socket.socket, number: int) -> None:
        self.engine = engine
        self.sock = sock
        self.number = number
        self.requests: Arena | None = None  # the front end's arena (requests' tensors)
        self.responses = Arena.create(f"edged-responses-{number}", RESPONSE_ARENA_BYTES)
        self.allocator = RingAllocator(RESPONSE_ARENA_BYTES)
        self._write_lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self.closed = False
        self.final_cpu_s = 0.0  # the reader thread's CPU, once it ended
        self.thread = threading.Thread(
            target=self._serve, name=f"edged-frontend-{number}", daemon=True
        )

    # --- writing (worker threads and the loop) --------------------------------------------

    def send(self, data: bytes) -> None:
        with self._write_lock:
            if self.closed:
                return
            try:
                self.sock.sendall(data)
            except OSError as exc:
                log.info("front end %d went away: %s", self.number, exc)
                self.closed = True

    def claim(self, waiter: RemoteWaiter) -> bool:
        """True for the first caller only: it answers ``waiter``."""
        if not waiter.timed:  # nothing else can answer it
            waiter.answered = True
            return True
        with self._claim_lock:
            if waiter.answered:
                return False
            waiter.answered = True
            return True

    def deliver(
        self, completions: list[tuple[RemoteWaiter, InferenceResult | BaseException]]
    ) -> None:
        out = bytearray()
        for waiter, outcome in completions:
            if not self.claim(waiter):
                continue  # its deadline passed and it was answered 504 already
            if isinstance(outcome, BaseException):
                out += wire.frame(
                    {"k": wire.RESULT, "i": waiter.token, **wire.error_fields(outcome)}
                )
            else:
                out += self._result_frame(waiter.token, outcome)
        if out:
            self.send(bytes(out))

    def deliver_batch(
        self,
        version: str,
        total_rows: int,
        outputs: dict[str, Array],
        rows: list[tuple[RemoteWaiter, int, int]],
    ) -> None:
        """One frame for every answer of a batch that belongs to this front end: each output
        is copied into the response arena once, and the front end splits it by rows."""
        live = [(w, first, n) for w, first, n in rows if self.claim(w)]
        if not live:
            return
        first, last = live[0][1], live[-1][1] + live[-1][2]
        if len(live) == 1 and first == 0 and last == total_rows:
            mine = outputs  # the whole batch (also a model without a batch dimension)
        elif sum(n for _, _, n in live) == last - first:  # contiguous rows: a view
            mine = {name: value[first:last] for name, value in outputs.items()}
        else:
            index = np.concatenate([np.arange(f, f + n) for _, f, n in live])
            mine = {name: value[index] for name, value in outputs.items()}
        refs, inline = self._place(mine)
        self.send(
            wire.frame(
                {
                    "k": wire.BATCH,
                    "v": version,
                    "b": total_rows,
                    "i": [w.token for w, _, _ in live],
                    "n": [n for _, _, n in live],
                    "t": refs,
                },
                inline,
            )
        )

    def _place(self, outputs: dict[str, Array]) -> tuple[list[wire.TensorRef], bytearray]:
        """Outputs into the response arena (or, when it is full, inline in the frame)."""
        refs = []
        inline = bytearray()
        view = self.responses.view
        for name, value in outputs.items():
            flat = np.ascontiguousarray(value)
            nbytes = flat.nbytes
            offset = self.allocator.alloc(nbytes)
            if offset is None:
                refs.append(wire.describe(name, flat, -1, len(inline)))
                inline += flat.tobytes()
            else:
                view[offset : offset + nbytes] = flat.reshape(-1).view(np.uint8).data
                refs.append(wire.describe(name, flat, offset, 0))
        return refs, inline

    def _result_frame(self, token: object, result: InferenceResult) -> bytes:
        refs, inline = self._place(result.outputs)
        return wire.frame(
            {
                "k": wire.RESULT,
                "i": token,
                "v": result.model_version,
                "b": result.batch_rows,
                "t": refs,
            },
            inline,
        )

    # --- reading (this connection's thread) -----------------------------------------------

    def _serve(self) -> None:
        buffer = bytearray()
        sock = self.sock
        try:
            while True:
                chunk = sock.recv(RECV_BYTES)
                if not chunk:
                    break
                buffer += chunk
                queued: Queued = {}
                for header, data in wire.frames(buffer):
                    kind = header["k"]
                    if kind == wire.INFER:
                        freed = header.get("f")
                        if freed:  # response slots the front end is done with, piggybacked
                            for offset in freed:
                                self.allocator.free(offset)
                        self.engine.infer(self, header, data, queued)
                    elif kind == wire.FREE:
                        free = self.allocator.free
                        for offset in header["o"]:
                            free(offset)
                if queued:  # every request of this read, one lock per model
                    self.engine.submit(self, queued)
        except (OSError, ValueError) as exc:
            if not self.closed:
                log.warning("front end %d: connection failed: %s", self.number, exc)
        finally:
            with self._write_lock:
                self.closed = True
            self.final_cpu_s = time.thread_time()
            self.engine.forget(self)
            try:
                sock.close()
            finally:
                self.responses.close()


class DataPlane:
    """Accepts front ends on a listening Unix socket and serves their requests."""

    def __init__(
        self,
        manager: ModelManager,
        listener: socket.socket,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.manager = manager
        self.listener = listener
        self.loop = loop
        self.closing = False
        self._connections: set[FrontEndConnection] = set()
        self._lock = threading.Lock()
        self._numbers = 0
        self._views: dict[str, dict[str, Any]] = {}
        self._views_frame = wire.frame({"k": wire.VIEWS, "ready": False, "models": {}})
        self._broadcast_pending = False
        self._background: set[asyncio.Task[Any]] = set()
        self.requests_served = 0
        self._closed_readers_cpu_s = 0.0
        self._acceptor = threading.Thread(target=self._accept, name="edged-accept", daemon=True)

    def start(self) -> None:
        self.manager.change_listeners.append(self.changed)
        self._acceptor.start()

    @property
    def front_ends(self) -> int:
        return len(self._connections)

    @property
    def readers_cpu_s(self) -> float:
        """CPU of every front end's reader thread so far (the engine's receiving side)."""
        with self._lock:
            live = list(self._connections)
        return self._closed_readers_cpu_s + sum(thread_cpu_s(c.thread) for c in live)

    # --- what serves now --------------------------------------------------------------------

    def changed(self) -> None:
        """A serving version changed (any thread): tell every front end, once per burst."""
        with self._lock:
            if self._broadcast_pending:
                return
            self._broadcast_pending = True
        self.loop.call_soon_threadsafe(self._schedule_broadcast)

    def _schedule_broadcast(self) -> None:
        task = self.loop.create_task(self.broadcast_views())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def broadcast_views(self) -> None:
        with self._lock:
            self._broadcast_pending = False
        models: dict[str, dict[str, Any]] = {}
        for name in self.manager.model_names():
            current = self.manager.entry(name).slot.current
            if current is None:
                continue
            cached = self._views.get(name)
            if cached is None or cached["version"] != current.version:
                cached = view_fields(await asyncio.to_thread(ModelView.of, current))
            models[name] = cached
        self._views = models
        ready = self.manager.ready and not self.closing
        self._views_frame = wire.frame({"k": wire.VIEWS, "ready": ready, "models": models})
        for connection in list(self._connections):
            connection.send(self._views_frame)

    # --- connections ------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed: the engine is stopping
            try:
                self._handshake(sock)
            except (OSError, ValueError) as exc:
                log.warning("a front end's handshake failed: %s", exc)
                sock.close()

    def _handshake(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        message, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        if not fds:
            raise ValueError("the front end sent no arena")
        with self._lock:
            self._numbers += 1
            number = self._numbers
        connection = FrontEndConnection(self, sock, number)
        buffer = bytearray(message)
        hellos = [h for h, _ in wire.frames(buffer) if h.get("k") == wire.HELLO]
        if not hellos:
            raise ValueError("the front end's first message is not a hello")
        connection.requests = Arena(fds[0], int(hellos[0]["arena"]))
        hello = wire.frame({"k": wire.HELLO, "arena": RESPONSE_ARENA_BYTES})
        socket.send_fds(sock, [hello], [connection.responses.fd])
        with self._lock:
            self._connections.add(connection)
            connection.send(self._views_frame)
        connection.thread.start()
        log.info("front end %d connected (pid %s)", number, hellos[0].get("pid"))

    def forget(self, connection: FrontEndConnection) -> None:
        with self._lock:
            self._connections.discard(connection)
            self._closed_readers_cpu_s += connection.final_cpu_s
        if connection.requests is not None:
            connection.requests.close()

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):
            self.listener.close()

    # --- requests -----------------------------------------------------------------------------

    def infer(
        self,
        connection: FrontEndConnection,
        header: dict[str, Any],
        data: bytes,
        queued: Queued,
    ) -> None:
        """Turn one request frame into a queued request (in ``queued``, for ``submit``), an
        error answer, or a task on the loop (cache, probation)."""
        request_id = header["i"]
        try:
            self._infer(connection, header, data, request_id, queued)
        except EdgedError as exc:
            connection.send(
                wire.frame({"k": wire.RESULT, "i": request_id, **wire.error_fields(exc)})
            )

    def _infer(
        self,
        connection: FrontEndConnection,
        header: dict[str, Any],
        data: bytes,
        request_id: int,
        queued: Queued,
    ) -> None:
        if self.closing:
            raise ShuttingDownError("the daemon is shutting down; retry on restart")
        name = header["m"]
        entry = self.manager.entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"unknown model {name!r}")
        current = entry.slot.current
        if current is None:
            raise ModelNotReadyError(f"model {name!r} has no version serving (being replaced)")
        arena = connection.requests.view if connection.requests is not None else None
        refs = header["t"]
        inputs: dict[str, Array] = {ref[0]: wire.tensor_at(ref, arena, data) for ref in refs}
        self.requests_served += 1
        if (
            entry.cache is None
            and entry.probation is None
            and header["vv"] == current.version
            and not self.manager.closing
        ):
            # The front end validated the request against this very version.
            dynamic = current.model.dynamic_batch
            signature = tuple(
                (ref[0], tuple(ref[2][1:]) if dynamic else tuple(ref[2]), ref[1]) for ref in refs
            )
            deadline = header["d"]
            waiter = RemoteWaiter(connection, request_id, deadline is not None)
            request = PendingRequest(inputs, header["r"], signature, deadline, waiter)
            queued.setdefault(entry.scheduler, []).append((request, header["p"]))
            return
        # The result cache, probation's watch and shadow runs live on the event loop, and may
        # keep the inputs: they get a copy, not the arena.
        owned = {key: np.array(value) for key, value in inputs.items()}
        self.loop.call_soon_threadsafe(self._start_on_loop, connection, header, owned)

    def submit(self, connection: FrontEndConnection, queued: Queued) -> None:
        for scheduler, requests in queued.items():
            refused = scheduler.submit_remote_many(requests)
            if refused:
                out = bytearray()
                for request, error in refused:
                    waiter = request.future
                    assert isinstance(waiter, RemoteWaiter)
                    waiter.answered = True
                    fields = wire.error_fields(error)
                    out += wire.frame({"k": wire.RESULT, "i": waiter.token, **fields})
                connection.send(bytes(out))
            timed = [
                (r.future, r.deadline)
                for r, _ in requests
                if r.deadline is not None and not r.future.cancelled()
            ]
            if timed:
                self.loop.call_soon_threadsafe(
                    self._arm_deadlines, connection, timed, scheduler.observer
                )

    def _arm_deadlines(
        self,
        connection: FrontEndConnection,
        timed: list[tuple[Any, float]],
        observer: BatchObserver,
    ) -> None:
        for waiter, deadline in timed:
            if not waiter.answered:
                self._arm_deadline(connection, waiter, observer, deadline)

    def _arm_deadline(
        self,
        connection: FrontEndConnection,
        waiter: RemoteWaiter,
        observer: BatchObserver,
        deadline: float,
    ) -> None:
        self.loop.call_later(
            max(0.0, deadline - time.monotonic()), self._expire, connection, waiter, observer
        )

    def _expire(
        self, connection: FrontEndConnection, waiter: RemoteWaiter, observer: BatchObserver
    ) -> None:
        """A request's deadline passed before its answer: answer 504 now (as an in-process
        caller's wait does), count it, and let the worker skip it if it is still queued."""
        if not connection.claim(waiter):
            return
        waiter.expired = True
        observer.on_outcome("timeout")
        error = DeadlineExceededError("request deadline passed")
        connection.send(
            wire.frame({"k": wire.RESULT, "i": waiter.token, **wire.error_fields(error)})
        )

    def _start_on_loop(
        self, connection: FrontEndConnection, header: dict[str, Any], inputs: dict[str, Array]
    ) -> None:
        task = self.loop.create_task(self._infer_on_loop(connection, header, inputs))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _infer_on_loop(
        self, connection: FrontEndConnection, header: dict[str, Any], inputs: dict[str, Array]
    ) -> None:
        deadline = header["d"]
        timeout_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        waiter = RemoteWaiter(connection, header["i"])
        outcome: InferenceResult | BaseException
        try:
            outcome = await self.manager.infer(
                header["m"],
                inputs,
                version=header.get("v"),
                priority=header["p"],
                timeout_s=timeout_s,
            )
        except Exception as exc:
            outcome = exc
        await asyncio.to_thread(connection.deliver, [(waiter, outcome)])
