"""Rollouts at fleet scale on simulated devices: N simulated devices (``edged.fleet.sim``, one
MQTT/mTLS connection and one client certificate each) on one real Mosquitto with mutual TLS,
the bundle either on a real nginx (Debian package, TLS, Range) as an HTTPS artifact or as
retained MQTT chunks, and the real ``edged rollout start`` tool in its own process through a
canary and two more waves. Reports start-to-done per wave, messages and bytes through the
broker per device and the peak retained bytes (a manager-side observer subscribed to
``edged/#``), bytes served by nginx, and the rollout tool's peak RSS and CPU time.

    python bench/fleetsim.py --run https:100 --run https:2000 --run https:10000 \\
        --run mqtt:100 --run mqtt:2000

Run from the repository root (it uses the test support's broker, nginx and PKI helpers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged.bundle.build import BundleSpec, build_bundle_from_dir
from edged.bundle.trust import load_trust_state
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.fleet.channel import ManagerSettings, wait_online
from edged.fleet.rollout import RolloutStore
from edged.fleet.sim import (
    FleetSim,
    SimSettings,
    Tally,
    Verdicts,
    sim_identities,
    tally_broker,
)
from edged.transport.tls import TlsFiles
from tests.support.broker import running_broker
from tests.support.daemon import SAMPLE_MODELS
from tests.support.nginx import Site, running_nginx
from tests.support.pki import FLEET_MANAGER, FleetPki, SigningKeys

ROOT = Path(__file__).resolve().parents[1]
GROUP = "bench"


def build_release(work: Path, signing: SigningKeys) -> Path:
    source = work / "src" / "mlp" / "2"
    write_onnx_mlp(source, SAMPLE_MLP_LAYERS, seed=0, bias_shift=0.5)
    shutil.copy(SAMPLE_MODELS / "mlp" / "config.toml", source.parent / "config.toml")
    bundle = work / "mlp-2.bundle"
    build_bundle_from_dir(source, BundleSpec.starting_now("mlp", 2, 2), [signing.signer], bundle)
    return bundle


def run_one(mode: str, n: int, work: Path, revert_percent: float = 0.0) -> dict[str, Any]:
    pki = FleetPki(work / "pki")
    signing = SigningKeys(work / "keys")
    bundle = build_release(work, signing)
    names = [f"sim-{i:05}" for i in range(n)]
    t0 = time.monotonic()
    identity = sim_identities(pki.ca, pki.ca_file, names, work / "sim-pki")
    certs_s = time.monotonic() - t0
    manager_files = pki.client(FLEET_MANAGER)
    with (
        running_broker(work / "broker", pki, {}) as broker,
        running_nginx(work / "nginx", pki, [Site("store")]) as nginx,
    ):
        settings = SimSettings(
            host=broker.host, port=broker.port, identity=identity,
            trust=load_trust_state(signing.root_bytes(), signing.signers_bytes()),
            groups=(GROUP,), artifact_ca_file=pki.ca_file, serving_version=1, seed=n,
            verdicts=Verdicts(promoted=100 - revert_percent, reverted=revert_percent),
        )  # fmt: skip
        manager = ManagerSettings(
            broker.host, broker.manager_port,
            TlsFiles(manager_files.ca_file, manager_files.cert_file, manager_files.key_file),
            timeout_s=60.0,
        )  # fmt: skip
        traced = bool(os.environ.get("EDGED_BENCH_TRACE_TOOL"))
        tool = [__file__, "tool"] if traced else ["-m", "edged.cli.main"]
        # e.g. "-m memray run --native -q -o /tmp/tool.bin": a profiler around the tool
        tool = os.environ.get("EDGED_BENCH_TOOL_PREFIX", "").split() + tool
        cli = [
            sys.executable, *tool, "rollout", "start", str(bundle),
            "--group", GROUP, "--waves", "10,50", "--wave-timeout", "900", "--id", "bench",
            "--state-dir", str(work / "rollouts"),
            "--host", broker.host, "--port", str(broker.manager_port),
            "--ca-file", str(manager_files.ca_file), "--cert-file", str(manager_files.cert_file),
            "--key-file", str(manager_files.key_file), "--signing-key", str(signing.signer_file),
            "--op-timeout", "60",
        ]  # fmt: skip
        if revert_percent:
            # Abort once more than 2 % of at least 20 decided devices reverted.
            cli += ["--abort-failed-percent", "2", "--abort-min-devices", "20"]
        if mode == "https":
            cli += ["--artifacts", str(nginx.root("store") / "artifacts")]
            cli += ["--base-url", nginx.base_url("store")]
        result = asyncio.run(_drive(settings, manager, names, cli, work))
        result["nginx_bytes"] = sum(r[3] for r in _nginx_log(nginx.access_log))
    state = RolloutStore(work / "rollouts").load("bench")
    waves = [
        {"devices": len(w), "seconds": round(done - begin, 2)}
        for w, begin, done in zip(state.waves, state.wave_started, state.wave_done_at, strict=False)
    ]
    started = state.wave_started[0] if state.wave_started else 0.0
    done_at = state.wave_done_at[-1] if state.wave_done_at else 0.0
    status_s = _time_status(work)
    return {
        "mode": mode,
        "devices": n,
        "bundle_bytes": bundle.stat().st_size,
        "status": state.status,
        "reason": state.reason,
        "device_states": dict(Counter(r.state for r in state.devices.values())),
        "certs_s": round(certs_s, 1),
        "start_to_done_s": round(done_at - started, 1),
        "waves": waves,
        "rollout_status_s": status_s,
        **result,
    }


async def _drive(
    settings: SimSettings, manager: ManagerSettings, names: list[str], cli: list[str], work: Path
) -> dict[str, Any]:
    sim = FleetSim(settings, names)
    t0 = time.monotonic()
    await sim.start(timeout_s=1800)
    connect_s = time.monotonic() - t0
    _note(f"{len(names)} simulated devices connected in {connect_s:.1f} s")
    await wait_online(manager, names, timeout_s=600)
    # The observer runs in its own process: in this one it would compete with thousands of
    # simulated devices for the event loop and fall behind the broker.
    tls = manager.tls
    counter = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "tally", "--host", manager.host, "--port", str(manager.port),
        "--ca-file", str(tls.ca_file), "--cert-file", str(tls.cert_file),
        "--key-file", str(tls.key_file), "--out", str(work / "tally.json"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert counter.stdin is not None
    assert counter.stdout is not None
    await counter.stdout.readline()  # "ready": subscribed to edged/#
    await asyncio.sleep(3.0)  # the retained statuses it was sent on subscribing are counted
    counter.stdin.write(b"reset\n")
    await counter.stdin.drain()
    await counter.stdout.readline()
    _note("all online; starting the rollout tool")
    with open(work / "rollout.log", "w") as log:  # noqa: ASYNC230 - opened once
        process = await asyncio.to_thread(
            subprocess.Popen, cli, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("EDGED_BENCH_TOOL_PATH", "")) if p)},
        )  # fmt: skip
        hwm = asyncio.create_task(asyncio.to_thread(_peak_rss_kib, process))
        _, status, usage = await asyncio.to_thread(os.wait4, process.pid, 0)
        peak_kib = await hwm
    process.returncode = os.waitstatus_to_exitcode(status)
    _note(f"rollout tool exited {process.returncode}")
    await asyncio.sleep(2.0)  # the observer takes what the broker still delivers
    counter.stdin.write(b"stop\n")
    await counter.stdin.drain()
    await counter.wait()
    tally = json.loads((work / "tally.json").read_text())
    n = len(names)
    messages = sum(tally["messages"].values())
    result = {
        "sim_connect_s": round(connect_s, 1),
        "tool_exit": process.returncode,
        # VmHWM of the tool's own image: ru_maxrss of a child also counts the forking
        # parent's pages (here: the simulator's), so it is not the tool's.
        "tool_peak_rss_mib": round(peak_kib / 1024, 1),
        "tool_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "broker_messages": messages,
        "broker_messages_per_device": round(messages / n, 1),
        "broker_bytes_per_device": round(sum(tally["bytes"].values()) / n),
        "by_kind": tally["messages"],
        "peak_retained_bytes": tally["peak_retained_bytes"],
        "peak_retained_bytes_per_device": round(tally["peak_retained_bytes"] / n),
        "sim_verdicts": dict(sim.counters.verdicts),
        "sim_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    await sim.stop()
    return result


async def _tally(args: argparse.Namespace) -> None:
    """The observer process: counts everything under edged/# until told to stop."""
    settings = ManagerSettings(
        args.host, args.port, TlsFiles(args.ca_file, args.cert_file, args.key_file), timeout_s=60
    ).client_settings()
    tally = Tally()
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(tally_broker(settings, "edged", tally, ready, stop))
    await ready.wait()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() == "reset":
            tally.reset()
            print("reset", flush=True)
        else:
            break
    stop.set()
    await task
    args.out.write_text(json.dumps(tally.to_json()))


