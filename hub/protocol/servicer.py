"""inference.GRPCInferenceService: protobuf in, data-plane calls, protobuf out. Nothing else.

No torch here; status codes come from hub.protocol.status, Triton's views of a model from
hub.protocol.triton.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from hub.core.dataplane import DataPlane
from hub.errors import HubError
from hub.protocol import triton
from hub.protocol.codec import decode_request, encode_response
from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.generated import grpc_service_pb2_grpc as pb_grpc
from hub.protocol.status import status_for


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    code, message = status_for(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort raises


def _unimplemented(method: str) -> Callable[..., Any]:
    async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by modelhub")

    handler.__name__ = method
    return handler


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    # --- health -----------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    # --- metadata ---------------------------------------------------------------------------

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        name, version, extensions = self.plane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            return triton.model_metadata(self.plane, self.plane.model(request.name, request.version))
        except HubError as exc:
            await _abort(context, exc)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        try:
            model = self.plane.model(request.name, request.version)
        except HubError as exc:
            await _abort(context, exc)
        return pb.ModelConfigResponse(config=triton.model_config(self.plane, model))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        try:
            models = await self.plane.statistics(request.name, request.version)
        except HubError as exc:
            await _abort(context, exc)
        return pb.ModelStatisticsResponse(model_stats=[triton.model_statistics(m) for m in models])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(models=[triton.index_entry(m) for m in self.plane.index(request.ready)])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        try:
            await self.plane.load(request.model_name, dict(request.parameters))
        except HubError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            await self.plane.unload(request.model_name)
        except HubError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # --- inference --------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest, time_remaining: float | None) -> pb.ModelInferResponse:
        plane = self.plane
        return await plane.infer(
            request.model_name,
            request.model_version,
            request.id,
            lambda spec: decode_request(request, spec),
            encode_response,
            timeout=time_remaining,
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, context.time_remaining())
        except HubError as exc:
            await _abort(context, exc)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently (and batch together); each response, or its
        error, is sent as soon as it is ready, carrying the request's id."""
        done: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                response = await self._infer(request, context.time_remaining())
            except HubError as exc:
                _, message = status_for(exc)
                stub = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                await done.put(pb.ModelStreamInferResponse(error_message=message, infer_response=stub))
                return
            await done.put(pb.ModelStreamInferResponse(infer_response=response))

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.get_running_loop().create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
            await done.put(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (item := await done.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    # --- everything else answers UNIMPLEMENTED, naming the method -----------------------------

    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")
