"""Argument parsing and dispatch. Each command group lives in its own module with a
``register(subparsers)`` function; a command handler returns the process exit code."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from edged import __version__
from edged.errors import EdgedError

# Each command and the module that registers it (`register(subparsers) -> None`). A command
# imports only its own module, so `edged status` or `edged run` does not pay for every tool's
# imports (the daemon, rich tables, the fleet manager's MQTT client...); --help imports them all.
COMMANDS = {
    "run": "edged.cli.run",
    "record-exit": "edged.cli.run",
    "models": "edged.cli.client",
    "status": "edged.cli.client",
    "infer": "edged.cli.client",
    "load": "edged.cli.client",
    "config": "edged.cli.configcmd",
    "push": "edged.cli.fleet",
    "fleet": "edged.cli.fleet",
    "rollout": "edged.cli.rollout",
    "keygen": "edged.cli.bundle",
    "bundle": "edged.cli.bundle",
    "trust": "edged.cli.bundle",
    "top": "edged.cli.top",
    "install": "edged.cli.install",
    "rollback": "edged.cli.install",
    "installs": "edged.cli.install",
    "doctor": "edged.cli.doctor",
    "demo": "edged.cli.demo",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))

Handler = Callable[[argparse.Namespace], int]


def build_parser(modules: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description="Edge inference daemon and tools.")
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a command group not built yet
        module.register(subparsers)
    return parser


def run_cli(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    module = COMMANDS.get(command or "")
    parser = build_parser((module,) if module else COMMAND_MODULES)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except EdgedError as exc:
        print(f"edged: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
