"""Telemetry from the engine's worker threads to the control plane's hub.

The scheduler's ``BatchObserver`` is called once per batch on a worker thread; here it only
appends a tuple. The engine's event loop sends what piled up as one event at most every
``FLUSH_S``, and the control plane replays it into its ``TelemetryHub`` (the same observer calls
an in-process scheduler would have made: the clock is CLOCK_MONOTONIC, shared by processes).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from edged.serve.scheduler import BatchObserver

FLUSH_S = 0.1
Record = list[Any]  # ["b", model, version, rows, queue_s, start, end] | ["o", model, outcome, n]


class RelayObserver:
    def __init__(self, relay: TelemetryRelay, model: str) -> None:
        self._relay = relay
        self._model = model

    def on_batch(
        self, version: str, rows: int, queue_s: list[float], start: float, end: float
    ) -> None:
        self._relay.add(["b", self._model, version, rows, queue_s, start, end])

    def on_outcome(self, outcome: str, count: int = 1) -> None:
        self._relay.add(["o", self._model, outcome, count])


class TelemetryRelay:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, send: Callable[[list[Record]], None]
    ) -> None:
        self._loop = loop
        self._send = send
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def observer(self, model: str) -> BatchObserver:
        return RelayObserver(self, model)

    def add(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._loop.call_later, FLUSH_S, self.flush)

    def flush(self) -> None:
        with self._lock:
            records, self._records = self._records, []
            self._scheduled = False
        if records:
            self._send(records)


def replay(records: list[Record], observer: Callable[[str], BatchObserver]) -> None:
    """Feed relayed records into ``observer(model)`` (the control plane's telemetry)."""
    observers: dict[str, BatchObserver] = {}
    for record in records:
        model = record[1]
        target = observers.get(model)
        if target is None:
            target = observers[model] = observer(model)
        if record[0] == "b":
            target.on_batch(record[2], record[3], record[4], record[5], record[6])
        else:
            target.on_outcome(record[2], record[3])
