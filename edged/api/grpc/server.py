"""The gRPC front end's server: grpc.aio on the HTTP API's host and ``server.grpc_port``, and on
a Unix socket beside the HTTP one; started, drained and stopped by the daemon's lifecycle."""

from __future__ import annotations

import contextlib
import logging

import grpc

from edged._net import unix_socket_file
from edged.api.backend import InferenceBackend
from edged.api.grpc.service import SERVICE, InferenceService
from edged.api.shm import SharedMemoryRegistry
from edged.config import ServerConfig
from edged.errors import ConfigError

log = logging.getLogger(__name__)


class GrpcServer:
    def __init__(
        self,
        backend: InferenceBackend,
        shm: SharedMemoryRegistry | None,
        config: ServerConfig,
        *,
        share_port: bool = False,
        serve_unix_socket: bool = True,
    ) -> None:
        """``shm``: the registry the HTTP API uses too, so that a region registered over one
        protocol serves requests over the other (as Triton's). ``share_port``: several front
        ends listen on the TCP port (SO_REUSEPORT; the kernel spreads the connections);
        ``serve_unix_socket``: this one also serves the gRPC Unix socket (one process may)."""
        self.config = config
        self.share_port = share_port
        self.serve_unix_socket = serve_unix_socket
        self.service = InferenceService(backend, shm)
        self._server: grpc.aio.Server | None = None
        self.port = 0  # the TCP port bound (config.grpc_port, or any free one when that is 0)

    @property
    def inflight(self) -> int:
        return self.service.gate.inflight

    async def start(self) -> list[str]:
        """Listen and serve; the endpoints, for the log."""
        config = self.config
        server = grpc.aio.server(
            options=[
                # Off unless the daemon's own front ends share the port: another process on
                # it would share the connections silently. (The control plane checks that
                # nothing listens there before any front end starts.)
                ("grpc.so_reuseport", 1 if self.share_port else 0),
                ("grpc.max_receive_message_length", config.max_body_bytes),
                ("grpc.max_send_message_length", -1),
            ]
        )
        handlers = self.service.handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        add_registered = getattr(server, "add_registered_method_handlers", None)
        if add_registered is not None:  # grpcio >= 1.63: no per-call lookup by method name
            add_registered(SERVICE, handlers)
        host = f"[{config.host}]" if ":" in config.host else config.host  # IPv6
        self.port = self._bind(server, f"{host}:{config.grpc_port}", "server.grpc_port")
        endpoints = [f"{host}:{self.port}"]
        socket_path = config.grpc_socket_path if self.serve_unix_socket else None
        if socket_path is not None:
            with unix_socket_file(socket_path, config.socket_mode):
                self._bind(server, f"unix:{socket_path}", "server.socket")
            endpoints.append(f"unix:{socket_path}")
        await server.start()
        self._server = server
        return [f"grpc://{e}" if not e.startswith("unix:") else f"grpc+{e}" for e in endpoints]

    @staticmethod
    def _bind(server: grpc.aio.Server, address: str, key: str) -> int:
        try:
            return server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(key, f"cannot listen for gRPC on {address}: {exc}") from exc

    def start_draining(self) -> None:
        """New calls get UNAVAILABLE from now on; admitted ones go on."""
        self.service.gate.start_draining()

    async def drained(self, timeout_s: float) -> bool:
        return await self.service.gate.drained(timeout_s)

    async def stop(self, grace_s: float) -> None:
        """Close the listeners; calls still running get ``grace_s`` before they are cancelled."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace_s)
        self._remove_socket()
        close = getattr(self.service.backend, "close", None)  # a backend with a session
        if close is not None:
            await close()

    def _remove_socket(self) -> None:
        socket_path = self.config.grpc_socket_path
        if socket_path is not None and self.serve_unix_socket:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
