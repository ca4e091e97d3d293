"""What the control plane needs of the gRPC front end before a front end serves it, without
importing grpcio into the control plane."""

from __future__ import annotations

import socket

from edged.errors import ConfigError


def ensure_port_free(host: str, port: int) -> None:
    """Raise ``ConfigError`` when something listens on ``host:port`` already (a process that
    binds it later, a front end, cannot fail the daemon's start)."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(
                "server.grpc_port", f"cannot listen for gRPC on {host}:{port}: {exc.strerror}"
            ) from exc
