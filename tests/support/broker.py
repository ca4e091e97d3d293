"""A real Mosquitto broker for tests: mutual TLS on a free loopback port, the edged ACL,
persistence in a temporary directory (a restart keeps retained messages and sessions)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edged._net import free_ports
from edged._process import stop_process
from edged.fleet.acl import render_acl
from edged.transport.topics import Topics
from tests.support.pki import FLEET_MANAGER, FleetPki
from tests.support.servers import accepting

MOSQUITTO = Path("/usr/sbin/mosquitto")


def mosquitto_missing_reason() -> str | None:
    if MOSQUITTO.exists() or shutil.which("mosquitto"):
        return None
    return (
        "mosquitto is not installed (/usr/sbin/mosquitto); 'scripts/dev test' installs it "
        "with apt-get"
    )


def _mosquitto_binary() -> str:
    return str(MOSQUITTO) if MOSQUITTO.exists() else (shutil.which("mosquitto") or "mosquitto")


@dataclass
class Broker:
    directory: Path
    pki: FleetPki
    groups_by_device: Mapping[str, Sequence[str]]
    topics: Topics = field(default_factory=Topics)
    host: str = "127.0.0.1"
    # -1: a free port is picked (all three distinct).
    port: int = -1
    # A second listener whose certificate names another host (hostname checks must refuse it);
    # 0: none.
    wrong_host_port: int = -1
    # The fleet managers' listener: the client id is not bound to the certificate there, so
    # several tools may run at once (the shipped config restricts it to the managers' CA).
    manager_port: int = -1
    # A complete mosquitto.conf to run instead of the generated one (e.g. the shipped example).
    config_text: str | None = None
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        picked = iter(free_ports(3))
        self.port, self.wrong_host_port, self.manager_port = (
            next(picked) if p == -1 else p
            for p in (self.port, self.wrong_host_port, self.manager_port)
        )

    @property
    def conf_file(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def acl_file(self) -> Path:
        return self.directory / "acl"

    @property
    def log_file(self) -> Path:
        return self.directory / "mosquitto.log"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "data").mkdir(exist_ok=True)
        user = pwd.getpwuid(os.getuid()).pw_name
        if self.config_text is not None:
            # A generated config runs as generated (its own ``user``, e.g. started as root).
            self.conf_file.write_text(self.config_text + f"log_dest file {self.log_file}\n")
            return
        self.acl_file.write_text(render_acl(self.topics, self.groups_by_device, [FLEET_MANAGER]))
        tls = (
            f"cafile {self.pki.ca_file}\nrequire_certificate true\nuse_identity_as_username true\n"
        )
        # The certificate's CN is also the client id: no device can take over another's session.
        bound = tls + "use_username_as_clientid true\n"
        self.conf_file.write_text(
            f"""# written by tests/support/broker.py
user {user}
allow_anonymous false
acl_file {self.acl_file}
persistence true
persistence_location {self.directory / "data"}/
autosave_interval 1
max_queued_messages 100000
log_dest file {self.log_file}
log_type error
log_type warning
log_type notice
log_type information
connection_messages true

listener {self.port} {self.host}
certfile {self.pki.server_cert}
keyfile {self.pki.server_key}
{bound}
listener {self.wrong_host_port} {self.host}
certfile {self.pki.wrong_host_cert}
keyfile {self.pki.wrong_host_key}
{bound}
listener {self.manager_port} {self.host}
certfile {self.pki.server_cert}
keyfile {self.pki.server_key}
{tls}"""
        )

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.write_config()
        with open(self.directory / "stdout.log", "ab") as out:
            self.process = subprocess.Popen(
                [_mosquitto_binary(), "-c", str(self.conf_file)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.process.returncode}:\n{self.log()}\n"
                    + (self.directory / "stdout.log").read_text(errors="replace")
                )
            ports = [p for p in (self.port, self.wrong_host_port, self.manager_port) if p]
            if all(accepting(self.host, p) for p in ports):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen within {timeout_s}s:\n{self.log()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence file), then SIGKILL if it hangs."""
        stop_process(self.process, timeout_s)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@contextlib.contextmanager
def running_broker(
    directory: Path, pki: FleetPki, groups_by_device: Mapping[str, Sequence[str]]
) -> Iterator[Broker]:
    broker = Broker(directory, pki, groups_by_device)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
