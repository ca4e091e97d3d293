"""``edged run``: serve a model repository (no broker and no certificates needed)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from edged.config import (
    DEFAULT_CONFIG_PATH,
    DaemonConfig,
    StateConfig,
    default_socket_path,
    load_config,
)
from edged.daemon import run_daemon


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run the daemon: serve a model repository")
    p.add_argument("--models", type=Path, help="model repository directory (models.repository)")
    p.add_argument("--host", help="TCP address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000; -1 disables TCP)")
    p.add_argument(
        "--grpc-port", type=int, help="KServe v2 gRPC port (server.grpc_port; 0 disables gRPC)"
    )
    p.add_argument(
        "--socket", type=Path, help=f"Unix socket path (default {default_socket_path()})"
    )
    p.add_argument("--no-socket", action="store_true", help="do not listen on a Unix socket")
    p.add_argument(
        "--config",
        type=Path,
        help=f"TOML config file (default {DEFAULT_CONFIG_PATH} when it exists)",
    )
    p.add_argument("--state-dir", type=Path, help="state directory (state.directory)")
    p.set_defaults(handler=handle_run)
    r = subparsers.add_parser(
        "record-exit",
        help="(systemd ExecStopPost=) record how the daemon ended, for the crash gate",
    )
    r.add_argument("--config", type=Path, help=f"TOML config file (default {DEFAULT_CONFIG_PATH})")
    r.add_argument("--state-dir", type=Path, help="state directory (state.directory)")
    r.set_defaults(
        handler=handle_record_exit, models=None, host=None, port=None, grpc_port=None, socket=None,
        no_socket=False,
    )  # fmt: skip


def handle_run(args: argparse.Namespace) -> int:
    return run_daemon(lambda: load_with_overrides(args))


def handle_record_exit(args: argparse.Namespace) -> int:
    """systemd's ``$EXIT_CODE``/``$EXIT_STATUS``/``$SERVICE_RESULT`` into the run marker, so
    that a probation cut off by the crash names the signal or exit status (a clean stop
    records nothing)."""
    from edged.serve.crashgate import CrashInfo, RunMarker

    info = CrashInfo.from_systemd(os.environ)
    if info is not None:
        RunMarker(load_with_overrides(args).state.directory).record_exit(info)
    return 0


def default_state_dir(configured: Path) -> Path:
    """systemd's ``$STATE_DIRECTORY``, else the configured one when usable, else a per-user one
    (so ``edged run`` works for a developer without root)."""
    from_systemd = os.environ.get("STATE_DIRECTORY")
    if from_systemd:
        return Path(from_systemd.split(":")[0])
    probe = configured if configured.exists() else configured.parent
    if os.access(probe, os.W_OK):
        return configured
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "edged"


def load_with_overrides(args: argparse.Namespace) -> DaemonConfig:
    """The config file with the command line's overrides applied (again on every SIGHUP)."""
    config_path = args.config
    if config_path is None and DEFAULT_CONFIG_PATH.exists():
        config_path = DEFAULT_CONFIG_PATH
    config = load_config(config_path)
    server = config.server
    if server.socket_path is None and not args.no_socket:
        server = replace(server, socket_path=default_socket_path())
    if args.no_socket:
        server = replace(server, socket_path=None)
    if args.socket is not None:
        server = replace(server, socket_path=args.socket)
    if args.host is not None:
        server = replace(server, host=args.host)
    if args.port is not None:
        server = replace(server, port=args.port)
    if args.grpc_port is not None:
        server = replace(server, grpc_port=args.grpc_port)
    models = config.models
    if args.models is not None:
        models = replace(models, repository=args.models)
    state = config.state
    if args.state_dir is not None:
        state = replace(state, directory=args.state_dir)
    elif config.source is None or state.directory == StateConfig().directory:
        state = replace(state, directory=default_state_dir(state.directory))
    return replace(config, server=server, models=models, state=state)
