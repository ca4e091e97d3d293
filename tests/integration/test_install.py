"""The operator's path for signed bundles, all through the real CLI and a real daemon:
``edged keygen``, ``edged trust init``, ``edged bundle build``, ``edged install`` under load,
a refused tampered bundle, ``edged rollback``, and the store surviving a restart."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from tests.support.cli import edged, trust_init
from tests.support.daemon import DaemonProcess, running_daemon

pytestmark = pytest.mark.integration

X = np.random.default_rng(11).standard_normal((1, 64), dtype=np.float32)


def build(keys: Path, tmp_path: Path, version: int, counter: int, shift: float) -> Path:
    model_dir = tmp_path / "build" / str(version)
    write_onnx_mlp(model_dir, SAMPLE_MLP_LAYERS, seed=0, bias_shift=shift)
    out = tmp_path / f"mlp-{version}.bundle"
    edged(
        "bundle", "build", "--model-dir", str(model_dir), "--config", str(tmp_path / "models" / "mlp" / "config.toml"),
        "--name", "mlp", "--version", str(version), "--counter", str(counter),
        "--key", str(keys / "signer.key"), "-o", str(out),
    )  # fmt: skip
    return out


async def _load(url: str, stop: asyncio.Event, results: list[tuple[int, str, list[float]]]) -> None:
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": X.ravel().tolist()}
        ]
    }
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.post(f"{url}/v2/models/mlp/infer", json=body) as response:
                doc: dict[str, Any] = await response.json()
                if response.status == 200:
                    results.append((200, doc["model_version"], doc["outputs"][0]["data"]))
                else:
                    results.append((response.status, "", []))


def install_under_load(
    daemon: DaemonProcess, bundle: Path
) -> tuple[subprocess.CompletedProcess[str], list[tuple[int, str, list[float]]]]:
    results: list[tuple[int, str, list[float]]] = []

    async def scenario() -> subprocess.CompletedProcess[str]:
        stop = asyncio.Event()
        clients = [asyncio.ensure_future(_load(daemon.url, stop, results)) for _ in range(8)]
        await asyncio.sleep(0.5)
        done = await asyncio.to_thread(
            edged,
            "install",
            str(bundle),
            "--socket",
            str(daemon.socket_path),
            "--json",
            check=False,
        )
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)
        return done

    return asyncio.run(scenario()), results


def test_bundle_install_rollback_and_restart_through_the_cli(
    model_repo: Path, tmp_path: Path, keys: Path
) -> None:
    work = tmp_path / "d"
    trust_init(keys, work / "state")
    good = build(keys, tmp_path, version=2, counter=1, shift=10.0)
    with running_daemon(model_repo, work) as daemon:
        done, results = install_under_load(daemon, good)
        assert done.returncode == 0, done.stderr
        outcome = json.loads(done.stdout)
        assert (outcome["outcome"], outcome["version"], outcome["previous_version"]) == (
            "installed",
            2,
            None,
        )
        assert [r for r in results if r[0] != 200] == []
        versions = {r[1] for r in results}
        assert versions == {"1", "2"}
        base = np.asarray(next(r[2] for r in results if r[1] == "1"))
        for _, version, data in results:
            np.testing.assert_allclose(
                np.asarray(data), base + (10.0 if version == "2" else 0.0), atol=1e-3
            )

        # A tampered copy of the next release: one byte of the weights flipped after signing.
        newer = build(keys, tmp_path, version=3, counter=2, shift=20.0)
        tampered = tmp_path / "tampered.bundle"
        raw = bytearray(newer.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        tampered.write_bytes(bytes(raw))
        bad = edged("install", str(tampered), "--socket", str(daemon.socket_path), check=False)
        assert bad.returncode == 1
        assert "install failed" in bad.stdout
        status = json.loads(edged("status", "--json", "--socket", str(daemon.socket_path)).stdout)
        assert next(m for m in status["models"] if m["name"] == "mlp")["version"] == "2"
        assert not list((work / "state").glob("staging/*"))
        assert not (work / "state" / "models" / "mlp" / "3").exists()

        assert edged("install", str(newer), "--socket", str(daemon.socket_path)).returncode == 0
        rolled = edged("rollback", "mlp", "--socket", str(daemon.socket_path), "--json")
        assert json.loads(rolled.stdout)["version"] == 2
        history = json.loads(
            edged("installs", "--json", "--socket", str(daemon.socket_path)).stdout
        )
        assert [h["outcome"] for h in history][-1] == "rolled-back"
    # The store is layered over the seed repository: version 2 still serves after a restart.
    with running_daemon(model_repo, work) as daemon:
        status = json.loads(edged("status", "--json", "--socket", str(daemon.socket_path)).stdout)
        assert next(m for m in status["models"] if m["name"] == "mlp")["version"] == "2"


def test_installs_are_refused_over_tcp(model_repo: Path, tmp_path: Path, keys: Path) -> None:
    work = tmp_path / "d"
    trust_init(keys, work / "state")
    good = build(keys, tmp_path, version=2, counter=1, shift=1.0)
    with running_daemon(model_repo, work) as daemon:
        refused = edged("install", str(good), "--url", daemon.url, check=False)
        assert refused.returncode == 1
        assert "Unix socket only" in refused.stderr


def test_offline_install_into_a_state_directory(
    model_repo: Path, tmp_path: Path, keys: Path
) -> None:
    state = tmp_path / "state"
    trust_init(keys, state)
    good = build(keys, tmp_path, version=2, counter=1, shift=1.0)
    done = edged("install", str(good), "--offline", "--state-dir", str(state), "--json")
    assert json.loads(done.stdout)["outcome"] == "installed"
    assert (state / "models" / "mlp" / "CURRENT").read_text().strip() == "2"


def test_bad_uploads_are_answered_early_as_json_and_one_at_a_time(
    model_repo: Path, tmp_path: Path, keys: Path
) -> None:
    from tests.bundle.npz_corpus import cd_offset

    work = tmp_path / "d"
    trust_init(keys, work / "state")
    bundle = build(keys, tmp_path, version=2, counter=1, shift=1.0)
    # The same release, but its signed test vectors carry a bad CRC.
    corrupt = tmp_path / "corrupt" / "2"
    shutil.copytree(tmp_path / "build" / "2", corrupt)
    raw = bytearray((corrupt / "test_vectors.npz").read_bytes())
    raw[cd_offset(bytes(raw)) - 1] ^= 0xFF
    (corrupt / "test_vectors.npz").write_bytes(bytes(raw))
    bad_vectors = tmp_path / "bad-vectors.bundle"
    edged(
        "bundle", "build", "--model-dir", str(corrupt), "--config", str(model_repo / "mlp" / "config.toml"),
        "--name", "mlp", "--version", "2", "--counter", "1",
        "--key", str(keys / "signer.key"), "-o", str(bad_vectors),
    )  # fmt: skip

    async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, json.loads(await reader.readexactly(length))

    spool = work / "state" / "uploads"

    async def scenario(socket: Path) -> None:
        # 256 MiB announced, starting with gzip magic: answered after the first MiB, while
        # the rest is never sent.
        reader, writer = await asyncio.open_unix_connection(str(socket))
        writer.write(
            b"POST /edged/v1/bundles HTTP/1.1\r\nHost: edged\r\n"
            + f"Content-Length: {256 << 20}\r\n\r\n".encode()
            + b"\x1f\x8b\x08\x00"
            + bytes(1 << 20)
        )
        await writer.drain()
        status, doc = await asyncio.wait_for(answer(reader), 60)
        assert (status, doc["error"]) == (409, "CompressedArchiveError")
        writer.close()
        # One upload at a time: while the first (its first 512 bytes sent) is open, a second
        # one gets 429 with Retry-After. The first holds the slot once its spool file exists;
        # a second sent before that could take the slot itself and bounce the first.
        first_reader, first = await asyncio.open_unix_connection(str(socket))
        try:
            data = bundle.read_bytes()
            first.write(
                b"POST /edged/v1/bundles HTTP/1.1\r\nHost: edged\r\n"
                + f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data[:512]
            )
            await first.drain()
            for _ in range(1200):  # bounded poll of real state: at most a minute
                if list(spool.glob("upload-*")):
                    break
                await asyncio.sleep(0.05)
            else:
                early = await asyncio.wait_for(answer(first_reader), 5)
                pytest.fail(f"the first upload never started spooling; it was answered {early}")
            second_reader, second = await asyncio.open_unix_connection(str(socket))
            second.write(
                b"POST /edged/v1/bundles HTTP/1.1\r\nHost: edged\r\nContent-Length: 1\r\n\r\nx"
            )
            second_status, doc = await asyncio.wait_for(answer(second_reader), 60)
            second.close()
            assert second_status == 429, doc
            first.write(data[512:])  # the first upload completes and installs
            await first.drain()
            status, doc = await asyncio.wait_for(answer(first_reader), 120)
            assert (status, doc["outcome"]) == (200, "installed"), doc
        finally:
            first.close()

    with running_daemon(model_repo, work) as daemon:
        bad = edged("install", str(bad_vectors), "--socket", str(daemon.socket_path), check=False)
        assert bad.returncode == 1
        assert bad.stdout.startswith("install failed (VectorFileError): mlp/2/test_vectors.npz")
        assert len(bad.stdout.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
        asyncio.run(scenario(daemon.socket_path))
        history = json.loads(
            edged("installs", "--json", "--socket", str(daemon.socket_path)).stdout
        )
        assert history[0]["source"] == bad_vectors.name
        assert not list((work / "state").glob("uploads/*"))
        assert history[-1]["outcome"] == "installed"
