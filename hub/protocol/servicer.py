"""inference.GRPCInferenceService: protobuf in, domain calls, protobuf out. Nothing else.

No torch here; status codes come from hub.protocol.status.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, Protocol

import grpc

from hub import __version__
from hub.config import VersionPolicy
from hub.core.models import ServedModel
from hub.core.repository import ModelRepository
from hub.datatypes import CONFIG_TYPE_NAMES
from hub.errors import HubError, ModelNotFound, Unsupported
from hub.protocol.codec import decode_inputs, encode_response, requested_outputs
from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.generated import grpc_service_pb2_grpc as pb_grpc
from hub.protocol.generated import model_config_pb2 as mc
from hub.protocol.status import status_for
from hub.spec import ModelSpec, TensorSpec

log = logging.getLogger("modelhub.grpc")
access = logging.getLogger("modelhub.access")

EXTENSIONS = ["model_configuration", "model_repository", "statistics"]
TensorMetadata = pb.ModelMetadataResponse.TensorMetadata


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    code, message = status_for(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort raises


def _unimplemented(method: str) -> Callable[..., Any]:
    async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by modelhub")

    handler.__name__ = method
    return handler


class ModelControl(Protocol):
    async def load_model(self, name: str) -> None: ...

    async def unload_model(self, name: str) -> None: ...


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        is_ready: Callable[[], bool],
        *,
        control: ModelControl | None = None,
        version_policy: Callable[[str], VersionPolicy] | None = None,
        log_requests: float = 0.0,
    ) -> None:
        self._version_policy = version_policy
        self.repository = repository
        self._is_ready = is_ready
        self._control = control
        self._log_requests = log_requests

    # --- health -----------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            model = self.repository.resolve(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=model.ready)

    # --- metadata ---------------------------------------------------------------------------

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="modelhub", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            model = self.repository.resolve(request.name, request.version)
        except HubError as exc:
            await _abort(context, exc)
        spec = model.spec
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=[str(m.version) for m in self.repository.versions(spec.name)],
            platform=_platform(model),
            inputs=[
                TensorMetadata(name=t.name, datatype=t.datatype, shape=(-1, 1) if spec.one_per_row(t) else t.shape)
                for t in spec.inputs
            ],
            outputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.outputs],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        try:
            model = self.repository.resolve(request.name, request.version)
        except HubError as exc:
            await _abort(context, exc)
        policy = self._version_policy(model.name) if self._version_policy else None
        return pb.ModelConfigResponse(config=model_config(model, policy))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        try:
            if request.name:
                models = (
                    [self.repository.resolve(request.name, request.version)]
                    if request.version
                    else self.repository.versions(request.name)
                )
                if not models:
                    self.repository.resolve(request.name)  # raises NOT_FOUND with the known names
            else:
                models = self.repository.models()
        except HubError as exc:
            await _abort(context, exc)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        entries = [
            pb.RepositoryIndexResponse.ModelIndex(
                name=m.name, version=str(m.version), state=m.state.triton, reason=m.reason
            )
            for m in self.repository.models()
            if m.ready or not request.ready
        ]
        return pb.RepositoryIndexResponse(models=entries)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        if self._control is None:
            await _abort(context, Unsupported("RepositoryModelLoad is not enabled on this server"))
        try:
            await self._control.load_model(request.model_name)
        except HubError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        if self._control is None:
            await _abort(context, Unsupported("RepositoryModelUnload is not enabled on this server"))
        try:
            await self._control.unload_model(request.model_name)
        except HubError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # --- inference --------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        response, error = await self._infer(request, context.time_remaining())
        if error is not None:
            await _abort(context, error)
        assert response is not None
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently (and batch together); each response, or its
        error, is sent as soon as it is ready, carrying the request's id."""
        done: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            response, error = await self._infer(request, context.time_remaining())
            if error is None:
                await done.put(pb.ModelStreamInferResponse(infer_response=response))
                return
            _, message = status_for(error)
            stub = pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            )
            await done.put(pb.ModelStreamInferResponse(error_message=message, infer_response=stub))

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

    async def _infer(
        self, request: pb.ModelInferRequest, time_remaining: float | None
    ) -> tuple[pb.ModelInferResponse | None, BaseException | None]:
        """One inference, accounted in statistics and metrics: (response, None) or (None, error)."""
        try:
            model = self.repository.get_ready(request.model_name, request.model_version)
        except HubError as exc:
            return None, exc
        started = time.perf_counter()
        model.begin_request()
        response = None
        error: BaseException | None = None
        try:
            inputs = decode_inputs(request)
            names = requested_outputs(request, model.spec)
            outputs = await model.infer(inputs, timeout=time_remaining, request_id=request.id)
            response = encode_response(request, model.version, outputs, names)
        except asyncio.CancelledError:
            model.end_request("CANCELLED", time.perf_counter() - started)
            raise
        except HubError as exc:
            error = exc
        except Exception as exc:
            error = exc
            log.exception("model '%s': request %r failed", model.spec.key, request.id or "-")
        elapsed = time.perf_counter() - started
        code_name = "OK" if error is None else status_for(error)[0].name
        model.end_request(code_name, elapsed)
        if self._log_requests and random.random() < self._log_requests:
            access.info(
                "%s v%d id=%s %s %.3fms",
                model.name,
                model.version,
                request.id or "-",
                code_name,
                elapsed * 1e3,
                extra={
                    "model": model.name,
                    "version": model.version,
                    "request_id": request.id,
                    "code": code_name,
                    "ms": round(elapsed * 1e3, 3),
                },
            )
        return response, error

    # --- everything else answers UNIMPLEMENTED, naming the method -----------------------------

    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")


