"""Open Inference Protocol (KServe v2) tensor encoding: JSON tensors and the binary tensor
extension (``Inference-Header-Content-Length``). Pure functions, no I/O.

JSON goes through ``orjson`` (about 8x faster than ``json`` both ways here, and it writes numpy
arrays directly, float32 in its shortest form). Anything orjson refuses is handed to the
standard ``json`` module, so every body that parsed before parses the same way, and a bad
body gets the same error message as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

from edged.errors import InvalidRequestError
from edged.runtime.base import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE, Array

HEADER_LENGTH = "Inference-Header-Content-Length"

# Above these sizes the API decodes (JSON bytes of a request) or encodes (values written as
# JSON numbers) on a worker thread: each takes over a millisecond there, too long for the loop.
OFFLOAD_JSON_BYTES = 256 * 1024
OFFLOAD_JSON_VALUES = 32 * 1024

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool
    shm_region: str | None = None
    shm_offset: int = 0
    shm_byte_size: int = 0


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, Array]
    outputs: list[OutputRequest]  # empty: all outputs, as JSON unless binary_data_output
    binary_output: bool
    priority: int
    timeout_s: float | None
    parameters: dict[str, Any] = field(default_factory=dict)


class SharedMemoryReader(Protocol):
    """Resolves shared-memory input references (the shared-memory registry)."""

    def read(self, region: str, offset: int, byte_size: int) -> memoryview: ...


def _int_param(params: dict[str, Any], key: str, where: str, default: int = 0) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{where}: parameter {key!r} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class _Plan:
    """What a binary request's JSON header says, parsed and validated once: a client sends the
    same header with every request, only the tensor bytes after it change."""

    layout: tuple[tuple[str, np.dtype[Any], tuple[int, ...], int], ...]  # name, dtype, shape, bytes
    binary_bytes: int
    request: InferRequest  # inputs empty

    def bind(self, body: bytes, header_length: int) -> InferRequest | None:
        if len(body) - header_length != self.binary_bytes:
            return None  # the full parse names what is wrong
        inputs: dict[str, Array] = {}
        offset = header_length
        for name, dtype, shape, size in self.layout:
            count = size // dtype.itemsize
            inputs[name] = np.frombuffer(body, dtype, count, offset).reshape(shape)
            offset += size
        r = self.request
        return InferRequest(
            r.id, inputs, list(r.outputs), r.binary_output, r.priority, r.timeout_s, r.parameters
        )


_PLANS: dict[bytes, _Plan] = {}
_PLAN_MAX_HEADER_BYTES = 4096
_PLAN_MAX_ENTRIES = 256


def parse_infer_request(
    body: bytes, header_length: int | None, shm: SharedMemoryReader | None = None
) -> InferRequest:
    if header_length is not None and 0 < header_length <= _PLAN_MAX_HEADER_BYTES:
        plan = _PLANS.get(body[:header_length])
        if plan is not None:
            bound = plan.bind(body, header_length)
            if bound is not None:
                return bound
    request, layout = _parse(body, header_length, shm)
    if (
        layout is not None
        and header_length is not None
        and 0 < header_length <= _PLAN_MAX_HEADER_BYTES
    ):
        if len(_PLANS) >= _PLAN_MAX_ENTRIES:
            _PLANS.clear()
        empty = InferRequest(
            request.id,
            {},
            request.outputs,
            request.binary_output,
            request.priority,
            request.timeout_s,
            request.parameters,
        )
        _PLANS[body[:header_length]] = _Plan(layout, len(body) - header_length, empty)
    return request


def _parse(
    body: bytes, header_length: int | None, shm: SharedMemoryReader | None
) -> tuple[InferRequest, tuple[tuple[str, np.dtype[Any], tuple[int, ...], int], ...] | None]:
    """The request, and its binary layout when every input is in the binary part."""
    json_part: bytes | memoryview
    binary: memoryview
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise InvalidRequestError(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes"
            )
        whole = memoryview(body)
        json_part, binary = whole[:header_length], whole[header_length:]
    doc = _loads(json_part)
    if not isinstance(doc, dict):
        raise InvalidRequestError("request body must be a JSON object with an 'inputs' list")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequestError("request needs a non-empty 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequestError("'parameters' must be an object")
    offset = 0
    inputs: dict[str, Array] = {}
    layout: list[tuple[str, np.dtype[Any], tuple[int, ...], int]] | None = []
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidRequestError(f"inputs[{i}] must be an object with a 'name'")
        name = raw["name"]
        if name in inputs:
            raise InvalidRequestError(f"input tensor {name!r} is given twice")
        array, used = _decode_input(raw, binary, offset, shm)
        offset += used
        inputs[name] = array
        if layout is not None and used:
            layout.append((name, array.dtype, array.shape, used))
        else:
            layout = None
    if offset != len(binary):
        raise InvalidRequestError(
            f"the binary part has {len(binary)} bytes but the inputs declare {offset}"
        )
    outputs: list[OutputRequest] = []
    binary_output = bool(params.get("binary_data_output", False))
    for i, raw in enumerate(doc.get("outputs") or []):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidRequestError(f"outputs[{i}] must be an object with a 'name'")
        oparams = raw.get("parameters") or {}
        region = oparams.get("shared_memory_region")
        outputs.append(
            OutputRequest(
                raw["name"],
                bool(oparams.get("binary_data", binary_output)),
                region if isinstance(region, str) else None,
                _int_param(oparams, "shared_memory_offset", f"output {raw['name']!r}"),
                _int_param(oparams, "shared_memory_byte_size", f"output {raw['name']!r}"),
            )
        )
    timeout_us = params.get("timeout")
    if timeout_us is not None and (
        isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us <= 0
    ):
        raise InvalidRequestError("parameter 'timeout' must be a positive integer (microseconds)")
    priority = _int_param(params, "priority", "request")
    request_id = doc.get("id")
    request = InferRequest(
        id=str(request_id) if request_id is not None else None,
        inputs=inputs,
        outputs=outputs,
        binary_output=binary_output,
        priority=priority,
        timeout_s=timeout_us / 1e6 if timeout_us else None,
        parameters=params,
    )
    return request, tuple(layout) if layout is not None else None


def _loads(data: bytes | memoryview) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    # What orjson refuses but ``json`` takes (NaN, huge integers, UTF-16), or the message
    # clients got before for a body that is not JSON at all.
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc


def json_request_bytes(body: bytes, header_length: int | None) -> int:
    """How many bytes of ``body`` are JSON to parse (the API offloads large ones)."""
    return len(body) if header_length is None else max(0, min(header_length, len(body)))


def json_response_values(request: InferRequest, outputs: dict[str, Array]) -> int:
    """How many output values the response writes as JSON numbers."""
    if request.outputs:
        return sum(
            outputs[w.name].size
            for w in request.outputs
            if not w.binary and w.shm_region is None and w.name in outputs
        )
    return 0 if request.binary_output else sum(v.size for v in outputs.values())


def _decode_input(
    raw: dict[str, Any], binary: memoryview, offset: int, shm: SharedMemoryReader | None
) -> tuple[Array, int]:
    name = raw["name"]
    datatype = raw.get("datatype")
    shape = raw.get("shape")
    if not isinstance(datatype, str):
        raise InvalidRequestError(f"input tensor {name!r}: 'datatype' is missing")
    dtype = DATATYPE_TO_NUMPY.get(datatype)
    if dtype is None:
        raise InvalidRequestError(
            f"input tensor {name!r}: datatype {datatype} is not supported "
            f"(supported: {', '.join(DATATYPE_TO_NUMPY)})"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidRequestError(f"input tensor {name!r}: 'shape' must be a list of sizes >= 0")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    params = raw.get("parameters") or {}
    where = f"input tensor {name!r}"
    if "shared_memory_region" in params:
        if shm is None:
            raise InvalidRequestError(f"{where}: shared memory is disabled on this server")
        size = _int_param(params, "shared_memory_byte_size", where)
        if size != nbytes:
            raise InvalidRequestError(
                f"{where}: shared_memory_byte_size {size} != {nbytes} bytes for shape {shape}"
            )
        region = shm.read(
            str(params["shared_memory_region"]),
            _int_param(params, "shared_memory_offset", where),
            size,
        )
        return np.frombuffer(region, dtype=dtype).reshape(shape), 0
    if "binary_data_size" in params:
        size = _int_param(params, "binary_data_size", where)
        if size != nbytes:
            raise InvalidRequestError(
                f"{where}: binary_data_size is {size} bytes but shape {shape} of {datatype} "
                f"needs {nbytes}"
            )
        if offset + size > len(binary):
            raise InvalidRequestError(f"{where}: the binary part ends before this tensor's data")
        return np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape), size
    data = raw.get("data")
    if data is None:
        raise InvalidRequestError(f"{where}: no 'data' and no binary_data_size")
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequestError(
            f"{where}: data is not a list of {datatype} values: {exc}"
        ) from exc
    if array.size != count:
        raise InvalidRequestError(
            f"{where}: data has {array.size} values but shape {shape} needs {count}"
        )
    return array.reshape(shape), 0


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, Array],
    shm_writer: Any = None,
) -> tuple[bytes, int | None]:
    """Returns (body, header_length or None when the body is plain JSON)."""
    wanted = request.outputs or [OutputRequest(n, request.binary_output) for n in outputs]
    doc_outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    stdlib_json = False
    for want in wanted:
        value = outputs.get(want.name)
        if value is None:
            raise InvalidRequestError(
                f"model {model_name!r} has no output tensor {want.name!r} "
                f"(outputs: {', '.join(outputs)})"
            )
        entry: dict[str, Any] = {
            "name": want.name,
            "datatype": NUMPY_TO_DATATYPE.get(value.dtype) or str(value.dtype),
            "shape": list(value.shape),
        }
        if want.shm_region is not None and shm_writer is not None:
            shm_writer.write(want.shm_region, want.shm_offset, want.shm_byte_size, value)
            entry["parameters"] = {
                "shared_memory_region": want.shm_region,
                "shared_memory_byte_size": value.nbytes,
            }
        elif want.binary:
            data = np.ascontiguousarray(value).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif value.dtype.kind == "f" and not np.isfinite(value).all():
            # orjson writes null for NaN/Infinity; json writes NaN/Infinity as before.
            stdlib_json = True
            entry["data"] = value.ravel().tolist()
        else:
            # orjson writes native-endian, C-contiguous arrays of these dtypes directly.
            data_array = np.ascontiguousarray(value.ravel())
            entry["data"] = (
                data_array if data_array.dtype in NUMPY_TO_DATATYPE and data_array.dtype.isnative
                else data_array.tolist()
            )  # fmt: skip
        doc_outputs.append(entry)
    doc: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": doc_outputs,
    }
    if request.id is not None:
        doc["id"] = request.id
    if stdlib_json:
        header = json.dumps(doc, separators=(",", ":")).encode()
    else:
        header = orjson.dumps(doc, option=_DUMPS_OPTIONS)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
