"""Certificate helpers for a small fleet PKI: a CA, a broker certificate, device and fleet
manager client certificates (ECDSA P-256), certificate signing requests (a device may keep its
key to itself) and loading an existing CA to issue more. ``edged fleet init`` /
``add-device`` build on them; a real fleet may use any CA whose client certificates carry the
device id as their CN."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edged._fs import create_new_file
from edged.errors import TlsSetupError

DEFAULT_VALIDITY_DAYS = 825


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (0644) and the key (0600, created with that mode)."""
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_bytes(self.cert_pem)
        key_path.unlink(missing_ok=True)
        write_private_key_pem(key_path, self.key_pem)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(common_name: str = "edged fleet CA", days: int = DEFAULT_VALIDITY_DAYS) -> Issued:
    key = new_key()
    cert = (
        _builder(common_name, _name(common_name), key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _leaf(
    ca: Issued,
    common_name: str,
    usage: x509.ObjectIdentifier,
    san: Sequence[x509.GeneralName],
    days: int,
) -> Issued:
    key = new_key()
    return Issued(_leaf_cert(ca, common_name, key.public_key(), usage, san, days), key)


def _leaf_cert(
    ca: Issued,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier,
    san: Sequence[x509.GeneralName],
    days: int,
) -> x509.Certificate:
    builder = (
        _builder(common_name, ca.cert.subject, public_key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def issue_server(
    ca: Issued,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = DEFAULT_VALIDITY_DAYS,
) -> Issued:
    """A broker certificate; ``hosts`` become DNS or IP subject alternative names."""
    san: list[x509.GeneralName] = []
    for host in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            san.append(x509.DNSName(host))
    return _leaf(ca, hosts[0] if hosts else "broker", ExtendedKeyUsageOID.SERVER_AUTH, san, days)


def issue_client(ca: Issued, common_name: str, days: int = DEFAULT_VALIDITY_DAYS) -> Issued:
    """A client certificate whose CN is the device id (or e.g. ``fleet-manager``)."""
    return _leaf(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, (), days)


@dataclass(frozen=True)
class ClientFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def write_client(directory: Path, ca_file: Path, issued: Issued, name: str) -> ClientFiles:
    """``<directory>/<name>.crt`` and ``<name>.key`` beside an existing CA file."""
    files = ClientFiles(ca_file, directory / f"{name}.crt", directory / f"{name}.key")
    issued.write(files.cert_file, files.key_file)
    return files


def issue_client_for_key(
    ca: Issued,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    days: int = DEFAULT_VALIDITY_DAYS,
) -> x509.Certificate:
    """A client certificate for a key held elsewhere (a CSR's, or a renewed certificate's)."""
    return _leaf_cert(ca, common_name, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, (), days)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ca(cert_path: Path, key_path: Path) -> Issued:
    """An existing CA, to issue more certificates from it."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise TlsSetupError(f"cannot load the CA {cert_path} / {key_path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsSetupError(f"{key_path} is not an EC private key")
    return Issued(cert, key)


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsSetupError(f"cannot read the certificate {path}: {exc}") from exc


def ec_public_key(cert: x509.Certificate, where: str) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TlsSetupError(f"{where}: the key is not an EC key")
    return key


def make_csr(common_name: str) -> tuple[bytes, bytes]:
    """A certificate signing request for ``common_name`` and its new private key (both PEM)."""
    key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(common_name))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return csr.public_bytes(serialization.Encoding.PEM), key_pem


def csr_public_key(csr_pem: bytes, common_name: str) -> ec.EllipticCurvePublicKey:
    """The key of a CSR whose signature holds and whose CN is ``common_name``."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise TlsSetupError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise TlsSetupError("the CSR's signature does not verify")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    if cn != common_name:
        raise TlsSetupError(f"the CSR is for CN {cn!r}, not {common_name!r}")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TlsSetupError("the CSR's key is not an EC key")
    return key


def write_private_key_pem(path: Path, pem: bytes) -> None:
    """A private key file created with mode 0600; never replaces an existing file."""
    try:
        create_new_file(path, pem, 0o600)
    except FileExistsError:
        raise TlsSetupError(f"{path} exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise TlsSetupError(f"cannot create key file {path}: {exc.strerror}") from exc