def _platform(model: ServedModel) -> str:
    return model.target.platform if model.target is not None else model.spec.target


def _version_policy(policy: VersionPolicy) -> mc.ModelVersionPolicy:
    if policy.all:
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if policy.specific:
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=policy.specific))
    return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=policy.latest or 1))


def _config_input(spec: ModelSpec, tensor: TensorSpec, skip: int) -> mc.ModelInput:
    if spec.one_per_row(tensor):
        return mc.ModelInput(
            name=tensor.name,
            data_type=CONFIG_TYPE_NAMES[tensor.datatype],
            dims=[1],
            reshape=mc.ModelTensorReshape(shape=[]),
        )
    return mc.ModelInput(name=tensor.name, data_type=CONFIG_TYPE_NAMES[tensor.datatype], dims=tensor.shape[skip:])


def model_config(model: ServedModel, versions: VersionPolicy | None = None) -> mc.ModelConfig:
    """The spec and policy as Triton's ModelConfig: dims without the batch dimension."""
    spec, policy = model.spec, model.spec.batching
    skip = 1 if policy.batching else 0
    config = mc.ModelConfig(
        name=spec.name,
        platform=_platform(model),
        backend="modelhub",
        runtime=spec.target,
        max_batch_size=policy.max_batch_size,
        input=[_config_input(spec, t, skip) for t in spec.inputs],
        output=[
            mc.ModelOutput(name=t.name, data_type=CONFIG_TYPE_NAMES[t.datatype], dims=t.shape[skip:])
            for t in spec.outputs
        ],
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{spec.name}_0",
                count=policy.instances,
                kind=mc.ModelInstanceGroup.KIND_GPU
                if model.runtime is not None and model.runtime.device == "cuda"
                else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
        version_policy=_version_policy(versions or VersionPolicy()),
        default_model_filename=model.target.artifact if model.target is not None else "",
    )
    if policy.batching:
        config.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=policy.preferred_batch_sizes,
                max_queue_delay_microseconds=round(policy.max_queue_delay * 1e6),
                default_queue_policy=mc.ModelQueuePolicy(
                    timeout_action=mc.ModelQueuePolicy.REJECT,
                    default_timeout_microseconds=round((policy.timeout or 0) * 1e6),
                    allow_timeout_override=True,
                    max_queue_size=policy.max_queue_size,
                ),
            )
        )
    for key, value in _manifest_parameters(model).items():
        config.parameters[key].string_value = value
    return config


def _manifest_parameters(model: ServedModel) -> dict[str, str]:
    """The build report, flattened into ModelConfig parameters."""
    out = {"state": model.state.value}
    if model.reason:
        out["reason"] = model.reason
    manifest = model.manifest
    if manifest:
        out["target"] = str(manifest.get("target", ""))
        out["built_at"] = str(manifest.get("built_at", ""))
        out["cache_key"] = str(manifest.get("cache_key", ""))
        validation = manifest.get("validation", {})
        for key in ("max_abs_err", "max_rel_err"):
            if key in validation:
                out[f"parity_{key}"] = f"{validation[key]:.3g}"
    return out


def _duration(d: Any) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(model: ServedModel) -> pb.ModelStatistics:
    s = model.stats
    return pb.ModelStatistics(
        name=model.name,
        version=str(model.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )
