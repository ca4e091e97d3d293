"""``inference.GRPCInferenceService`` (KServe v2 / Triton) over an ``InferenceBackend``.

Each RPC is a method of ``InferenceService``; ``handlers()`` binds them to gRPC method handlers
behind the admission gate (draining answers UNAVAILABLE) and the one error mapping
(``status.code_for``). ModelStatistics, the CUDA shared-memory, trace and log RPCs are not
served: gRPC answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from edged import __version__
from edged._compat import TIMEOUT_ERRORS
from edged.api.backend import InferenceBackend
from edged.api.grpc._proto import grpc_service_pb2 as pb
from edged.api.grpc._proto import model_config_pb2 as mc
from edged.api.grpc.codec import decode_request, encode_response
from edged.api.grpc.status import code_for, retry_hint
from edged.api.shm import SharedMemoryRegistry
from edged.errors import (
    EdgedError,
    FeatureDisabledError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    NotPermittedError,
)

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
DRAINING = "edged is shutting down; retry shortly"

Context = grpc.aio.ServicerContext[Any, Any]
Unary = Callable[[Any, Context], Awaitable[Any]]


class AdmissionGate:
    """Counts admitted calls; once draining, new calls get UNAVAILABLE and ``drained()`` waits
    for the admitted ones (a stream counts per request, not for as long as it stays open)."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if not self.inflight:
            self._idle.set()

    def start_draining(self) -> None:
        self.draining = True

    async def drained(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TIMEOUT_ERRORS:
            return False
        return True


def _version(text: str) -> str | None:
    return text or None


def _on_unix_socket(context: Context) -> bool:
    return context.peer().startswith("unix:")


class InferenceService:
    def __init__(self, backend: InferenceBackend, shm: SharedMemoryRegistry | None) -> None:
        self.backend = backend
        self.shm = shm
        self.gate = AdmissionGate()

    # --- health and metadata --------------------------------------------------------------

    async def server_live(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.backend.ready and not self.gate.draining)

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        extensions = ["model_repository", "edged"]
        if self.shm is not None:
            extensions.append("system_shared_memory")
        return pb.ServerMetadataResponse(name="edged", version=__version__, extensions=extensions)

    async def model_ready(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        # As Triton: an unknown model is not ready, not an error.
        try:
            self.backend.view(request.name, _version(request.version))
        except (ModelNotFoundError, ModelNotReadyError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        view = self.backend.view(request.name, _version(request.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=view.model_name,
            versions=[view.version],
            platform=view.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in view.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in view.outputs],
        )

    async def model_config(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        """Triton's ``ModelConfig`` message, the fields edged has: batching and tensors."""
        view = self.backend.view(request.name, _version(request.version))
        dynamic = view.dynamic_batch

        def dims(shape: tuple[int, ...]) -> tuple[int, ...]:
            return shape[1:] if dynamic else shape

        config = mc.ModelConfig(
            name=view.model_name,
            platform=view.platform,
            max_batch_size=view.max_batch_size if dynamic else 0,
            input=[
                mc.ModelInput(name=t.name, data_type=f"TYPE_{t.datatype}", dims=dims(t.shape))
                for t in view.inputs
            ],
            output=[
                mc.ModelOutput(name=t.name, data_type=f"TYPE_{t.datatype}", dims=dims(t.shape))
                for t in view.outputs
            ],
        )
        if dynamic:
            config.dynamic_batching.CopyFrom(
                mc.ModelDynamicBatching(
                    max_queue_delay_microseconds=view.max_queue_delay_us,
                    priority_levels=view.priority_levels,
                    default_priority_level=view.default_priority,
                )
            )
        return pb.ModelConfigResponse(config=config)

    # --- inference ------------------------------------------------------------------------

    async def _infer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        shm = self.shm
        parsed = decode_request(request, shm, context.time_remaining())
        name = request.model_name
        result = await self.backend.infer(
            name,
            parsed.inputs,
            version=request.model_version or None,
            priority=parsed.priority,
            timeout_s=parsed.timeout_s,
        )
        return encode_response(name, result.model_version, request.id, parsed, result.outputs, shm)

    async def model_infer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        # The hot RPC: the gate and the error mapping inline, without a wrapper's coroutine.
        gate = self.gate
        if gate.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING, retry_hint(1))
        gate.enter()
        try:
            return await self._infer(request, context)
        except EdgedError as exc:
            await _abort(context, exc)
            raise  # not reached: abort raises
        finally:
            gate.leave()

    async def model_stream_infer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently and are answered as they finish (match
        them by ``id``); a failed request is answered with ``error_message`` and the stream
        goes on, as Triton does."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            gate = self.gate
            if gate.draining:
                answers.put_nowait(_stream_error(request, DRAINING))
                return
            gate.enter()
            try:
                response = await self._infer(request, context)
            except EdgedError as exc:
                answers.put_nowait(_stream_error(request, str(exc)))
            except Exception:  # a bug: answered, and logged with its traceback
                log.exception("gRPC stream request to %s failed", request.model_name)
                answers.put_nowait(_stream_error(request, "internal error (see edged's log)"))
            else:
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            finally:
                gate.leave()

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.get_running_loop().create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            finally:
                answers.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
            await reader  # re-raises what ended the reading
        finally:
            for task in (reader, *running):
                task.cancel()

    # --- the model-repository extension ---------------------------------------------------

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        rows = await self.backend.index_async()
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                entry(
                    name=row["name"],
                    version=row["version"],
                    state=row["state"],
                    reason=row.get("reason", ""),
                )
                for row in rows
                if not request.ready or row["state"] == "READY"
            ]
        )

    def _operator(self, context: Context, action: str) -> None:
        """Load and unload change what serves: accepted on gRPC's Unix socket only, whose file
        permissions say who may, as the HTTP API's installs and rollbacks."""
        if not _on_unix_socket(context):
            raise NotPermittedError(
                f"{action} is accepted on edged's gRPC Unix socket only (server.socket, "
                "'-grpc' added to its name)"
            )

    async def repository_model_load(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        self._operator(context, "RepositoryModelLoad")
        if request.parameters:
            raise InvalidRequestError(
                "edged loads the version its repository names; load parameters "
                f"({', '.join(sorted(request.parameters))}) are not supported"
            )
        version = await self.backend.load_model(request.model_name)
        log.info("gRPC load of %s: version %s serving", request.model_name, version)
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        self._operator(context, "RepositoryModelUnload")
        await self.backend.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- the system shared-memory extension -----------------------------------------------

    def _shm(self) -> SharedMemoryRegistry:
        if self.shm is None:
            raise FeatureDisabledError(
                "shared memory is disabled (set server.shared_memory = true)"
            )
        return self.shm

    async def system_shared_memory_status(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(
            regions={
                r["name"]: status(
                    name=r["name"], key=r["key"], offset=r["offset"], byte_size=r["byte_size"]
                )
                for r in self._shm().status(request.name or None)
            }
        )

    async def system_shared_memory_register(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._shm().register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def system_shared_memory_unregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._shm().unregister(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    # --- binding --------------------------------------------------------------------------

    def _guarded(self, method: Unary, gated: bool = True) -> Unary:
        gate = self.gate

        async def handler(request: Any, context: Context) -> Any:
            if gated and gate.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING, retry_hint(1))
            gate.enter()
            try:
                return await method(request, context)
            except EdgedError as exc:
                await _abort(context, exc)
            finally:
                gate.leave()

        return handler

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The RPCs served, by method name, with their (de)serializers from the proto."""
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        unary: dict[str, Unary] = {
            "ServerLive": self._guarded(self.server_live, gated=False),
            "ServerReady": self._guarded(self.server_ready, gated=False),
            "ServerMetadata": self._guarded(self.server_metadata),
            "ModelReady": self._guarded(self.model_ready),
            "ModelMetadata": self._guarded(self.model_metadata),
            "ModelConfig": self._guarded(self.model_config),
            "ModelInfer": self.model_infer,
            "RepositoryIndex": self._guarded(self.repository_index),
            "RepositoryModelLoad": self._guarded(self.repository_model_load),
            "RepositoryModelUnload": self._guarded(self.repository_model_unload),
            "SystemSharedMemoryStatus": self._guarded(self.system_shared_memory_status),
            "SystemSharedMemoryRegister": self._guarded(self.system_shared_memory_register),
            "SystemSharedMemoryUnregister": self._guarded(self.system_shared_memory_unregister),
        }
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for name, method in unary.items():
            desc = service.methods_by_name[name]
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=_message_class(desc.input_type).FromString,
                response_serializer=_message_class(desc.output_type).SerializeToString,
            )
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString,
        )
        return handlers


def _message_class(descriptor: Any) -> Any:
    return getattr(pb, descriptor.name)


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


async def _abort(context: Context, exc: EdgedError) -> None:
    code, metadata = code_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.warning("gRPC call -> %s: %s", code.name, exc)
    await context.abort(code, str(exc), metadata)
