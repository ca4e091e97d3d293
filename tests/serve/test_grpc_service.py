"""The gRPC front end in-process over real loopback TCP, on a real ModelManager behind the
InferenceBackend seam: the admission gate while draining and the trailing retry hint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edged.api.backend import ManagerBackend
from edged.api.grpc._proto import grpc_service_pb2 as pb
from edged.api.grpc.server import GrpcServer
from edged.config import ModelsConfig, ServerConfig
from edged.serve.manager import ModelManager

SERVICE = "/inference.GRPCInferenceService/"


@asynccontextmanager
async def serving(repo: Path) -> AsyncIterator[tuple[GrpcServer, grpc.aio.Channel]]:
    manager = ModelManager(ModelsConfig(repository=repo))
    await manager.start()
    server = GrpcServer(ManagerBackend(manager), None, ServerConfig(grpc_port=0))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, channel
    finally:
        await server.stop(0.0)
        await manager.close()


async def call(channel: grpc.aio.Channel, method: str, request: Any, response: Any) -> Any:
    stub = channel.unary_unary(
        SERVICE + method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response.FromString,
    )
    return await stub(request, timeout=30)


def infer_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
    return request


def test_draining_answers_unavailable_with_a_retry_hint_and_the_server_turns_unready(
    model_repo: Path,
) -> None:
    async def main() -> None:
        async with serving(model_repo) as (server, channel):
            response = await call(channel, "ModelInfer", infer_request(), pb.ModelInferResponse)
            assert response.model_version == "1" and len(response.raw_output_contents) == 1
            ready = await call(
                channel, "ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse
            )
            assert ready.ready
            server.start_draining()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(channel, "ModelInfer", infer_request(), pb.ModelInferResponse)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (info.value.details() or "")
            trailing = dict(info.value.trailing_metadata() or ())
            assert trailing["retry-after"] == "1"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(
                    channel,
                    "ModelMetadata",
                    pb.ModelMetadataRequest(name="mlp"),
                    pb.ModelMetadataResponse,
                )
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            # Health still answers, so that a balancer learns to go elsewhere.
            live = await call(channel, "ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse)
            assert live.live
            ready = await call(
                channel, "ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse
            )
            assert not ready.ready
            assert await server.drained(5.0)

    asyncio.run(main())


def test_unserved_rpcs_are_unimplemented_and_unknown_models_not_found(model_repo: Path) -> None:
    async def main() -> None:
        async with serving(model_repo) as (_server, channel):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(
                    channel,
                    "ModelStatistics",
                    pb.ModelStatisticsRequest(name="mlp"),
                    pb.ModelStatisticsResponse,
                )
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
            request = infer_request()
            request.model_name = "nope"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(channel, "ModelInfer", request, pb.ModelInferResponse)
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
            assert "unknown model 'nope'" in (info.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(
                    channel,
                    "SystemSharedMemoryStatus",
                    pb.SystemSharedMemoryStatusRequest(),
                    pb.SystemSharedMemoryStatusResponse,
                )
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert "server.shared_memory" in (info.value.details() or "")

    asyncio.run(main())
