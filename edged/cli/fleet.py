"""``edged push`` and ``edged fleet ...``: the fleet manager's tools (the logic lives in
``edged.fleet.channel`` and ``edged.fleet.directory``). Connection and signing settings
come from the options, else the fleet directory (``--fleet`` / ``EDGED_FLEET_DIR``), else the
``EDGED_FLEET_*`` variables."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from edged._toml import load_toml_file
from edged.bundle.keys import load_private_key
from edged.cli.fleetargs import _env, add_artifact_args, add_connection_args
from edged.cli.fleetsetup import register_setup
from edged.errors import ConfigError, FleetSetupError
from edged.fleet.acl import DEFAULT_MANAGERS, render_acl
from edged.fleet.artifacts import artifact_store
from edged.fleet.channel import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_PUSH_TIMEOUT_S,
    CommandResult,
    DeviceOutcome,
    ManagerSettings,
    PushResult,
    clean_chunks,
    fleet_status,
    push,
    send_command,
)
from edged.fleet.directory import ManagerContext, manager_context
from edged.fleet.pki import issue_client, issue_server, load_ca, make_ca
from edged.transport.tls import TlsFiles
from edged.transport.topics import Target, Topics


def add_target_args(p: argparse.ArgumentParser) -> None:
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--device", help="one device (its certificate CN)")
    t.add_argument("--group", help="every device of a group")
    p.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="DEVICE",
        help="device to wait for (repeatable; default: the device, or the group's members "
        "from their retained status)",
    )


def _fleet_context(args: argparse.Namespace) -> ManagerContext | None:
    if args.fleet is None:
        return None
    return manager_context(args.fleet, args.manager, args.op_timeout)


def settings_from(args: argparse.Namespace) -> ManagerSettings:
    context = _fleet_context(args)
    base = context.settings if context is not None else None

    def pick(flag: str, env: str, from_fleet: Any, default: Any = None) -> Any:
        value = getattr(args, flag)
        if value is not None:
            return value
        if from_fleet is not None:
            return from_fleet
        return _env(env, default)

    tls = base.tls if base is not None else None
    files = {
        "ca_file": pick("ca_file", "CA", tls.ca_file if tls else None),
        "cert_file": pick("cert_file", "CERT", tls.cert_file if tls else None),
        "key_file": pick("key_file", "KEY", tls.key_file if tls else None),
    }
    for flag, value in files.items():
        if value is None:
            option = "--" + flag.replace("_", "-")
            raise ConfigError(
                option, "is required (or give --fleet DIR, or set EDGED_FLEET_CA/CERT/KEY)"
            )
    return ManagerSettings(
        host=str(pick("host", "HOST", base.host if base else None, "localhost")),
        port=int(pick("port", "PORT", base.port if base else None, "8883")),
        tls=TlsFiles(Path(files["ca_file"]), Path(files["cert_file"]), Path(files["key_file"])),
        topic_prefix=str(
            pick("topic_prefix", "TOPIC_PREFIX", base.topic_prefix if base else None, "edged")
        ),
        timeout_s=args.op_timeout,
    )


def signing_keys(args: argparse.Namespace) -> list[Ed25519PrivateKey]:
    path = args.signing_key
    if path is None:
        context = _fleet_context(args)
        path = context.signing_key_file if context is not None else _env("SIGNING_KEY")
    if path is None:
        raise ConfigError(
            "--signing-key", "is required (or give --fleet DIR, or set EDGED_FLEET_SIGNING_KEY)"
        )
    return [load_private_key(Path(path))]


def target_from(args: argparse.Namespace) -> Target:
    return Target.device(args.device) if args.device else Target.group(args.group)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("push", help="publish a signed bundle to a device or a group")
    p.add_argument("bundle", type=Path)
    add_target_args(p)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_BYTES, help="bytes")
    p.add_argument("--timeout", type=float, default=DEFAULT_PUSH_TIMEOUT_S, help="seconds to wait")
    p.add_argument(
        "--keep-chunks",
        action="store_true",
        help="leave the retained chunks on the broker for devices that come later",
    )
    add_artifact_args(p)
    add_connection_args(p, signing=True)
    p.set_defaults(handler=handle_push)

    fleet = subparsers.add_parser("fleet", help="fleet status, commands, broker ACL, certs")
    sub = fleet.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND", required=True)

    s = sub.add_parser("status", help="devices, online state and model versions (retained)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--settle", type=float, default=2.0, help="seconds to collect messages")
    add_connection_args(s)
    s.set_defaults(handler=handle_status)

    for name, help_text in (
        ("ping", "signed ping; every device answers"),
        ("report", "ask devices for their full status"),
        ("rollback", "serve the previous held version of a model"),
    ):
        c = sub.add_parser(name, help=help_text)
        if name == "rollback":
            c.add_argument("model")
            c.add_argument("--to-version", type=int)
        add_target_args(c)
        c.add_argument("--timeout", type=float, default=30.0)
        c.add_argument("--json", action="store_true", help="machine-readable output")
        add_connection_args(c, signing=True)
        c.set_defaults(handler=handle_command, command_type=name)

    k = sub.add_parser("clean", help="remove retained bundle chunks left on the broker")
    k.add_argument("--deployment", help="only this deployment's chunks")
    k.add_argument("--force", action="store_true", help="also chunks a device is still downloading")
    k.add_argument("--settle", type=float, default=2.0, help="seconds to collect messages")
    add_connection_args(k)
    k.set_defaults(handler=handle_clean)

    a = sub.add_parser("acl", help="print the Mosquitto ACL for an inventory of groups")
    a.add_argument(
        "inventory", type=Path, help='TOML: [groups] device-1 = ["lab", ...], one per device'
    )
    a.add_argument("--topic-prefix", default="edged")
    a.add_argument("--manager", action="append", default=[], help="fleet manager CN")
    a.set_defaults(handler=handle_acl)

    register_setup(sub)

    c = sub.add_parser(
        "certs", help="flat lab PKI: CA, broker and client certificates (never replaces a CA)"
    )
    c.add_argument("directory", type=Path)
    c.add_argument("--client", action="append", default=[], metavar="CN", help="repeatable")
    c.add_argument(
        "--server-host",
        action="append",
        default=[],
        metavar="NAME",
        help="broker DNS name or IP (repeatable; default localhost and 127.0.0.1)",
    )
    c.set_defaults(handler=handle_certs)


# --- push ----------------------------------------------------------------------------------


class _LiveBars:
    """One progress bar per device, updated from push()'s progress callback."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.fields[device]:<16}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[state]}"),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def update(self, outcome: DeviceOutcome) -> None:
        task = self.tasks.get(outcome.device)
        if task is None:
            task = self.progress.add_task("", total=100, device=outcome.device, state=outcome.state)
            self.tasks[outcome.device] = task
        self.progress.update(task, completed=outcome.percent, state=outcome.state)


