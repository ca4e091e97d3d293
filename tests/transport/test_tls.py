"""Local TLS checks: key file permissions, the device id from the certificate, bad files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edged.errors import InsecureKeyFileError, TlsSetupError
from edged.transport.tls import TlsFiles, certificate_common_name, client_context
from tests.support.pki import FleetPki


@pytest.fixture
def pki(tmp_path: Path) -> FleetPki:
    return FleetPki(tmp_path / "pki")


def files(pki: FleetPki, name: str) -> TlsFiles:
    c = pki.client(name)
    return TlsFiles(c.ca_file, c.cert_file, c.key_file)


def test_the_device_id_is_the_certificate_cn(pki: FleetPki) -> None:
    assert certificate_common_name(pki.client("device-7").cert_file) == "device-7"


def test_a_client_context_verifies_the_broker_and_its_hostname(pki: FleetPki) -> None:
    context = client_context(files(pki, "device-1"))
    assert context.check_hostname
    assert context.minimum_version.name == "TLSv1_2"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666])
def test_a_key_readable_by_group_or_others_is_refused(pki: FleetPki, mode: int) -> None:
    tls = files(pki, "device-1")
    os.chmod(tls.key_file, mode)
    with pytest.raises(InsecureKeyFileError, match=f"chmod 600 {tls.key_file}"):
        client_context(tls)


def test_owner_only_keys_are_accepted(pki: FleetPki) -> None:
    tls = files(pki, "device-1")
    os.chmod(tls.key_file, 0o400)
    client_context(tls)


def test_missing_or_mismatched_files_name_the_file(pki: FleetPki, tmp_path: Path) -> None:
    tls = files(pki, "device-1")
    other = files(pki, "device-2")
    with pytest.raises(TlsSetupError, match="cannot read client key"):
        client_context(TlsFiles(tls.ca_file, tls.cert_file, tmp_path / "absent.key"))
    with pytest.raises(TlsSetupError, match="belong together"):
        client_context(TlsFiles(tls.ca_file, tls.cert_file, other.key_file))
    with pytest.raises(TlsSetupError, match="not a PEM certificate"):
        certificate_common_name(tls.key_file)
