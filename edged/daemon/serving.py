"""The serving processes as the control plane runs them: the listening sockets (bound here once
and inherited by every front end, so a front end that dies loses no queued connection), the
engine and its private socket, the front ends, and the private socket of the control plane's
own routes, to which front ends forward what they do not answer themselves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from edged._compat import TaskGroup
from edged._net import unix_socket_file
from edged.config import DaemonConfig
from edged.daemon.processes import BeforeRestart, Child, ChildState, describe_exit
from edged.daemon.zygote import Zygote, ZygoteProcess
from edged.engine.proxy import EngineProxy
from edged.engine.service import HEARTBEAT_S

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048  # a thousand clients connecting at once must not see a refused SYN


class ServingProcesses:
    def __init__(
        self,
        config: DaemonConfig,
        proxy: EngineProxy,
        front_ends: int,
        zygote: Zygote,
        power: bool = False,
    ) -> None:
        """``power``: the telemetry measures energy per inference, for the engine's gate."""
        self.config = config
        self.power = power
        self.zygote = zygote
        self.proxy = proxy
        self.front_end_count = front_ends
        self.runtime_dir = Path(
            tempfile.mkdtemp(prefix="edged-", dir=os.environ.get("RUNTIME_DIRECTORY"))
        )
        self.engine_path = str(self.runtime_dir / "engine.sock")
        self.control_path = str(self.runtime_dir / "control.sock")
        self.listeners: list[socket.socket] = []
        self._engine_listener: socket.socket | None = None
        self._engine_link: socket.socket | None = None  # the engine's end, until it started
        self.engine: Child | None = None
        self.front_ends: list[Child] = []
        self._lifelines: list[socket.socket] = []
        self._control_runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # The control plane's crash gate, awaited after the engine died and before it restarts.
        self.engine_crashed: BeforeRestart | None = None

    # --- start ------------------------------------------------------------------------------

    async def start(self, tg: TaskGroup, control_app: web.Application) -> list[str]:
        endpoints = self._bind_listeners()
        self._control_runner = web.AppRunner(control_app, access_log=None)
        await self._control_runner.setup()
        await web.UnixSite(self._control_runner, self.control_path).start()
        engine_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        engine_listener.bind(self.engine_path)
        engine_listener.listen(64)
        self._engine_listener = engine_listener
        self.engine = Child(
            ChildState("engine", "engine"),
            self._spawn_engine,
            on_exit=self._engine_exited,
            after_start=self._engine_started,
            before_restart=self.engine_crashed,
        )
        tg.create_task(self.engine.run(), name="engine")
        # The front ends start while the engine loads the models: they connect to its socket
        # (bound above) and wait in its backlog until it accepts.
        for number in range(1, self.front_end_count + 1):
            child = self._front_end(number)
            self.front_ends.append(child)
            tg.create_task(child.run(), name=f"front-end-{number}")
        await self.proxy.wait_started()
        return endpoints

    def _bind_listeners(self) -> list[str]:
        server = self.config.server
        endpoints = []
        if server.port >= 0:
            family, _, _, _, address = socket.getaddrinfo(
                server.host, server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(address)
            tcp.listen(LISTEN_BACKLOG)
            self.listeners.append(tcp)
            endpoints.append(f"http://{server.host}:{tcp.getsockname()[1]}")
        if server.socket_path is not None:
            path = server.socket_path
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with unix_socket_file(path, server.socket_mode):
                unix.bind(str(path))
            unix.listen(LISTEN_BACKLOG)
            self.listeners.append(unix)
            endpoints.append(f"unix:{path}")
        if server.grpc_port:
            # The first front end binds gRPC itself: a port in use fails the start here, not
            # as a front end that dies at every restart.
            from edged.api.grpc.listen import ensure_port_free

            ensure_port_free(server.host, server.grpc_port)
            endpoints.append(f"grpc://{server.host}:{server.grpc_port}")
        return endpoints

    # --- the engine -----------------------------------------------------------------------------

    def _spawn_engine(self) -> ZygoteProcess:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._engine_link = theirs
        task = asyncio.get_running_loop().create_task(self._talk_to_engine(ours))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        assert self._engine_listener is not None
        return ZygoteProcess(
            self.zygote,
            "edged.daemon.children:engine_main",
            (self.config, self.power, logging.getLogger().level, os.getpid()),
            [theirs.fileno(), self._engine_listener.fileno()],
        )

    def _engine_started(self, process: ZygoteProcess) -> None:
        if self._engine_link is not None:
            self._engine_link.close()  # the engine holds its end now
            self._engine_link = None

    async def _talk_to_engine(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        await self.proxy.serve(reader, writer)

    def _engine_exited(self, state: ChildState, code: int | None) -> None:
        serving = ", ".join(
            f"{m['name']}@{m['version']}" for m in self.proxy.status()["models"] if m["version"]
        )
        log.error(
            "the engine (pid %s) ended: %s, while serving %s; restarting it",
            state.last_pid or "?",
            describe_exit(code),
            serving or "no models",
        )

    def engine_healthy(self) -> bool:
        """Connected, and its heartbeat is recent: a frozen engine stops the watchdog pings."""
        return self.proxy.connected and self.proxy.status_age_s < 3 * HEARTBEAT_S

    # --- front ends ---------------------------------------------------------------------------

    def _front_end(self, number: int) -> Child:
        link: list[socket.socket] = []

        def spawn() -> ZygoteProcess:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._lifelines.append(ours)  # closing ours (or dying) ends the front end
            link.append(theirs)
            return ZygoteProcess(
                self.zygote,
                "edged.daemon.children:frontend_main",
                (
                    self.config,
                    number,
                    self.front_end_count,
                    self.engine_path,
                    self.control_path,
                    logging.getLogger().level,
                    os.getpid(),
                ),
                [theirs.fileno(), *(s.fileno() for s in self.listeners)],
            )

        def started(process: ZygoteProcess) -> None:
            while link:
                link.pop().close()  # the front end holds its end now

        return Child(
            ChildState(f"front-end-{number}", "front-end"),
            spawn,
            on_exit=self._front_end_exited,
            after_start=started,
        )

    def _front_end_exited(self, state: ChildState, code: int | None) -> None:
        log.error(
            "%s (pid %s) ended: %s; restarting it", state.name, state.last_pid, describe_exit(code)
        )

    # --- status and stop ----------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        children = [c for c in [self.engine, *self.front_ends] if c is not None]
        rows = [c.state.to_json() for c in children]
        engine = self.proxy.engine_status
        if rows and engine:
            rows[0]["front_ends_connected"] = engine.get("front_ends")
            rows[0]["requests"] = engine.get("requests")
        return rows

    def start_draining(self) -> None:
        for child in self.front_ends:
            child.terminate()

    async def stop(self, remaining: Callable[[], float]) -> None:
        for child in self.front_ends:
            child.terminate()
        # A front end keeps the same deadline and logs what it could not finish: give it a
        # moment past the deadline to say so before it is killed.
        await _wait_ended(self.front_ends, remaining() + 0.5)
        await self.proxy.close(remaining())
        if self.engine is not None:
            self.engine.terminate()
            await _wait_ended([self.engine], max(remaining(), 1.0))
        await self._cleanup()

    async def kill(self) -> None:
        children = [*self.front_ends, *([self.engine] if self.engine else [])]
        for child in children:
            child.kill()
        await _wait_ended(children, 2.0)  # SIGKILL: the zygote reports them at once
        await self._cleanup()

    async def _cleanup(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._control_runner is not None:
            await self._control_runner.cleanup()
        for sock in [*self.listeners, *self._lifelines]:
            sock.close()
        if self._engine_listener is not None:
            self._engine_listener.close()
        socket_path = self.config.server.socket_path
        if socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self.zygote.close()


async def _wait_ended(children: list[Child], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for child in children:
        process = child.process
        while process is not None and process.exitcode is None:
            if loop.time() > deadline:
                log.warning("%s did not stop in time: killing it", child.state.name)
                child.kill()
                break
            await asyncio.sleep(0.02)
