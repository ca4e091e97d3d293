"""The KServe v2 gRPC front end (``inference.GRPCInferenceService``, as Triton serves it):
``tritonclient.grpc``, DeepStream's nvinferserver and perf_analyzer work unchanged.

It speaks only to an ``InferenceBackend`` (``edged.api.backend``); the protos it was built from
are vendored in ``proto/`` and the stubs in ``_proto/`` are generated from them by
``scripts/grpc_stubs.py``. ``server.GrpcServer`` serves it; importing this package alone does not
import grpcio (``listen.ensure_port_free`` is what the control plane needs of it).
"""
