"""``edged install FILE``, ``edged rollback MODEL``, ``edged installs``: operator actions on the
bundle store. Against a running daemon they go through its Unix socket (hot swap, zero failed
requests); ``--offline`` installs into a state directory while no daemon runs (USB stick).
Either way the bundle passes exactly the same checks."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edged.cli.client import add_endpoint_args, client_from
from edged.config import DEFAULT_CONFIG_PATH, load_config
from edged.errors import ApiError, BundleFileError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("install", help="install a signed bundle (hot swap on the daemon)")
    p.add_argument("file", type=Path)
    add_endpoint_args(p)
    p.add_argument(
        "--offline",
        action="store_true",
        help="no daemon is running: install straight into the state directory",
    )
    p.add_argument("--state-dir", type=Path, help="with --offline (default: from the config)")
    p.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle_install)

    p = subparsers.add_parser("rollback", help="serve the previous version still in the store")
    p.add_argument("model")
    p.add_argument("--to", type=int, help="a specific held version")
    add_endpoint_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle_rollback)

    p = subparsers.add_parser("installs", help="the install and rollback log of the daemon")
    add_endpoint_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle_installs)


def _print_result(result: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
    elif result.get("error"):
        print(f"{result['action']} failed ({result['error']}): {result['message']}")
    else:
        previous = result.get("previous_version")
        print(
            f"{result['model']}: {result['outcome']}, now serving version {result['version']}"
            + (f" (was {previous})" if previous is not None else "")
        )
    return 0 if not result.get("error") else 1


def _result_document(status: int, data: bytes) -> dict[str, Any]:
    """The daemon's install/rollback answer; anything else (a proxy's HTML, a crash) becomes
    one ``ApiError`` line instead of a traceback."""
    try:
        doc = json.loads(data) if data else {}
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        text = data.decode(errors="replace").strip().splitlines()
        raise ApiError(status, (text[0][:200] if text else "empty answer") + " (not JSON)")
    if status not in (200, 409) or "outcome" not in doc:
        raise ApiError(status, str(doc.get("error", doc))[:500])
    return doc


def handle_install(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise BundleFileError(f"{args.file}: no such bundle file")
    if args.offline:
        from edged.bundle.offline import install_direct

        state_dir = args.state_dir
        if state_dir is None:
            config_path = args.config or (
                DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
            )
            state_dir = load_config(config_path).state.directory
        result = install_direct(state_dir, args.file)
        return _print_result(result.to_json(), args.json)
    client = client_from(args)
    with args.file.open("rb") as bundle:
        status, _, data = client.request(
            "POST",
            "/edged/v1/bundles",
            bundle,
            {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(args.file.stat().st_size),
                "Edged-Bundle-Name": args.file.name,
            },
        )
    return _print_result(_result_document(status, data), args.json)


def handle_rollback(args: argparse.Namespace) -> int:
    path = f"/edged/v1/models/{args.model}/rollback" + (f"?to={args.to}" if args.to else "")
    status, _, data = client_from(args).request("POST", path)
    return _print_result(_result_document(status, data), args.json)


def handle_installs(args: argparse.Namespace) -> int:
    history = client_from(args).json("GET", "/edged/v1/installs")
    if args.json:
        print(json.dumps(history, indent=2))
        return 0
    table = Table("time", "action", "model", "version", "outcome", "message", title="installs")
    for entry in history:
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(entry.get("at", 0)))),
            str(entry.get("action")),
            str(entry.get("model")),
            str(entry.get("version")),
            str(entry.get("outcome")),
            str(entry.get("message", "")),
        )
    Console().print(table)
    return 0
