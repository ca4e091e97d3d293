"""KServe v2 gRPC tensors to and from numpy: ``ModelInferRequest`` to the backend's inputs, its
result to a ``ModelInferResponse``. Pure functions, no I/O but the shared-memory registry.

Raw contents are the fast path (``tritonclient.grpc`` always sends them): each input is one
``np.frombuffer`` over the message's bytes, each output one ``tobytes``. Typed contents (the
``*_contents`` lists) are converted by numpy in C, never value by value in Python.

As Triton: ``raw_input_contents`` are matched in order to the inputs that have neither typed
contents nor a shared-memory region; outputs come back raw unless the client asks for typed
contents with ``binary_data = false`` (on the request, or on every requested output), as one
response cannot mix the two; an output written to shared memory gets an empty raw entry, so that
the raw entries stay aligned with ``outputs``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edged.api.grpc._proto import grpc_service_pb2 as pb
from edged.api.tensors import OutputRequest
from edged.errors import InvalidRequestError
from edged.runtime.base import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE, Array

# The typed-contents field of each datatype (FP16 has none: it travels raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

_SHM_REGION = "shared_memory_region"


class SharedMemory(Protocol):
    """The shared-memory registry (``edged.api.shm.SharedMemoryRegistry``)."""

    def read(self, name: str, offset: int, byte_size: int) -> memoryview: ...

    def write(self, name: str, offset: int, byte_size: int, value: Array) -> None: ...


@dataclass(frozen=True)
class GrpcInferRequest:
    inputs: dict[str, Array]
    outputs: tuple[OutputRequest, ...]  # empty: every output of the model
    raw_output: bool  # False: typed contents
    priority: int
    timeout_s: float | None


def param_value(param: pb.InferParameter) -> bool | int | float | str | None:
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def _int_param(
    params: Mapping[str, pb.InferParameter], key: str, where: str, default: int = 0
) -> int:
    param = params.get(key)
    if param is None:
        return default
    value = param_value(param)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{where}: parameter {key!r} must be a non-negative integer")
    return value


def _bool_param(params: Mapping[str, pb.InferParameter], key: str, where: str) -> bool | None:
    param = params.get(key)
    if param is None:
        return None
    value = param_value(param)
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{where}: parameter {key!r} must be a bool")
    return value


def decode_request(
    request: pb.ModelInferRequest, shm: SharedMemory | None, deadline_s: float | None
) -> GrpcInferRequest:
    """``deadline_s``: the time left of the call's gRPC deadline, if it has one; the sooner of
    it and the request's ``timeout`` parameter (microseconds) bounds the request."""
    raw = request.raw_input_contents
    raw_count = len(raw)
    used = 0
    inputs: dict[str, Array] = {}
    for tensor in request.inputs:
        name = tensor.name
        where = f"input tensor {name!r}"
        if name in inputs:
            raise InvalidRequestError(f"{where} is given twice")
        datatype = tensor.datatype
        dtype = DATATYPE_TO_NUMPY.get(datatype)
        if dtype is None:
            raise InvalidRequestError(
                f"{where}: datatype {datatype or '(none)'} is not supported "
                f"(supported: {', '.join(DATATYPE_TO_NUMPY)})"
            )
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidRequestError(f"{where}: shape {list(shape)} has a negative size")
        nbytes = math.prod(shape) * dtype.itemsize
        params = tensor.parameters
        if _SHM_REGION in params:
            inputs[name] = _from_shm(params, shm, where, shape, dtype, nbytes)
        elif tensor.HasField("contents"):
            if raw_count:
                raise InvalidRequestError(
                    f"{where}: typed contents cannot be mixed with raw_input_contents"
                )
            inputs[name] = _from_contents(tensor.contents, datatype, dtype, shape, where)
        elif used < raw_count:
            data = raw[used]
            used += 1
            if len(data) != nbytes:
                raise InvalidRequestError(
                    f"{where}: raw contents have {len(data)} bytes but shape {list(shape)} of "
                    f"{datatype} needs {nbytes}"
                )
            inputs[name] = np.frombuffer(data, dtype).reshape(shape)
        else:
            raise InvalidRequestError(f"{where}: no raw contents, typed contents or shared memory")
    if not inputs:
        raise InvalidRequestError("request needs at least one input tensor")
    if used != raw_count:
        raise InvalidRequestError(
            f"{raw_count} raw_input_contents for {used} input(s) that take raw contents"
        )
    params = request.parameters
    outputs, raw_output = _requested_outputs(
        request, _bool_param(params, "binary_data_output", "request")
    )
    timeout_s = deadline_s
    timeout_us = _int_param(params, "timeout", "request")
    if timeout_us:
        timeout_s = timeout_us / 1e6 if timeout_s is None else min(timeout_s, timeout_us / 1e6)
    return GrpcInferRequest(
        inputs, outputs, raw_output, _int_param(params, "priority", "request"), timeout_s
    )


