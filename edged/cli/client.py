"""``edged models``, ``edged status``, ``edged infer``, ``edged load``: talk to the local daemon."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from edged.api.client import Endpoint, LocalClient
from edged.config import default_socket_path
from edged.errors import InvalidRequestError
from edged.runtime.base import DATATYPE_TO_NUMPY, Array


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket", type=Path, help=f"daemon Unix socket (default {default_socket_path()})"
    )
    p.add_argument("--url", help="daemon URL instead of the socket, e.g. http://127.0.0.1:8000")


def client_from(args: argparse.Namespace) -> LocalClient:
    if args.url:
        return LocalClient(Endpoint(url=args.url))
    return LocalClient(Endpoint(socket_path=args.socket or default_socket_path()))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="list the models of the local daemon")
    add_endpoint_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle_models)

    p = subparsers.add_parser("status", help="the local daemon's state and recent swaps")
    add_endpoint_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle_status)

    p = subparsers.add_parser("infer", help="run one inference on the local daemon")
    add_endpoint_args(p)
    p.add_argument("model")
    p.add_argument(
        "--input",
        required=True,
        type=Path,
        help="a .npy file (single-input models) or a .json object {input_name: nested list}",
    )
    p.add_argument("--model-version", help="require this version")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--timeout-ms", type=float)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle_infer)

    p = subparsers.add_parser("load", help="(re)load a model from the repository (hot swap)")
    add_endpoint_args(p)
    p.add_argument("model")
    p.set_defaults(handler=handle_load)


def handle_models(args: argparse.Namespace) -> int:
    index = client_from(args).json("POST", "/v2/repository/index")
    if args.json:
        print(json.dumps(index, indent=2))
        return 0
    table = Table("model", "version", "state", "reason", title="models")
    for row in index:
        table.add_row(row["name"], row["version"], row["state"], row.get("reason", ""))
    Console().print(table)
    return 0


def processes_table(rows: list[dict[str, Any]]) -> Table:
    """The serving processes: the engine and each front end, with restarts and last exit."""
    table = Table("process", "pid", "state", "up s", "restarts", "last exit", title="processes")
    for p in rows:
        table.add_row(
            p["name"],
            str(p["pid"] or "-"),
            p["state"],
            "-" if p.get("uptime_s") is None else f"{p['uptime_s']:.0f}",
            str(p["restarts"]),
            p.get("last_exit") or "",
        )
    return table


def handle_status(args: argparse.Namespace) -> int:
    status = client_from(args).json("GET", "/edged/v1/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    console = Console()
    console.print(f"ready: {'yes' if status['ready'] else 'no'}")
    table = Table("model", "state", "version", "queue", "runtime", "last error", title="models")
    for m in status["models"]:
        table.add_row(
            m["name"],
            m["state"],
            m["version"] or "-",
            str(m["queue_depth"]),
            m["runtime"] or "-",
            m["last_error"] or "",
        )
    console.print(table)
    if status["events"]:
        events = Table("time", "model", "from", "to", "result", "reason", title="recent swaps")
        for e in status["events"][-10:]:
            events.add_row(
                time.strftime("%H:%M:%S", time.localtime(e["at"])),
                e["model"],
                e["from"] or "-",
                e["to"],
                "ok" if e["ok"] else "FAILED",
                e["reason"],
            )
        console.print(events)
    if status.get("processes"):
        console.print(processes_table(status["processes"]))
    watched = [m for m in status["models"] if m.get("probation") or m.get("last_probation")]
    if watched:
        probation = Table("model", "version", "state", "reason", title="probation")
        for m in watched:
            p = m.get("probation")
            if p:
                probation.add_row(m["name"], p["version"], "watching", p["reason"])
            else:
                last = m["last_probation"]
                probation.add_row(m["name"], last["version"], last["decision"], last["reason"])
        console.print(probation)
    return 0


def _read_inputs(path: Path, metadata: dict[str, Any]) -> dict[str, Array]:
    specs = {i["name"]: i for i in metadata["inputs"]}
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise InvalidRequestError(
                    f"a .npy file feeds single-input models; this one has {', '.join(specs)}: "
                    "use a .json object instead"
                )
            return {next(iter(specs)): np.load(path, allow_pickle=False)}
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"{path} must hold a JSON object {{input_name: values}}")
    inputs: dict[str, Array] = {}
    for name, values in doc.items():
        spec = specs.get(name)
        if spec is None:
            raise InvalidRequestError(
                f"{path}: the model has no input {name!r} ({', '.join(specs)})"
            )
        inputs[name] = np.asarray(values, dtype=DATATYPE_TO_NUMPY[spec["datatype"]])
    return inputs


def handle_infer(args: argparse.Namespace) -> int:
    client = client_from(args)
    metadata = client.json("GET", f"/v2/models/{args.model}")
    inputs = _read_inputs(args.input, metadata)
    version, outputs = client.infer(
        args.model,
        inputs,
        version=args.model_version,
        priority=args.priority,
        timeout_ms=args.timeout_ms,
    )
    if args.json:
        doc = {
            "model_name": args.model,
            "model_version": version,
            "outputs": {k: v.tolist() for k, v in outputs.items()},
        }
        print(json.dumps(doc))
        return 0
    console = Console()
    console.print(f"{args.model} version {version}")
    for name, value in outputs.items():
        console.print(f"[bold]{name}[/bold] {value.dtype} {list(value.shape)}")
        np.set_printoptions(precision=4, suppress=True, threshold=64)
        console.print(str(value), markup=False)
    return 0


def handle_load(args: argparse.Namespace) -> int:
    result = client_from(args).json("POST", f"/v2/repository/models/{args.model}/load")
    print(f"{args.model}: serving version {result['version']}", file=sys.stdout)
    return 0
