"""A real nginx (the Debian package) serving artifact directories over TLS for tests: each
``Site`` is one ``server`` block on its own free loopback port, with an optional per-connection
rate limit (so a transfer is still running when a test cuts it) and an optional client
certificate requirement (a private artifact store). Range requests are nginx's own."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edged._net import free_ports
from edged._process import stop_process
from tests.support.pki import FleetPki
from tests.support.servers import accepting

NGINX = Path("/usr/sbin/nginx")


def nginx_missing_reason() -> str | None:
    if NGINX.exists() or shutil.which("nginx"):
        return None
    return "nginx is not installed (/usr/sbin/nginx); 'scripts/dev test' installs it with apt-get"


@dataclass(frozen=True)
class Site:
    name: str
    rate: str = ""  # nginx limit_rate, e.g. "256k": bytes per second per connection
    client_cert: bool = False  # require a client certificate from the fleet CA


@dataclass
class Nginx:
    directory: Path
    pki: FleetPki
    sites: Sequence[Site]
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.ports = dict(
            zip((s.name for s in self.sites), free_ports(len(self.sites)), strict=True)
        )

    def root(self, site: str) -> Path:
        return self.directory / "sites" / site

    def base_url(self, site: str) -> str:
        return f"https://localhost:{self.ports[site]}/artifacts"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    def requests(self) -> list[tuple[str, int, str]]:
        """``(site, status, range header)`` of every request served so far."""
        if not self.access_log.exists():
            return []
        out = []
        for line in self.access_log.read_text().splitlines():
            m = re.match(r"^(\S+) (\d+) \"(.*)\" \d+$", line)
            if m:
                out.append((m.group(1), int(m.group(2)), m.group(3)))
        return out

    def write_config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        servers = []
        for site in self.sites:
            self.root(site.name).joinpath("artifacts").mkdir(parents=True, exist_ok=True)
            verify = (
                f"ssl_client_certificate {self.pki.ca_file};\n    ssl_verify_client on;"
                if site.client_cert
                else ""
            )
            rate = f"limit_rate {site.rate};" if site.rate else ""
            servers.append(
                f"""  server {{
    listen {self.host}:{self.ports[site.name]} ssl;
    server_name localhost;
    ssl_certificate {self.pki.server_cert};
    ssl_certificate_key {self.pki.server_key};
    {verify}
    root {self.root(site.name)};
    access_log {self.access_log} edged;
    location /artifacts/ {{ {rate} }}
  }}"""
            )
        temp = self.directory / "temp"
        temp.mkdir(exist_ok=True)
        user = f"user {pwd.getpwuid(os.getuid()).pw_name};" if os.geteuid() == 0 else ""
        conf = self.directory / "nginx.conf"
        conf.write_text(
            f"""# written by tests/support/nginx.py
{user}
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {self.directory / "nginx.pid"};
error_log {self.directory / "error.log"} info;
events {{ worker_connections 16384; }}
http {{
  log_format edged '$server_port $status "$http_range" $bytes_sent';
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  types {{ application/octet-stream bundle; }}
  sendfile on;
{chr(10).join(servers)}
}}
"""
        )
        return conf

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        conf = self.write_config()
        binary = str(NGINX) if NGINX.exists() else (shutil.which("nginx") or "nginx")
        with open(self.directory / "stdout.log", "ab") as out:
            self.process = subprocess.Popen(
                [
                    binary,
                    "-c",
                    str(conf),
                    "-p",
                    str(self.directory),
                    "-e",
                    str(self.directory / "error.log"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            if all(accepting(self.host, p) for p in self.ports.values()):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen within {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: nginx's fast shutdown closes every connection (a transfer is cut)."""
        stop_process(self.process, timeout_s)


@contextlib.contextmanager
def running_nginx(directory: Path, pki: FleetPki, sites: Sequence[Site]) -> Iterator[Nginx]:
    server = Nginx(directory, pki, sites)
    try:
        server.start()
        yield server
    finally:
        server.stop()
