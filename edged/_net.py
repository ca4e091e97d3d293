"""Free loopback TCP ports, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import contextlib
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


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1. Each is held open until all are picked, so
    two calls in a row cannot hand out the same port, as separate ``free_port()`` calls can."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports
