"""Footprint of the daemon on this machine: time from start to READY=1, RSS with no models,
and idle CPU over a quiet minute. Targets (issue): <= 1 s, <= 80 MB, <= 0.5 % of one core.

The bench plays systemd's part: it binds $NOTIFY_SOCKET and times the READY=1 datagram.
Run: python bench/footprint.py [--idle-seconds 60] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edged._net import free_port

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start(models: Path, work: Path) -> tuple[subprocess.Popen[bytes], float, socket.socket]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(work / "notify")
    notify.bind(address)
    env = {**os.environ, "NOTIFY_SOCKET": address}
    args = [
        sys.executable, "-m", "edged.cli.main", "run", "--models", str(models),
        "--port", "0", "--grpc-port", str(free_port()), "--socket", str(work / "edged.sock"),
        "--state-dir", str(work / "state"),
    ]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    notify.settimeout(30)
    while True:
        message = notify.recv(4096).decode()
        if "READY=1" in message.splitlines():
            return process, time.monotonic() - started, notify


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3, help="start-up runs (the median counts)")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edged-footprint-") as tmp:
        root = Path(tmp)
        empty = root / "empty-repo"
        empty.mkdir()
        ready_s: list[float] = []
        rss: list[int] = []
        for i in range(args.runs):
            work = root / f"run{i}"
            work.mkdir()
            process, seconds, notify = start(empty, work)
            time.sleep(1.0)  # let start-up settle before reading RSS
            rss.append(rss_bytes(process.pid))
            ready_s.append(seconds)
            if i < args.runs - 1:
                stop(process)
                notify.close()
                continue
            before = cpu_seconds(process.pid)
            time.sleep(args.idle_seconds)
            idle_cpu = (cpu_seconds(process.pid) - before) / args.idle_seconds
            stop(process)
            notify.close()
        work = root / "with-samples"
        work.mkdir()
        process, with_models_s, notify = start(REPO / "models", work)
        time.sleep(1.0)
        rss_models = rss_bytes(process.pid)
        stop(process)
        notify.close()
    ready_s.sort()
    rss.sort()
    results = {
        "ready_s_median": ready_s[len(ready_s) // 2],
        "rss_mb_no_models": rss[len(rss) // 2] / 1e6,
        "idle_cpu_percent_of_one_core": idle_cpu * 100,
        "idle_seconds": args.idle_seconds,
        "ready_s_with_sample_models": with_models_s,
        "rss_mb_with_sample_models": rss_models / 1e6,
    }
    rows = [
        (
            "start to READY=1 (no models)",
            f"{results['ready_s_median']:.2f} s",
            "<= 1 s",
            results["ready_s_median"] <= 1.0,
        ),
        (
            "RSS, no models",
            f"{results['rss_mb_no_models']:.1f} MB",
            "<= 80 MB",
            results["rss_mb_no_models"] <= 80,
        ),
        (
            f"idle CPU over {args.idle_seconds:.0f} s",
            f"{results['idle_cpu_percent_of_one_core']:.3f} % of a core",
            "<= 0.5 %",
            results["idle_cpu_percent_of_one_core"] <= 0.5,
        ),
        ("start to READY=1 (sample models)", f"{with_models_s:.2f} s", "", None),
        ("RSS, sample models loaded", f"{results['rss_mb_with_sample_models']:.1f} MB", "", None),
    ]
    for name, value, target, ok in rows:
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        print(f"{name:<36} {value:>22}  {target:<10} {verdict}")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "footprint.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
