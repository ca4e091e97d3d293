"""What the real servers the tests start (mosquitto, nginx, edged) have in common: whether a
port accepts connections, and a stop that cannot hang."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess


def accepting(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """True when something accepts a TCP connection on ``host:port`` now."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout_s):
        return True
    return False


def stop_process(process: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
