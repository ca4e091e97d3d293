"""``edged demo``: the whole loop on one machine. A throw-away CA with device and fleet
certificates and signing keys, a local Mosquitto with a mutual-TLS listener on loopback, the
daemon on the sample models, an inference, a signed push of a new version, the hot swap and the
new answers, and a telemetry record received over MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from edged._compat import TIMEOUT_ERRORS
from edged._net import free_port, free_ports
from edged._process import stop_process
from edged.errors import DemoStepFailedError, EdgedError

# Sample models shipped with the package: the demo needs no model generator (onnx) at run time.
# In a checkout ``models`` is a symlink to the top-level ``models/``; a wheel holds the files.
SHIPPED_MODELS = Path(__file__).resolve().parent / "models"
SHIPPED_SOURCES = Path(__file__).resolve().parent / "sources"  # the version the demo pushes
DEVICE = "demo-device"
MANAGER = "fleet-manager"
GROUP = "demo"


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "mosquitto"],
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        if Path("/usr/sbin/mosquitto").exists():
            return "/usr/sbin/mosquitto"
    raise DemoStepFailedError(
        "mosquitto is not installed: run `sudo apt-get install mosquitto` (scripts/dev demo does)"
    )


@dataclass
class Pki:
    ca_file: Path
    server_cert: Path
    server_key: Path
    device: tuple[Path, Path]
    manager: tuple[Path, Path]


def make_pki(directory: Path) -> Pki:
    from edged.fleet.pki import issue_client, issue_server, make_ca

    ca = make_ca("edged demo CA")
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    issue_server(ca, ("localhost", "127.0.0.1")).write(
        directory / "server.crt", directory / "server.key"
    )
    paths = {}
    for name in (DEVICE, MANAGER):
        issue_client(ca, name).write(directory / f"{name}.crt", directory / f"{name}.key")
        paths[name] = (directory / f"{name}.crt", directory / f"{name}.key")
    return Pki(
        ca_file, directory / "server.crt", directory / "server.key", paths[DEVICE], paths[MANAGER]
    )


@contextlib.contextmanager
def running_broker(directory: Path, pki: Pki, port: int) -> Iterator[Path]:
    """Mosquitto with one TLS listener on loopback that requires client certificates; the
    certificate CN is the username and the edged ACL applies."""
    from edged.fleet.acl import render_acl
    from edged.transport.topics import Topics

    acl = directory / "edged.acl"
    acl.write_text(render_acl(Topics(), {DEVICE: [GROUP]}, [MANAGER]))
    log = directory / "mosquitto.log"
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"""user {pwd.getpwuid(os.getuid()).pw_name}
allow_anonymous false
acl_file {acl}
persistence false
log_dest file {log}
listener {port} 127.0.0.1
cafile {pki.ca_file}
certfile {pki.server_cert}
keyfile {pki.server_key}
tls_version tlsv1.2
require_certificate true
use_identity_as_username true
"""
    )
    process = subprocess.Popen(
        [find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise DemoStepFailedError(
                    f"mosquitto did not start: {log.read_text() if log.exists() else ''}"
                )
            time.sleep(0.05)
        yield log
    finally:
        stop_process(process, 5)


@contextlib.contextmanager
def running_daemon(
    work: Path, models: Path, pki: Pki, broker_port: int, http_port: int, grpc_port: int
) -> Iterator[Path]:
    socket_path = work / "edged.sock"
    config = work / "edged.toml"
    cert, key = pki.device
    config.write_text(
        f"""[server]
host = "127.0.0.1"
port = {http_port}
grpc_port = {grpc_port}
socket = "{socket_path}"

[state]
directory = "{work / "state"}"

[mqtt]
enabled = true
host = "127.0.0.1"
port = {broker_port}
ca_file = "{pki.ca_file}"
cert_file = "{cert}"
key_file = "{key}"
groups = ["{GROUP}"]
reconnect_min_s = 0.1
reconnect_max_s = 2.0

