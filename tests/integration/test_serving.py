"""A real ``edged run`` process, called with tritonclient, plain HTTP and the CLI."""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http as triton

from edged.api.client import Endpoint, LocalClient
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_failing_version, write_onnx_mlp
from edged.errors import ApiError, DaemonUnreachableError
from edged.modelrepo.config import TEST_VECTORS_FILE
from tests.support.daemon import running_daemon

pytestmark = pytest.mark.integration


def vectors(version_dir: Path) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    with np.load(version_dir / TEST_VECTORS_FILE) as npz:
        return npz["input:input"], npz["output:output"]


@pytest.mark.parametrize("model", ["mlp", "fc"])
def test_tritonclient_runs_onnx_and_tflite_models(
    model_repo: Path, tmp_path: Path, model: str
) -> None:
    x, expected = vectors(model_repo / model / "1")
    with running_daemon(model_repo, tmp_path / "d") as daemon:
        client = triton.InferenceServerClient(f"127.0.0.1:{daemon.port}")
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready(model)
        metadata = client.get_model_metadata(model)
        assert metadata["inputs"][0]["name"] == "input"
        for binary in (True, False):
            infer_input = triton.InferInput("input", list(x.shape), "FP32")
            infer_input.set_data_from_numpy(x, binary_data=binary)
            output = triton.InferRequestedOutput("output", binary_data=binary)
            result = client.infer(model, [infer_input], outputs=[output])
            np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-3, atol=1e-4)
            assert result.get_response()["model_version"] == "1"
        client.close()


def test_plain_http_over_the_unix_socket(model_repo: Path, tmp_path: Path) -> None:
    x, expected = vectors(model_repo / "mlp" / "1")
    with running_daemon(model_repo, tmp_path / "d") as daemon:
        mode = stat.S_IMODE(os.stat(daemon.socket_path).st_mode)
        assert mode == 0o660
        client = LocalClient(Endpoint(socket_path=daemon.socket_path))
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
        doc = client.json("POST", "/v2/models/mlp/infer", body)
        got = np.asarray(doc["outputs"][0]["data"], np.float32).reshape(doc["outputs"][0]["shape"])
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
        index = client.json("POST", "/v2/repository/index")
        assert {(r["name"], r["version"], r["state"]) for r in index} == {
            ("mlp", "1", "READY"),
            ("fc", "1", "READY"),
        }


async def _load(
    url: str, model: str, stop: asyncio.Event, results: list[tuple[int, str, Any]]
) -> None:
    x = np.random.default_rng(7).standard_normal((1, 64), dtype=np.float32)
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.post(f"{url}/v2/models/{model}/infer", json=body) as response:
                doc = await response.json()
                if response.status == 200:
                    results.append((200, doc["model_version"], doc["outputs"][0]["data"]))
                else:
                    results.append((response.status, "", doc))


def test_hot_swap_under_concurrent_load_fails_no_request(model_repo: Path, tmp_path: Path) -> None:
    """Two swaps (HTTP load, then SIGHUP) under 16 concurrent clients: every request succeeds
    and each answer matches exactly the version it names."""
    results: list[tuple[int, str, Any]] = []
    with running_daemon(model_repo, tmp_path / "d") as daemon:

        async def scenario() -> None:
            stop = asyncio.Event()
            clients = [
                asyncio.ensure_future(_load(daemon.url, "mlp", stop, results)) for _ in range(16)
            ]
            await asyncio.sleep(1.0)
            write_onnx_mlp(model_repo / "mlp" / "2", SAMPLE_MLP_LAYERS, seed=0, bias_shift=10.0)
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{daemon.url}/v2/repository/models/mlp/load") as response:
                    assert response.status == 200, await response.text()
            await asyncio.sleep(1.0)
            write_onnx_mlp(model_repo / "mlp" / "3", SAMPLE_MLP_LAYERS, seed=0, bias_shift=20.0)
            daemon.signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while not any(r[1] == "3" for r in results[-50:]) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*clients)

        asyncio.run(scenario())
    failures = [r for r in results if r[0] != 200]
    assert failures == []
    by_version: dict[str, list[Any]] = {}
    for _, version, data in results:
        by_version.setdefault(version, []).append(data)
    assert set(by_version) == {"1", "2", "3"}
    base = np.asarray(by_version["1"][0], np.float32)
    for version, shift in (("1", 0.0), ("2", 10.0), ("3", 20.0)):
        outputs = np.asarray(by_version[version], np.float32)
        np.testing.assert_allclose(outputs, np.broadcast_to(base + shift, outputs.shape), atol=1e-3)
    assert len(results) > 100


def test_a_failing_new_version_is_refused_and_the_old_one_serves(
    model_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(model_repo, tmp_path / "d") as daemon:
        client = LocalClient(Endpoint(socket_path=daemon.socket_path))
        write_failing_version(model_repo / "mlp" / "2")
        with pytest.raises(ApiError, match="409.*test vector.*differs") as info:
            client.json("POST", "/v2/repository/models/mlp/load")
        assert info.value.status == 409
        version, _ = client.infer("mlp", {"input": np.zeros((1, 64), np.float32)})
        assert version == "1"
        status = client.json("GET", "/edged/v1/status")
        mlp = next(m for m in status["models"] if m["name"] == "mlp")
        assert mlp["version"] == "1" and "differs" in mlp["last_error"]
        assert "differs" in daemon.log()


BAD_REQUESTS = [
    (
        "mlp",
        {"inputs": [{"name": "wrong", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]},
        "no input tensor 'wrong'",
    ),
    (
        "mlp",
        {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.0] * 32}]},
        "'input': shape [1, 32]",
    ),
    (
        "mlp",
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT32", "data": [0] * 64}]},
        "'input': datatype INT32",
    ),
    (
        "mlp",
        {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]},
        "datatype BYTES is not supported",
    ),
    (
        "nope",
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]},
        "unknown model 'nope'",
    ),
]


