"""TLS for the fleet channel: a client context (TLS >= 1.2, broker verified against our CA,
hostname included, client certificate), the key file permission check, and the device id
(the client certificate's common name)."""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from edged.errors import InsecureKeyFileError, TlsSetupError


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path  # the CA that signed the broker's certificate
    cert_file: Path  # this client's certificate (PEM)
    key_file: Path  # this client's private key (PEM, unencrypted, mode 0600 or 0400)


def check_key_permissions(key_file: Path) -> None:
    """Refuse a private key that its group or others can read or write."""
    try:
        mode = os.stat(key_file).st_mode
    except OSError as exc:
        raise TlsSetupError(f"cannot read client key {key_file}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise TlsSetupError(f"client key {key_file} is not a regular file")
    loose = mode & (stat.S_IRWXG | stat.S_IRWXO)
    if loose:
        raise InsecureKeyFileError(
            f"client key {key_file} has mode {stat.S_IMODE(mode):04o}: group or others may "
            f"access it; run 'chmod 600 {key_file}' (and keep it owned by the edged user)"
        )


def certificate_common_name(cert_file: Path) -> str:
    """The subject CN of a PEM certificate (the device id of a device certificate)."""
    try:
        data = cert_file.read_bytes()
    except OSError as exc:
        raise TlsSetupError(f"cannot read certificate {cert_file}: {exc.strerror}") from exc
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise TlsSetupError(f"{cert_file} is not a PEM certificate: {exc}") from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise TlsSetupError(
            f"certificate {cert_file} must have exactly one subject CN (the device id); "
            f"it has {len(names)}"
        )
    value = names[0].value
    return value.decode("utf-8") if isinstance(value, bytes) else value


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A client context: TLS 1.2 or newer, the broker verified against ``ca_file`` with its
    hostname, and our certificate and key loaded for mutual TLS."""
    check_key_permissions(files.key_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(files.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load CA certificate {files.ca_file}: {exc}") from exc
    try:
        context.load_cert_chain(str(files.cert_file), str(files.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"cannot load client certificate {files.cert_file} with key {files.key_file}: "
            f"{exc} (do they belong together, and is the key unencrypted PEM?)"
        ) from exc
    return context
