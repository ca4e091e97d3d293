"""KServe v2 gRPC: tensors to and from protobuf messages, and errors to status codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edged.api.grpc._proto import grpc_service_pb2 as pb
from edged.api.grpc.codec import CONTENTS_FIELD, decode_request, encode_response
from edged.api.grpc.status import code_for
from edged.api.shm import SharedMemoryRegistry
from edged.errors import (
    DeadlineExceededError,
    EdgedError,
    FeatureDisabledError,
    InferenceFailedError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    NotPermittedError,
    QueueFullError,
    SelfTestFailedError,
    ShuttingDownError,
)
from edged.runtime.base import DATATYPE_TO_NUMPY


def raw_request(**arrays: np.ndarray[Any, Any]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, value in arrays.items():
        request.inputs.add(name=name, datatype="FP32", shape=value.shape)
        request.raw_input_contents.append(value.tobytes())
    return request


def test_raw_inputs_are_views_of_the_message_bytes_in_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones((2, 1), dtype=np.float32)
    parsed = decode_request(raw_request(a=a, b=b), None, None)
    np.testing.assert_array_equal(parsed.inputs["a"], a)
    np.testing.assert_array_equal(parsed.inputs["b"], b)
    # np.frombuffer over the bytes: no copy of its own.
    assert not parsed.inputs["a"].flags.owndata
    assert not parsed.inputs["a"].flags.writeable
    assert parsed.outputs == () and parsed.raw_output
    assert parsed.priority == 0 and parsed.timeout_s is None


@pytest.mark.parametrize("datatype", sorted(CONTENTS_FIELD))
def test_typed_contents_of_every_datatype_decode_and_encode_back(datatype: str) -> None:
    dtype = DATATYPE_TO_NUMPY[datatype]
    flat = (np.arange(6) % 2 if datatype == "BOOL" else np.arange(6) + 1).astype(dtype)
    value = flat.reshape(2, 3)
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 3])
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(value.ravel().tolist())
    request.parameters["binary_data_output"].bool_param = False
    parsed = decode_request(request, None, None)
    assert parsed.inputs["x"].dtype == dtype
    np.testing.assert_array_equal(parsed.inputs["x"], value)
    assert not parsed.raw_output
    response = encode_response("m", "1", "", parsed, {"y": value}, None)
    assert not response.raw_output_contents
    out = response.outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("y", datatype, [2, 3])
    got = np.asarray(getattr(out.contents, CONTENTS_FIELD[datatype]), dtype)
    np.testing.assert_array_equal(got.reshape(2, 3), value)


def test_raw_contents_go_to_the_inputs_without_typed_contents_or_shared_memory(
    tmp_path: Path,
) -> None:
    (tmp_path / "frames").write_bytes(np.full(4, 7, np.float32).tobytes())
    shm = SharedMemoryRegistry(root=tmp_path)
    shm.register("r", "/frames", 0, 16)
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[2])
    s = request.inputs.add(name="s", datatype="FP32", shape=[4])
    s.parameters["shared_memory_region"].string_param = "r"
    s.parameters["shared_memory_byte_size"].int64_param = 16
    request.inputs.add(name="b", datatype="INT64", shape=[1])
    request.raw_input_contents.extend(
        [np.array([1, 2], np.float32).tobytes(), np.array([9], np.int64).tobytes()]
    )
    parsed = decode_request(request, shm, None)
    np.testing.assert_array_equal(parsed.inputs["a"], [1, 2])
    np.testing.assert_array_equal(parsed.inputs["s"], [7, 7, 7, 7])
    np.testing.assert_array_equal(parsed.inputs["b"], [9])
    shm.close()


def test_priority_from_the_parameters_and_the_sooner_of_timeout_and_grpc_deadline() -> None:
    request = raw_request(x=np.zeros(1, np.float32))
    request.parameters["priority"].uint64_param = 2
    request.parameters["timeout"].int64_param = 500_000  # microseconds, as tritonclient sends
    parsed = decode_request(request, None, 2.0)
    assert parsed.priority == 2
    assert parsed.timeout_s == 0.5
    assert decode_request(request, None, 0.1).timeout_s == 0.1
    request.parameters["priority"].int64_param = 1
    assert decode_request(request, None, None).priority == 1


BAD = [
    ("shape", lambda r: r.inputs.add(name="x", datatype="FP32", shape=[3]), "needs 12"),
    ("dtype", lambda r: r.inputs.add(name="x", datatype="BYTES", shape=[2]), "not supported"),
    ("negative", lambda r: r.inputs.add(name="x", datatype="FP32", shape=[-2]), "negative"),
    ("no data", lambda r: r.inputs.add(name="x", datatype="FP32", shape=[2]), "no raw contents"),
]


@pytest.mark.parametrize(("case", "add", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_invalid_arguments_naming_the_problem(
    case: str, add: Any, message: str
) -> None:
    request = pb.ModelInferRequest(model_name="m")
    add(request)
    if case in ("shape", "negative"):
        request.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    with pytest.raises(InvalidRequestError, match=message):
        decode_request(request, None, None)


def test_typed_and_raw_contents_do_not_mix_and_every_raw_entry_must_be_used() -> None:
    request = raw_request(a=np.zeros(2, np.float32))
    typed = request.inputs.add(name="b", datatype="FP32", shape=[1])
    typed.contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidRequestError, match="cannot be mixed"):
        decode_request(request, None, None)
    extra = raw_request(a=np.zeros(2, np.float32))
    extra.raw_input_contents.append(b"\0\0\0\0")
    with pytest.raises(InvalidRequestError, match="2 raw_input_contents for 1 input"):
        decode_request(extra, None, None)
    fp16 = pb.ModelInferRequest(model_name="m")
    fp16.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidRequestError, match="FP16 has no typed contents"):
        decode_request(fp16, None, None)


def test_requested_outputs_come_back_raw_in_the_order_asked() -> None:
    request = raw_request(x=np.zeros(1, np.float32))
    request.outputs.add(name="b")
    request.outputs.add(name="a")
    parsed = decode_request(request, None, None)
    outputs = {"a": np.array([1.0], np.float32), "b": np.array([[2, 3]], np.int32)}
    response = encode_response("m", "3", "req-1", parsed, outputs, None)
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "req-1")
    assert [o.name for o in response.outputs] == ["b", "a"]
    assert [o.datatype for o in response.outputs] == ["INT32", "FP32"]
    assert list(response.outputs[0].shape) == [1, 2]
    assert response.raw_output_contents[0] == outputs["b"].tobytes()
    assert response.raw_output_contents[1] == outputs["a"].tobytes()
    request.outputs.add(name="nope")
    with pytest.raises(InvalidRequestError, match="no output tensor 'nope'"):
        encode_response("m", "3", "", decode_request(request, None, None), outputs, None)


def test_binary_data_false_on_every_output_gives_typed_contents_and_on_some_is_refused() -> None:
    request = raw_request(x=np.zeros(1, np.float32))
    request.outputs.add(name="a").parameters["binary_data"].bool_param = False
    assert not decode_request(request, None, None).raw_output
    request.outputs.add(name="b")
    with pytest.raises(InvalidRequestError, match="raw or typed"):
        decode_request(request, None, None)


def test_an_output_in_shared_memory_is_written_there_and_keeps_the_raw_entries_aligned(
    tmp_path: Path,
) -> None:
    (tmp_path / "out").write_bytes(bytes(32))
    shm = SharedMemoryRegistry(root=tmp_path)
    shm.register("o", "/out", 0, 32)
    request = raw_request(x=np.zeros(1, np.float32))
    want = request.outputs.add(name="a")
    want.parameters["shared_memory_region"].string_param = "o"
    want.parameters["shared_memory_byte_size"].int64_param = 32
    request.outputs.add(name="b")
    parsed = decode_request(request, shm, None)
    a = np.arange(4, dtype=np.float32)
    b = np.array([5], np.int64)
    response = encode_response("m", "1", "", parsed, {"a": a, "b": b}, shm)
    assert list(response.raw_output_contents) == [b"", b.tobytes()]
    params = response.outputs[0].parameters
    assert params["shared_memory_region"].string_param == "o"
    assert params["shared_memory_byte_size"].int64_param == 16
    assert (tmp_path / "out").read_bytes()[:16] == a.tobytes()
    shm.close()


ERRORS: list[tuple[EdgedError, grpc.StatusCode]] = [
    (InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    (QueueFullError("x", retry_after_s=2), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (ModelNotReadyError("x"), grpc.StatusCode.UNAVAILABLE),
    (ShuttingDownError("x"), grpc.StatusCode.UNAVAILABLE),
    (NotPermittedError("x"), grpc.StatusCode.PERMISSION_DENIED),
    (FeatureDisabledError("x"), grpc.StatusCode.UNIMPLEMENTED),
    (SelfTestFailedError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (InsufficientMemoryError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (InferenceFailedError("x"), grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize(("error", "code"), ERRORS, ids=[type(e).__name__ for e, _ in ERRORS])
def test_each_error_maps_to_its_status_code(error: EdgedError, code: grpc.StatusCode) -> None:
    got, metadata = code_for(error)
    assert got is code
    hints = dict(metadata)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert hints == {"retry-after": "2", "grpc-retry-pushback-ms": "2000"}
    elif code is grpc.StatusCode.UNAVAILABLE:
        assert hints == {"retry-after": "1", "grpc-retry-pushback-ms": "1000"}
    else:
        assert hints == {}
