"""The orjson codec answers exactly as the ``json`` codec before it: the same arrays for good
requests, the same error message for each bad one (messages recorded from the json codec), and
responses that decode to the same values."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edged.api.tensors import (
    InferRequest,
    OutputRequest,
    encode_infer_response,
    parse_infer_request,
)
from edged.errors import InvalidRequestError

# (body, Inference-Header-Content-Length, message of the json codec or "OK <inputs>")
RECORDED: list[tuple[bytes, int | None, str]] = [
    (b"", None, "request body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    (
        b"{not json",
        None,
        "request body is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]',
        None,
        "request body is not valid JSON: Expecting ',' delimiter: line 1 column 80 (char 79)",
    ),
    (
        b"\xff\xfe{",
        None,
        "request body is not valid JSON: 'utf-16-le' codec can't decode byte 0x7b in position 2: truncated data",
    ),
    (b"NaN", None, "request body must be a JSON object with an 'inputs' list"),
    (b"[]", None, "request body must be a JSON object with an 'inputs' list"),
    (b'"inputs"', None, "request body must be a JSON object with an 'inputs' list"),
    (b"{}", None, "request needs a non-empty 'inputs' list"),
    (b'{"inputs": {}}', None, "request needs a non-empty 'inputs' list"),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], "parameters": []}',
        None,
        "OK {'x': ('<f4', [[1.0, 2.0]])}",
    ),
    (b'{"inputs": [1]}', None, "inputs[0] must be an object with a 'name'"),
    (b'{"inputs": [{"name": 3}]}', None, "inputs[0] must be an object with a 'name'"),
    (b'{"inputs": [{"name": "x", "shape": [1]}]}', None, "input tensor 'x': 'datatype' is missing"),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}',
        None,
        "input tensor 'x': datatype BYTES is not supported (supported: BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64)",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [true], "datatype": "FP32", "data": [1]}]}',
        None,
        "input tensor 'x': 'shape' must be a list of sizes >= 0",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}',
        None,
        "input tensor 'x': 'shape' must be a list of sizes >= 0",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}',
        None,
        "input tensor 'x': data has 1 values but shape [2] needs 2",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}',
        None,
        "input tensor 'x': data is not a list of FP32 values: could not convert string to float: 'a'",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1000]}]}',
        None,
        "input tensor 'x': data is not a list of INT8 values: Python integer 1000 out of bounds for int8",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [[1], 2]}]}',
        None,
        "input tensor 'x': data is not a list of FP32 values: setting an array element with a sequence. The requested array has an inhomogeneous shape after 1 dimensions. The detected shape was (2,) + inhomogeneous part.",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}',
        None,
        "input tensor 'x': no 'data' and no binary_data_size",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}',
        None,
        "input tensor 'x' is given twice",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], "parameters": {"timeout": 0}}',
        None,
        "parameter 'timeout' must be a positive integer (microseconds)",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], "parameters": {"timeout": 1.5}}',
        None,
        "parameter 'timeout' must be a positive integer (microseconds)",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], "parameters": {"priority": -1}}',
        None,
        "request: parameter 'priority' must be a non-negative integer",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], "outputs": [{"name": 1}]}',
        None,
        "outputs[0] must be an object with a 'name'",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], "outputs": [{"name": "y", "parameters": {"shared_memory_offset": "a"}}]}',
        None,
        "output 'y': parameter 'shared_memory_offset' must be a non-negative integer",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}\x00\x00\x00\x00\x00\x00\x00\x00',
        91,
        "request body is not valid JSON: Unterminated string starting at: line 1 column 76 (char 75)",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}\x00\x00\x00\x00',
        91,
        "request body is not valid JSON: Unterminated string starting at: line 1 column 76 (char 75)",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}\x00',
        74,
        "the binary part has 1 bytes but the inputs declare 0",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
        200,
        "Inference-Header-Content-Length is 200 but the body has 74 bytes",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
        10,
        "request body is not valid JSON: Expecting value: line 1 column 11 (char 10)",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}]}',
        None,
        "input tensor 'x': shared memory is disabled on this server",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1e999999]}]}',
        None,
        "OK {'x': ('<f4', [inf])}",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT64", "data": [99999999999999999999999]}]}',
        None,
        "input tensor 'x': data is not a list of UINT64 values: Python int too large to convert to C long",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
        None,
        "OK {'x': ('<f4', [nan])}",
    ),
]


@pytest.mark.parametrize(("body", "header_length", "expected"), RECORDED)
def test_requests_parse_as_the_json_codec_did(
    body: bytes, header_length: int | None, expected: str
) -> None:
    if not expected.startswith("OK "):
        with pytest.raises(InvalidRequestError) as caught:
            parse_infer_request(body, header_length)
        assert str(caught.value) == expected
        return
    request = parse_infer_request(body, header_length)
    got = {k: (v.dtype.str, v.tolist()) for k, v in request.inputs.items()}
    assert f"OK {got!r}" == expected


def _request(binary: bool = False, outputs: list[OutputRequest] | None = None) -> InferRequest:
    return InferRequest("r-ü", {}, outputs or [], binary, 0, None)


def _stdlib_body(outputs: dict[str, np.ndarray[Any, Any]], request_id: str) -> bytes:
    """What the json codec wrote for a JSON response."""
    doc = {
        "model_name": "m",
        "model_version": "1",
        "outputs": [
            {"name": n, "datatype": d, "shape": list(v.shape), "data": v.ravel().tolist()}
            for (n, v), d in zip(outputs.items(), DATATYPES, strict=False)
        ],
        "id": request_id,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


DATATYPES = ("FP32", "FP16", "FP64", "INT64", "UINT8", "BOOL", "INT8")


def test_json_response_decodes_to_the_same_values_as_before() -> None:
    rng = np.random.default_rng(3)
    outputs: dict[str, np.ndarray[Any, Any]] = {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "f64": rng.standard_normal((1, 2)),
        "i64": rng.integers(-(2**62), 2**62, (3,)),
        "u8": rng.integers(0, 255, (2, 2)).astype(np.uint8),
        "b": np.array([True, False]),
        "i8": np.asfortranarray(rng.integers(-100, 100, (3, 2)).astype(np.int8)),
    }
    body, header_length = encode_infer_response("m", "1", _request(), outputs)
    assert header_length is None
    new = json.loads(body)
    old = json.loads(_stdlib_body(outputs, "r-ü"))
    assert [k for k in new] == [k for k in old]
    assert new["id"] == old["id"] == "r-ü"
    for got, want, value in zip(new["outputs"], old["outputs"], outputs.values(), strict=True):
        assert {k: v for k, v in got.items() if k != "data"} == {
            k: v for k, v in want.items() if k != "data"
        }
        np.testing.assert_array_equal(np.asarray(got["data"], dtype=value.dtype), value.ravel())
        np.testing.assert_array_equal(
            np.asarray(got["data"], dtype=value.dtype), np.asarray(want["data"], value.dtype)
        )


def test_float32_is_written_in_its_shortest_form() -> None:
    value = np.array([0.1, 1.5], dtype=np.float32)
    body, _ = encode_infer_response("m", "1", _request(), {"y": value})
    assert b'"data":[0.1,1.5]' in body


def test_nonfinite_values_are_written_as_before() -> None:
    value = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    body, _ = encode_infer_response("m", "1", _request(), {"y": value})
    assert b'"data":[NaN,Infinity,-Infinity,1.0]' in body


def test_binary_response_header_is_the_same_document() -> None:
    value = np.arange(4, dtype=np.float32)
    request = _request(binary=True)
    body, header_length = encode_infer_response("m", "1", request, {"y": value})
    assert header_length is not None
    assert json.loads(body[:header_length]) == {
        "model_name": "m",
        "model_version": "1",
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}
        ],
        "id": "r-ü",
    }
    assert body[header_length:] == value.tobytes()


def test_byte_swapped_outputs_are_written_by_value() -> None:
    value = np.array([1.25, -2.0], dtype=">f4")
    body, _ = encode_infer_response("m", "1", _request(), {"y": value})
    assert json.loads(body)["outputs"][0]["data"] == [1.25, -2.0]


def test_deeply_nested_body_is_a_bad_request() -> None:
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        parse_infer_request(body, None)
