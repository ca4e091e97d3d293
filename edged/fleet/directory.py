"""The fleet directory: one folder on the fleet manager's machine holding the fleet's CAs,
signing keys, trust root, broker config and ACL, the inventory (``fleet.toml``: broker address,
managers, and each device's groups, the one place groups are written down) and one folder per
device to copy onto it. Commands only add: nothing here ever replaces a CA or a private key.

    fleet.toml                        inventory (edit groups with add-device / set-groups)
    pki/ca.{crt,key}                  fleet CA: devices and the broker's certificate
    pki/managers-ca.{crt,key}         managers' CA (the managers' listener accepts only it)
    pki/server.{crt,key}              the broker's certificate
    managers/<name>.{crt,key}         fleet manager client certificates
    keys/root.key, keys/signer.key    Ed25519: trust root (keep offline), bundle/command signer
    trust/root.json, signers.json     the trust documents every device starts from
    broker/mosquitto.conf, edged.acl  the broker's config and ACL (regenerated on changes)
    devices/<name>/                   edged.toml, mqtt/{ca,device}.crt, mqtt/device.key,
                                      state/trust/{root,signers}.json: copy to the device
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edged._fs import atomic_write
from edged._toml import load_toml_file
from edged.bundle.keys import generate_key, load_private_key, write_private_key
from edged.bundle.trust import build_root, build_signers
from edged.bundle.truststore import ROOT_FILE, SIGNERS_FILE
from edged.errors import ConfigError, FleetSetupError
from edged.fleet.acl import render_acl
from edged.fleet.brokerconf import (
    DEVICE_PORT,
    MANAGER_PORT,
    BrokerFiles,
    render_mosquitto_conf,
)
from edged.fleet.channel import ManagerSettings
from edged.fleet.pki import (
    Issued,
    cert_pem,
    csr_public_key,
    ec_public_key,
    issue_client,
    issue_client_for_key,
    issue_server,
    load_ca,
    load_cert,
    make_ca,
)
from edged.transport.tls import TlsFiles
from edged.transport.topics import Topics, check_name

FLEET_FILE = "fleet.toml"
DEFAULT_MANAGER = "fleet-manager"
SIGNERS_VALIDITY_S = 365 * 86_400


@dataclass(frozen=True)
class Inventory:
    """``fleet.toml``."""

    broker_host: str
    server_hosts: tuple[str, ...]
    device_port: int = DEVICE_PORT
    manager_port: int = MANAGER_PORT
    bind_address: str = ""
    topic_prefix: str = "edged"
    managers: tuple[str, ...] = (DEFAULT_MANAGER,)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # device -> groups

    def to_toml(self) -> str:
        def q(value: str) -> str:
            return json.dumps(value)  # a JSON string is a TOML basic string

        def strings(values: Sequence[str]) -> str:
            return "[" + ", ".join(q(v) for v in values) + "]"

        lines = [
            "# The fleet (written by 'edged fleet init'; 'edged fleet add-device' adds devices).",
            "# Groups live here and only here: the broker ACL and each device's config are",
            "# generated from them.",
            f"managers = {strings(self.managers)}",
            "",
            "[broker]",
            f"host = {q(self.broker_host)}",
            f"server_hosts = {strings(self.server_hosts)}",
            f"device_port = {self.device_port}",
            f"manager_port = {self.manager_port}",
            f"bind_address = {q(self.bind_address)}",
            f"topic_prefix = {q(self.topic_prefix)}",
            "",
            "[groups]",
            *(f"{q(device)} = {strings(self.groups[device])}" for device in sorted(self.groups)),
        ]
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: Path) -> Inventory:
        data = load_toml_file(path)
        broker = data.get("broker")
        groups = data.get("groups", {})
        managers = data.get("managers", [DEFAULT_MANAGER])
        if not (
            isinstance(broker, dict) and isinstance(groups, dict) and isinstance(managers, list)
        ):
            raise ConfigError(
                str(path), "needs a [broker] table, a [groups] table, managers = [...]"
            )
        try:
            return cls(
                broker_host=str(broker["host"]),
                server_hosts=tuple(str(h) for h in broker.get("server_hosts", [broker["host"]])),
                device_port=int(broker.get("device_port", DEVICE_PORT)),
                manager_port=int(broker.get("manager_port", MANAGER_PORT)),
                bind_address=str(broker.get("bind_address", "")),
                topic_prefix=str(broker.get("topic_prefix", "edged")),
                managers=tuple(str(m) for m in managers),
                groups={str(d): tuple(str(g) for g in gs) for d, gs in groups.items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(str(path), f"not a valid fleet inventory: {exc!r}") from exc


@dataclass(frozen=True)
class FleetDir:
    root: Path

    @property
    def inventory_file(self) -> Path:
        return self.root / FLEET_FILE

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def managers_ca_cert(self) -> Path:
        return self.pki / "managers-ca.crt"

    @property
    def managers_ca_key(self) -> Path:
        return self.pki / "managers-ca.key"

    @property
    def server_cert(self) -> Path:
        return self.pki / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.pki / "server.key"

    @property
    def root_key(self) -> Path:
        return self.root / "keys" / "root.key"

    @property
    def signer_key(self) -> Path:
        return self.root / "keys" / "signer.key"

    @property
    def trust(self) -> Path:
        return self.root / "trust"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def broker_conf(self) -> Path:
        return self.broker / "mosquitto.conf"

    @property
    def acl_file(self) -> Path:
        return self.broker / "edged.acl"

    def device_dir(self, name: str) -> Path:
        return self.root / "devices" / name

    def manager_files(self, name: str) -> TlsFiles:
        return TlsFiles(
            self.ca_cert,
            self.root / "managers" / f"{name}.crt",
            self.root / "managers" / f"{name}.key",
        )

    def inventory(self) -> Inventory:
        if not self.inventory_file.is_file():
            raise FleetSetupError(
                f"{self.root} is not a fleet directory (no {FLEET_FILE}); create one with "
                f"'edged fleet init {self.root}'"
            )
        return Inventory.load(self.inventory_file)


def _write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    if path.exists():
        raise FleetSetupError(f"{path} exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode=mode)


def _write_issued(issued: Issued, cert_path: Path, key_path: Path) -> None:
    for path in (cert_path, key_path):
        if path.exists():
            raise FleetSetupError(f"{path} exists; refusing to overwrite it")
    issued.write(cert_path, key_path)


def _regenerate_broker_files(fleet: FleetDir, inventory: Inventory) -> None:
    topics = Topics(inventory.topic_prefix)
    acl = render_acl(topics, inventory.groups, inventory.managers)
    atomic_write(fleet.acl_file, acl.encode())
    files = BrokerFiles(
        acl_file=fleet.acl_file.resolve(),
        persistence_dir=(fleet.broker / "data").resolve(),
        ca_file=fleet.ca_cert.resolve(),
        manager_ca_file=fleet.managers_ca_cert.resolve(),
        cert_file=fleet.server_cert.resolve(),
        key_file=fleet.server_key.resolve(),
    )
    conf = render_mosquitto_conf(
        files,
        inventory.device_port,
        inventory.manager_port,
        inventory.bind_address,
        run_as=_file_owner(fleet.server_key),
    )
    atomic_write(fleet.broker_conf, conf.encode())


def _file_owner(path: Path) -> str | None:
    """The name of the user owning ``path`` (None where it has no name)."""
    import pwd

    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (KeyError, OSError):
        return None


def _save_inventory(fleet: FleetDir, inventory: Inventory) -> None:
    atomic_write(fleet.inventory_file, inventory.to_toml().encode())
    _regenerate_broker_files(fleet, inventory)


def init_fleet(
    root: Path,
    broker_host: str,
    *,
    server_hosts: Sequence[str] = (),
    device_port: int = DEVICE_PORT,
    manager_port: int = MANAGER_PORT,
    bind_address: str = "",
    topic_prefix: str = "edged",
    manager: str = DEFAULT_MANAGER,
    now: float | None = None,
) -> FleetDir:
    """A new fleet directory. Refuses a directory that already holds a fleet, a CA or keys."""
    fleet = FleetDir(root)
    for existing in (fleet.inventory_file, fleet.ca_key, fleet.managers_ca_key, fleet.root_key):
        if existing.exists():
            raise FleetSetupError(
                f"{existing} exists: {root} already holds a fleet; 'edged fleet init' never "
                "replaces a CA or a key (add devices with 'edged fleet add-device')"
            )
    check_name(manager, "fleet manager name")
    hosts = tuple(server_hosts) or (broker_host,)
    inventory = Inventory(
        broker_host, hosts, device_port, manager_port, bind_address, topic_prefix, (manager,)
    )
    root.mkdir(parents=True, exist_ok=True)
    ca, managers_ca = make_ca("edged fleet CA"), make_ca("edged fleet managers CA")
    _write_issued(ca, fleet.ca_cert, fleet.ca_key)
    _write_issued(managers_ca, fleet.managers_ca_cert, fleet.managers_ca_key)
    _write_issued(issue_server(ca, hosts), fleet.server_cert, fleet.server_key)
    files = fleet.manager_files(manager)
    _write_issued(issue_client(managers_ca, manager), files.cert_file, files.key_file)

    root_key, signer = generate_key(), generate_key()
    fleet.signer_key.parent.mkdir(parents=True, exist_ok=True)
    write_private_key(fleet.root_key, root_key)
    write_private_key(fleet.signer_key, signer)
    issued_at = int(time.time() if now is None else now)
    _write_new(fleet.trust / ROOT_FILE, build_root([root_key.public_key()], 1, [root_key]))
    signers = build_signers([signer.public_key()], 1, 1, issued_at + SIGNERS_VALIDITY_S, [root_key])
    _write_new(fleet.trust / SIGNERS_FILE, signers)
    (fleet.broker / "data").mkdir(parents=True, exist_ok=True)
    _save_inventory(fleet, inventory)
    return fleet


def _device_config(name: str, inventory: Inventory, groups: Sequence[str], state_dir: str) -> str:
    def q(value: str) -> str:
        return json.dumps(value)

    return f"""# edged on device {name} (written by 'edged fleet add-device'). Copy this folder to
