"""A throw-away fleet PKI for tests: CA, broker certificates, device and fleet manager client
certificates, a certificate from a foreign CA, and an edged trust store with a signing key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edged.bundle.keys import generate_key, write_private_key
from edged.bundle.trust import build_root, build_signers
from edged.bundle.truststore import ROOT_FILE, SIGNERS_FILE
from edged.fleet.pki import ClientFiles, Issued, issue_client, issue_server, make_ca

FLEET_MANAGER = "fleet-manager"


@dataclass
class FleetPki:
    """Certificates under ``directory``; client certificates are issued on first use."""

    directory: Path
    ca: Issued = field(default_factory=make_ca)
    _clients: dict[str, ClientFiles] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file.write_bytes(self.ca.cert_pem)
        issue_server(self.ca, ("localhost", "127.0.0.1")).write(self.server_cert, self.server_key)
        # A broker certificate that names another host: clients must refuse it.
        issue_server(self.ca, ("wrong.example",)).write(self.wrong_host_cert, self.wrong_host_key)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def wrong_host_cert(self) -> Path:
        return self.directory / "wrong-host.crt"

    @property
    def wrong_host_key(self) -> Path:
        return self.directory / "wrong-host.key"

    def client(self, common_name: str) -> ClientFiles:
        files = self._clients.get(common_name)
        if files is None:
            files = ClientFiles(
                self.ca_file,
                self.directory / f"{common_name}.crt",
                self.directory / f"{common_name}.key",
            )
            issue_client(self.ca, common_name).write(files.cert_file, files.key_file)
            self._clients[common_name] = files
        return files

    def foreign_client(self, common_name: str) -> ClientFiles:
        """A client certificate with a trusted-looking CN, signed by a CA the broker does not
        know."""
        other = make_ca("some other CA")
        files = ClientFiles(
            self.ca_file,
            self.directory / f"foreign-{common_name}.crt",
            self.directory / f"foreign-{common_name}.key",
        )
        issue_client(other, common_name).write(files.cert_file, files.key_file)
        return files


@dataclass
class SigningKeys:
    """One root key and one bundle/command signing key, and the trust documents naming them."""

    directory: Path
    root: Ed25519PrivateKey = field(default_factory=generate_key)
    signer: Ed25519PrivateKey = field(default_factory=generate_key)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_private_key(self.signer_file, self.signer)

    @property
    def signer_file(self) -> Path:
        return self.directory / "signer.key"

    def root_bytes(self) -> bytes:
        return build_root([self.root.public_key()], 1, [self.root])

    def signers_bytes(self) -> bytes:
        expires = int(time.time()) + 30 * 86_400
        return build_signers([self.signer.public_key()], 1, 1, expires, [self.root])

    def install_trust(self, trust_dir: Path) -> None:
        """Provision a device trust store (``<state>/trust``)."""
        trust_dir.mkdir(parents=True, exist_ok=True)
        (trust_dir / ROOT_FILE).write_bytes(self.root_bytes())
        (trust_dir / SIGNERS_FILE).write_bytes(self.signers_bytes())