def _result_table(result: PushResult) -> Table:
    table = Table(
        "device",
        "result",
        "progress",
        "reason",
        title=f"{result.model} version {result.version} -> {result.target} "
        f"(deployment {result.deployment_id[:12]})",
    )
    for device in sorted(result.outcomes):
        o = result.outcomes[device]
        style = "green" if o.ok else "red"
        table.add_row(
            device, f"[{style}]{o.state}[/{style}]", f"{o.chunks_done}/{o.chunks_total}", o.reason
        )
    return table


def handle_push(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    keys = signing_keys(args)
    console = Console(stderr=not sys.stdout.isatty())
    bars = _LiveBars(console)
    with bars.progress:
        result = asyncio.run(
            push(
                settings,
                keys,
                args.bundle,
                target_from(args),
                chunk_size=args.chunk_size,
                timeout_s=args.timeout,
                expected=args.expect or None,
                keep_chunks=args.keep_chunks,
                on_progress=bars.update,
                artifacts=artifact_store(args.artifacts, args.base_url),
            )
        )
    Console().print(_result_table(result))
    if not result.chunks_cleared and not args.keep_chunks:
        print(
            "the bundle's retained chunks stay on the broker for the devices that did not "
            f"answer; 'edged fleet clean --deployment {result.deployment_id}' removes them"
        )
    return 0 if result.ok else 1


# --- fleet status and commands -------------------------------------------------------------


def handle_status(args: argparse.Namespace) -> int:
    view = asyncio.run(fleet_status(settings_from(args), settle_s=args.settle))
    if args.json:
        out = {
            d: {
                "status": s.to_json(),
                "last_deployment": view.progress[d].to_json() if d in view.progress else None,
            }
            for d, s in sorted(view.statuses.items())
        }
        print(json.dumps(out, indent=2))
        return 0
    table = Table("device", "online", "groups", "models", "last deployment", title="fleet")
    for device, status in sorted(view.statuses.items()):
        models = ", ".join(f"{m.name}@{m.version or '-'}" for m in status.models) or "-"
        progress = view.progress.get(device)
        last = (
            f"{progress.model}@{progress.version} {progress.state}"
            + (f": {progress.reason}" if progress.state == "failed" else "")
            if progress
            else "-"
        )
        online = "[green]online[/green]" if status.online else f"[red]offline[/red] {status.reason}"
        table.add_row(device, online, ", ".join(status.groups) or "-", models, last)
    Console().print(table)
    return 0


def _command_table(result: CommandResult) -> Table:
    table = Table(
        "device", "ok", "answer", title=f"{result.command.type} -> {result.command.target}"
    )
    for device in sorted(set(result.devices) | set(result.replies)):
        reply = result.replies.get(device)
        if reply is None:
            table.add_row(device, "[red]no answer[/red]", "")
        elif reply.ok:
            table.add_row(device, "[green]yes[/green]", json.dumps(dict(reply.result))[:120])
        else:
            table.add_row(device, "[red]no[/red]", reply.error)
    return table


def handle_command(args: argparse.Namespace) -> int:
    kind = {"report": "status"}.get(args.command_type, args.command_type)
    cmd_args: dict[str, Any] = {}
    if kind == "rollback":
        cmd_args["model"] = args.model
        if args.to_version is not None:
            cmd_args["to_version"] = args.to_version
    result = asyncio.run(
        send_command(
            settings_from(args),
            signing_keys(args),
            target_from(args),
            kind,
            cmd_args,
            timeout_s=args.timeout,
            expected=args.expect or None,
        )
    )
    if args.json:
        print(json.dumps({d: r.to_json() for d, r in result.replies.items()}, indent=2))
    else:
        Console().print(_command_table(result))
    return 0 if result.ok else 1


def handle_clean(args: argparse.Namespace) -> int:
    result = asyncio.run(
        clean_chunks(
            settings_from(args), deployment=args.deployment, force=args.force, settle_s=args.settle
        )
    )
    for deployment, count in sorted(result.removed.items()):
        print(f"removed {count} retained chunk(s) of deployment {deployment}")
    for deployment, count in sorted(result.kept.items()):
        print(f"kept {count} chunk(s) of deployment {deployment}: a device is downloading it")
    if not result.removed and not result.kept:
        print("no retained chunks on the broker")
    return 0


# --- ACL and certificates ------------------------------------------------------------------


def handle_acl(args: argparse.Namespace) -> int:
    data = load_toml_file(args.inventory)
    groups = data.get("groups", {})
    if not isinstance(groups, dict) or not all(
        isinstance(v, list) and all(isinstance(g, str) for g in v) for v in groups.values()
    ):
        raise ConfigError("groups", "must map each device id to a list of group names")
    managers: Sequence[str] = args.manager or DEFAULT_MANAGERS
    sys.stdout.write(render_acl(Topics(args.topic_prefix), groups, managers))
    return 0


def handle_certs(args: argparse.Namespace) -> int:
    """A flat lab PKI. Run again, it issues the new client certificates from the CA already
    there; it never replaces a CA, a key or a certificate."""
    directory: Path = args.directory
    ca_file, ca_key = directory / "ca.crt", directory / "ca.key"
    names = args.client or (["fleet-manager"] if not ca_key.exists() else [])
    planned = [directory / f"{n}.{ext}" for n in names for ext in ("crt", "key")]
    if not ca_key.exists():
        planned += [ca_file, ca_key, directory / "server.crt", directory / "server.key"]
    existing = [str(p) for p in planned if p.exists()]
    if existing:
        raise FleetSetupError(f"refusing to overwrite {', '.join(existing)}")
    if ca_key.exists():
        ca = load_ca(ca_file, ca_key)
        print(f"using the existing CA in {directory}")
    else:
        ca = make_ca()
        ca.write(ca_file, ca_key)
        hosts = args.server_host or ["localhost", "127.0.0.1"]
        issue_server(ca, hosts).write(directory / "server.crt", directory / "server.key")
        print(f"wrote a CA and the broker certificate ({', '.join(hosts)}) to {directory}")
    for name in names:
        issue_client(ca, name).write(directory / f"{name}.crt", directory / f"{name}.key")
    if names:
        print(f"wrote client certificates for {', '.join(names)}")
    return 0