# the device and run: edged run --config edged.toml. Relative paths are relative to this file.
# Its groups come from the fleet's inventory (fleet.toml); change them there.

[state]
directory = {q(state_dir)}

[mqtt]
enabled = true
host = {q(inventory.broker_host)}
port = {inventory.device_port}
topic_prefix = {q(inventory.topic_prefix)}
ca_file = "mqtt/ca.crt"
cert_file = "mqtt/device.crt"   # CN = {name}
key_file = "mqtt/device.key"    # mode 0600
groups = [{", ".join(q(g) for g in groups)}]
"""


def add_device(
    root: Path,
    name: str,
    groups: Sequence[str] = (),
    *,
    csr_pem: bytes | None = None,
    state_dir: str = "state",
) -> Path:
    """Issue device ``name``'s certificate (for a new key, or for the key of ``csr_pem`` so the
    private key never leaves the device) and write its folder: config, certificates, trust
    files. Adds it to the inventory and regenerates the ACL. Refuses an existing device."""
    fleet = FleetDir(root)
    inventory = fleet.inventory()
    check_name(name, "device id")
    for group in groups:
        check_name(group, "group name")
    device_dir = fleet.device_dir(name)
    if name in inventory.groups or device_dir.exists():
        raise FleetSetupError(
            f"device {name} exists already ({device_dir}); 'edged fleet renew {name}' issues "
            "it a new certificate"
        )
    ca = load_ca(fleet.ca_cert, fleet.ca_key)
    mqtt = device_dir / "mqtt"
    if csr_pem is None:
        _write_issued(issue_client(ca, name), mqtt / "device.crt", mqtt / "device.key")
    else:
        cert = issue_client_for_key(ca, name, csr_public_key(csr_pem, name))
        _write_new(mqtt / "device.crt", cert_pem(cert))
    _write_new(mqtt / "ca.crt", fleet.ca_cert.read_bytes())
    for trust_file in (ROOT_FILE, SIGNERS_FILE):
        _write_new(
            device_dir / state_dir / "trust" / trust_file, (fleet.trust / trust_file).read_bytes()
        )
    unique = tuple(dict.fromkeys(groups))
    _write_new(
        device_dir / "edged.toml", _device_config(name, inventory, unique, state_dir).encode()
    )
    _save_inventory(fleet, replace(inventory, groups={**inventory.groups, name: unique}))
    return device_dir


def add_manager(root: Path, name: str) -> TlsFiles:
    """A fleet manager certificate from the managers' CA (refuses an existing one)."""
    fleet = FleetDir(root)
    inventory = fleet.inventory()
    check_name(name, "fleet manager name")
    files = fleet.manager_files(name)
    if name in inventory.managers or files.cert_file.exists():
        raise FleetSetupError(f"manager {name} exists already; 'edged fleet renew {name}'")
    ca = load_ca(fleet.managers_ca_cert, fleet.managers_ca_key)
    _write_issued(issue_client(ca, name), files.cert_file, files.key_file)
    _save_inventory(fleet, replace(inventory, managers=(*inventory.managers, name)))
    return files


