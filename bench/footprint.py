"""Footprint of the daemon on this machine, with the default config and the two sample models
(``models/``): time from start to READY=1, memory of all its processes together (PSS summed,
so pages they share count once), and idle CPU of all of them over a quiet stretch.

Targets ("Serving at scale", item 6): READY <= 0.6 s, PSS <= 140 MiB, idle CPU <= 0.5 % of a
core. The same is measured for edged in one process (``[server] workers = 0``) in the same run,
the design before, as the baseline.

The bench plays systemd's part: it binds $NOTIFY_SOCKET and times the READY=1 datagram.
Run: python bench/footprint.py [--idle-seconds 30] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from edged._net import free_port
from edged._process import stop_process

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def pss_bytes(processes: list[psutil.Process]) -> dict[str, int]:
    """PSS of each process (its private pages plus its share of the pages it shares)."""
    out = {}
    for p in processes:
        with contextlib.suppress(psutil.Error):
            out[f"{p.pid} {' '.join(p.cmdline())[:60]}"] = p.memory_full_info().pss
    return out


def start(work: Path, workers: int | None) -> tuple[subprocess.Popen[bytes], float, socket.socket]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(work / "notify")
    notify.bind(address)
    env = {**os.environ, "NOTIFY_SOCKET": address}
    config = work / "edged.toml"
    config.write_text("" if workers is None else f"[server]\nworkers = {workers}\n")
    args = [
        sys.executable, "-m", "edged.cli.main", "run", "--models", str(REPO / "models"),
        "--port", "0", "--grpc-port", str(free_port()), "--socket", str(work / "edged.sock"),
        "--state-dir", str(work / "state"), "--config", str(config),
    ]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    notify.settimeout(60)
    while True:
        message = notify.recv(4096).decode()
        if "READY=1" in message.splitlines():
            return process, time.monotonic() - started, notify


def measure(
    root: Path, name: str, workers: int | None, runs: int, idle_s: float
) -> dict[str, object]:
    ready: list[float] = []
    pss: list[int] = []
    processes: dict[str, int] = {}
    idle_cpu = 0.0
    for i in range(runs):
        work = root / f"{name}-{i}"
        work.mkdir()
        process, seconds, notify = start(work, workers)
        ready.append(seconds)
        time.sleep(2.0)  # let start-up settle (the front ends connect, imports finish)
        members = tree(process.pid)
        processes = pss_bytes(members)
        pss.append(sum(processes.values()))
        if i == runs - 1:
            before = cpu_seconds(members)
            time.sleep(idle_s)
            idle_cpu = (cpu_seconds(members) - before) / idle_s
        stop_process(process, 30)
        notify.close()
    ready.sort()
    pss.sort()
    return {
        "ready_s_median": ready[len(ready) // 2],
        "ready_s_all": ready,
        "pss_mib_median": pss[len(pss) // 2] / MIB,
        "pss_mib_per_process": {k: v / MIB for k, v in processes.items()},
        "idle_cpu_percent_of_one_core": idle_cpu * 100,
        "idle_seconds": idle_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=3, help="start-up runs (the median counts)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edged-footprint-") as tmp:
        root = Path(tmp)
        results = {
            "default": measure(root, "default", None, args.runs, args.idle_seconds),
            "one_process": measure(root, "one", 0, args.runs, args.idle_seconds),
        }
    for name, r in results.items():
        print(f"{name}:")
        per_process = r["pss_mib_per_process"]
        assert isinstance(per_process, dict)
        for pname, mib in per_process.items():
            print(f"    {mib:7.1f} MiB  {pname}")
    rows = []
    for name, r in results.items():
        ready, pss, idle = (
            r["ready_s_median"],
            r["pss_mib_median"],
            r["idle_cpu_percent_of_one_core"],
        )
        assert isinstance(ready, float)
        assert isinstance(pss, float)
        assert isinstance(idle, float)
        rows += [
            (f"{name}: start to READY=1", f"{ready:.2f} s", "<= 0.6 s", ready <= 0.6),
            (f"{name}: PSS, all processes", f"{pss:.1f} MiB", "<= 140 MiB", pss <= 140),
            (
                f"{name}: idle CPU, all processes",
                f"{idle:.3f} % of a core",
                "<= 0.5 %",
                idle <= 0.5,
            ),
        ]
    for name, value, target, ok in rows:
        print(f"{name:<40} {value:>20}  {target:<11} {'PASS' if ok else 'MISS'}")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "footprint.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
