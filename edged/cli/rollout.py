"""``edged rollout start|status|pause|resume|abort``: staged rollouts of a signed release to a
group (``edged.fleet.rollout``). Exit codes: 0 done, 1 aborted (or an error), 3 paused or
waiting for offline devices (``resume`` goes on)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from edged.cli.fleetargs import add_artifact_args, add_connection_args
from edged.fleet.rolloutstate import (
    ABORTED,
    DONE,
    PASSED,
    AbortPolicy,
    RolloutState,
    RolloutStore,
    check_percents,
)

# The commands that talk to the broker import the fleet manager's client when they run:
# ``edged rollout status`` on a 10,000-device state file needs none of it.

TABLE_DEVICES = 100
LISTED_DEVICES = 20
EXIT_ABORTED = 1
EXIT_UNFINISHED = 3


def _store(args: argparse.Namespace) -> RolloutStore:
    if args.state_dir is not None:
        return RolloutStore(args.state_dir)
    fleet = getattr(args, "fleet", None)
    if fleet is not None:
        return RolloutStore(Path(fleet) / "rollouts")
    return RolloutStore(Path(os.environ.get("EDGED_ROLLOUT_DIR", "rollouts")))


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where rollout state lives (default: <fleet>/rollouts, else ./rollouts)",
    )


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("rollout", help="staged rollouts with probation and abort")
    sub = p.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)

    start = sub.add_parser("start", help="start a staged rollout of a signed bundle to a group")
    start.add_argument("bundle", type=Path)
    start.add_argument("--group", required=True)
    start.add_argument("--canary", help="the first wave's device (default: the first by name)")
    start.add_argument(
        "--waves",
        default="10,50",
        help="cumulative percentages of the group after the canary; 100 is always last",
    )
    start.add_argument("--device", action="append", default=[], help="member (default: status)")
    start.add_argument("--abort-failed-percent", type=float, default=0.0)
    start.add_argument("--abort-min-devices", type=int, default=1)
    start.add_argument("--wave-timeout", type=float, default=600.0, help="seconds")
    start.add_argument("--id", help="rollout id (default: <model>-<version>-<random>)")
    add_artifact_args(start)
    _add_state_dir(start)
    add_connection_args(start, signing=True)
    start.set_defaults(handler=handle_start)

    for name, handler, text in (
        ("resume", handle_resume, "go on with a paused, interrupted or waiting rollout"),
        ("abort", handle_abort, "abort: roll back every device that took the release"),
        ("pause", handle_pause, "stop after the current step; 'resume' goes on"),
        ("status", handle_status, "per wave and per device, from the saved state"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("id")
        _add_state_dir(c)
        if name == "status":
            c.add_argument("--json", action="store_true")
            c.add_argument(
                "--devices",
                action="store_true",
                help=f"every device's line (default up to {TABLE_DEVICES} devices; "
                "larger rollouts show a summary per wave and the devices not passed)",
            )
            c.add_argument("--fleet", type=Path, default=os.environ.get("EDGED_FLEET_DIR"))
        elif name == "pause":
            c.add_argument("--fleet", type=Path, default=os.environ.get("EDGED_FLEET_DIR"))
        else:
            add_connection_args(c, signing=True)
            c.add_argument(
                "--offline-timeout",
                type=float,
                help="how long to wait for offline devices (default: the wave timeout)",
            )
        c.set_defaults(handler=handler)


def _print_event(state: RolloutState, message: str) -> None:
    print(f"[{state.id}] {message}", flush=True)


def _table(state: RolloutState, every_device: bool = False) -> str:
    """Per wave: each device's line, or for a large rollout a count per state and the lines
    of the devices that did not pass (at most ``LISTED_DEVICES`` per wave)."""
    lines = [
        f"rollout {state.id}: {state.model} version {state.version} to group {state.group}: "
        f"{state.status}" + (f" ({state.reason})" if state.reason else ""),
    ]
    detailed = every_device or len(state.devices) <= TABLE_DEVICES
    for i, wave in enumerate(state.waves):
        mark = "*" if i == state.wave and state.status not in (DONE, ABORTED) else " "
        timing = ""
        if i < len(state.wave_done_at) and i < len(state.wave_started):
            timing = f" done in {state.wave_done_at[i] - state.wave_started[i]:.1f} s"
        counts = Counter(state.devices[d].state for d in wave)
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        lines.append(f"{mark} wave {i + 1} ({len(wave)} devices: {summary}){timing}:")
        shown = wave if detailed else [d for d in wave if state.devices[d].state != PASSED]
        for device in shown[: None if detailed else LISTED_DEVICES]:
            r = state.devices[device]
            reason = f"  {r.reason}" if r.reason else ""
            lines.append(f"    {device:<20} {r.state:<12}{reason}")
        if not detailed and len(shown) > LISTED_DEVICES:
            lines.append(f"    ... and {len(shown) - LISTED_DEVICES} more (--devices lists all)")
    return "\n".join(lines)


def _finish(state: RolloutState) -> int:
    print(_table(state))
    if state.status == DONE:
        return 0
    if state.status == ABORTED:
        return EXIT_ABORTED
    return EXIT_UNFINISHED


def handle_start(args: argparse.Namespace) -> int:
    from edged.cli.fleet import settings_from, signing_keys
    from edged.fleet.artifacts import artifact_store
    from edged.fleet.rollout import drive, members_of, new_rollout

    settings = settings_from(args)
    keys = signing_keys(args)
    store = _store(args)
    percents = check_percents([int(p) for p in args.waves.split(",") if p.strip()])
    members = args.device or asyncio.run(members_of(settings, args.group))
    state = new_rollout(
        store,
        args.bundle,
        args.group,
        members,
        percents=percents,
        canary=args.canary,
        abort=AbortPolicy(
            failed_permille=round(args.abort_failed_percent * 10),
            min_devices=args.abort_min_devices,
            wave_timeout_s=args.wave_timeout,
        ),
        rollout_id=args.id,
        artifacts=artifact_store(args.artifacts, args.base_url),
    )
    print(f"rollout {state.id}: waves {state.waves}", flush=True)
    result = asyncio.run(drive(settings, keys, store, state.id, on_event=_print_event))
    return _finish(result)


def handle_resume(args: argparse.Namespace) -> int:
    from edged.cli.fleet import settings_from, signing_keys
    from edged.fleet.rollout import drive

    store = _store(args)
    result = asyncio.run(
        drive(
            settings_from(args),
            signing_keys(args),
            store,
            args.id,
            on_event=_print_event,
            offline_timeout_s=args.offline_timeout,
        )
    )
    return _finish(result)


def handle_abort(args: argparse.Namespace) -> int:
    from edged.cli.fleet import settings_from, signing_keys
    from edged.fleet.rollout import drive

    store = _store(args)
    store.set_control(args.id, "abort")
    if store.is_driven(args.id):
        print(f"rollout {args.id}: abort requested; the running edged rollout carries it out")
        return 0
    result = asyncio.run(
        drive(settings_from(args), signing_keys(args), store, args.id, on_event=_print_event)
    )
    print(_table(result))
    return 0 if result.status == ABORTED else EXIT_UNFINISHED


def handle_pause(args: argparse.Namespace) -> int:
    store = _store(args)
    store.set_control(args.id, "pause")
    print(f"rollout {args.id}: pause requested")
    return 0


def handle_status(args: argparse.Namespace) -> int:
    state = _store(args).load(args.id)
    if args.json:
        print(json.dumps(state.to_json(), indent=1, sort_keys=True))
    else:
        print(_table(state, args.devices))
    return 0
