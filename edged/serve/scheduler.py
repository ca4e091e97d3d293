"""Per-model scheduler: a bounded priority queue drained by one inference worker thread.

Batching adds no delay when the worker is idle: a request runs at once, and whatever arrives
while the worker is busy forms the next batch (up to ``max_batch_size`` rows). So one caller
sees raw latency and a crowd gets batches. ``max_queue_delay_us`` > 0 additionally waits that
long for a batch to fill, trading latency for batch size. Models without a dynamic batch
dimension get one request per run.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edged.errors import (
    DeadlineExceededError,
    EdgedError,
    InferenceFailedError,
    ModelNotReadyError,
    QueueFullError,
    ShuttingDownError,
)
from edged.modelrepo.config import BatchingConfig
from edged.runtime.base import Array
from edged.serve.batching import Batch, fill
from edged.serve.slot import ModelSlot
from edged.serve.stall import StallDetector

log = logging.getLogger(__name__)

# Rows of each input, with the non-batch shape and dtype: requests batch together only when
# these match.
BatchSignature = tuple[tuple[str, tuple[int, ...], str], ...]

# A new version may change its priority levels; the queues exist for every level allowed.
MAX_PRIORITY_LEVELS = 16


@dataclass(frozen=True)
class InferenceResult:
    outputs: dict[str, Array]
    model_version: str
    batch_rows: int


class BatchObserver(Protocol):
    """Telemetry hook, called from the worker thread; must not block."""

    def on_batch(
        self,
        version: str,
        rows: int,
        queue_s: list[float],
        compute_start: float,
        compute_end: float,
    ) -> None: ...

    def on_outcome(self, outcome: str, count: int = 1) -> None:
        """``outcome``: rejected | timeout | dropped | error."""
        ...


class NullObserver:
    def on_batch(
        self, version: str, rows: int, queue_s: list[float], start: float, end: float
    ) -> None:
        pass

    def on_outcome(self, outcome: str, count: int = 1) -> None:
        pass


class ReplySink(Protocol):
    """Where the answers of requests from another process go (one write per call)."""

    def deliver(
        self, completions: list[tuple[RemoteWaiter, InferenceResult | BaseException]]
    ) -> None:
        """Errors of some requests, from the worker thread."""
        ...

    def deliver_batch(
        self,
        version: str,
        total_rows: int,
        outputs: dict[str, Array],
        rows: list[tuple[RemoteWaiter, int, int]],
    ) -> None:
        """The answers of a batch's requests that belong to this sink, from the sender
        thread: ``rows`` holds (waiter, first row in ``outputs``, rows)."""
        ...


class RemoteWaiter:
    """Waits for one request of another process: its answer goes straight from the worker
    thread to ``sink``, without a hop through the event loop. ``answered`` is set by whoever
    answers first (the worker, or the sink's deadline timer): a request is answered once."""

    __slots__ = ("answered", "expired", "sink", "timed", "token")

    def __init__(self, sink: ReplySink, token: object, timed: bool = False) -> None:
        self.sink = sink
        self.token = token
        self.timed = timed  # a deadline timer may answer it too
        self.answered = False
        self.expired = False  # its deadline passed before an answer: the worker may skip it

    def cancelled(self) -> bool:
        return self.expired


class PendingRequest:
    __slots__ = ("deadline", "enqueued_at", "future", "inputs", "rows", "signature")

    def __init__(
        self,
        inputs: dict[str, Array],
        rows: int,
        signature: BatchSignature,
        deadline: float | None,
        future: asyncio.Future[InferenceResult] | RemoteWaiter,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.signature = signature
        self.deadline = deadline
        self.future = future
        self.enqueued_at = time.monotonic()


Completion = tuple[
    "asyncio.Future[InferenceResult] | RemoteWaiter", "InferenceResult | BaseException"
]


class Scheduler:
    def __init__(
        self,
        slot: ModelSlot,
        batching: BatchingConfig,
        loop: asyncio.AbstractEventLoop,
        observer: BatchObserver | None = None,
        *,
        stuck_after_s: float = 60.0,
    ) -> None:
        self.slot = slot
        self.batching = batching
        self.observer: BatchObserver = observer or NullObserver()
        self._loop = loop
        self._cond = threading.Condition(threading.Lock())
        # Index 0 is the highest priority (protocol priority 1).
        self._queues: list[deque[PendingRequest]] = [deque() for _ in range(MAX_PRIORITY_LEVELS)]
        self._count = 0
        self._stopping = False
        self._worker_waiting = False  # guarded by _cond: only then does submit notify
        # Brackets each run: a worker inside one run for too long counts as hung.
        self.stall = StallDetector(stuck_after_s)
        # CPU this worker spent inside the runtime: the rest of its thread's CPU is the
        # scheduler's own per-request cost (bench/serving.py reports it).
        self.run_cpu_s = 0.0
        # Batches whose answers go to other processes, for the sender thread.
        self._send_cond = threading.Condition(threading.Lock())
        self._to_send: list[
            tuple[str, int, dict[str, Array], dict[ReplySink, list[tuple[RemoteWaiter, int, int]]]]
        ] = []
        self._sender: threading.Thread | None = None
        self._sending = False  # the sender is inside a send (answers must stay in order)
        self._thread = threading.Thread(
            target=self._work, name=f"edged-worker-{slot.name}", daemon=True
        )

    # --- event-loop side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._count

    def submit(
        self,
        inputs: dict[str, Array],
        rows: int,
        signature: BatchSignature,
        priority: int,
        deadline: float | None,
    ) -> asyncio.Future[InferenceResult]:
        future: asyncio.Future[InferenceResult] = self._loop.create_future()
        self._enqueue(PendingRequest(inputs, rows, signature, deadline, future), priority)
        return future

    def submit_remote_many(
        self, items: list[tuple[PendingRequest, int]]
    ) -> list[tuple[PendingRequest, EdgedError]]:
        """Queue several requests of other processes (``(request, priority)``, their futures
        ``RemoteWaiter``s) under one lock; what was refused, with why."""
        refused: list[tuple[PendingRequest, EdgedError]] = []
        with self._cond:
            for item, priority in items:
                if self._stopping:
                    refused.append(
                        (item, ShuttingDownError(f"model {self.slot.name!r} is shutting down"))
                    )
                elif self._count >= self.batching.max_queue_size:
                    self.observer.on_outcome("rejected")
                    refused.append((item, self._queue_full()))
                else:
                    self._queues[priority - 1].append(item)
                    self._count += 1
            if self._worker_waiting:
                self._cond.notify()
        return refused

    def _queue_full(self) -> QueueFullError:
        return QueueFullError(
            f"queue of model {self.slot.name!r} is full "
            f"({self.batching.max_queue_size} requests waiting); retry later"
        )

    def _enqueue(self, item: PendingRequest, priority: int) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDownError(f"model {self.slot.name!r} is shutting down")
            if self._count >= self.batching.max_queue_size:
                self.observer.on_outcome("rejected")
                raise self._queue_full()
            self._queues[priority - 1].append(item)
            self._count += 1
            if self._worker_waiting:  # a busy worker looks at the queue before it waits
                self._cond.notify()

    def stop(self) -> None:
        """Stop taking new work; the worker drains what is queued, then exits."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def worker_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def thread_cpu_s(self) -> float:
        """CPU seconds the worker and sender threads used so far."""
        sender = self._sender
        return thread_cpu_s(self._thread) + (thread_cpu_s(sender) if sender else 0.0)

    def _complete(
        self,
        completions: list[tuple[asyncio.Future[InferenceResult], InferenceResult | BaseException]],
    ) -> None:
        for future, outcome in completions:
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    # --- worker thread --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._count and not self._stopping:
                    self._worker_waiting = True
                    self._cond.wait()
                    self._worker_waiting = False
                if not self._count:
                    return
                batch = self._take_batch_locked()
            try:
                completions = self._run(batch)
            except BaseException as exc:  # never let the worker die silently
                log.exception("worker of %s failed", self.slot.name)
                completions = [(item.future, exc) for item in batch]
            if completions:
                self._deliver(completions)

    def _send_batches(
        self,
        version: str,
        total_rows: int,
        outputs: dict[str, Array],
        remote: dict[ReplySink, list[tuple[RemoteWaiter, int, int]]],
    ) -> None:
        """Hand a batch's answers for other processes to the sender thread: it copies and
        sends them while this worker already runs the next batch (the runtime releases the
        GIL, so the two overlap)."""
        if not self._count:
            # Nothing waits for this worker: sending from here is quicker than waking the
            # sender (a lone caller's latency).
            with self._send_cond:
                idle = not self._to_send and not self._sending
            if idle:
                self._send(version, total_rows, outputs, remote)
                return
        with self._send_cond:
            self._to_send.append((version, total_rows, outputs, remote))
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_loop, name=f"edged-sender-{self.slot.name}", daemon=True
                )
                self._sender.start()
            self._send_cond.notify()

    def _send_loop(self) -> None:
        while True:
            with self._send_cond:
                while not self._to_send:
                    self._send_cond.wait()
                work, self._to_send = self._to_send, []
                self._sending = True
            try:
                for version, total_rows, outputs, remote in work:
                    self._send(version, total_rows, outputs, remote)
            finally:
                with self._send_cond:
                    self._sending = False

    def _send(
        self,
        version: str,
        total_rows: int,
        outputs: dict[str, Array],
        remote: dict[ReplySink, list[tuple[RemoteWaiter, int, int]]],
    ) -> None:
        for sink, rows in remote.items():
            try:
                sink.deliver_batch(version, total_rows, outputs, rows)
            except Exception:  # a front end that went away must not stop the sending thread
                log.exception("answers of %s not delivered", self.slot.name)

    def _deliver(self, completions: list[Completion]) -> None:
        local: list[tuple[asyncio.Future[InferenceResult], InferenceResult | BaseException]] = []
        remote: dict[ReplySink, list[tuple[RemoteWaiter, InferenceResult | BaseException]]] = {}
        for waiter, outcome in completions:
            if isinstance(waiter, RemoteWaiter):
                remote.setdefault(waiter.sink, []).append((waiter, outcome))
            else:
                local.append((waiter, outcome))
        if local:
            self._loop.call_soon_threadsafe(self._complete, local)
        for sink, answers in remote.items():
            try:
                sink.deliver(answers)
            except Exception:  # a front end that went away must not stop the worker
                log.exception("answers of %s not delivered", self.slot.name)

    def _take_batch_locked(self) -> list[PendingRequest]:
        current = self.slot.current
        dynamic = current is not None and current.model.dynamic_batch
        max_rows = self.batching.max_batch_size if dynamic else 1
        delay_s = self.batching.max_queue_delay_us / 1e6
        batch: Batch[PendingRequest] = Batch()
        while True:
            taken = len(batch.items)
            complete = fill(batch, self._queues, max_rows)
            self._count -= len(batch.items) - taken
            first = batch.first_enqueued_at
            if complete or not delay_s or first is None:
                return batch.items
            remaining = first + delay_s - time.monotonic()
            if remaining <= 0 or self._stopping:
                return batch.items
            self._worker_waiting = True
            self._cond.wait(remaining)
            self._worker_waiting = False

    def _run(self, batch: list[PendingRequest]) -> list[Completion]:
        now = time.monotonic()
        completions: list[Completion] = []
        live: list[PendingRequest] = []
        for item in batch:
            if item.future.cancelled():  # the caller went away or timed out
                self.observer.on_outcome("dropped")
            elif item.deadline is not None and now > item.deadline:
                self.observer.on_outcome("timeout")
                completions.append(
                    (item.future, DeadlineExceededError("deadline passed while queued"))
                )
            else:
                live.append(item)
        if not live:
            return completions
        version = self.slot.acquire()
        if version is None:
            error = ModelNotReadyError(
                f"model {self.slot.name!r} has no version serving right now (being replaced)"
            )
            completions.extend((item.future, error) for item in live)
            return completions
        try:
            feeds = _concat([item.inputs for item in live])
            start = time.monotonic()
            cpu = time.thread_time()
            with self.stall.working():
                outputs = version.model.run(feeds)
            self.run_cpu_s += time.thread_time() - cpu
            end = time.monotonic()
        except EdgedError as exc:
            self.observer.on_outcome("error", len(live))
            completions.extend((item.future, exc) for item in live)
            return completions
        except Exception as exc:
            self.observer.on_outcome("error", len(live))
            log.error(
                "model %s version %s: %d request(s) failed: %s: %s",
                self.slot.name,
                version.version,
                len(live),
                type(exc).__name__,
                exc,
            )
            failure = InferenceFailedError(f"inference failed: {type(exc).__name__}: {exc}")
            failure.__cause__ = exc
            completions.extend((item.future, failure) for item in live)
            return completions
        finally:
            self.slot.release(version)
        total_rows = sum(item.rows for item in live)
        self.observer.on_batch(
            version.version, total_rows, [start - item.enqueued_at for item in live], start, end
        )
        offset = 0
        remote: dict[ReplySink, list[tuple[RemoteWaiter, int, int]]] = {}
        for item in live:
            waiter = item.future
            if type(waiter) is RemoteWaiter:
                # Another process's request: its rows go out with the rest of the batch.
                remote.setdefault(waiter.sink, []).append((waiter, offset, item.rows))
            else:
                part = (
                    outputs
                    if len(live) == 1
                    else {k: v[offset : offset + item.rows] for k, v in outputs.items()}
                )
                completions.append((waiter, InferenceResult(part, version.version, total_rows)))
            offset += item.rows
        if remote:
            self._send_batches(version.version, total_rows, outputs, remote)
        return completions


def _concat(feeds: list[dict[str, Array]]) -> dict[str, Array]:
    if len(feeds) == 1:
        return feeds[0]
    return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}


def thread_cpu_s(thread: threading.Thread) -> float:
    """CPU seconds ``thread`` (of this process) used so far; 0 when it is not running."""
    ident = thread.ident
    if ident is None or not thread.is_alive():
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except OSError:  # it ended a moment ago
        return 0.0
