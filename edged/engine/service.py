"""The engine process: the one ``ModelManager`` of the daemon (exactly one runtime session per
loaded version), its data plane for the front ends, and the control connection over which the
control plane loads, swaps, reloads, asks for status and hears of probations and telemetry.

The engine lives as long as its control connection: when the control plane goes away, so does
the engine (the same for front ends: nothing outlives the daemon's main process).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from edged.bundle.store import MODELS_DIR
from edged.bundle.swap_policy import policy_for_swap
from edged.config import DaemonConfig, ModelsConfig
from edged.engine import wire
from edged.engine.dataplane import DataPlane
from edged.engine.relay import Record, TelemetryRelay
from edged.errors import EdgedError, InvalidRequestError
from edged.runtime.budget import front_ends, usable_cores
from edged.serve.manager import ModelManager, SwapEvent
from edged.serve.probation_record import PROBATION_DIR, ProbationRecords
from edged.serve.watch import ProbationOutcome

log = logging.getLogger(__name__)

# How often the engine tells the control plane it is alive and how its workers are.
HEARTBEAT_S = 2.0


def models_config_fields(config: ModelsConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(config)
    fields["repository"] = str(config.repository)
    return fields


def models_config_from(fields: dict[str, Any]) -> ModelsConfig:
    return ModelsConfig(**{**fields, "repository": Path(fields["repository"])})


# Calls after which the front ends' views of the models must be new before the reply.
CHANGES_WHAT_SERVES = frozenset({"load_version", "load_model", "unload", "reload"})


class EngineService:
    def __init__(
        self,
        config: DaemonConfig,
        control: socket.socket,
        listener: socket.socket,
        power: bool = False,
    ) -> None:
        """``power``: the control plane measures energy per inference and sends the figures
        (without, the energy gate says "no power source")."""
        self.config = config
        self.power = power
        self._control_socket = control
        self._listener = listener
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Joules per inference by (model, version), as the control plane measured them.
        self.energy: dict[tuple[str, str], float] = {}

    def _send(self, header: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(wire.frame(header))

    def _event(self, name: str, **fields: Any) -> None:
        self._send({"k": wire.EVENT, "n": name, **fields})

    def _telemetry(self, records: list[Record]) -> None:
        self._event("telemetry", records=records)

    async def _probation(self, outcome: ProbationOutcome) -> None:
        self._event("probation", outcome=outcome.to_json())

    def _energy_per_inference(self, model: str, version: str) -> float | None:
        return self.energy.get((model, version))

    def _swap(self, event: SwapEvent) -> None:
        self._event("swap", swap=dataclasses.asdict(event))

    def status(self) -> dict[str, Any]:
        status = self.manager.status()
        status["engine"] = {
            "pid": os.getpid(),
            "front_ends": self.dataplane.front_ends,
            "requests": self.dataplane.requests_served,
            "stuck_workers": self.manager.stuck_workers(),
            "queue_depths": {k: list(v) for k, v in self.manager.queue_depths().items()},
            # The engine's own CPU per request, apart from the runtimes' compute: its reader
            # threads, its workers outside ``run``, and its event loop (this thread).
            "cpu": {
                "readers_s": self.dataplane.readers_cpu_s,
                "workers_outside_run_s": sum(
                    e.scheduler.thread_cpu_s - e.scheduler.run_cpu_s
                    for e in self.manager.entries.values()
                ),
                "loop_s": time.thread_time(),
            },
        }
        return status

    def _changed(self) -> None:
        self._event("status", status=self.status())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        relay = self.relay = TelemetryRelay(loop, self._telemetry)
        self.manager = ModelManager(
            config.models,
            relay.observer,
            store=config.state.directory / MODELS_DIR,
            worker_stuck_after_s=config.server.worker_stuck_after_s,
        )
        self.manager.front_ends = front_ends(usable_cores(), config.server.workers)
        self.manager.probation_policy = policy_for_swap
        self.manager.probation_listeners.append(self._probation)
        self.manager.swap_listeners.append(self._swap)
        # Crash-safe rollouts: the durable probation records (the control plane's crash gate
        # judges them before this process starts).
        self.manager.probation_records = ProbationRecords(config.state.directory / PROBATION_DIR)
        if self.power:
            self.manager.energy_per_inference = self._energy_per_inference
        reader, self._writer = await asyncio.open_unix_connection(sock=self._control_socket)
        self.dataplane = DataPlane(self.manager, self._listener, loop)
        await self.manager.start()
        # The views first: a front end that connects gets what serves, never an empty list.
        await self.dataplane.broadcast_views()
        self.dataplane.start()

        def changed() -> None:
            loop.call_soon_threadsafe(self._changed)

        self.manager.change_listeners.append(changed)
        self._event("started", status=self.status())
        heartbeat = loop.create_task(self._heartbeat())
        try:
            await self._serve_control(reader)
        finally:
            heartbeat.cancel()
            self.dataplane.close()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._event("status", status=self.status())

    async def _serve_control(self, reader: asyncio.StreamReader) -> None:
        buffer = bytearray()
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                log.info("the control plane went away: stopping")
                return
            buffer += chunk
            for header, _ in wire.frames(buffer):
                if header.get("k") != wire.CALL:
                    continue
                if header["m"] == "close":
                    await self._close(header)
                    return
                task = asyncio.get_running_loop().create_task(self._call(header))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _close(self, header: dict[str, Any]) -> None:
        self.dataplane.close()
        await self.manager.close(float(header["a"].get("timeout_s", 10.0)))
        self._send({"k": wire.REPLY, "i": header["i"], "ok": True})
        if self._writer is not None:
            with contextlib.suppress(OSError):
                await self._writer.drain()

    async def _call(self, header: dict[str, Any]) -> None:
        call_id, method, args = header["i"], header["m"], header.get("a", {})
        try:
            result = await self._dispatch(method, args)
            if method in CHANGES_WHAT_SERVES:
                # Every front end hears of the change before the caller does: a client that
                # loads or unloads a model through one front end finds it so on the others.
                await self.dataplane.broadcast_views()
        except EdgedError as exc:
            self._send({"k": wire.REPLY, "i": call_id, **wire.error_fields(exc)})
        except Exception as exc:
            log.exception("engine call %s failed", method)
            self._send({"k": wire.REPLY, "i": call_id, **wire.error_fields(exc)})
        else:
            self._send({"k": wire.REPLY, "i": call_id, "ok": True, "result": result})
        self._changed()

    async def _dispatch(self, method: str, args: dict[str, Any]) -> Any:
        manager = self.manager
        if method == "status":
            # What ran so far goes out first: the caller sees telemetry and status agree.
            self.relay.flush()
            return self.status()
        if method == "load_version":
            await manager.load_version(args["model"], Path(args["version_dir"]))
            return None
        if method == "load_model":
            return await manager.load_model(args["model"])
        if method == "unload":
            await manager.unload(args["model"])
            return None
        if method == "energy":
            self.energy = {(m, v): float(j) for m, v, j in args["figures"]}
            return None
        if method == "index":
            return await manager.index_async()
        if method == "reload":
            new = models_config_from(args["models"])
            manager.repository = new.repository
            manager.config = new
            await manager.reload_repository()
            return manager.model_names()
        raise InvalidRequestError(f"the engine has no call {method!r}")
