"""What the fleet-channel tests share: a pusher's steps against a real broker, the CLI, and
small predicates on progress reports."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np

from edged.api.client import Endpoint, LocalClient
from edged.fleet.channel import (
    ManagerSettings,
    PreparedBundle,
    deploy_command,
    publish_chunks,
    send_command,
    wait_progress,
)
from edged.transport.protocol import Progress
from edged.transport.topics import Target
from tests.support.broker import Broker
from tests.support.daemon import DaemonProcess
from tests.support.pki import FLEET_MANAGER, FleetPki, SigningKeys

T = TypeVar("T")
DEVICE_1 = Target.device("device-1")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def infer(daemon: DaemonProcess, x: np.ndarray[Any, Any]) -> tuple[str, np.ndarray[Any, Any]]:
    version, outputs = LocalClient(Endpoint(url=daemon.url), timeout_s=10).infer(
        "mlp", {"input": x}
    )
    return version, outputs["output"]


def cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def connection_args(broker: Broker, pki: FleetPki) -> list[str]:
    files = pki.client(FLEET_MANAGER)
    return [
        "--host",
        broker.host,
        "--port",
        str(broker.manager_port),
        "--ca-file",
        str(files.ca_file),
        "--cert-file",
        str(files.cert_file),
        "--key-file",
        str(files.key_file),
        "--op-timeout",
        "5",
    ]


def for_deployment(
    deployment_id: str, done: Callable[[Progress], bool]
) -> Callable[[Progress], bool]:
    return lambda p: p.deployment == deployment_id and done(p)


def terminal(progress: Progress) -> bool:
    return progress.terminal


async def announce(
    manager: ManagerSettings, signing: SigningKeys, prepared: PreparedBundle, target: Target
) -> None:
    """What push() does after the chunks: the signed announcement, and its accepted reply."""
    command = deploy_command(target, prepared.deployment)
    result = await send_command(
        manager, [signing.signer], target, "deploy", command=command, expected=["device-1"]
    )
    assert result.ok, result.replies


async def send_first_half(
    manager: ManagerSettings, signing: SigningKeys, prepared: PreparedBundle, device: str
) -> int:
    """Half the chunks, the announcement, and a wait until the device has them; the half."""
    d = prepared.deployment
    half = d.chunk_count // 2
    target = Target.device(device)
    await publish_chunks(manager, target, prepared, range(half))
    await announce(manager, signing, prepared, target)
    await wait_progress(manager, device, for_deployment(d.id, lambda p: p.chunks_done >= half))
    return half
