"""Start a real ``edged run`` process for a test and stop it cleanly, even on failure."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edged._net import free_ports
from edged._process import stop_process
from edged.config import ServerConfig
from tests.support.servers import accepting

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_MODELS = REPO_ROOT / "models"
SHARED_MODELS = REPO_ROOT.parent / "shared" / "models"


@dataclass
class DaemonProcess:
    process: subprocess.Popen[bytes]
    port: int
    socket_path: Path
    log_path: Path
    grpc_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def grpc_socket_url(self) -> str:
        """gRPC's Unix socket, where the repository extension's load and unload are accepted."""
        config = ServerConfig(socket_path=self.socket_path, grpc_port=self.grpc_port)
        return f"unix:{config.grpc_socket_path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = 60.0, count: int = 1) -> None:
        """Bounded poll of the log (real state) until ``text`` appears ``count`` times."""
        deadline = time.monotonic() + timeout_s
        while self.log().count(text) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout_s}s:\n{self.log()}")
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 30.0) -> int:
        stop_process(self.process, timeout_s)
        return self.process.returncode


def wait_ready(
    url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"daemon not ready after {timeout_s}s:\n{log_path.read_text()}")


def wait_listening(
    port: int, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 60.0
) -> None:
    """Bounded poll until ``port`` accepts connections (gRPC, which a front end serves; its
    HTTP readiness does not say that the gRPC listener is up yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}:\n{log_path.read_text()}")
        if accepting("127.0.0.1", port, 2):
            return
        time.sleep(0.05)
    raise RuntimeError(
        f"nothing listens on port {port} after {timeout_s}s:\n{log_path.read_text()}"
    )


@contextlib.contextmanager
def running_daemon(
    repo: Path,
    workdir: Path,
    config_text: str = "",
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    wait: bool = True,
    cwd: Path | None = None,
) -> Iterator[DaemonProcess]:
    """``edged run --models repo`` on free HTTP and gRPC ports and a socket in ``workdir``; a
    relative ``repo`` is relative to ``cwd`` (default: the test's working directory)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, grpc_port = free_ports(2)
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    socket_path = Path(tempfile.mkdtemp(prefix="edged-")) / "edged.sock"
    config = workdir / "edged.toml"
    config.write_text(config_text)
    log_path = workdir / "daemon.log"
    args = [
        sys.executable,
        "-m",
        "edged.cli.main",
        "run",
        "--models",
        str(repo),
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--socket",
        str(socket_path),
        "--config",
        str(config),
        "--state-dir",
        str(workdir / "state"),
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
    daemon = DaemonProcess(process, port, socket_path, log_path, grpc_port)
    try:
        if wait:
            wait_ready(daemon.url, process, log_path)
            wait_listening(grpc_port, process, log_path)
        yield daemon
    finally:
        daemon.stop()
