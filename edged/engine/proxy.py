"""The control plane's handle on the engine process: what the installer, the fleet agent, the
operator API and telemetry used to call on an in-process ``ModelManager``.

Calls that change something (load, unload, reload) go to the engine and wait for its answer;
``status()`` and friends answer from the last status the engine sent (after every change, and
as a heartbeat), so a status query never waits on the engine. While no engine is connected
(starting, restarting after a crash) calls fail with ``EngineUnavailableError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edged._compat import TIMEOUT_ERRORS
from edged.config import ModelsConfig
from edged.engine import wire
from edged.engine.relay import replay
from edged.engine.service import models_config_fields
from edged.errors import EngineUnavailableError
from edged.serve.manager import SwapEvent
from edged.serve.scheduler import BatchObserver
from edged.serve.watch import ProbationOutcome

log = logging.getLogger(__name__)

ProbationListener = Callable[[ProbationOutcome], Awaitable[None]]


class EngineProxy:
    def __init__(self, config: ModelsConfig, observer: Callable[[str], BatchObserver]) -> None:
        self.config = config
        self.repository = config.repository
        self._observer = observer
        self._observers: dict[str, BatchObserver] = {}
        self.probation_listeners: list[ProbationListener] = []
        self.swap_listeners: list[Callable[[SwapEvent], None]] = []
        self._writer: asyncio.StreamWriter | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._status_calls: set[int] = set()
        self._ids = itertools.count(1)
        self._status: dict[str, Any] = {"ready": False, "models": [], "events": []}
        self._status_at = 0.0
        self._connected = asyncio.Event()
        self._started = asyncio.Event()
        self._background: set[asyncio.Future[None]] = set()

    # --- the connection (one engine at a time) ----------------------------------------------

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def wait_started(self) -> None:
        await self._started.wait()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Talk to one engine until its connection ends (the engine stopped or died)."""
        self._writer = writer
        self._connected.set()
        buffer = bytearray()
        try:
            while True:
                chunk = await reader.read(262144)
                if not chunk:
                    return
                buffer += chunk
                for header, _ in wire.frames(buffer):
                    self._dispatch(header)
        finally:
            self._writer = None
            self._connected.clear()
            self._started.clear()
            self._status = {**self._status, "ready": False}
            for future in self._calls.values():
                if not future.done():
                    future.set_exception(
                        EngineUnavailableError("the engine stopped before it answered")
                    )
            self._calls.clear()
            self._status_calls.clear()
            with contextlib.suppress(OSError):
                writer.close()

    def _dispatch(self, header: dict[str, Any]) -> None:
        kind = header.get("k")
        if kind == wire.REPLY:
            call_id = header["i"]
            future = self._calls.pop(call_id, None)
            if header.get("ok") and call_id in self._status_calls:
                # Applied here, in the order the engine sent it: a later status event must
                # not be overwritten when the caller resumes.
                self._status = header["result"]
                self._status_at = time.monotonic()
            self._status_calls.discard(call_id)
            if future is None or future.done():
                return
            if header.get("ok"):
                future.set_result(header.get("result"))
            else:
                future.set_exception(wire.error_from(header))
        elif kind == wire.EVENT:
            name = header["n"]
            if name == "telemetry":
                replay(header["records"], self._observer_for)
            elif name in ("status", "started"):
                self._status = header["status"]
                self._status_at = time.monotonic()
                if name == "started":
                    self._started.set()
            elif name == "swap":
                event = SwapEvent(**header["swap"])
                for hear in self.swap_listeners:
                    try:
                        hear(event)
                    except Exception:  # a listener's bug must not stop the engine's events
                        log.exception("swap listener failed for %s", event.model)
            elif name == "probation":
                outcome = ProbationOutcome(**header["outcome"])
                for listener in self.probation_listeners:
                    task = asyncio.ensure_future(listener(outcome))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    def _observer_for(self, model: str) -> BatchObserver:
        observer = self._observers.get(model)
        if observer is None:
            observer = self._observers[model] = self._observer(model)
        return observer

    async def call(self, method: str, wait_s: float | None = None, **args: Any) -> Any:
        writer = self._writer
        if writer is None:
            raise EngineUnavailableError(
                "the engine is not running (starting or restarting); retry shortly"
            )
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        if method == "status":
            self._status_calls.add(call_id)
        writer.write(wire.frame({"k": wire.CALL, "i": call_id, "m": method, "a": args}))
        if wait_s is None:
            return await future
        return await asyncio.wait_for(future, wait_s)

    # --- what a ModelManager offered ------------------------------------------------------

    async def load_version(self, model: str, version_dir: Path) -> None:
        await self.call("load_version", model=model, version_dir=str(version_dir))

    async def load_model(self, name: str) -> str:
        version: str = await self.call("load_model", model=name)
        return version

    async def unload(self, name: str) -> None:
        await self.call("unload", model=name)

    async def index_async(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.call("index")
        return rows

    async def reload_repository(self) -> None:
        await self.call("reload", models=models_config_fields(self.config))

    async def refresh(self) -> dict[str, Any]:
        """The engine's status now (not the last one it sent), with the telemetry of every
        batch that ran so far replayed first; the last status when no engine answers."""
        try:
            await self.call("status", wait_s=5.0)  # _dispatch applies it, in order
        except EngineUnavailableError:
            pass
        except TIMEOUT_ERRORS:
            log.warning("the engine did not answer a status call within 5s")
        return self._status

    async def close(self, timeout_s: float) -> bool:
        """Let the engine drain its queues and release every model; False: it did not answer."""
        try:
            await self.call("close", wait_s=max(timeout_s, 0.001) + 1.0, timeout_s=timeout_s)
        except EngineUnavailableError:
            return False
        except TIMEOUT_ERRORS:
            return False
        return True

    def status(self) -> dict[str, Any]:
        status = dict(self._status)
        status.pop("engine", None)
        return status

    @property
    def engine_status(self) -> dict[str, Any]:
        engine: dict[str, Any] = self._status.get("engine", {})
        return engine

    @property
    def status_age_s(self) -> float:
        return time.monotonic() - self._status_at

    @property
    def ready(self) -> bool:
        return self.connected and bool(self._status.get("ready"))

    def model_names(self) -> list[str]:
        return sorted(m["name"] for m in self._status.get("models", []))

    def queue_depths(self) -> dict[str, tuple[str | None, int]]:
        depths = self.engine_status.get("queue_depths", {})
        return {name: (value[0], value[1]) for name, value in depths.items()}

    def stuck_workers(self) -> dict[str, float]:
        stuck: dict[str, float] = self.engine_status.get("stuck_workers", {})
        return stuck

    def running_workers(self) -> list[str]:
        return []  # the engine's own threads: the engine process exits on its own terms
