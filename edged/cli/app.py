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

# Modules that contribute sub-commands; each has `register(subparsers) -> None`.
COMMAND_MODULES = (
    "edged.cli.run",
    "edged.cli.client",
    "edged.cli.configcmd",
    "edged.cli.fleet",
    "edged.cli.bundle",
    "edged.cli.top",
    "edged.cli.install",
    "edged.cli.doctor",
    "edged.cli.demo",
)

Handler = Callable[[argparse.Namespace], int]


# `edged run` starts the daemon: it imports only its own command module, so start-up does not
# pay for every tool's imports (rich tables, the fleet manager's MQTT client...).
FAST_PATHS = {"run": ("edged.cli.run",)}


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
    parser = build_parser(FAST_PATHS.get(command or "", COMMAND_MODULES))
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
