"""What the real servers the tests start (mosquitto, nginx, edged) have in common: whether a
port accepts connections. (Their stop that cannot hang is ``edged._process.stop_process``.)"""

from __future__ import annotations

import contextlib
import socket


def accepting(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """True when something accepts a TCP connection on ``host:port`` now."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout_s):
        return True
    return False
