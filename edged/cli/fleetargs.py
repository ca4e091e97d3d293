"""Command-line options the fleet commands share (``edged push``, ``edged fleet``, ``edged
rollout``): the broker connection and the artifact store. Only argparse: a command registers
its options without importing the fleet manager's MQTT client."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"EDGED_FLEET_{name}", default)


def add_connection_args(p: argparse.ArgumentParser, signing: bool = False) -> None:
    g = p.add_argument_group(
        "broker connection (default: the fleet directory, else EDGED_FLEET_* variables)"
    )
    g.add_argument(
        "--fleet",
        type=Path,
        default=_env("DIR"),
        help="fleet directory made by 'edged fleet init' (EDGED_FLEET_DIR)",
    )
    g.add_argument("--manager", help="manager certificate of the fleet directory to use")
    g.add_argument("--host", help="broker host (EDGED_FLEET_HOST, default localhost)")
    g.add_argument("--port", type=int, help="broker port (EDGED_FLEET_PORT, default 8883)")
    g.add_argument("--ca-file", type=Path, help="CA of the broker (EDGED_FLEET_CA)")
    g.add_argument("--cert-file", type=Path, help="our client certificate (EDGED_FLEET_CERT)")
    g.add_argument("--key-file", type=Path, help="its key, mode 0600 (EDGED_FLEET_KEY)")
    g.add_argument("--topic-prefix", help="EDGED_FLEET_TOPIC_PREFIX, default edged")
    g.add_argument("--op-timeout", type=float, default=10.0, help="per broker operation (s)")
    if signing:
        g.add_argument(
            "--signing-key",
            type=Path,
            help="Ed25519 key that signs commands (EDGED_FLEET_SIGNING_KEY)",
        )


def add_artifact_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--artifacts",
        type=Path,
        metavar="DIR",
        help="write the bundle as DIR/<sha256>.bundle (a directory an HTTPS server serves) "
        "and announce its URLs instead of publishing chunks through the broker",
    )
    p.add_argument(
        "--base-url",
        action="append",
        default=[],
        metavar="URL",
        help="URL under which DIR is served; repeat for mirrors, tried in order",
    )