def test_bad_input_gets_400_naming_the_problem_and_the_daemon_keeps_serving(
    model_repo: Path, tmp_path: Path
) -> None:
    config = "[server]\nmax_body_bytes = 65536\n"
    with running_daemon(model_repo, tmp_path / "d", config) as daemon:
        client = LocalClient(Endpoint(url=daemon.url))
        for model, body, message in BAD_REQUESTS:
            status, _, data = client.request(
                "POST", f"/v2/models/{model}/infer", json.dumps(body).encode()
            )
            assert status == 400, (model, body)
            assert message in json.loads(data)["error"]
        status, _, data = client.request("POST", "/v2/models/mlp/infer", b'{"inputs": [')
        assert status == 400 and "not valid JSON" in json.loads(data)["error"]
        status, _, data = client.request("POST", "/v2/models/mlp/infer", b" " * 70000)
        assert status == 400 and "exceeds the limit of 65536 bytes" in json.loads(data)["error"]
        version, outputs = client.infer("mlp", {"input": np.zeros((2, 64), np.float32)})
        assert version == "1" and outputs["output"].shape == (2, 10)
        assert daemon.process.poll() is None


def test_cli_talks_to_the_daemon_over_its_socket(model_repo: Path, tmp_path: Path) -> None:
    x, expected = vectors(model_repo / "fc" / "1")
    np.save(tmp_path / "x.npy", x)
    with running_daemon(model_repo, tmp_path / "d") as daemon:
        sock = str(daemon.socket_path)
        edged = [sys.executable, "-m", "edged.cli.main"]
        out = subprocess.run(
            [*edged, "models", "--json", "--socket", sock], capture_output=True, check=True
        )
        assert {r["name"] for r in json.loads(out.stdout)} == {"mlp", "fc"}
        out = subprocess.run(
            [*edged, "infer", "fc", "--input", str(tmp_path / "x.npy"), "--json", "--socket", sock],
            capture_output=True,
            check=True,
        )
        doc = json.loads(out.stdout)
        np.testing.assert_allclose(
            np.asarray(doc["outputs"]["output"]), expected, rtol=1e-3, atol=1e-4
        )
        out = subprocess.run([*edged, "status", "--socket", sock], capture_output=True, check=True)
        assert b"READY" in out.stdout
    gone = subprocess.run([*edged, "status", "--socket", sock], capture_output=True)
    assert gone.returncode == 1
    lines = gone.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot reach the edged daemon" in lines[0]
    with pytest.raises(DaemonUnreachableError):
        LocalClient(Endpoint(socket_path=daemon.socket_path)).json("GET", "/v2")


def test_shared_memory_frames_in_and_results_out(model_repo: Path, tmp_path: Path) -> None:
    key = f"edged-test-{os.getpid()}"
    shm_file = Path("/dev/shm") / key
    x, expected = vectors(model_repo / "fc" / "1")
    size = 4096
    shm_file.write_bytes(b"\0" * size)
    try:
        with shm_file.open("r+b") as f, mmap.mmap(f.fileno(), size) as region:
            region[0 : x.nbytes] = x.tobytes()
            with running_daemon(
                model_repo, tmp_path / "d", "[server]\nshared_memory = true\n"
            ) as daemon:
                client = LocalClient(Endpoint(url=daemon.url))
                client.json(
                    "POST",
                    "/v2/systemsharedmemory/region/frames/register",
                    {"key": f"/{key}", "offset": 0, "byte_size": size},
                )
                assert client.json("GET", "/v2/systemsharedmemory/status")[0]["name"] == "frames"
                body = {
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 16],
                            "datatype": "FP32",
                            "parameters": {
                                "shared_memory_region": "frames",
                                "shared_memory_byte_size": x.nbytes,
                            },
                        }
                    ],
                    "outputs": [
                        {
                            "name": "output",
                            "parameters": {
                                "shared_memory_region": "frames",
                                "shared_memory_offset": 1024,
                                "shared_memory_byte_size": 32,
                            },
                        }
                    ],
                }
                doc = client.json("POST", "/v2/models/fc/infer", body)
                assert "data" not in doc["outputs"][0]
                got = np.frombuffer(region[1024 : 1024 + expected.nbytes], np.float32).reshape(
                    expected.shape
                )
                np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
                client.json("POST", "/v2/systemsharedmemory/region/frames/unregister")
    finally:
        shm_file.unlink()


def test_shared_memory_is_off_by_default(model_repo: Path, tmp_path: Path) -> None:
    with running_daemon(model_repo, tmp_path / "d") as daemon:
        client = LocalClient(Endpoint(url=daemon.url))
        with pytest.raises(ApiError, match="shared memory is disabled"):
            client.json(
                "POST", "/v2/systemsharedmemory/region/r/register", {"key": "/x", "byte_size": 4}
            )