[telemetry]
interval_s = 1.0
"""
    )
    log = work / "daemon.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edged.cli.main",
                "run",
                "--models",
                str(models),
                "--config",
                str(config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        from edged.api.client import Endpoint, LocalClient

        client = LocalClient(Endpoint(socket_path=socket_path), timeout_s=2)
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise DemoStepFailedError(
                    f"the daemon exited with {process.returncode}:\n{log.read_text()}"
                )
            with contextlib.suppress(EdgedError):
                if client.request("GET", "/v2/health/ready")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise DemoStepFailedError(
                    f"the daemon was not ready within 60 s:\n{log.read_text()}"
                )
            time.sleep(0.1)
        yield socket_path
    finally:
        stop_process(process, 20)


class Demo:
    def __init__(self, work: Path, smoke: bool, console: Console) -> None:
        self.work = work
        self.smoke = smoke
        self.console = console
        self.steps: list[tuple[str, bool, str]] = []

    def step(self, title: str, action: Callable[[], str]) -> None:
        self.console.rule(f"[bold]{len(self.steps) + 1}. {title}")
        try:
            detail = action()
        except (EdgedError, OSError, AssertionError) as exc:
            self.steps.append((title, False, str(exc)))
            self.console.print(f"[bold red]FAILED[/]: {exc}")
            raise DemoStepFailedError(f"step {len(self.steps)} ({title}) failed: {exc}") from exc
        self.steps.append((title, True, detail))
        self.console.print(f"[green]ok[/] {detail}")

    def run(self) -> int:
        pki_dir = self.work / "pki"
        keys_dir = self.work / "keys"
        holder: dict[str, Any] = {}

        def make_credentials() -> str:
            from edged.bundle.keys import generate_key, write_private_key
            from edged.bundle.trust import build_root, build_signers
            from edged.bundle.truststore import TrustStore

            holder["pki"] = make_pki(pki_dir)
            root, signer = generate_key(), generate_key()
            keys_dir.mkdir(parents=True, exist_ok=True)
            write_private_key(keys_dir / "root.key", root)
            write_private_key(keys_dir / "signer.key", signer)
            holder["signer"] = signer
            root_doc = build_root([root.public_key()], 1, [root])
            signers_doc = build_signers(
                [signer.public_key()], 1, 1, int(time.time()) + 30 * 86400, [root]
            )
            TrustStore(self.work / "device" / "state" / "trust").initialise(root_doc, signers_doc)
            return (
                f"CA, certificates for {DEVICE} and {MANAGER} in {pki_dir}; root and signing "
                f"keys in {keys_dir}; device trust store provisioned"
            )

        self.step("throw-away CA, device and fleet certificates, signing keys", make_credentials)
        # Triton's port for the API when it is free, so the README's curl lines work.
        http_port = free_port(8000 if not self.smoke else 0)
        broker_port, spare = [p for p in free_ports(3) if p != http_port][:2]
        grpc_port = free_port(8001) if not self.smoke and http_port != 8001 else spare
        pki: Pki = holder["pki"]
        with contextlib.ExitStack() as stack:

            def start_broker() -> str:
                stack.enter_context(running_broker(self.work, pki, broker_port))
                return (
                    f"mosquitto on 127.0.0.1:{broker_port}, TLS 1.2+, client certificates "
                    "required, edged ACL"
                )

            self.step("local mosquitto with a mutual-TLS listener", start_broker)

            def start_daemon() -> str:
                shutil.copytree(SHIPPED_MODELS, self.work / "models")
                holder["socket"] = stack.enter_context(
                    running_daemon(
                        self.work / "device",
                        self.work / "models",
                        pki,
                        broker_port,
                        http_port,
                        grpc_port,
                    )
                )
                from edged.fleet.channel import ManagerSettings, wait_online
                from edged.transport.tls import TlsFiles

                cert, key = pki.manager
                holder["settings"] = settings = ManagerSettings(
                    "127.0.0.1", broker_port, TlsFiles(pki.ca_file, cert, key)
                )
                asyncio.run(wait_online(settings, [DEVICE], timeout_s=30.0))
                return (
                    f"edged serving the sample models on http://127.0.0.1:{http_port}, gRPC "
                    f"127.0.0.1:{grpc_port} and {holder['socket']}; {DEVICE} online on the broker"
                )

            self.step("the daemon on the sample models", start_daemon)
            x = np.random.default_rng(1).standard_normal((1, 64), dtype=np.float32)

            def infer_v1() -> str:
                version, outputs = self._client(holder).infer("mlp", {"input": x})
                if version != "1":
                    raise DemoStepFailedError(f"expected version 1, got {version}")
                holder["v1"] = outputs["output"]
                head = np.array2string(outputs["output"][0, :4], precision=3)
                return f"mlp version {version} answers {head} ..."

            self.step("inference", infer_v1)

            def push_v2() -> str:
                from edged.bundle.build import BundleSpec, build_bundle_from_dir
                from edged.fleet.channel import push
                from edged.transport.topics import Target

                shutil.copytree(SHIPPED_SOURCES, self.work / "build")
                source = self.work / "build" / "mlp" / "2"
                bundle = self.work / "mlp-2.bundle"
                build_bundle_from_dir(
                    source, BundleSpec.starting_now("mlp", 2, 1), [holder["signer"]], bundle
                )

                def progress(outcome: Any) -> None:
                    self.console.print(f"  {outcome.device}: {outcome.state} {outcome.percent}%")

                result = asyncio.run(
                    push(
                        holder["settings"],
                        [holder["signer"]],
                        bundle,
                        Target.group(GROUP),
                        chunk_size=16384,
                        timeout_s=60,
                        on_progress=progress,
                    )
                )
                outcome = result.outcomes.get(DEVICE)
                if not result.ok or outcome is None:
                    raise DemoStepFailedError(f"push did not complete: {result.outcomes}")
                return (
                    f"signed bundle {bundle.name} ({bundle.stat().st_size} bytes) pushed to "
                    f"group {GROUP!r}: {DEVICE} {outcome.state}"
                )

            self.step("push a new signed version", push_v2)

            def infer_v2() -> str:
                version, outputs = self._client(holder).infer("mlp", {"input": x})
                if version != "2":
                    raise DemoStepFailedError(f"expected version 2 after the swap, got {version}")
                shift = float(np.mean(outputs["output"] - holder["v1"]))
                if abs(shift - 1.0) > 1e-3:
                    raise DemoStepFailedError(
                        f"version 2 should answer version 1 + 1.0; differs by {shift:.4f}"
                    )
                events = self._client(holder).json("GET", "/edged/v1/status")["events"]
                swap = next(e for e in reversed(events) if e["model"] == "mlp" and e["ok"])
                return (
                    f"hot swap {swap['from']} -> {swap['to']} ({swap['reason'].split(';')[0]}); "
                    f"mlp version 2 answers version 1's outputs + {shift:.3f}"
                )

            self.step("the hot swap and the new version's answers", infer_v2)

            def telemetry() -> str:
                record = asyncio.run(self._telemetry_record(holder["settings"]))
                model = record["models"].get("mlp", {})
                latency = model.get("latency_ms", {}).get("e2e", {})
                power = record.get("power") or {}
                return (
                    f"record seq {record['seq']} from {record['device']} over MQTT: "
                    f"mlp v{model.get('version')} "
                    f"requests={model.get('requests')} p50={latency.get('p50')} ms, "
                    f"cpu={record.get('system', {}).get('cpu_percent')}%, "
                    f"power={power.get('total_w') or 'unavailable (no sensor)'}"
                )

            self.step("telemetry", telemetry)
            if not self.smoke:
                self.console.rule("[bold]the demo keeps running: try it")
                self.console.print(
                    f"  edged status --socket {holder['socket']}\n"
                    f"  edged top --socket {holder['socket']}\n"
                    f"  curl -s localhost:{http_port}/metrics | head\n"
                    "Ctrl-C stops the daemon and the broker."
                )
                with contextlib.suppress(KeyboardInterrupt):
                    signal.pause()
        self.console.rule("[bold green]every step worked")
        return 0

    def _client(self, holder: dict[str, Any]) -> Any:
        from edged.api.client import Endpoint, LocalClient

        return LocalClient(Endpoint(socket_path=holder["socket"]))

    async def _telemetry_record(self, settings: Any) -> dict[str, Any]:
        from edged.transport.client import MqttClient
        from edged.transport.topics import Topics

        client = self._client({"socket": self.work / "device" / "edged.sock"})
        topic = Topics().telemetry(DEVICE)

        async def first_record() -> dict[str, Any]:
            async with MqttClient(settings.client_settings()) as mqtt:
                await mqtt.subscribe([topic], qos=1)
                # Some traffic once subscribed, so the next record has latency figures.
                for _ in range(20):
                    await asyncio.to_thread(
                        client.infer, "mlp", {"input": np.zeros((1, 64), np.float32)}
                    )
                async for message in mqtt.messages():
                    record: dict[str, Any] = json.loads(message.payload)
                    mlp = record.get("models", {}).get("mlp", {})
                    if record.get("type") == "telemetry" and mlp.get("requests"):
                        return record
            raise DemoStepFailedError("the broker connection closed before a telemetry record")

        try:
            return await asyncio.wait_for(first_record(), 20)
        except TIMEOUT_ERRORS:
            raise DemoStepFailedError(
                "no telemetry record with requests arrived within 20 s"
            ) from None


def run_demo(smoke: bool, workdir: Path | None, console: Console | None = None) -> int:
    console = console or Console()
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return Demo(workdir, smoke, console).run()
    # AF_UNIX socket paths must stay short.
    with tempfile.TemporaryDirectory(prefix="edged-demo-") as tmp:
        return Demo(Path(tmp), smoke, console).run()
