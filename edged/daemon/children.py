"""The entry points of the daemon's child processes: the engine and the front ends.

They are forked by the zygote (``edged.daemon.zygote``) after the heavy modules are imported
(numpy, the runtimes, aiohttp, edged), so children start in milliseconds and share those
pages. Both ignore SIGINT (Ctrl-C reaches the whole process group; the control plane decides)
and end when the control plane goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING

from aiohttp import web

from edged._compat import TIMEOUT_ERRORS
from edged.api.app import build_data_app
from edged.api.context import GATE, SHM
from edged.api.forward import add_forwarding
from edged.config import DaemonConfig
from edged.daemon.loops import run_loop
from edged.engine.client import EngineClient
from edged.engine.service import EngineService
from edged.errors import EdgedError

if TYPE_CHECKING:  # grpcio is imported only where gRPC is served
    from edged.api.grpc.server import GrpcServer

log = logging.getLogger(__name__)

# The GIL switch interval of the engine (seconds), overridable for measuring the hand-off
# between its threads (bench/serving.py --switch-interval).
SWITCH_INTERVAL_ENV = "EDGED_ENGINE_SWITCH_INTERVAL_S"
ENGINE_SWITCH_INTERVAL_S = 0.0005

# What the zygote imports before it forks anyone (shared, copy-on-write, by every child).
PRELOAD = (
    "edged.daemon.children",
    "edged.runtime.onnx",
    "edged.runtime.litert",
    "onnxruntime",
    "ai_edge_litert.interpreter",
    # grpcio starts no thread at import; imported here, its 18 MiB are shared, not the first
    # front end's own.
    "edged.api.grpc.server",
)


def configure_logging(role: str, level: int) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s",
        force=True,
    )


def end_with(control_plane: int) -> None:
    """Exit as soon as the control plane's process ends, whatever this process is doing (a
    model still loading, a worker stuck in a run): nothing outlives the daemon's main process."""
    try:
        pidfd = os.pidfd_open(control_plane)
    except (OSError, AttributeError):  # gone already, or a kernel before 5.3
        if not _alive(control_plane):
            os._exit(1)
        return

    def wait() -> None:
        select.select([pidfd], [], [])
        log.warning("the control plane (pid %d) is gone: exiting", control_plane)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=wait, name="edged-lifeline", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def engine_main(
    config: DaemonConfig, power: bool, log_level: int, control_plane: int, fds: list[int]
) -> None:
    """``power``: the control plane measures energy per inference (and sends the figures);
    ``fds``: the control connection, then the engine's listening socket."""
    control, listener = (socket.socket(fileno=fd) for fd in fds)
    configure_logging("engine", log_level)
    # The engine's threads (a reader per front end, a worker and a sender per model, the loop)
    # hand requests to each other: one waiting for the GIL waits up to the switch interval.
    # 0.5 ms instead of Python's 5 ms served 12 % more at 64 clients on 12 cores
    # (bench/serving.py --switch-interval, docs/serving.md).
    sys.setswitchinterval(float(os.environ.get(SWITCH_INTERVAL_ENV) or ENGINE_SWITCH_INTERVAL_S))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with(control_plane)
    service = EngineService(config, control, listener, power)
    try:
        run_loop(service.run())
    except EdgedError as exc:
        log.error("engine failed: %s", exc)
        sys.exit(1)
    manager = getattr(service, "manager", None)
    if manager is not None and manager.running_workers():
        # A runtime torn down by interpreter exit while a thread runs inside it aborts.
        logging.shutdown()
        os._exit(0)


FIRST_FRONT_END = 1  # ServingProcesses numbers its front ends from 1


async def _start_grpc(
    config: DaemonConfig,
    number: int,
    front_ends: int,
    client: EngineClient,
    app: web.Application,
    control_path: str,
) -> GrpcServer | None:
    """KServe v2 gRPC in every front end. grpcio binds its own sockets (it cannot serve an
    inherited one), so the front ends share the TCP port with SO_REUSEPORT; the Unix socket,
    which cannot be shared, is the first front end's."""
    if not config.server.grpc_port:
        return None
    from edged.api.grpc.control import ControlPlaneRepository
    from edged.api.grpc.server import GrpcServer

    grpc = GrpcServer(
        ControlPlaneRepository(client, control_path),
        app[SHM],
        config.server,
        share_port=front_ends > 1,
        serve_unix_socket=number == FIRST_FRONT_END,
    )
    log.info("front end %d serving gRPC on %s", number, ", ".join(await grpc.start()))
    return grpc


def frontend_main(
    config: DaemonConfig,
    number: int,
    front_ends: int,
    engine_path: str,
    control_path: str,
    log_level: int,
    control_plane: int,
    fds: list[int],
) -> None:
    """``fds``: the lifeline to the control plane, then the listening sockets."""
    lifeline, *listeners = (socket.socket(fileno=fd) for fd in fds)
    configure_logging(f"front-end-{number}", log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with(control_plane)
    run_loop(
        _serve_front_end(config, number, front_ends, listeners, engine_path, control_path, lifeline)
    )


async def _serve_front_end(
    config: DaemonConfig,
    number: int,
    front_ends: int,
    listeners: list[socket.socket],
    engine_path: str,
    control_path: str,
    lifeline: socket.socket,
) -> None:
    loop = asyncio.get_running_loop()
    server = config.server
    client = EngineClient(engine_path, f"front end {number}")
    keep_connected = loop.create_task(client.run())
    app = build_data_app(client, server.max_body_bytes, server.shared_memory_enabled)
    add_forwarding(app, control_path)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=min(1.0, server.drain_timeout_s),
    )
    await runner.setup()
    grpc = await _start_grpc(config, number, front_ends, client, app, control_path)
    for listener in listeners:
        await web.SockSite(runner, listener).start()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    lifeline.setblocking(False)
    gone = loop.create_task(loop.sock_recv(lifeline, 1))
    stopping = loop.create_task(stop.wait())
    await asyncio.wait([gone, stopping], return_when=asyncio.FIRST_COMPLETED)
    if gone.done():  # the control plane is gone: nothing to drain for
        log.warning("the control plane went away: stopping")
        os._exit(1)
    # The ordered drain: new requests get 503 + Retry-After, admitted ones finish.
    deadline = loop.time() + server.drain_timeout_s
    gate = app[GATE]
    gate.start_draining()
    if grpc is not None:  # new gRPC calls get UNAVAILABLE
        grpc.start_draining()
    await asyncio.sleep(min(server.drain_grace_s, server.drain_timeout_s))
    with contextlib.suppress(*TIMEOUT_ERRORS):
        if not await gate.drained(max(0.0, deadline - loop.time())) or (
            grpc is not None and not await grpc.drained(max(0.0, deadline - loop.time()))
        ):
            inflight = gate.inflight + (grpc.inflight if grpc is not None else 0)
            log.warning("%d request(s) still running after %.1fs", inflight, server.drain_timeout_s)
    await runner.cleanup()
    if grpc is not None:
        await grpc.stop(min(1.0, max(0.0, deadline - loop.time())))
    keep_connected.cancel()
    gone.cancel()
