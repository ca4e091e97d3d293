"""``edged demo [--smoke]``: the whole fleet loop on this machine (see ``edged/demo.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole loop on this machine (broker, daemon, push)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="non-interactive; exit 0 only if every step worked"
    )
    p.add_argument("--workdir", type=Path, help="keep the certificates, keys and logs here")
    p.set_defaults(handler=handle_demo)


def handle_demo(args: argparse.Namespace) -> int:
    from edged.demo import run_demo

    return run_demo(args.smoke, args.workdir)
