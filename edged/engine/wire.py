"""The messages between processes: front ends ↔ engine (inference) and control plane ↔ engine
(management). One frame: ``u32 header length, u32 data length``, an orjson header, then raw
bytes. Tensors travel as descriptors naming where their bytes are: a shared-memory arena
(``edged.engine.arena``) or, as the fallback, the frame's own data section.

Nothing here is pickled: a header is JSON, a tensor is a shape, a datatype and a place.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

import edged.errors as errors_module
from edged.errors import EdgedError, InferenceFailedError, QueueFullError
from edged.runtime.base import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE, Array

FRAME = struct.Struct("<II")
FRAME_SIZE = FRAME.size
# A header is small; a frame longer than this is a bug or garbage on the socket.
MAX_HEADER_BYTES = 16 * 1024 * 1024

# Message kinds (header key "k").
INFER = "i"  # front end → engine: one request
RESULT = "r"  # engine → front end: one answer (outputs or error)
BATCH = "b"  # engine → front end: the answers of several requests of one batch, by rows
FREE = "f"  # front end → engine: response slots the front end is done with
VIEWS = "v"  # engine → front end: what serves now (model views, readiness)
HELLO = "h"  # both ways, first: arena sizes and who is talking
CALL = "c"  # control plane → engine: a management call
REPLY = "y"  # engine → control plane: a call's answer
EVENT = "e"  # engine → control plane: something happened (probation, telemetry)

# A tensor descriptor: [name, datatype, shape, arena offset (-1: inline), data offset, nbytes]
TensorRef = list[Any]


def frame(header: dict[str, Any], data: bytes | bytearray | memoryview = b"") -> bytes:
    head = orjson.dumps(header)
    return (
        FRAME.pack(len(head), len(data)) + head + data
        if data
        else (FRAME.pack(len(head), 0) + head)
    )


def frames(buffer: bytearray) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Yield every complete frame at the start of ``buffer``, then remove them from it."""
    position = 0
    end = len(buffer)
    unpack = FRAME.unpack_from
    loads = orjson.loads
    try:
        while end - position >= FRAME_SIZE:
            head_len, data_len = unpack(buffer, position)
            if head_len > MAX_HEADER_BYTES:
                raise ValueError(f"frame header of {head_len} bytes: the stream is corrupt")
            total = FRAME_SIZE + head_len + data_len
            if end - position < total:
                break
            start = position + FRAME_SIZE
            header = loads(buffer[start : start + head_len])
            data = bytes(buffer[start + head_len : position + total]) if data_len else b""
            position += total
            yield header, data
    finally:
        if position:
            del buffer[:position]


def describe(name: str, value: Array, arena_offset: int, data_offset: int) -> TensorRef:
    return [
        name,
        NUMPY_TO_DATATYPE.get(value.dtype, str(value.dtype)),
        list(value.shape),
        arena_offset,
        data_offset,
        value.nbytes,
    ]


def tensor_at(ref: TensorRef, arena: memoryview | None, data: bytes) -> Array:
    """A view of the tensor ``ref`` names (no copy)."""
    _, datatype, shape, arena_offset, data_offset, nbytes = ref
    dtype = DATATYPE_TO_NUMPY[datatype]
    value: Array
    if arena_offset >= 0:
        assert arena is not None, "a tensor in an arena that was never shared"
        value = np.frombuffer(arena, dtype, nbytes // dtype.itemsize, arena_offset)
    else:
        value = np.frombuffer(data, dtype, nbytes // dtype.itemsize, data_offset)
    value = value.reshape(shape)
    return value


# --- errors -----------------------------------------------------------------------------------


def error_fields(exc: BaseException) -> dict[str, Any]:
    """An exception as header fields; the other side raises the same EdgedError class."""
    name = type(exc).__name__ if isinstance(exc, EdgedError) else "InferenceFailedError"
    message = str(exc) if isinstance(exc, EdgedError) else f"{type(exc).__name__}: {exc}"
    fields: dict[str, Any] = {"e": name, "msg": message}
    if isinstance(exc, QueueFullError):
        fields["retry"] = exc.retry_after_s
    return fields


def error_from(header: dict[str, Any]) -> EdgedError:
    """The error a header carries, as the EdgedError class the other side raised."""
    cls = getattr(errors_module, str(header.get("e")), None)
    message = str(header.get("msg", "engine error"))
    if not (isinstance(cls, type) and issubclass(cls, EdgedError)):
        return InferenceFailedError(message)
    try:
        error = cls(message)
    except TypeError:  # an error class whose constructor takes more than a message
        error = InferenceFailedError(message)
    if isinstance(error, QueueFullError) and "retry" in header:
        error.retry_after_s = header["retry"]
    return error
