"""The KServe v2 gRPC front end (``inference.GRPCInferenceService``, as Triton serves it):
``tritonclient.grpc``, DeepStream's nvinferserver and perf_analyzer work unchanged.

It speaks only to an ``InferenceBackend`` (``edged.api.backend``); the protos it was built from
are vendored in ``proto/`` and the stubs in ``_proto/`` are generated from them by
``scripts/grpc_stubs.py``.
"""

from edged.api.grpc.server import GrpcServer

__all__ = ["GrpcServer"]
