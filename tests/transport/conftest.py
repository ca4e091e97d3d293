"""Fixtures for the fleet channel: a PKI, a real Mosquitto with the edged ACL, signing keys and
a trust store, signed bundles of the sample MLP, and device daemons (real ``edged run``)."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.bundle.build import BundleSpec, build_bundle_from_dir
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.fleet.channel import ManagerSettings
from edged.modelrepo.config import TEST_VECTORS_FILE
from edged.transport.tls import TlsFiles
from tests.support.broker import Broker, mosquitto_missing_reason, running_broker
from tests.support.daemon import SAMPLE_MODELS, DaemonProcess, running_daemon, wait_ready
from tests.support.pki import FLEET_MANAGER, FleetPki, SigningKeys

GROUPS = {"device-1": ["lab"], "device-2": ["lab"], "device-3": ["lab"], "device-9": ["north"]}
CHUNK_BYTES = 4096  # the ~130 KB sample bundle makes 33 chunks


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    return FleetPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def signing(tmp_path_factory: pytest.TempPathFactory) -> SigningKeys:
    return SigningKeys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def broker(tmp_path: Path, pki: FleetPki) -> Iterator[Broker]:
    reason = mosquitto_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    with running_broker(tmp_path / "broker", pki, GROUPS) as b:
        yield b


@pytest.fixture
def manager(broker: Broker, pki: FleetPki) -> ManagerSettings:
    files = pki.client(FLEET_MANAGER)
    return ManagerSettings(
        broker.host,
        broker.manager_port,
        TlsFiles(files.ca_file, files.cert_file, files.key_file),
        timeout_s=5.0,
    )


@dataclass(frozen=True)
class Bundle:
    path: Path
    version: int
    version_dir: Path  # the source, for its test vectors

    def vectors(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        with np.load(self.version_dir / TEST_VECTORS_FILE) as npz:
            return npz["input:input"], npz["output:output"]


@dataclass
class Bundles:
    """Signed bundles of the sample MLP, version N with its weights shifted by N/4."""

    directory: Path
    signing: SigningKeys
    built: dict[int, Bundle] = field(default_factory=dict)

    def mlp(self, version: int) -> Bundle:
        if version not in self.built:
            source = self.directory / "src" / "mlp" / str(version)
            write_onnx_mlp(source, SAMPLE_MLP_LAYERS, seed=0, bias_shift=version / 4)
            shutil.copy(SAMPLE_MODELS / "mlp" / "config.toml", source.parent / "config.toml")
            out = self.directory / f"mlp-{version}.bundle"
            spec = BundleSpec.starting_now("mlp", version, version)
            build_bundle_from_dir(source, spec, [self.signing.signer], out)
            self.built[version] = Bundle(out, version, source)
        return self.built[version]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, signing: SigningKeys) -> Bundles:
    return Bundles(tmp_path_factory.mktemp("bundles"), signing)


def mqtt_config(broker: Broker, pki: FleetPki, device: str, **overrides: object) -> str:
    """A daemon config with the fleet channel on, short timeouts for tests."""
    files = pki.client(device)
    values: dict[str, object] = {
        "enabled": True,
        "host": broker.host,
        "port": broker.port,
        "ca_file": str(files.ca_file),
        "cert_file": str(files.cert_file),
        "key_file": str(files.key_file),
        "groups": GROUPS.get(device, []),
        "keepalive_s": 5,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 1.0,
        "operation_timeout_s": 5.0,
        "download_stall_timeout_s": 20.0,
        "download_reserve_bytes": 0,
        "progress_interval_s": 0.05,
    }
    values.update(overrides)
    lines = ["[mqtt]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Devices:
    """Starts device daemons that share one model repository and the test's trust store."""

    workdir: Path
    repo: Path
    broker: Broker
    pki: FleetPki
    signing: SigningKeys
    stack: contextlib.ExitStack

    def workdir_of(self, device: str) -> Path:
        return self.workdir / device

    def start(self, device: str, *, wait: bool = True, **overrides: object) -> DaemonProcess:
        work = self.workdir_of(device)
        trust = work / "state" / "trust"
        if not trust.exists():
            self.signing.install_trust(trust)
        config = mqtt_config(self.broker, self.pki, device, **overrides)
        return self.stack.enter_context(running_daemon(self.repo, work, config, wait=wait))

    def start_many(self, devices: list[str]) -> list[DaemonProcess]:
        """Start several daemons at once (they load their models in parallel)."""
        started = [self.start(d, wait=False) for d in devices]
        for daemon in started:
            wait_ready(daemon.url, daemon.process, daemon.log_path)
        return started


@pytest.fixture
def devices(
    tmp_path: Path, model_repo: Path, broker: Broker, pki: FleetPki, signing: SigningKeys
) -> Iterator[Devices]:
    with contextlib.ExitStack() as stack:
        yield Devices(tmp_path / "devices", model_repo, broker, pki, signing, stack)
