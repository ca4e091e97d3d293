"""``edged doctor`` on a healthy device setup, then with each item broken in turn: every broken
item must be caught with a fail (or, for missing power sensors, a warn) and a hint."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from edged.bundle.build import BundleSpec, build_bundle_from_dir
from edged.bundle.offline import install_direct
from edged.daemon.doctor import FAIL, PASS, WARN, Check, DoctorOptions, run_checks
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.fleet.pki import Issued, new_key
from tests.support.broker import Broker, mosquitto_missing_reason, running_broker
from tests.support.daemon import SAMPLE_MODELS
from tests.support.pki import FleetPki, SigningKeys
from tests.telemetry.sysfs_trees import ORIN_NANO, build_tree

pytestmark = pytest.mark.integration


def expired_certificate(ca: Issued) -> Issued:
    """A device certificate from the fleet CA whose validity ended yesterday."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


@dataclass
class Device:
    root: Path
    config: Path
    state: Path
    pki: FleetPki
    broker: Broker

    def write_config(self, extra: str = "", **mqtt: object) -> None:
        files = self.pki.client("device-1")
        values: dict[str, object] = {
            "enabled": True,
            "host": self.broker.host,
            "port": self.broker.port,
            "ca_file": str(files.ca_file),
            "cert_file": str(files.cert_file),
            "key_file": str(files.key_file),
        }
        values.update(mqtt)
        lines = ["[mqtt]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
        lines += ["[state]", f"directory = {json.dumps(str(self.state))}"]
        lines += ["[telemetry]", f"sysfs_root = {json.dumps(str(self.root / 'sys'))}"]
        self.config.write_text("\n".join(lines) + "\n" + extra)

    def checks(self, **options: object) -> dict[str, Check]:
        result = run_checks(self.config, DoctorOptions(broker_timeout_s=3.0, **options))  # type: ignore[arg-type]
        return {c.item: c for c in result}


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    reason = mosquitto_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    pki = FleetPki(tmp_path / "pki")
    signing = SigningKeys(tmp_path / "keys")
    state = tmp_path / "state"
    signing.install_trust(state / "trust")
    source = tmp_path / "src" / "mlp" / "2"
    write_onnx_mlp(source, SAMPLE_MLP_LAYERS, seed=0)
    shutil.copy(SAMPLE_MODELS / "mlp" / "config.toml", source.parent / "config.toml")
    bundle = tmp_path / "mlp.bundle"
    build_bundle_from_dir(source, BundleSpec.starting_now("mlp", 2, 1), [signing.signer], bundle)
    assert install_direct(state, bundle).ok
    build_tree(tmp_path / "sys", ORIN_NANO)
    with running_broker(tmp_path / "broker", pki, {"device-1": []}) as broker:
        d = Device(tmp_path, tmp_path / "edged.toml", state, pki, broker)
        d.write_config()
        yield d


def test_a_healthy_device_passes_every_check(device: Device) -> None:
    checks = device.checks()
    # The test signers list is short-lived, so the doctor rightly warns that it expires soon.
    assert checks["trust store"].status == WARN
    assert "renewed signers list" in checks["trust store"].hint
    assert {item: c.status for item, c in checks.items() if c.status != PASS} == {
        "trust store": WARN
    }
    assert "mlp@2" in checks["store"].detail
    assert "VDD_IN" in checks["power sensors"].detail
    assert "device-1" in checks["broker"].detail


def test_invalid_config_fails(device: Device) -> None:
    device.config.write_text(device.config.read_text() + "[server]\nport = 'x'\n")
    check = device.checks()["config"]
    assert check.status == FAIL
    assert "server.port" in check.detail


def test_expired_certificate_and_open_key_file_fail(device: Device) -> None:
    files = device.pki.client("device-1")
    expired = device.root / "expired"
    expired.mkdir()
    expired_certificate(device.pki.ca).write(expired / "c.crt", expired / "c.key")
    os.chmod(files.key_file, 0o644)
    device.write_config(cert_file=str(expired / "c.crt"), key_file=str(files.key_file))
    checks = device.checks()
    assert checks["device certificate"].status == FAIL
    assert "expired" in checks["device certificate"].detail
    assert checks["key file"].status == FAIL
    assert "chmod 600" in checks["key file"].hint


def test_missing_trust_store_fails(device: Device) -> None:
    shutil.rmtree(device.state / "trust")
    check = device.checks()["trust store"]
    assert check.status == FAIL
    assert "edged trust init" in check.hint


def test_expired_signers_list_fails(device: Device) -> None:
    far_future = time.time() + 400 * 86400
    check = device.checks(now=lambda: far_future)["trust store"]
    assert check.status == FAIL
    assert "expired" in check.detail


def test_corrupt_store_fails(device: Device) -> None:
    weights = device.state / "models" / "mlp" / "2" / "model.onnx.data"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    check = device.checks()["store"]
    assert check.status == FAIL
    assert "version 2" in check.detail


def test_unreachable_broker_fails(device: Device) -> None:
    device.broker.stop()
    check = device.checks()["broker"]
    assert check.status == FAIL
    assert str(device.broker.port) in check.detail


def test_no_power_sensor_is_a_warning_not_a_number(device: Device) -> None:
    shutil.rmtree(device.root / "sys")
    (device.root / "sys").mkdir()
    check = device.checks()["power sensors"]
    assert check.status == WARN
    assert "unavailable" in check.detail


def test_low_disk_space_fails(device: Device) -> None:
    check = device.checks(min_free_bytes=2**62)["disk"]
    assert check.status == FAIL
    assert "MiB free" in check.detail


def test_insane_clock_fails(device: Device) -> None:
    check = device.checks(now=lambda: 978307200.0)["clock"]  # 2001-01-01
    assert check.status == FAIL
    assert "2001-01-01" in check.detail


def test_broken_onnxruntime_install_fails_and_sets_the_exit_code(
    device: Device, tmp_path: Path
) -> None:
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ImportError('libonnxruntime.so: cannot open shared object file')\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edged.cli.main",
            "doctor",
            "--json",
            "--config",
            str(device.config),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 1
    checks = {c["item"]: c for c in json.loads(result.stdout)}
    assert checks["onnxruntime"]["status"] == FAIL
    assert "libonnxruntime.so" in checks["onnxruntime"]["detail"]
