"""A free loopback TCP port, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import socket


def free_port(preferred: int = 0) -> int:
    """``preferred`` when it is free, else any free port on 127.0.0.1."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
