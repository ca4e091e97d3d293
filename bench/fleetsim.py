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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged.bundle.build import BundleSpec, build_bundle_from_dir
from edged.bundle.trust import load_trust_state
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.fleet.channel import ManagerSettings, wait_online
from edged.fleet.rollout import RolloutStore
from edged.fleet.sim import FleetSim, SimSettings, Tally, sim_identities, tally_broker
from edged.transport.tls import TlsFiles
from tests.support.broker import running_broker
from tests.support.daemon import SAMPLE_MODELS
from tests.support.nginx import Site, running_nginx
from tests.support.pki import FLEET_MANAGER, FleetPki, SigningKeys

ROOT = Path(__file__).resolve().parents[1]
GROUP = "bench"


def build_release(work: Path, signing: SigningKeys) -> Path:
    import shutil

    source = work / "src" / "mlp" / "2"
    write_onnx_mlp(source, SAMPLE_MLP_LAYERS, seed=0, bias_shift=0.5)
    shutil.copy(SAMPLE_MODELS / "mlp" / "config.toml", source.parent / "config.toml")
    bundle = work / "mlp-2.bundle"
    build_bundle_from_dir(source, BundleSpec.starting_now("mlp", 2, 2), [signing.signer], bundle)
    return bundle


def run_one(mode: str, n: int, work: Path) -> dict[str, Any]:
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
            groups=(GROUP,), artifact_ca_file=pki.ca_file, serving_version=1,
        )  # fmt: skip
        manager = ManagerSettings(
            broker.host, broker.manager_port,
            TlsFiles(manager_files.ca_file, manager_files.cert_file, manager_files.key_file),
            timeout_s=60.0,
        )  # fmt: skip
        cli = [
            sys.executable, "-m", "edged.cli.main", "rollout", "start", str(bundle),
            "--group", GROUP, "--waves", "10,50", "--wave-timeout", "900", "--id", "bench",
            "--state-dir", str(work / "rollouts"),
            "--host", broker.host, "--port", str(broker.manager_port),
            "--ca-file", str(manager_files.ca_file), "--cert-file", str(manager_files.cert_file),
            "--key-file", str(manager_files.key_file), "--signing-key", str(signing.signer_file),
            "--op-timeout", "60",
        ]  # fmt: skip
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
    tally = Tally()
    stop, ready = asyncio.Event(), asyncio.Event()
    client_settings = await asyncio.to_thread(manager.client_settings)
    listener = asyncio.create_task(tally_broker(client_settings, "edged", tally, ready, stop))
    await ready.wait()
    await wait_online(manager, names[-1:], timeout_s=600)
    tally.reset()
    peak_before = tally.retained_bytes
    log = open(work / "rollout.log", "w")  # noqa: SIM115, ASYNC230 - closed below
    process = await asyncio.to_thread(
        subprocess.Popen, cli, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    peak = [peak_before]

    async def watch_peak() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tally.retained_bytes)
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_peak())
    _, status, usage = await asyncio.to_thread(os.wait4, process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    await watcher
    log.close()
    stop.set()
    await listener
    n = len(names)
    result = {
        "sim_connect_s": round(connect_s, 1),
        "tool_exit": process.returncode,
        "tool_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "tool_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "broker_messages": tally.total_messages,
        "broker_messages_per_device": round(tally.total_messages / n, 1),
        "broker_bytes_per_device": round(tally.total_bytes / n),
        "by_kind": dict(tally.messages),
        "peak_retained_bytes": peak[0],
        "peak_retained_bytes_per_device": round(peak[0] / n),
        "sim_verdicts": dict(sim.counters.verdicts),
        "sim_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    await sim.stop()
    return result


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
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="MODE:N, MODE https|mqtt")
    parser.add_argument("--out", type=Path, default=Path("bench/out/fleetsim.json"))
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = []
    for spec in args.run or ["https:100"]:
        mode, _, count = spec.partition(":")
        with tempfile.TemporaryDirectory(prefix="edged-fleetsim-") as tmp:
            result = run_one(mode, int(count), Path(tmp))
        results.append(result)
        print(json.dumps(result), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
