"""``edged config check FILE``: validate a daemon config file without starting anything."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edged.config import DEFAULT_CONFIG_PATH, load_config


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("config", help="daemon config tools")
    sub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    check = sub.add_parser("check", help="validate a config file (errors name the key path)")
    check.add_argument("file", type=Path, nargs="?", default=DEFAULT_CONFIG_PATH)
    check.add_argument("--json", action="store_true", help="print the effective config as JSON")
    check.set_defaults(handler=handle_check)


def handle_check(args: argparse.Namespace) -> int:
    """Everything ``edged run`` refuses before it starts serving: the file itself and, with the
    fleet channel on, its TLS files (a key readable by others, a certificate whose CN is not a
    device id)."""
    config = load_config(args.file)
    device = ""
    if config.mqtt.enabled:
        from edged.transport.agent import check_agent_files

        device = f" (fleet channel as device {check_agent_files(config)})"
    if args.json:
        print(json.dumps(asdict(config), default=str, indent=2))
    else:
        print(f"{args.file}: ok{device}")
    return 0