def renew(root: Path, name: str) -> Path:
    """A new certificate for an existing device or manager, for the key it already has (the
    key never moves); only the certificate file is replaced."""
    fleet = FleetDir(root)
    inventory = fleet.inventory()
    if name in inventory.groups:
        cert_path = fleet.device_dir(name) / "mqtt" / "device.crt"
        ca = load_ca(fleet.ca_cert, fleet.ca_key)
    elif name in inventory.managers:
        cert_path = fleet.manager_files(name).cert_file
        ca = load_ca(fleet.managers_ca_cert, fleet.managers_ca_key)
    else:
        raise FleetSetupError(f"{name} is neither a device nor a manager of the fleet in {root}")
    public_key = ec_public_key(load_cert(cert_path), str(cert_path))
    atomic_write(cert_path, cert_pem(issue_client_for_key(ca, name, public_key)))
    return cert_path


def set_groups(root: Path, name: str, groups: Sequence[str]) -> Path:
    """Change a device's groups in the inventory; rewrites the ACL and the device's config."""
    fleet = FleetDir(root)
    inventory = fleet.inventory()
    if name not in inventory.groups:
        raise FleetSetupError(f"no device {name} in the fleet in {root}")
    for group in groups:
        check_name(group, "group name")
    unique = tuple(dict.fromkeys(groups))
    config = fleet.device_dir(name) / "edged.toml"
    state_dir = str(load_toml_file(config).get("state", {}).get("directory", "state"))
    atomic_write(config, _device_config(name, inventory, unique, state_dir).encode())
    _save_inventory(fleet, replace(inventory, groups={**inventory.groups, name: unique}))
    return config


@dataclass(frozen=True)
class ManagerContext:
    settings: ManagerSettings
    signing_key_file: Path

    def signing_keys(self) -> list[Ed25519PrivateKey]:
        return [load_private_key(self.signing_key_file)]


def manager_context(
    root: Path, manager: str | None = None, timeout_s: float = 10.0
) -> ManagerContext:
    """How ``edged push`` and ``edged fleet ...`` reach the fleet from its directory."""
    fleet = FleetDir(root)
    inventory = fleet.inventory()
    name = manager or inventory.managers[0]
    if name not in inventory.managers:
        raise FleetSetupError(f"no manager {name} in the fleet in {root}")
    settings = ManagerSettings(
        inventory.broker_host,
        inventory.manager_port,
        fleet.manager_files(name),
        topic_prefix=inventory.topic_prefix,
        timeout_s=timeout_s,
    )
    return ManagerContext(settings, fleet.signer_key)


__all__ = [
    "FLEET_FILE",
    "FleetDir",
    "Inventory",
    "ManagerContext",
    "add_device",
    "add_manager",
    "init_fleet",
    "manager_context",
    "renew",
    "set_groups",
]
