"""A real ``edged run`` process over KServe v2 gRPC: ``tritonclient.grpc`` unchanged, beside
HTTP clients on the same models, through a hot swap under mixed load and an ordered shutdown."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import stat
import urllib.request
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from edged.api.grpc._proto import grpc_service_pb2 as pb
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.modelrepo.config import TEST_VECTORS_FILE
from tests.support.daemon import running_daemon
from tests.support.grpc_load import GrpcInferenceLoad
from tests.support.load import InferenceLoad

pytestmark = pytest.mark.integration


def vectors(version_dir: Path) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    with np.load(version_dir / TEST_VECTORS_FILE) as npz:
        return npz["input:input"], npz["output:output"]


def grpc_input(x: np.ndarray[Any, Any]) -> triton.InferInput:
    infer_input = triton.InferInput("input", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    return infer_input


def status_of(call: Any) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status())


# The process design (the default: front ends and an engine), two front ends sharing the gRPC
# port, and everything in one process.
DESIGNS = {
    "front-ends": "",
    "two-front-ends": "[server]\nworkers = 2\n",
    "one-process": "[server]\nworkers = 0\n",
}


@pytest.mark.parametrize("design", list(DESIGNS))
def test_tritonclient_grpc_health_metadata_config_infer_and_stream(
    model_repo: Path, tmp_path: Path, design: str
) -> None:
    with running_daemon(model_repo, tmp_path / "d", DESIGNS[design]) as daemon:
        client = triton.InferenceServerClient(daemon.grpc_url)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("mlp") and not client.is_model_ready("nope")
        assert client.get_server_metadata(as_json=True)["name"] == "edged"
        for model in ("mlp", "fc"):
            x, expected = vectors(model_repo / model / "1")
            metadata = client.get_model_metadata(model, as_json=True)
            assert metadata["versions"] == ["1"]
            assert metadata["inputs"][0]["name"] == "input"
            assert metadata["inputs"][0]["datatype"] == "FP32"
            config = client.get_model_config(model, as_json=True)["config"]
            assert config["input"][0]["data_type"] == "TYPE_FP32"
            assert config["output"][0]["name"] == "output"
            # Raw contents both ways: all outputs, then the one output asked for by name.
            for outputs in (None, [triton.InferRequestedOutput("output")]):
                result = client.infer(model, [grpc_input(x)], outputs=outputs, request_id="r7")
                np.testing.assert_allclose(
                    result.as_numpy("output"), expected, rtol=1e-3, atol=1e-4
                )
                response = result.get_response()
                assert (response.model_version, response.id) == ("1", "r7")
        assert client.get_model_config("mlp", as_json=True)["config"]["max_batch_size"] == 32
        x, expected = vectors(model_repo / "mlp" / "1")
        # Version pinned, priority and a timeout from the request's parameters, a gRPC deadline.
        result = client.infer(
            "mlp", [grpc_input(x)], model_version="1", priority=1, timeout=10_000_000,
            client_timeout=30,
        )  # fmt: skip
        np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-3, atol=1e-4)
        assert status_of(lambda: client.infer("mlp", [grpc_input(x)], priority=9)) == (
            "StatusCode.INVALID_ARGUMENT"
        )
        assert status_of(lambda: client.infer("mlp", [grpc_input(x)], model_version="7")) == (
            "StatusCode.NOT_FOUND"
        )
        assert status_of(lambda: client.infer("nope", [grpc_input(x)])) == "StatusCode.NOT_FOUND"
        assert status_of(lambda: client.infer("mlp", [grpc_input(x[:, :32])])) == (
            "StatusCode.INVALID_ARGUMENT"
        )
        # ModelStreamInfer: every request answered on the stream, matched by id.
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(8):
            client.async_stream_infer("mlp", [grpc_input(x)], request_id=str(i))
        client.async_stream_infer("nope", [grpc_input(x)], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(9)]
        client.stop_stream()
        errors = [error for _, error in got if error is not None]
        assert len(errors) == 1 and "unknown model 'nope'" in str(errors[0])
        ids = sorted(result.get_response().id for result, error in got if error is None)
        assert ids == [str(i) for i in range(8)]
        for result, error in got:
            if error is None:
                np.testing.assert_allclose(
                    result.as_numpy("output"), expected, rtol=1e-3, atol=1e-4
                )
        client.close()


def test_typed_contents_in_and_out_over_the_wire(model_repo: Path, tmp_path: Path) -> None:
    """The KServe v2 typed contents (what clients without the raw extension send), asked back
    as typed contents with ``binary_data = false``."""
    x, expected = vectors(model_repo / "mlp" / "1")
    request = pb.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="output").parameters["binary_data"].bool_param = False
    with running_daemon(model_repo, tmp_path / "d") as daemon:
        with grpc.insecure_channel(daemon.grpc_url) as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            response = infer(request, timeout=30)
    assert not response.raw_output_contents
    out = response.outputs[0]
    got = np.asarray(out.contents.fp32_contents, np.float32).reshape(list(out.shape))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("design", list(DESIGNS))
def test_repository_load_and_unload_are_accepted_on_the_grpc_unix_socket_only(
    model_repo: Path, tmp_path: Path, design: str
) -> None:
    with running_daemon(model_repo, tmp_path / "d", DESIGNS[design]) as daemon:
        socket_path = daemon.grpc_socket_url.removeprefix("unix:")
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o660
        tcp = triton.InferenceServerClient(daemon.grpc_url)
        local = triton.InferenceServerClient(daemon.grpc_socket_url)
        index = tcp.get_model_repository_index(as_json=True)["models"]
        assert {(m["name"], m["version"], m["state"]) for m in index} == {
            ("mlp", "1", "READY"),
            ("fc", "1", "READY"),
        }
        assert status_of(lambda: tcp.load_model("mlp")) == "StatusCode.PERMISSION_DENIED"
        assert status_of(lambda: tcp.unload_model("mlp")) == "StatusCode.PERMISSION_DENIED"
        write_onnx_mlp(model_repo / "mlp" / "2", SAMPLE_MLP_LAYERS, seed=0, bias_shift=10.0)
        local.load_model("mlp")
        assert tcp.get_model_metadata("mlp", as_json=True)["versions"] == ["2"]
        local.unload_model("fc")
        assert not tcp.is_model_ready("fc")
        x = np.zeros((1, 16), np.float32)
        # In one process the model has no version serving; a front end's engine client no
        # longer lists an unloaded model.
        assert status_of(lambda: tcp.infer("fc", [grpc_input(x)])) in (
            "StatusCode.UNAVAILABLE",
            "StatusCode.NOT_FOUND",
        )
        local.load_model("fc")
        assert tcp.is_model_ready("fc")
        tcp.close()
        local.close()


def test_system_shared_memory_inputs_and_outputs_shared_with_http(
    model_repo: Path, tmp_path: Path
) -> None:
    shm = pytest.importorskip("tritonclient.utils.shared_memory", reason="tritonclient's libcshm")
    x, expected = vectors(model_repo / "mlp" / "1")
    key = f"/edged-test-{tmp_path.name}"
    region = shm.create_shared_memory_region("frames", key, x.nbytes + expected.nbytes)
    try:
        shm.set_shared_memory_region(region, [x])
        config = "[server]\nshared_memory = true\n"
        with running_daemon(model_repo, tmp_path / "d", config) as daemon:
            client = triton.InferenceServerClient(daemon.grpc_url)
            client.register_system_shared_memory("frames", key, x.nbytes + expected.nbytes)
            status = client.get_system_shared_memory_status(as_json=True)["regions"]["frames"]
            assert status["key"] == key and int(status["byte_size"]) == x.nbytes + expected.nbytes
            # One registry for both protocols, as Triton's.
            with urllib.request.urlopen(f"{daemon.url}/v2/systemsharedmemory/status") as r:
                assert [s["name"] for s in json.loads(r.read())] == ["frames"]
            infer_input = triton.InferInput("input", list(x.shape), "FP32")
            infer_input.set_shared_memory("frames", x.nbytes)
            output = triton.InferRequestedOutput("output")
            output.set_shared_memory("frames", expected.nbytes, offset=x.nbytes)
            result = client.infer("mlp", [infer_input], outputs=[output])
            out = result.get_output("output")
            assert out.parameters["shared_memory_region"].string_param == "frames"
            got = shm.get_contents_as_numpy(region, np.float32, expected.shape, offset=x.nbytes)
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
            client.unregister_system_shared_memory("frames")
            assert client.get_system_shared_memory_status(as_json=True) == {}
            client.close()
    finally:
        shm.destroy_shared_memory_region(region)


def test_grpc_and_http_clients_on_one_model_see_a_hot_swap_with_no_failed_request(
    model_repo: Path, tmp_path: Path
) -> None:
    """HTTP and gRPC clients load one model together; a swap to a version whose outputs are
    shifted by 10, triggered over gRPC, fails none of them, and every gRPC answer matches the
    version it names."""
    with running_daemon(model_repo, tmp_path / "d") as daemon:
        with (
            InferenceLoad(daemon.port, clients=3) as http_load,
            GrpcInferenceLoad(daemon.grpc_url, clients=3) as grpc_load,
        ):
            http_load.wait_for_ok(50)
            grpc_load.wait_for_ok(50)
            write_onnx_mlp(model_repo / "mlp" / "2", SAMPLE_MLP_LAYERS, seed=0, bias_shift=10.0)
            local = triton.InferenceServerClient(daemon.grpc_socket_url)
            local.load_model("mlp")
            local.close()
            grpc_load.wait_for_version("2")
            grpc_load.wait_for_ok(50)
            http_load.wait_for_ok(50)
    assert http_load.failures == {}
    assert grpc_load.failures == {}
    by_version: dict[str, list[np.ndarray[Any, Any]]] = {}
    for version, output in grpc_load.answers:
        by_version.setdefault(version, []).append(output)
    assert set(by_version) == {"1", "2"}
    base = by_version["1"][0]
    for version, shift in (("1", 0.0), ("2", 10.0)):
        outputs = np.stack(by_version[version])
        np.testing.assert_allclose(outputs, np.broadcast_to(base + shift, outputs.shape), atol=1e-3)


LOOP_CONFIG = """[batching]
max_queue_size = 1
"""


def loop_request(iterations: int, timeout_us: int = 0) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="loop")
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.inputs.add(name="iterations", datatype="INT64", shape=[1])
    request.raw_input_contents.extend(
        [np.zeros(1, np.float32).tobytes(), np.array([iterations], np.int64).tobytes()]
    )
    if timeout_us:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def probe(infer: Any) -> grpc.StatusCode:
    try:
        infer(loop_request(1, timeout_us=50_000), timeout=30)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize("design", list(DESIGNS))
def test_full_queue_is_resource_exhausted_and_a_drain_answers_unavailable_and_waits_for_grpc(
    loop_repo: Path, tmp_path: Path, design: str
) -> None:
    """The loop model's queue holds one request. A hung run keeps its worker busy (a probe with
    a 50 ms timeout parameter then waits it out: DEADLINE_EXCEEDED); of two more calls at
    least one is refused with the retry hint. After SIGTERM new calls get UNAVAILABLE and the
    server turns unready while the drain waits for the admitted gRPC calls."""
    (loop_repo / "loop" / "config.toml").write_text(LOOP_CONFIG)
    config = "[server]\ndrain_timeout_s = 3\n" + DESIGNS[design].removeprefix("[server]\n")
    with running_daemon(loop_repo, tmp_path / "d", config) as daemon:
        channel = grpc.insecure_channel(daemon.grpc_url)
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        assert np.frombuffer(infer(loop_request(2)).raw_output_contents[0], np.float32) == 2.0
        hung = [infer.future(loop_request(10**12))]
        # Until the hung run holds the worker, a probe may run, or find the queue full.
        while (code := probe(infer)) is not grpc.StatusCode.DEADLINE_EXCEEDED:
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
        finished: queue.Queue[grpc.Future[Any]] = queue.Queue()
        for _ in range(2):
            hung.append(infer.future(loop_request(10**12)))
            hung[-1].add_done_callback(finished.put)
        refused = finished.get(timeout=30)
        error = refused.exception()
        assert isinstance(error, grpc.RpcError)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # (key, value) pairs; the stubs type them as objects with bytes values.
        hints = dict(cast(Any, error.trailing_metadata()))
        assert hints["retry-after"] == "1"
        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log("stopping: draining")
        with pytest.raises(grpc.RpcError) as info:
            infer(loop_request(1), timeout=30)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (info.value.details() or "")
        ready = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerReady",
            request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString,
        )
        assert not ready(pb.ServerReadyRequest(), timeout=30).ready
        exit_code = daemon.process.wait(60)
        channel.close()
    log = daemon.log()
    assert exit_code == 0, log
    # Only gRPC calls were running: the hung one at least (the queued one too, unless the
    # expired probe still held the queue's one place).
    running = re.search(r"(\d+) request\(s\) still running after 3.0s", log)
    assert running is not None and int(running.group(1)) >= 1, log
    assert "Traceback" not in log
