"""``edged doctor``: pass, warn or fail for each thing a device needs, with a hint; the exit
code is 1 when any check fails."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edged.config import DEFAULT_CONFIG_PATH
from edged.daemon.doctor import FAIL, MIN_FREE_BYTES, PASS, DoctorOptions, run_checks

STYLE = {PASS: "green", "warn": "yellow", FAIL: "bold red"}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("doctor", help="check this device and say how to fix what is wrong")
    p.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("--min-free-bytes", type=int, default=MIN_FREE_BYTES)
    p.add_argument("--broker-timeout", type=float, default=5.0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle_doctor)


def handle_doctor(args: argparse.Namespace) -> int:
    path = args.config
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    checks = run_checks(
        path,
        DoctorOptions(broker_timeout_s=args.broker_timeout, min_free_bytes=args.min_free_bytes),
    )
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
        return 1 if failed else 0
    table = Table("", "check", "detail", "how to fix", title="edged doctor")
    for c in checks:
        table.add_row(f"[{STYLE.get(c.status, '')}]{c.status}[/]", c.item, c.detail, c.hint)
    Console().print(table)
    return 1 if failed else 0
