"""The fleet directory and its PKI: ``edged fleet init`` once, then ``add-device``,
``add-manager``, ``renew``, ``set-groups``; nothing ever replaces a CA or a key."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from edged.cli.app import run_cli
from edged.errors import FleetSetupError, TlsSetupError
from edged.fleet.directory import (
    FleetDir,
    add_device,
    add_manager,
    init_fleet,
    manager_context,
    renew,
    set_groups,
)
from edged.fleet.pki import load_cert, make_csr
from edged.transport.tls import TlsFiles, certificate_common_name, client_context


def issued_by(cert_file: Path, ca_file: Path) -> bool:
    try:
        load_cert(cert_file).verify_directly_issued_by(load_cert(ca_file))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def snapshot(fleet: FleetDir) -> dict[str, bytes]:
    paths = [fleet.ca_cert, fleet.ca_key, fleet.managers_ca_cert, fleet.managers_ca_key,
             fleet.root_key, fleet.signer_key, fleet.server_key]  # fmt: skip
    return {str(p): p.read_bytes() for p in paths}


@pytest.fixture
def fleet(tmp_path: Path) -> FleetDir:
    return init_fleet(tmp_path / "fleet", "broker.lan", server_hosts=["broker.lan", "10.0.0.2"])


def test_init_makes_everything_once_and_never_again(fleet: FleetDir) -> None:
    before = snapshot(fleet)
    with pytest.raises(FleetSetupError, match="never replaces a CA"):
        init_fleet(fleet.root, "other.lan")
    assert run_cli(["fleet", "init", str(fleet.root)]) == 1
    assert snapshot(fleet) == before
    for key in (fleet.ca_key, fleet.managers_ca_key, fleet.server_key, fleet.root_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    manager = fleet.manager_files("fleet-manager")
    assert issued_by(manager.cert_file, fleet.managers_ca_cert)
    assert not issued_by(manager.cert_file, fleet.ca_cert)  # only the managers' listener
    assert issued_by(fleet.server_cert, fleet.ca_cert)
    conf = fleet.broker_conf.read_text()
    assert "use_username_as_clientid true" in conf and str(fleet.managers_ca_cert.resolve()) in conf


def test_devices_join_from_the_same_ca_and_never_overwrite(fleet: FleetDir) -> None:
    before = snapshot(fleet)
    one = add_device(fleet.root, "device-1", ["lab"])
    two = add_device(fleet.root, "device-2", ["lab", "north"])
    assert snapshot(fleet) == before
    for folder, name in ((one, "device-1"), (two, "device-2")):
        cert = folder / "mqtt" / "device.crt"
        assert issued_by(cert, fleet.ca_cert) and certificate_common_name(cert) == name
        client_context(TlsFiles(folder / "mqtt" / "ca.crt", cert, folder / "mqtt" / "device.key"))
        assert (folder / "state" / "trust" / "root.json").read_bytes() == (
            fleet.trust / "root.json"
        ).read_bytes()
    key = (one / "mqtt" / "device.key").read_bytes()
    with pytest.raises(FleetSetupError, match="exists already"):
        add_device(fleet.root, "device-1", ["north"])
    assert (one / "mqtt" / "device.key").read_bytes() == key
    acl = fleet.acl_file.read_text()
    assert "user device-2\ntopic read edged/groups/lab/cmd" in acl
    assert "edged/groups/north/cmd" in acl.split("user device-2")[1]
    assert 'groups = ["lab", "north"]' in (two / "edged.toml").read_text()


def test_a_device_key_can_stay_on_the_device(fleet: FleetDir) -> None:
    csr, _ = make_csr("device-7")
    folder = add_device(fleet.root, "device-7", ["lab"], csr_pem=csr)
    assert not (folder / "mqtt" / "device.key").exists()
    cert = load_cert(folder / "mqtt" / "device.crt")
    assert cert.public_key() == x509.load_pem_x509_csr(csr).public_key()
    assert issued_by(folder / "mqtt" / "device.crt", fleet.ca_cert)
    wrong, _ = make_csr("device-8")
    with pytest.raises(TlsSetupError, match="CN 'device-8', not 'device-9'"):
        add_device(fleet.root, "device-9", [], csr_pem=wrong)


def test_renew_keeps_the_key_and_the_ca(fleet: FleetDir) -> None:
    folder = add_device(fleet.root, "device-1", ["lab"])
    cert_file = folder / "mqtt" / "device.crt"
    old = load_cert(cert_file)
    before = snapshot(fleet)
    renew(fleet.root, "device-1")
    new = load_cert(cert_file)
    assert new.serial_number != old.serial_number
    assert new.public_key() == old.public_key() and issued_by(cert_file, fleet.ca_cert)
    assert snapshot(fleet) == before
    files = add_manager(fleet.root, "operator-2")
    assert issued_by(files.cert_file, fleet.managers_ca_cert)
    renew(fleet.root, "operator-2")
    assert issued_by(files.cert_file, fleet.managers_ca_cert)
    with pytest.raises(FleetSetupError):
        add_manager(fleet.root, "operator-2")
    with pytest.raises(FleetSetupError, match="neither a device nor a manager"):
        renew(fleet.root, "nobody")
    assert manager_context(fleet.root, "operator-2").settings.tls == files


def test_groups_live_in_the_inventory(fleet: FleetDir) -> None:
    add_device(fleet.root, "device-1", ["lab"])
    set_groups(fleet.root, "device-1", ["north"])
    assert fleet.inventory().groups["device-1"] == ("north",)
    assert "edged/groups/north/cmd" in fleet.acl_file.read_text()
    assert "groups/lab" not in fleet.acl_file.read_text()
    assert 'groups = ["north"]' in (fleet.device_dir("device-1") / "edged.toml").read_text()


def test_fleet_certs_run_again_adds_a_client_from_the_same_ca(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    assert run_cli(["fleet", "certs", str(out), "--client", "device-1"]) == 0
    ca = (out / "ca.crt").read_bytes()
    assert run_cli(["fleet", "certs", str(out), "--client", "device-2"]) == 0
    assert (out / "ca.crt").read_bytes() == ca
    assert issued_by(out / "device-1.crt", out / "ca.crt")
    assert issued_by(out / "device-2.crt", out / "ca.crt")
    key = (out / "device-2.key").read_bytes()
    assert run_cli(["fleet", "certs", str(out), "--client", "device-2"]) == 1
    assert (out / "device-2.key").read_bytes() == key