def _from_shm(
    params: Mapping[str, pb.InferParameter],
    shm: SharedMemory | None,
    where: str,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    nbytes: int,
) -> Array:
    if shm is None:
        raise InvalidRequestError(f"{where}: shared memory is disabled on this server")
    size = _int_param(params, "shared_memory_byte_size", where)
    if size != nbytes:
        raise InvalidRequestError(
            f"{where}: shared_memory_byte_size {size} != {nbytes} bytes for shape {list(shape)}"
        )
    region = param_value(params[_SHM_REGION])
    data = shm.read(str(region), _int_param(params, "shared_memory_offset", where), size)
    return np.frombuffer(data, dtype).reshape(shape)


def _from_contents(
    contents: pb.InferTensorContents,
    datatype: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    where: str,
) -> Array:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequestError(f"{where}: {datatype} has no typed contents; send it raw")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidRequestError(
            f"{where}: {field} has {len(values)} values but shape {list(shape)} needs {count}"
        )
    try:
        return np.fromiter(values, dtype, count).reshape(shape)
    except (ValueError, OverflowError) as exc:
        raise InvalidRequestError(f"{where}: {field} does not fit {datatype}: {exc}") from exc


def _requested_outputs(
    request: pb.ModelInferRequest, binary_default: bool | None
) -> tuple[tuple[OutputRequest, ...], bool]:
    wanted: list[OutputRequest] = []
    binary_flags: list[bool | None] = []
    for output in request.outputs:
        where = f"output {output.name!r}"
        params = output.parameters
        if "classification" in params:
            raise InvalidRequestError(f"{where}: classification outputs are not supported")
        binary = _bool_param(params, "binary_data", where)
        region = params.get(_SHM_REGION)
        if region is None:
            binary_flags.append(binary)
            wanted.append(OutputRequest(output.name, binary is not False))
        else:
            wanted.append(
                OutputRequest(
                    output.name,
                    True,
                    str(param_value(region)),
                    _int_param(params, "shared_memory_offset", where),
                    _int_param(params, "shared_memory_byte_size", where),
                )
            )
    flags = [binary_default if b is None else b for b in binary_flags] or [binary_default]
    if all(b is False for b in flags):
        return tuple(wanted), False
    if any(b is False for b in flags):
        raise InvalidRequestError(
            "binary_data = false on some outputs only: a response carries either raw or typed "
            "contents (set it on every output, or on the request as binary_data_output)"
        )
    return tuple(wanted), True


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str,
    request: GrpcInferRequest,
    outputs: dict[str, Array],
    shm: SharedMemory | None,
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id
    )
    wanted = request.outputs or tuple(OutputRequest(name, True) for name in outputs)
    raw: list[bytes] = []
    tensors = response.outputs
    for want in wanted:
        value = outputs.get(want.name)
        if value is None:
            raise InvalidRequestError(
                f"model {model_name!r} has no output tensor {want.name!r} "
                f"(outputs: {', '.join(outputs)})"
            )
        datatype = NUMPY_TO_DATATYPE.get(value.dtype)
        if datatype is None:
            raise InvalidRequestError(f"output {want.name!r} has dtype {value.dtype}: no datatype")
        tensor = tensors.add(name=want.name, datatype=datatype, shape=value.shape)
        if want.shm_region is not None:
            if shm is None:
                raise InvalidRequestError(
                    f"output {want.name!r}: shared memory is disabled on this server"
                )
            shm.write(want.shm_region, want.shm_offset, want.shm_byte_size, value)
            tensor.parameters[_SHM_REGION].string_param = want.shm_region
            tensor.parameters["shared_memory_byte_size"].int64_param = value.nbytes
            if want.shm_offset:
                tensor.parameters["shared_memory_offset"].int64_param = want.shm_offset
            raw.append(b"")
        elif request.raw_output:
            raw.append(value.tobytes())
        else:
            field = CONTENTS_FIELD.get(datatype)
            if field is None:
                raise InvalidRequestError(
                    f"output {want.name!r}: {datatype} has no typed contents; ask for it raw"
                )
            getattr(tensor.contents, field).extend(value.ravel().tolist())
    if request.raw_output:
        response.raw_output_contents.extend(raw)
    return response
