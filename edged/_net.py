"""Sockets: a Unix socket file with exact permissions (the daemon's HTTP and gRPC sockets), and
free loopback TCP ports, for the demo, the tests and the benchmarks.

Ports are picked below the kernel's ephemeral range. ``bind(0)`` hands out a port from that
range, and so does every outgoing ``connect()``: a port picked with ``bind(0)`` and released
can be taken by some client's connection before the server binds it ("Address already in
use"). Below the range only another listener can take it.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000
_ATTEMPTS = 200


@contextlib.contextmanager
def unix_socket_file(path: Path, mode: int) -> Iterator[None]:
    """Bind a Unix socket at ``path`` inside this block: a stale socket file is removed first,
    the socket is created under a tight umask so it never exists with looser permissions than
    ``mode``, and gets exactly ``mode`` once bound."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_umask = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)


def _candidates() -> range:
    """The ports below the ephemeral range (or above it, where it starts too low)."""
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    if low - _LOWEST >= 2_000:
        return range(_LOWEST, low)
    return range(high + 1, 65536)


def _bind(s: socket.socket, port: int) -> bool:
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def free_port(preferred: int = 0) -> int:
    """``preferred`` when it is free, else a free port on 127.0.0.1."""
    if preferred:
        with socket.socket() as s:
            if _bind(s, preferred):
                return preferred
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1, outside the ephemeral range. Each is held
    open until all are picked, so one call cannot hand out the same port twice; the random
    pick keeps calls in a row from handing out the same one either."""
    candidates = _candidates()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(_ATTEMPTS):
            if len(ports) == count:
                break
            port = random.choice(candidates)  # noqa: S311 - spreading picks, not secrets
            s = stack.enter_context(socket.socket())
            if port not in ports and _bind(s, port):
                ports.append(port)
        if len(ports) < count:
            raise OSError(f"no {count} free ports between {candidates.start} and {candidates.stop}")
        return ports