def _peak_rss_kib(process: subprocess.Popen[bytes]) -> int:
    """The process's peak RSS (VmHWM), read until it exits (it only grows)."""
    peak = 0
    path = Path(f"/proc/{process.pid}/status")
    while True:
        try:
            text = path.read_text()
        except OSError:
            return peak
        state = next((ln for ln in text.splitlines() if ln.startswith("State:")), "")
        if "zombie" in state:
            return peak
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
        time.sleep(0.1)


def _note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _nginx_log(path: Path) -> list[tuple[str, int, str, int]]:
    """(port, status, range, bytes sent) of every request nginx logged."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            m = re.match(r'^(\S+) (\d+) "(.*)" (\d+)$', line)
            if m:
                out.append((m.group(1), int(m.group(2)), m.group(3), int(m.group(4))))
    return out


def _time_status(work: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "edged.cli.main", "rollout", "status", "bench",
         "--state-dir", str(work / "rollouts")],
        check=True, capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    return round(time.monotonic() - t0, 2)


def main() -> None:
    if sys.argv[1:2] == ["tool"]:  # the rollout tool, with the top allocation sites at exit
        import atexit
        import tracemalloc

        from edged.cli.main import main as edged_main

        def dump() -> None:
            current, peak = tracemalloc.get_traced_memory()
            print(f"python heap now {current >> 20} MiB, peak {peak >> 20} MiB", file=sys.stderr)
            for stat in tracemalloc.take_snapshot().statistics("lineno")[:15]:
                print(stat, file=sys.stderr)

        tracemalloc.start()
        atexit.register(dump)
        sys.exit(edged_main(sys.argv[2:]))
    if sys.argv[1:2] == ["tally"]:
        t = argparse.ArgumentParser()
        t.add_argument("mode")
        for name in ("--host", "--ca-file", "--cert-file", "--key-file", "--out"):
            t.add_argument(name, type=str if name == "--host" else Path, required=True)
        t.add_argument("--port", type=int, required=True)
        asyncio.run(_tally(t.parse_args()))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        help="MODE:N[:revertP], MODE https|mqtt; revertP: P %% of the devices revert",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/fleetsim.json"))
    parser.add_argument(
        "--trace-tool", action="store_true", help="log the tool's top allocations (slower)"
    )
    args = parser.parse_args()
    if args.trace_tool:
        os.environ["EDGED_BENCH_TRACE_TOOL"] = "1"
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = []
    for spec in args.run or ["https:100"]:
        mode, count, *rest = spec.split(":")
        revert = float(rest[0].removeprefix("revert")) if rest else 0.0
        with tempfile.TemporaryDirectory(prefix="edged-fleetsim-") as tmp:
            try:
                result = run_one(mode, int(count), Path(tmp), revert)
            finally:
                log = Path(tmp) / "rollout.log"
                if log.exists():
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(log, args.out.parent / f"fleetsim-{mode}-{count}.log")
        results.append(result)
        print(json.dumps(result), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
