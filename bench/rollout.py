"""Staged rollout at fleet scale: N real ``edged run`` daemons (the sample MLP) on one real
Mosquitto with mutual TLS, one ``edged rollout`` of a new signed release through a canary and
two more waves. Reports start-to-done per wave and the messages that went through the broker
(counted by a manager-side observer subscribed to every edged topic), per device.

    python bench/rollout.py --devices 10 --devices 40

Run from the repository root (it uses the test support's broker, PKI and daemon helpers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged.bundle.build import BundleSpec, build_bundle_from_dir
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.fleet.channel import ManagerSettings, _connected, wait_online
from edged.fleet.rollout import AbortPolicy, RolloutStore, drive, new_rollout
from edged.serve.probation import ProbationPolicy
from edged.transport.tls import TlsFiles
from tests.support.broker import running_broker
from tests.support.daemon import SAMPLE_MODELS, running_daemon, wait_ready
from tests.support.pki import FLEET_MANAGER, FleetPki, SigningKeys

GROUP = "bench"


def device_config(broker: Any, pki: FleetPki, device: str) -> str:
    files = pki.client(device)
    values = {
        "enabled": True, "host": broker.host, "port": broker.port,
        "ca_file": str(files.ca_file), "cert_file": str(files.cert_file),
        "key_file": str(files.key_file), "groups": [GROUP], "keepalive_s": 30,
        "reconnect_min_s": 0.2, "reconnect_max_s": 2.0, "progress_interval_s": 0.5,
        "download_reserve_bytes": 0,
    }  # fmt: skip
    lines = ["[telemetry]", "enabled = false", "[mqtt]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


async def observe(settings: ManagerSettings, counts: Counter[str], stop: asyncio.Event) -> None:
    """Count every message the broker delivers on the edged topics, by kind."""
    async with _connected(settings) as (client, fleet):

        def take(message: Any) -> None:
            parts = message.topic.split("/")
            kind = parts[3] if len(parts) > 3 and parts[1] in ("devices", "groups") else parts[1]
            counts[kind] += 1

        fleet.take = take  # type: ignore[method-assign]
        await client.subscribe(["edged/#"], qos=1)
        await stop.wait()


def run_one(n: int, work: Path) -> dict[str, Any]:
    pki = FleetPki(work / "pki")
    signing = SigningKeys(work / "keys")
    repo = work / "models"
    shutil.copytree(SAMPLE_MODELS, repo, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    source = work / "src" / "mlp" / "2"
    write_onnx_mlp(source, SAMPLE_MLP_LAYERS, seed=0, bias_shift=0.5)
    shutil.copy(SAMPLE_MODELS / "mlp" / "config.toml", source.parent / "config.toml")
    bundle = work / "mlp-2.bundle"
    policy = ProbationPolicy(min_s=1, max_s=60, min_requests=0)
    spec = dataclasses.replace(BundleSpec.starting_now("mlp", 2, 2), rollout=policy)
    build_bundle_from_dir(source, spec, [signing.signer], bundle)
    names = [f"node-{i:03}" for i in range(n)]
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(running_broker(work / "broker", pki, {}))
        started = time.monotonic()
        daemons = []
        for name in names:
            signing.install_trust(work / "d" / name / "state" / "trust")
            daemons.append(
                stack.enter_context(
                    running_daemon(
                        repo, work / "d" / name, device_config(broker, pki, name), wait=False
                    )
                )
            )
        for daemon in daemons:
            wait_ready(daemon.url, daemon.process, daemon.log_path, timeout_s=300)
        files = pki.client(FLEET_MANAGER)
        settings = ManagerSettings(
            broker.host, broker.manager_port,
            TlsFiles(files.ca_file, files.cert_file, files.key_file), timeout_s=30.0,
        )  # fmt: skip
        asyncio.run(wait_online(settings, names, timeout_s=300))
        boot_s = time.monotonic() - started
        rss_mb = sum(_rss_kb(d.process.pid) for d in daemons) / 1024

        async def rollout() -> tuple[Any, Counter[str], float]:
            counts: Counter[str] = Counter()
            stop = asyncio.Event()
            watcher = asyncio.create_task(observe(settings, counts, stop))
            await asyncio.sleep(1.0)  # subscribed; retained statuses counted before the start
            counts.clear()
            store = RolloutStore(work / "rollouts")
            state = new_rollout(
                store, bundle, GROUP, names, percents=(10, 50), rollout_id="bench",
                abort=AbortPolicy(wave_timeout_s=600),
            )  # fmt: skip
            t0 = time.time()
            state = await drive(settings, [signing.signer], store, state.id)
            total = time.time() - t0
            await asyncio.sleep(1.0)  # the last reports arrive
            stop.set()
            await watcher
            return state, counts, total

        state, counts, total = asyncio.run(rollout())
    waves = [
        {"devices": len(w), "seconds": round(done - begin, 2)}
        for w, begin, done in zip(state.waves, state.wave_started, state.wave_done_at, strict=False)
    ]
    messages = sum(counts.values())
    return {
        "devices": n,
        "status": state.status,
        "boot_s": round(boot_s, 1),
        "daemons_rss_mb": round(rss_mb),
        "start_to_done_s": round(total, 2),
        "waves": waves,
        "messages": messages,
        "messages_per_device": round(messages / n, 1),
        "by_kind": dict(counts),
        "published_by_tool": state.messages_sent,
    }


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("bench/out/rollout.json"))
    args = parser.parse_args()
    results = []
    for n in args.devices or [10]:
        with tempfile.TemporaryDirectory(prefix="edged-rollout-bench-") as tmp:
            result = run_one(n, Path(tmp))
        results.append(result)
        waves = ", ".join(f"{w['devices']} in {w['seconds']} s" for w in result["waves"])
        print(
            f"N={n}: {result['status']} in {result['start_to_done_s']} s (waves: {waves}); "
            f"{result['messages']} messages through the broker "
            f"({result['messages_per_device']}/device, {result['by_kind']}); "
            f"daemons booted in {result['boot_s']} s, {result['daemons_rss_mb']} MB RSS together",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
