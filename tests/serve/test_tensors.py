"""Open Inference Protocol tensor decoding and encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edged.api.tensors import encode_infer_response, parse_infer_request
from edged.errors import InvalidRequestError


def binary_request(
    arrays: dict[str, np.ndarray], extra: dict[str, object] | None = None
) -> tuple[bytes, int]:
    inputs = []
    chunks = []
    for name, value in arrays.items():
        data = value.tobytes()
        inputs.append(
            {
                "name": name,
                "shape": list(value.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(data)},
            }
        )
        chunks.append(data)
    header = json.dumps({"inputs": inputs, **(extra or {})}).encode()
    return header + b"".join(chunks), len(header)


def test_binary_inputs_decode_to_the_same_arrays() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones((2, 1), dtype=np.float32)
    body, length = binary_request({"a": a, "b": b})
    request = parse_infer_request(body, length)
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], b)


def test_json_inputs_and_parameters() -> None:
    body = json.dumps(
        {
            "id": "r1",
            "inputs": [{"name": "x", "shape": [1, 2], "datatype": "INT64", "data": [[1, 2]]}],
            "parameters": {"priority": 1, "timeout": 2500},
        }
    ).encode()
    request = parse_infer_request(body, None)
    assert request.inputs["x"].dtype == np.int64
    assert request.inputs["x"].tolist() == [[1, 2]]
    assert request.priority == 1
    assert request.timeout_s == pytest.approx(0.0025)
    assert request.id == "r1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"inputs": []}', "non-empty 'inputs'"),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}',
            "datatype BYTES",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}',
            "'x': data has 2 values",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}',
            "'x': data is not",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": "1", "datatype": "FP32", "data": [1]}]}',
            "'x': 'shape'",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},'
            b' {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            "given twice",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "parameters": {"timeout": -1}}',
            "timeout",
        ),
    ],
)
def test_malformed_requests_name_what_was_wrong(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_infer_request(body, None)


def test_binary_size_must_match_shape() -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    with pytest.raises(InvalidRequestError, match="'x': binary_data_size is 8 bytes but shape"):
        parse_infer_request(header + b"\0" * 8, len(header))


def test_truncated_binary_part_is_rejected() -> None:
    body, length = binary_request({"x": np.ones(4, np.float32)})
    with pytest.raises(InvalidRequestError, match="ends before"):
        parse_infer_request(body[:-3], length)


def test_header_length_beyond_body_is_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="Inference-Header-Content-Length"):
        parse_infer_request(b"{}", 10)


def test_response_mixes_binary_and_json_outputs() -> None:
    body, length = binary_request({"x": np.ones(2, np.float32)})
    request = parse_infer_request(
        body[:length].replace(
            b'"inputs"',
            b'"outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}], "inputs"',
        )
        + body[length:],
        length
        + len(b'"outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}], '),
    )
    y = np.arange(3, dtype=np.float32)
    z = np.array([[1, 2]], dtype=np.int32)
    payload, header_length = encode_infer_response("m", "7", request, {"y": y, "z": z})
    assert header_length is not None
    doc = json.loads(payload[:header_length])
    assert doc["model_version"] == "7"
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == y.nbytes
    assert doc["outputs"][1]["data"] == [1, 2]
    np.testing.assert_array_equal(np.frombuffer(payload[header_length:], np.float32), y)


def test_unknown_requested_output_is_rejected() -> None:
    request = parse_infer_request(
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "nope"}]}',
        None,
    )
    with pytest.raises(InvalidRequestError, match="no output tensor 'nope'"):
        encode_infer_response("m", "1", request, {"y": np.zeros(1, np.float32)})


def test_a_repeated_header_decodes_each_requests_own_tensor_bytes() -> None:
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    second = -first
    body1, length = binary_request({"a": first}, {"id": "same", "parameters": {"priority": 1}})
    body2, length2 = binary_request({"a": second}, {"id": "same", "parameters": {"priority": 1}})
    assert body1[:length] == body2[:length2]
    r1 = parse_infer_request(body1, length)
    r2 = parse_infer_request(body2, length2)  # the header's parse is reused
    np.testing.assert_array_equal(r1.inputs["a"], first)
    np.testing.assert_array_equal(r2.inputs["a"], second)
    assert (r2.id, r2.priority) == ("same", 1)
    assert r1.inputs is not r2.inputs and r1.outputs is not r2.outputs


def test_a_repeated_header_with_the_wrong_byte_count_is_still_rejected() -> None:
    body, length = binary_request({"a": np.ones((2, 2), dtype=np.float32)})
    parse_infer_request(body, length)
    with pytest.raises(
        InvalidRequestError, match="binary part has 20 bytes but the inputs declare 16"
    ):
        parse_infer_request(body + b"\0" * 4, length)
    with pytest.raises(InvalidRequestError, match="the binary part ends before"):
        parse_infer_request(body[:-4], length)
