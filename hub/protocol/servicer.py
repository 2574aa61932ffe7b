"""inference.GRPCInferenceService: protobuf in, data-plane calls, protobuf out. Nothing else.

No torch here; status codes come from hub.protocol.status, Triton's views of a model from
hub.protocol.triton.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from hub.core.dataplane import DataPlane
from hub.errors import HubError, InvalidInput, LimitReached, ShuttingDown
from hub.limits import DEFAULT_LIMITS, Limits
from hub.logs import Summarise, Throttle
from hub.protocol import triton
from hub.protocol.codec import decode_request, encode_response, request_timeout
from hub.protocol.generated import grpc_service_pb2 as pb
from hub.protocol.generated import grpc_service_pb2_grpc as pb_grpc
from hub.protocol.status import status_for
from hub.protocol.wire import INFER, LOAD, LOG_SETTINGS, SETTINGS, too_many_entries
from hub.shm import CUDA, SYSTEM, Holds

log = logging.getLogger("modelhub.grpc")

SERVICE = "inference.GRPCInferenceService"
SHUTTING_DOWN = (grpc.StatusCode.UNAVAILABLE, str(ShuttingDown()))


@dataclass(frozen=True)
class Undecodable:
    """What a handler receives in place of a request whose protobuf did not parse, or that
    holds more entries than the limits allow (`excess`, what it holds too many of: it was
    refused before parsing, hub.protocol.wire)."""

    method: str
    size: int
    excess: str = ""

    @property
    def message(self) -> str:
        if self.excess:
            return f"{self.method}: the request holds {self.excess}"
        return f"{self.method}: the request ({self.size} bytes) is not a valid protobuf message of its type"

    def described(self, noun: str) -> str:
        """For the log: "undecodable request of 12 bytes", say."""
        if self.excess:
            return f"{noun} of {self.size} bytes holding {self.excess}"
        return f"undecodable {noun} of {self.size} bytes"


def add_to_server(servicer: InferenceServicer, server: Any) -> None:
    """Register the service as the generated `add_GRPCInferenceServiceServicer_to_server`
    does, but with deserializers that never raise: a request that does not parse reaches the
    handler as `Undecodable` and is answered INVALID_ARGUMENT with one log line (grpc.aio
    would log a traceback per request and answer UNKNOWN; a stream would hang)."""
    captured: dict[str, grpc.RpcMethodHandler] = {}

    class _Capture:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            captured.update(handlers)

    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _Capture())
    handlers = {method: _tolerant(method, handler, servicer) for method, handler in captured.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


#: The other requests whose entries are counted before they are parsed (hub.protocol.wire).
_SCANNED = {
    "TraceSetting": SETTINGS,
    "LogSettings": LOG_SETTINGS,
    "RepositoryModelLoad": LOAD,
    "RepositoryModelUnload": LOAD,
}


def _tolerant(method: str, handler: Any, servicer: InferenceServicer) -> Any:
    """`handler` with a deserializer that returns Undecodable instead of raising. A unary
    method's behaviour refuses it; a streaming one (ModelStreamInfer) sees it in its stream.
    A ModelInferRequest that holds more entries than the limits allow is Undecodable too,
    before it is parsed (hub.protocol.wire): parsing it could cost gigabytes. So is a trace
    or log settings, load or unload request with more map entries than `request_entries`."""
    parse = handler.request_deserializer
    limits = servicer.limits

    def parsed(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError, mostly; whatever it is, the bytes are the client's fault
            return Undecodable(method, len(data))

    # A message shorter than this cannot hold too many entries (each takes 2 bytes at least),
    # so the small requests whose latency is measured in µs pay one comparison.
    unscanned = 2 * min(limits.request_entries, limits.bytes_elements)
    scan = _SCANNED.get(method, INFER)

    def counted(data: bytes) -> Any:
        if len(data) > unscanned and (excess := too_many_entries(data, limits, scan)) is not None:
            return Undecodable(method, len(data), excess)
        try:
            return parse(data)
        except Exception:  # as in parsed
            return Undecodable(method, len(data))

    deserialize = counted if parse == pb.ModelInferRequest.FromString or method in _SCANNED else parsed
    if handler.request_streaming or handler.unary_unary is None:
        return handler._replace(request_deserializer=deserialize)
    behaviour = handler.unary_unary

    serialize = handler.response_serializer

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            servicer.undecodable_log(
                log,
                logging.WARNING,
                "%s from %s: refused %s",
                method,
                context.peer(),
                request.described("request"),
            )
            return _fail(context, (grpc.StatusCode.INVALID_ARGUMENT, request.message))
        response = await behaviour(request, context)
        # (None: no deadline.) grpcio's thread-pool server never cancels a handler, and logs no
        # such error: there the wait would only hold a handler thread.
        if context.time_remaining() == 0 and getattr(context, "cancelled_at_deadline", True):
            await _deadline_seen()
        return response

    def serialize_or_nothing(response: Any) -> bytes:
        return b"" if response is None else serialize(response)

    return handler._replace(
        request_deserializer=deserialize, unary_unary=guarded, response_serializer=serialize_or_nothing
    )


#: The longest a unary handler whose call's deadline has passed waits for grpc to cancel it.
DEADLINE_SEEN_WAIT = 1.0


async def _deadline_seen() -> None:
    """Wait until grpc cancels this handler, its call's deadline having passed; at most
    DEADLINE_SEEN_WAIT seconds. grpc core ends a call at its deadline, but grpc.aio learns of
    it only when its poller hands it the call's close event, and a handler that answers in
    between (with DEADLINE_EXCEEDED, its own timeout being the same deadline, or with a
    response that came just too late) has its answer refused by core: grpc.aio logs that as
    `ExecuteBatchError raised in core by servicer method` at ERROR with a traceback, once per
    call (2,737 in one probe's deadline storm). Once it has the close event it cancels the
    handler instead, and logs that at debug: the answer was for nobody, the client's call
    having ended at the same deadline."""
    await asyncio.sleep(DEADLINE_SEEN_WAIT)


#: The logger of grpc.aio's Cython module, and the line it logs there, with a traceback, when
#: grpc core refuses a handler's answer.
GRPC_AIO_LOGGER = "grpc._cython.cygrpc"
_REFUSED_ANSWER = "ExecuteBatchError raised in core by servicer method ["


def _refused_answer(record: logging.LogRecord) -> tuple[object, ...] | None:
    """(method,) when `record` is grpc.aio's ERROR for an answer that core took and then failed
    to send (`Failed "execute_batch"`: the call had ended), else None. A batch that core
    refused to start (`Failed grpc_call_start_batch`, a malformed answer of ours) stays an error.

    Why it happens, and why it cannot be stopped before it does: a call cancelled by its client,
    or whose connection closed, ends in core, which completes the call's close event and fails
    any answer then sent. grpc.aio (_handle_exceptions in server.pyx.pxi) stays quiet only when
    its close-event task has already run (`client_closed`); when core delivers the failed send
    first, about 4 in 1,000 cancels in a probe, it logs this at ERROR. The handler has returned by
    then, and nothing it can ask before returning (`context.cancelled()` is the code we set,
    `context.done()` whether the status went) knows of the cancel sooner than grpc.aio does.
    (A call past its deadline is kept from it by _deadline_seen.)"""
    if record.levelno != logging.ERROR or record.exc_info is None:
        return None
    error = record.exc_info[1]
    if type(error).__name__ != "ExecuteBatchError" or not str(error).startswith('Failed "execute_batch"'):
        return None
    message = record.getMessage()
    if not (message.startswith(_REFUSED_ANSWER) and message.endswith("]")):
        return None
    return (message[len(_REFUSED_ANSWER) : -1],)


def quiet_refused_answers() -> None:
    """Turn grpc.aio's ERROR and traceback for an answer to a call that its client had already
    ended into one throttled info line on modelhub.grpc. Idempotent; process-wide, as logging is."""
    logger = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(f, Summarise) and f.matches is _refused_answer for f in logger.filters):
        logger.addFilter(
            Summarise(
                log.name,
                logging.INFO,
                "%s: the call ended (cancelled by its client, or its connection closed) as it was answered; "
                "the answer was dropped",
                _refused_answer,
            )
        )


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status for a caught error. Call it inside the `except` block and end the RPC after
    it: ending it inside would keep the error (its traceback, its frames, the request's
    arrays) alive for as long as the RPC's own objects."""
    return status_for(exc)


def _fail(context: grpc.aio.ServicerContext, status: tuple[grpc.StatusCode, str]) -> Any:
    """End a unary RPC with `status`: set it and return None, which the tolerant serializer
    (add_to_server) sends as nothing. Unlike `context.abort`, nothing is raised: an AbortError's
    traceback holds the handler's frames (and so the request, its bytes and its arrays) in a
    reference cycle inside grpc.aio until the cyclic collector runs."""
    context.set_code(status[0])
    context.set_details(status[1])
    return None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, limits: Limits = DEFAULT_LIMITS) -> None:
        self.plane = plane
        self.limits = limits
        self._readers: set[asyncio.Task[None]] = set()
        #: One line per undecodable request, at most 5 per 10 s (a flood of them is the client's).
        self.undecodable_log = Throttle()

    # --- draining (SIGTERM) -------------------------------------------------------------------

    def refuse_new(self) -> None:
        """The data plane refuses new inference requests from now on (`DataPlane.refuse_new`);
        streams stop reading and end with UNAVAILABLE once their accepted requests are answered."""
        self.plane.refuse_new()
        for reader in list(self._readers):
            reader.cancel()

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
            failure = _status(exc)
        return _fail(context, failure)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        try:
            model = self.plane.model(request.name, request.version)
        except HubError as exc:
            failure = _status(exc)
        else:
            return pb.ModelConfigResponse(config=triton.model_config(self.plane, model))
        return _fail(context, failure)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        try:
            models = await self.plane.statistics(request.name, request.version)
        except HubError as exc:
            failure = _status(exc)
        else:
            return pb.ModelStatisticsResponse(model_stats=[triton.model_statistics(m) for m in models])
        return _fail(context, failure)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(models=[triton.index_entry(m) for m in self.plane.index(request.ready)])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        try:
            await self.plane.load(request.model_name, dict(request.parameters))
        except HubError as exc:
            failure = _status(exc)
        else:
            return pb.RepositoryModelLoadResponse()
        return _fail(context, failure)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            await self.plane.unload(request.model_name)
        except HubError as exc:
            failure = _status(exc)
        else:
            return pb.RepositoryModelUnloadResponse()
        return _fail(context, failure)

    # --- inference --------------------------------------------------------------------------

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        time_remaining: float | None,
        hold: Callable[[int], None],
        accepted: bool = False,
    ) -> pb.ModelInferResponse:
        plane = self.plane
        limits = self.limits
        timeout = request_timeout(request, time_remaining)

        def answer(holds: Holds | None) -> Coroutine[Any, Any, pb.ModelInferResponse]:
            return plane.infer(
                request.model_name,
                request.model_version,
                request.id,
                lambda spec: decode_request(request, spec, limits, holds),
                encode_response,
                timeout=timeout,
                accepted=accepted,
                hold=hold,
            )

        if plane.shared_memory is None:  # nothing to hold: a request naming a region is refused in decoding
            return await answer(None)
        with Holds(plane.shared_memory) as holds:  # the regions it names stay mapped until it is answered
            return await answer(holds)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        unsent = self.plane.unsent

        def hold(size: int) -> None:  # a large answer, counted until the call ends: read, or gone
            give_back = unsent.take(size, context.peer())
            context.add_done_callback(lambda _: give_back())

        try:
            return await self._infer(request, context.time_remaining(), hold)
        except HubError as exc:
            failure = _status(exc)
        return _fail(context, failure)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest | Undecodable], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently (and batch together); each response, or its
        error, is sent as soon as it is ready, carrying the request's id.

        At most `limits.stream_in_flight` requests of a stream are computing or waiting for
        the client to read their responses, and only as many as `limits.stream_bytes` holds at
        the size of the stream's largest answer so far: one always, and no second until the
        stream's first answer has told that size. Past that the stream is not read, so a client
        that writes without reading is held back by flow control, and the answers the server
        holds for it are bounded in bytes, not only in number. An answer larger than those
        before it, that would take the unread ones past `limits.stream_bytes`, is dropped and
        its request answered RESOURCE_EXHAUSTED (a client that reads its answers meets that
        only if their sizes jump). An undecodable message (or one holding more entries than
        the limits allow) gets an error on the stream, and the stream
        ends with INVALID_ARGUMENT once the requests before it are answered; during shutdown it
        ends with UNAVAILABLE the same way. Each request read is `accept()`ed by the data plane
        and released when its task ends, however it ends.

        As Triton does, every response carries the parameter `triton_final_response` (true: each
        request is answered once), which streaming clients read to know a request is done, and a
        stream opened with the header `triton_grpc_error: true` ends at its first error with that
        error's status instead of carrying it in `error_message` (Triton's opt-in).
        """
        loop = asyncio.get_running_loop()
        grpc_errors = _grpc_error_mode(context)
        # Each answer with its size and what gives it back to the server's count of unread ones.
        done: asyncio.Queue[_Answer | _StreamEnd] = asyncio.Queue()
        most, budget = self.limits.stream_in_flight, self.limits.stream_bytes
        unread = 0  # requests read whose answers the client has not taken yet
        largest = 0  # bytes of the stream's largest answer so far; 0: none answered yet
        held = 0  # bytes of the answers computed that the client has not taken
        room = asyncio.Event()  # set when `unread` falls or `largest` is learnt
        tasks: set[asyncio.Task[None]] = set()
        plane = self.plane
        unsent, peer = plane.unsent, context.peer()

        def may_read() -> bool:
            # Answers of 4 MiB for 30-byte requests: 64 unread ones held 256 MiB per stream.
            return unread == 0 or (largest > 0 and unread < most and (unread + 1) * largest <= budget)

        def released(task: asyncio.Task[None]) -> None:
            plane.release()

        async def answer(request: pb.ModelInferRequest) -> None:
            nonlocal largest, held
            give_back: Callable[[], None] | None = None

            def hold(size: int) -> None:  # counted server-wide too, until the client takes it
                nonlocal give_back
                give_back = unsent.take(size, peer)

            try:
                infer_response = await self._infer(request, context.time_remaining(), hold, accepted=True)
                size = max(1, sum(len(contents) for contents in infer_response.raw_output_contents))
                if size > largest:
                    largest = size
                    room.set()
                if held and held + size > budget:  # larger than the answers before it said
                    del infer_response
                    raise LimitReached(
                        f"the stream's unread answers hold {held} bytes and this one {size} more, over "
                        f"{budget} (--max-stream-bytes): read the answers before sending more"
                    )
                infer_response.parameters[FINAL_RESPONSE].bool_param = True
                response = pb.ModelStreamInferResponse(infer_response=infer_response)
            except BaseException as exc:
                if give_back is not None:
                    give_back()
                    give_back = None
                if not isinstance(exc, HubError):
                    raise
                status = _status(exc)
                if grpc_errors:
                    await done.put(_StreamEnd(status))
                    return
                stub = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                stub.parameters[FINAL_RESPONSE].bool_param = True
                response = pb.ModelStreamInferResponse(error_message=status[1], infer_response=stub)
                size = 1
            held += size
            await done.put((response, size, give_back))

        async def read() -> None:
            nonlocal unread
            end = _StreamEnd()
            try:
                async for request in request_iterator:
                    if isinstance(request, Undecodable):
                        self.undecodable_log(
                            log,
                            logging.WARNING,
                            "%s from %s: refused %s; ending the stream",
                            request.method,
                            context.peer(),
                            request.described("message"),
                        )
                        end = _StreamEnd(
                            (grpc.StatusCode.INVALID_ARGUMENT, request.message), error_on_stream=not grpc_errors
                        )
                        break
                    if self.plane.draining:
                        end = _StreamEnd(SHUTTING_DOWN)
                        break
                    while not may_read():
                        room.clear()
                        await room.wait()
                    unread += 1
                    try:
                        self.plane.accept()
                    except ShuttingDown:  # it began while this stream waited for a slot
                        end = _StreamEnd(SHUTTING_DOWN)
                        break
                    task = loop.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    # Released however the task ends: answered, refused before it reached the
                    # plane (a `timeout` parameter of the wrong type), or cancelled before it
                    # ran (the client left); a request left counted held SIGTERM its whole grace.
                    task.add_done_callback(released)
            except asyncio.CancelledError:
                if not self.plane.draining:
                    raise
                end = _StreamEnd(SHUTTING_DOWN)  # refuse_new() stopped the reading
            # Nothing adds to `tasks` past this point, so one wait covers every answer. Not a loop
            # until `tasks` is empty: answers that finished in this loop turn are still in it
            # until their done callbacks run, and on Python 3.12 a gather of done tasks returns
            # without yielding, so such a loop never let them run and the server hung at 100% CPU.
            if tasks:
                await asyncio.gather(*tasks)
            await done.put(end)

        reader = loop.create_task(read())
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        try:
            while not isinstance(item := await done.get(), _StreamEnd):
                response, size, give_back = item
                del item
                try:
                    yield response
                finally:  # taken, or the client went away
                    if give_back is not None:
                        give_back()
                del response
                unread -= 1
                held -= size
                room.set()
            if item.status is not None:
                if item.error_on_stream:
                    yield pb.ModelStreamInferResponse(error_message=item.status[1])
                _fail(context, item.status)  # the stream ends when this generator returns
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()  # (one cancelled here has taken nothing: it holds an answer only once queued)
            while not done.empty():  # answers the client will never take
                left = done.get_nowait()
                if not isinstance(left, _StreamEnd) and left[2] is not None:
                    left[2]()

    # --- shared memory ----------------------------------------------------------------------

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        return self._shm_status(SYSTEM, request.name, pb.SystemSharedMemoryStatusResponse, context)

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        arguments = {"key": request.key, "offset": request.offset, "byte_size": request.byte_size}
        return await self._shm_register(SYSTEM, request.name, arguments, pb.SystemSharedMemoryRegisterResponse, context)

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        return await self._shm_unregister(SYSTEM, request.name, pb.SystemSharedMemoryUnregisterResponse, context)

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        return self._shm_status(CUDA, request.name, pb.CudaSharedMemoryStatusResponse, context)

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any
    ) -> pb.CudaSharedMemoryRegisterResponse:
        arguments = {"raw_handle": request.raw_handle, "device_id": request.device_id, "byte_size": request.byte_size}
        return await self._shm_register(CUDA, request.name, arguments, pb.CudaSharedMemoryRegisterResponse, context)

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return await self._shm_unregister(CUDA, request.name, pb.CudaSharedMemoryUnregisterResponse, context)

    # The two kinds (system, CUDA) differ only in their messages.

    def _shm_status(self, kind: str, name: str, response: Any, context: Any) -> Any:
        try:
            regions = self.plane.shared_memory_status(kind, name)
        except HubError as exc:
            failure = _status(exc)
        else:
            return response(regions={r["name"]: response.RegionStatus(**r) for r in regions})
        return _fail(context, failure)

    async def _shm_register(self, kind: str, name: str, arguments: dict[str, Any], response: Any, context: Any) -> Any:
        try:
            await self.plane.register_shared_memory(kind, name, arguments)
        except HubError as exc:
            failure = _status(exc)
        else:
            return response()
        return _fail(context, failure)

    async def _shm_unregister(self, kind: str, name: str, response: Any, context: Any) -> Any:
        try:
            await self.plane.unregister_shared_memory(kind, name)
        except HubError as exc:
            failure = _status(exc)
        else:
            return response()
        return _fail(context, failure)

    # --- log settings (Triton's logging extension) -------------------------------------------

    async def LogSettings(self, request: pb.LogSettingsRequest, context: Any) -> pb.LogSettingsResponse:
        """No settings in the request: the current ones (tritonclient's get_log_settings)."""
        try:
            changes = {name: _setting(name, value) for name, value in request.settings.items()}
            settings = await self.plane.update_log_settings(changes)
        except HubError as exc:
            failure = _status(exc)
        else:
            response = pb.LogSettingsResponse()
            for name, value in settings.items():
                slot = response.settings[name]
                if isinstance(value, bool):
                    slot.bool_param = value
                elif isinstance(value, int):
                    slot.uint32_param = value
                else:
                    slot.string_param = value
            return response
        return _fail(context, failure)

    # --- trace settings (Triton's trace extension) -------------------------------------------

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Any) -> pb.TraceSettingResponse:
        """No settings in the request: the current ones (tritonclient's get_trace_settings). A
        setting with no values clears it (a model's own falls back to the global one)."""
        try:
            changes = {name: list(value.value) or None for name, value in request.settings.items()}
            settings = await self.plane.update_trace_settings(request.model_name, changes)
        except HubError as exc:
            failure = _status(exc)
        else:
            response = pb.TraceSettingResponse()
            for name, values in settings.items():
                response.settings[name].value.extend(values)
            return response
        return _fail(context, failure)


#: The response parameter Triton sets on every streamed response: true on a request's last one.
FINAL_RESPONSE = "triton_final_response"


def _grpc_error_mode(context: Any) -> bool:
    """Whether the stream asked, with the header `triton_grpc_error: true`, to end at its first
    error with that error's status (tritonclient: `start_stream(headers={"triton_grpc_error":
    "true"})`), as Triton's gRPC frontend does."""
    return any(key == "triton_grpc_error" and value == "true" for key, value in context.invocation_metadata() or ())


def _setting(name: str, value: pb.LogSettingsRequest.SettingValue) -> bool | int | str:
    which = value.WhichOneof("parameter_choice")
    if which is None:
        raise InvalidInput(f"log setting '{name[:64]}' has no value")
    result: bool | int | str = getattr(value, which)
    return result


@dataclass(frozen=True)
class _StreamEnd:
    """The last item of a stream's queue: end normally, or with `status`."""

    status: tuple[grpc.StatusCode, str] | None = None
    error_on_stream: bool = False


#: An answer in a stream's queue: the response, its size, and what gives it back to the
#: server's count of unread answers (None: not counted).
_Answer = tuple[pb.ModelStreamInferResponse, int, Callable[[], None] | None]
