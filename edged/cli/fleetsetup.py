"""``edged fleet init|add-device|add-manager|renew|set-groups|csr``: make and grow a fleet
directory (the logic lives in ``edged.fleet.directory``). Nothing here replaces a CA or a key.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from edged.errors import ConfigError, TlsSetupError
from edged.fleet.brokerconf import DEVICE_PORT, MANAGER_PORT
from edged.fleet.directory import (
    DEFAULT_MANAGER,
    FleetDir,
    add_device,
    add_manager,
    init_fleet,
    renew,
    set_groups,
)
from edged.fleet.pki import make_csr, write_private_key_pem


def _fleet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fleet",
        type=Path,
        default=os.environ.get("EDGED_FLEET_DIR", "fleet"),
        help="fleet directory (EDGED_FLEET_DIR, default ./fleet)",
    )


def register_setup(sub: Any) -> None:
    i = sub.add_parser(
        "init", help="new fleet directory: CAs, signing keys, trust root, broker config + ACL"
    )
    i.add_argument("directory", type=Path, nargs="?", default=Path("fleet"))
    i.add_argument("--broker-host", default="localhost", help="name devices use for the broker")
    i.add_argument(
        "--server-host",
        action="append",
        default=[],
        metavar="NAME",
        help="names in the broker certificate (repeatable; default the broker host)",
    )
    i.add_argument("--device-port", type=int, default=DEVICE_PORT)
    i.add_argument("--manager-port", type=int, default=MANAGER_PORT)
    i.add_argument("--bind-address", default="", help="listen address (default: all)")
    i.add_argument("--topic-prefix", default="edged")
    i.add_argument("--manager", default=DEFAULT_MANAGER, help="first fleet manager's name")
    i.set_defaults(handler=handle_init)

    a = sub.add_parser(
        "add-device", help="certificate, config and trust files for a device (one folder)"
    )
    a.add_argument("name", help="device id (its certificate's CN)")
    a.add_argument("--group", action="append", default=[], help="repeatable")
    a.add_argument(
        "--csr",
        type=Path,
        help="sign this request (from 'edged fleet csr') instead of making a key",
    )
    a.add_argument("--state-dir", default="state", help="the device's state directory")
    _fleet_arg(a)
    a.set_defaults(handler=handle_add_device)

    m = sub.add_parser("add-manager", help="one more fleet manager certificate")
    m.add_argument("name")
    _fleet_arg(m)
    m.set_defaults(handler=handle_add_manager)

    r = sub.add_parser("renew", help="new certificate for a device or manager (same key)")
    r.add_argument("name")
    _fleet_arg(r)
    r.set_defaults(handler=handle_renew)

    g = sub.add_parser("set-groups", help="change a device's groups (inventory, ACL, config)")
    g.add_argument("name")
    g.add_argument("--group", action="append", default=[], help="repeatable; none: no group")
    _fleet_arg(g)
    g.set_defaults(handler=handle_set_groups)

    c = sub.add_parser("csr", help="on the device: a key (kept) and a request to sign")
    c.add_argument("name", help="device id")
    c.add_argument("--out", type=Path, default=Path("."), help="directory for the key and CSR")
    c.set_defaults(handler=handle_csr)


def handle_init(args: argparse.Namespace) -> int:
    fleet = init_fleet(
        args.directory,
        args.broker_host,
        server_hosts=args.server_host,
        device_port=args.device_port,
        manager_port=args.manager_port,
        bind_address=args.bind_address,
        topic_prefix=args.topic_prefix,
        manager=args.manager,
    )
    print(f"fleet directory {fleet.root}:")
    print(f"  broker:  mosquitto -c {fleet.broker_conf}")
    print(f"  devices: edged fleet add-device NAME --group GROUP --fleet {fleet.root}")
    print(f"  push:    edged push BUNDLE --device NAME --fleet {fleet.root}")
    print(f"  keep {fleet.root_key} offline: it signs the trust documents")
    return 0


def handle_add_device(args: argparse.Namespace) -> int:
    csr = None
    if args.csr is not None:
        try:
            csr = args.csr.read_bytes()
        except OSError as exc:
            raise TlsSetupError(f"cannot read {args.csr}: {exc.strerror}") from exc
    path = add_device(args.fleet, args.name, args.group, csr_pem=csr, state_dir=args.state_dir)
    print(f"device {args.name} (groups: {', '.join(args.group) or 'none'}): {path}")
    print(f"  copy it to the device and run: edged run --config {path.name}/edged.toml")
    if csr is not None:
        print("  put the device's own key at mqtt/device.key (mode 0600)")
    print(f"  the broker re-reads {FleetDir(args.fleet).acl_file} on SIGHUP")
    return 0


def handle_add_manager(args: argparse.Namespace) -> int:
    files = add_manager(args.fleet, args.name)
    print(f"manager {args.name}: {files.cert_file} (use: --fleet {args.fleet} --manager NAME)")
    return 0


def handle_renew(args: argparse.Namespace) -> int:
    print(f"renewed: {renew(args.fleet, args.name)}")
    return 0


def handle_set_groups(args: argparse.Namespace) -> int:
    config = set_groups(args.fleet, args.name, args.group)
    print(f"{args.name}: groups {', '.join(args.group) or 'none'}; copy {config} to the device")
    return 0


def handle_csr(args: argparse.Namespace) -> int:
    out: Path = args.out
    csr_file = out / f"{args.name}.csr"
    if csr_file.exists():
        raise ConfigError(str(csr_file), "exists; refusing to overwrite it")
    csr, key_pem = make_csr(args.name)
    write_private_key_pem(out / "device.key", key_pem)
    csr_file.write_bytes(csr)
    print(f"key: {out / 'device.key'} (stays here); request: {csr_file} (send it to the fleet)")
    return 0
