"""The one place where edged's errors become gRPC status codes (the HTTP routes' twin is
``edged.api.context.status_for``).

Bad input INVALID_ARGUMENT, unknown model or version NOT_FOUND, queue full RESOURCE_EXHAUSTED,
deadline DEADLINE_EXCEEDED, not ready or draining UNAVAILABLE, an operator action over TCP
PERMISSION_DENIED, a subsystem turned off UNIMPLEMENTED, a refused hot swap FAILED_PRECONDITION,
anything else INTERNAL. RESOURCE_EXHAUSTED and UNAVAILABLE carry a retry hint in the trailing
metadata: ``retry-after`` in seconds (as HTTP's header) and gRPC's own
``grpc-retry-pushback-ms``, which gRPC's client-side retry policy honours.
"""

from __future__ import annotations

import grpc

from edged.errors import (
    DeadlineExceededError,
    EdgedError,
    FeatureDisabledError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    NotPermittedError,
    QueueFullError,
    SelfTestFailedError,
    ShuttingDownError,
)

Metadata = tuple[tuple[str, str], ...]


def retry_hint(seconds: int) -> Metadata:
    return (("retry-after", str(seconds)), ("grpc-retry-pushback-ms", str(seconds * 1000)))


def code_for(exc: EdgedError) -> tuple[grpc.StatusCode, Metadata]:
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, ()
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, ()
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, retry_hint(exc.retry_after_s)
    if isinstance(exc, ModelNotReadyError | ShuttingDownError):
        return grpc.StatusCode.UNAVAILABLE, retry_hint(1)
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, ()
    if isinstance(exc, NotPermittedError):
        return grpc.StatusCode.PERMISSION_DENIED, ()
    if isinstance(exc, FeatureDisabledError):
        return grpc.StatusCode.UNIMPLEMENTED, ()
    if isinstance(exc, SelfTestFailedError | InsufficientMemoryError):
        return grpc.StatusCode.FAILED_PRECONDITION, ()
    return grpc.StatusCode.INTERNAL, ()
