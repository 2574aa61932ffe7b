"""The protocol-neutral data plane: everything a frontend (gRPC, REST) does, in domain terms.

Frontends translate their wire format into calls on one DataPlane and its results back; the
accounting of a request (statistics, metrics, in-flight, the sampled access log) happens
here, once, whichever frontend the request came through. No protobuf or HTTP here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from hub import __version__
from hub.config import VersionPolicy
from hub.core.models import ServedModel
from hub.core.repository import ModelRepository
from hub.core.trace import Tracer
from hub.core.trace import write as write_trace
from hub.core.unsent import COUNTED, UnsentAnswers
from hub.errors import (
    CANCELLED,
    OK,
    HubError,
    InvalidInput,
    ModelExecutionError,
    ModelNotFound,
    PermissionDenied,
    ShuttingDown,
    code_of,
    shorten,
)
from hub.limits import DEFAULT_LIMITS, MODEL_NAME_MAX, REQUEST_ID_MAX
from hub.logs import LogSettings
from hub.shm import OutputTarget, SharedMemoryRegistry
from hub.spec import MODEL_NAME, ModelSpec

log = logging.getLogger("modelhub.dataplane")
access = logging.getLogger("modelhub.access")

T = TypeVar("T")

#: Why load and unload are refused when the server was started without model control.
CONTROL_OFF = (
    "model control (load and unload) is off on this server; start it with --model-control "
    "(env MODELHUB_MODEL_CONTROL=1) or --watch"
)


def _settings_off(what: str) -> str:
    return (
        f"changing the {what} settings is model control, which is off on this server; start it with "
        "--model-control (env MODELHUB_MODEL_CONTROL=1) or --watch (reading them needs neither)"
    )


#: The V2 protocol extensions this server implements, as ServerMetadata lists them (with
#: "logging" where the log is ours, and the shared-memory ones where they are on).
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics", "trace")


@dataclass(frozen=True)
class RequestedOutput:
    """An output a client asked for. `class_count` > 0 asks for the classification extension:
    the top N entries of each row as BYTES "value:index" (or "value:index:label")."""

    name: str
    class_count: int = 0
    target: OutputTarget | None = None  # shared memory to write it into (the response carries no data)


@dataclass
class InferRequest:
    """One decoded inference request. `outputs` empty means every output of the model."""

    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[RequestedOutput] = ()
    parameters: Mapping[str, object] = field(default_factory=dict)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[tuple[str, np.ndarray]]  # in the order requested (or the model's order)
    #: Outputs already written into the shared memory the request gave them: the frontend
    #: describes them (name, datatype, shape) but sends no data.
    in_shared_memory: frozenset[str] = frozenset()


class ModelControl(Protocol):
    """Load, reload and unload (hub/core/control.py implements it)."""

    async def load_model(self, name: str) -> None: ...

    async def unload_model(self, name: str) -> None: ...


class LogControl(Protocol):
    """Triton's logging extension: hub.logs.LogSettings in one process; with several, the
    model process changes them in every process (hub/workers/frontend.py)."""

    def available(self) -> bool: ...

    def current(self) -> dict[str, bool | int | str]: ...

    async def update(self, changes: Mapping[str, object]) -> dict[str, bool | int | str]: ...


class TraceControl(Protocol):
    """The trace settings and the traces left to write: this process's in one process; with
    several, the model process's (hub/workers/frontend.py), which changes them everywhere."""

    async def settings(self, model: str) -> dict[str, list[str]]: ...

    async def update(self, model: str, changes: Mapping[str, object]) -> dict[str, list[str]]: ...

    async def claim(self, model: str) -> bool: ...


class LocalTraces:
    """The trace settings of this process's own tracer."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def settings(self, model: str) -> dict[str, list[str]]:
        return self._tracer.settings(model)

    async def update(self, model: str, changes: Mapping[str, object]) -> dict[str, list[str]]:
        return self._tracer.update(model, changes)

    async def claim(self, model: str) -> bool:
        return self._tracer.claim(model)


class DataPlane:
    """What every frontend calls. One per server; owns no models (the repository does)."""

    def __init__(
        self,
        repository: ModelRepository,
        is_ready: Callable[[], bool],
        *,
        is_live: Callable[[], bool] = lambda: True,
        control: ModelControl | None = None,
        version_policy: Callable[[str], VersionPolicy] | None = None,
        log_requests: float = 0.0,
        shared_memory: SharedMemoryRegistry | None = None,
        logs: LogControl | None = None,
        tracer: Tracer | None = None,
        traces: TraceControl | None = None,
        unsent_bytes: int = DEFAULT_LIMITS.unsent_bytes,
    ) -> None:
        self.repository = repository
        #: The answers held for clients that have not read them (hub/core/unsent.py).
        self.unsent = UnsentAnswers(unsent_bytes)
        self.logs: LogControl = logs or LogSettings()
        #: Samples this process's requests; `traces` changes its settings (and other processes').
        self.tracer = tracer or Tracer()
        self.traces: TraceControl = traces or LocalTraces(self.tracer)
        #: The regions requests may name (None: shared memory is off); frontends look them up.
        self.shared_memory = shared_memory
        self._is_ready = is_ready
        self._is_live = is_live
        self._control = control
        self._version_policy = version_policy
        self._log_requests = log_requests
        self._draining = False
        self._held: asyncio.Event | None = None  # refusals wait on it while set (`hold_refusals`)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # --- draining (SIGTERM) -------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    def refuse_new(self) -> None:
        """From now on refuse new inference requests at once (ShuttingDown: UNAVAILABLE or
        503, which clients may retry elsewhere), whichever frontend they come by; those
        already accepted are still answered."""
        self._draining = True

    def hold_refusals(self) -> None:
        """Refusals wait (`release_refusals`) instead of being answered at once: the server's
        last moments before its listeners stop. A client that was refused at once sent its next
        request straight away, and the one in grpc's queue when the listener stopped, not yet
        handed to a handler, was CANCELLED by grpc, which clients do not retry; a held refusal
        is a call in progress, which grpc lets finish (UNAVAILABLE), and its client sends nothing
        meanwhile. Only while draining."""
        if self._draining and self._held is None:
            self._held = asyncio.Event()

    def release_refusals(self) -> None:
        """Answer the held refusals (ShuttingDown), and refuse at once from now on."""
        if self._held is not None:
            self._held.set()

    async def drained(self, timeout: float) -> bool:
        """Wait until every accepted inference request is answered; False if `timeout` ran out."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def accept(self) -> None:
        """Count a request as accepted: drained() waits until it is `release()`d. `infer` does
        both itself; a frontend that accepts a request before (one read from a stream, say)
        passes `accepted=True` and releases it however its handling ends, infer or not."""
        if self._draining:
            raise ShuttingDown()
        self._in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        """An accepted request is answered (or refused, or cancelled): drained() stops waiting for it."""
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    # --- health and metadata ----------------------------------------------------------------

    def live(self) -> bool:
        return self._is_live()

    def ready(self) -> bool:
        return self._is_ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            return self.repository.resolve(name, version).ready
        except ModelNotFound:
            return False

    def server_metadata(self) -> tuple[str, str, Sequence[str]]:
        """(name, version, extensions)."""
        extensions = [*EXTENSIONS, *(("logging",) if self.logs.available() else ())]
        if self.shared_memory is not None:
            extensions += self.shared_memory.extensions()
        return "modelhub", __version__, extensions

    def model(self, name: str, version: str = "") -> ServedModel:
        """The model whose metadata or configuration a request asks for (NOT_FOUND for an
        unknown name or version)."""
        return self.repository.describe(name, version)

    def versions(self, name: str) -> list[ServedModel]:
        return self.repository.versions(name)

    def version_policy(self, name: str) -> VersionPolicy:
        return self._version_policy(name) if self._version_policy else VersionPolicy()

    async def statistics(self, name: str = "", version: str = "") -> list[ServedModel]:
        """The models whose statistics a request asks for: one version, every version of one
        model, or (no name) every model; their `stats` are current when this returns (with
        several worker processes they are fetched from the model process)."""
        if not name:
            models = self.repository.models()
        elif version:
            models = [self.repository.resolve(name, version)]
        else:
            models = self.repository.versions(name)
            if not models:
                self.repository.resolve(name)  # raises NOT_FOUND with the known names
        await self.repository.refresh_statistics(models)
        return models

    def index(self, ready_only: bool = False) -> list[ServedModel]:
        return [m for m in self.repository.models() if m.ready or not ready_only]

    # --- model control ----------------------------------------------------------------------

    async def load(self, name: str, parameters: Mapping[str, object] | None = None) -> None:
        """(Re)load a model. Triton's `config` and `file:` overrides are refused: a client must
        not hand the server a model configuration or files (CVE-2023-31036)."""
        for key in parameters or {}:
            if key == "config" or key.startswith("file:"):
                raise InvalidInput(
                    f"load parameter '{key[:64]}' is not supported: modelhub builds models from its plugins "
                    "directory only, and takes no configuration or files in a load request"
                )
        if self._control is None:
            raise PermissionDenied(CONTROL_OFF)
        _check_model_name(name)
        await self._control.load_model(name)

    async def unload(self, name: str) -> None:
        if self._control is None:
            raise PermissionDenied(CONTROL_OFF)
        _check_model_name(name)
        await self._control.unload_model(name)

    # --- log settings (Triton's logging extension) -----------------------------------------

    def log_settings(self) -> dict[str, bool | int | str]:
        """The server's log settings, as Triton names them; UNIMPLEMENTED where the process's
        log is not modelhub's (a library embedding the Server)."""
        return self.logs.current()

    async def update_log_settings(self, changes: Mapping[str, object]) -> dict[str, bool | int | str]:
        """Change some (InvalidInput naming a setting that is unknown, of the wrong type, or
        `log_file`, which a client may not set); the settings after. A change reconfigures the
        server, so it is model control: PERMISSION_DENIED while that is off (a client could
        otherwise silence the error lines, or flood the log with debug ones)."""
        if not changes:
            return self.logs.current()
        if self._control is None:
            self.logs.current()  # UNIMPLEMENTED first where the log is an embedder's
            raise PermissionDenied(_settings_off("log"))
        return await self.logs.update(changes)

    # --- shared memory (Triton's extension) -------------------------------------------------

    def _registry(self, kind: str) -> SharedMemoryRegistry:
        registry = self.shared_memory or SharedMemoryRegistry()
        registry.require(kind)  # Unsupported, saying how to turn it on
        return registry

    def require_shared_memory(self, kind: str) -> None:
        """Unsupported (saying how to turn it on) when this server does not take `kind`: a
        frontend asks before it reads a registration's fields, so a client of a server without
        the extension learns that first, not what is wrong with its handle."""
        self._registry(kind)

    async def register_shared_memory(self, kind: str, name: str, arguments: Mapping[str, Any]) -> None:
        """Register a region: `arguments` are key, offset, byte_size (system) or raw_handle,
        device_id, byte_size (CUDA). AlreadyExists for a registered name; InvalidInput when
        the key, handle, offset or size do not make a region."""
        await self._registry(kind).register(kind, name, dict(arguments))

    async def unregister_shared_memory(self, kind: str, name: str = "") -> None:
        """Unregister one region (an unknown name is no error) or, with no name, all of `kind`."""
        await (self.shared_memory or SharedMemoryRegistry()).remove(kind, name)

    def shared_memory_status(self, kind: str, name: str = "") -> list[dict[str, Any]]:
        """Each region's status as Triton reports it; NOT_FOUND for an unknown name."""
        return self._registry(kind).status(kind, name)

    # --- inference --------------------------------------------------------------------------

    async def infer(
        self,
        name: str,
        version: str,
        request_id: str,
        decode: Callable[[ModelSpec], InferRequest],
        encode: Callable[[InferResponse], T],
        *,
        timeout: float | None = None,
        accepted: bool = False,
        heavy: Callable[[InferResponse], bool] | None = None,
        hold: Callable[[int], None] | None = None,
    ) -> T:
        """One inference, accounted in statistics and metrics. `decode` (given the model's
        spec) and `encode` are the frontend's; their time and their errors count as the
        request's. `encode` runs in a worker thread for a response that `heavy` says costs
        more than the event loop should spend on it (REST's JSON of many values), so that it
        holds up no other request; it must then give the GIL up now and then (no single C call
        over a whole tensor). Large classifications are computed in a worker thread too.
        `hold(size)` is called for an answer of `COUNTED` bytes or more (its tensors' bytes,
        less those written to shared memory) before it is encoded: the frontend counts it in
        `self.unsent` until its client takes it, and a LimitReached from there is the
        request's answer.
        While the server drains it raises ShuttingDown, unless the frontend
        `accept()`ed the request before (`accepted`; it `release()`s it too).

        Raises a HubError (or, for a crash, ModelExecutionError) without its traceback, so a
        rejected request's arrays are freed as soon as it is answered.
        """
        if not accepted:
            if self._draining and self._held is not None:
                await self._held.wait()
            self.accept()
        try:
            if len(request_id) > REQUEST_ID_MAX:  # before it is logged, traced or forwarded
                raise InvalidInput(
                    f"request id is {len(request_id)} characters long; the most this server accepts is {REQUEST_ID_MAX}"
                )
            model = self.repository.get_ready(name, version)
            started = time.perf_counter()
            traced = self.tracer.active and self.tracer.sample(model.name)
            if traced and self.tracer.limited(model.name) and not await self.traces.claim(model.name):
                traced = False
            trace = self.tracer.new_id() if traced else None
            trace_start = time.monotonic_ns() if trace is not None else 0
            trace_computed = 0
            model.begin_request()
            code = OK
            delivery = None
            try:
                request = decode(model.spec)
                names = resolve_outputs(request.outputs, model)
                delivery = await model.infer(request.inputs, timeout=timeout, request_id=request_id)
                if trace is not None:
                    trace_computed = time.monotonic_ns()
                results = delivery.outputs
                if model.spec.postprocess is not None:  # model outputs -> served outputs, per request
                    results = await model.postprocess(results, delivery.inferences)
                outputs = []
                for n, c in names:
                    array = results[n]
                    if c:
                        array = await _classify_off_loop(model, n, array, c)
                    outputs.append((n, array))
                written: frozenset[str] = frozenset()
                if request.outputs and any(o.target is not None for o in request.outputs):
                    written = _write_shared(request.outputs, outputs)
                if hold is not None:
                    size = 0
                    for n, array in outputs:
                        if n not in written:
                            size += array.nbytes
                    if size >= COUNTED:
                        hold(size)
                response = InferResponse(model.name, str(model.version), request_id, outputs, written)
                if heavy is not None and heavy(response):
                    return await asyncio.get_running_loop().run_in_executor(None, encode, response)
                return encode(response)
            except asyncio.CancelledError:
                code = CANCELLED
                raise
            except HubError as exc:
                code = exc.code
                raise _bare(exc) from None
            except Exception as exc:
                code = code_of(exc)
                log.exception("model '%s': request %r failed", model.spec.key, request_id or "-")
                raise _bare(_crash(model, exc)) from None
            finally:
                elapsed = time.perf_counter() - started
                model.end_request(code, elapsed, delivery)
                if self._log_requests and random.random() < self._log_requests:
                    self._access(model, request_id, code, elapsed)
                if trace is not None:
                    _trace(trace, model, request_id, trace_start, trace_computed, delivery)
        finally:
            if not accepted:
                self.release()

    # --- trace settings (Triton's trace extension) ------------------------------------------

    async def trace_settings(self, model: str = "") -> dict[str, list[str]]:
        """The trace settings that apply to `model` ("": the global ones), `trace_count` as what
        is left of it; NOT_FOUND for an unknown model."""
        if model:
            self.repository.resolve(model)
        return await self.traces.settings(model)

    async def update_trace_settings(self, model: str, changes: Mapping[str, object]) -> dict[str, list[str]]:
        """Change the global settings or a model's own (a setting sent as None clears it);
        model control, as the log settings are."""
        if model:
            self.repository.resolve(model)
        if not changes:
            return await self.traces.settings(model)
        if self._control is None:
            raise PermissionDenied(_settings_off("trace"))
        return await self.traces.update(model, changes)

    def _access(self, model: ServedModel, request_id: str, code: str, elapsed: float) -> None:
        access.info(
            "%s v%d id=%s %s %.3fms",
            model.name,
            model.version,
            request_id or "-",
            code,
            elapsed * 1e3,
            extra={
                "model": model.name,
                "version": model.version,
                "request_id": request_id,
                "code": code,
                "ms": round(elapsed * 1e3, 3),
            },
        )


def _check_model_name(name: str) -> None:
    """Refuse a name no model can have (hub/spec.py) before anything looks for it: with
    --workers N the frontend would forward it to the model process, and a load re-imports
    every plugin first (an empty name was NOT_FOUND after that)."""
    if len(name) > MODEL_NAME_MAX:
        raise InvalidInput(
            f"model name '{shorten(name)}' is longer than {MODEL_NAME_MAX} characters, the most a model's name may be"
        )
    if not MODEL_NAME.match(name):
        raise InvalidInput(
            f"model name '{shorten(name)}' cannot name a model: a model's name is letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )


def resolve_outputs(requested: Sequence[RequestedOutput], model: ServedModel) -> list[tuple[str, int]]:
    """(name, class_count) of every output to return: the requested ones, or all of the model's."""
    spec = model.spec
    if not requested:
        return [(t.name, 0) for t in spec.outputs]
    declared = [t.name for t in spec.outputs]
    names = []
    seen: set[str] = set()
    for output in requested:
        if output.name in seen:  # (each would be encoded again: a few bytes of request, an output's worth of answer)
            raise InvalidInput(f"requested output '{shorten(output.name)}' appears more than once")
        seen.add(output.name)
        if output.name not in declared:
            raise InvalidInput(
                f"requested output '{shorten(output.name)}' is not an output of model '{spec.name}'; "
                f"outputs: {declared}"
            )
        if output.class_count and output.target is not None:
            raise InvalidInput(
                f"requested output '{shorten(output.name)}': classification and shared memory cannot be combined"
            )
        if output.class_count < 0:
            raise InvalidInput(
                f"requested output '{shorten(output.name)}': class_count must be positive, got {output.class_count}"
            )
        names.append((output.name, output.class_count))
    return names


def _write_shared(requested: Sequence[RequestedOutput], outputs: list[tuple[str, np.ndarray]]) -> frozenset[str]:
    """Write the outputs that asked for shared memory into it; their names."""
    targets = {o.name: o.target for o in requested if o.target is not None}
    for name, array in outputs:
        target = targets.get(name)
        if target is not None:
            target.write(name, array)
    return frozenset(targets)


#: Classification entries ("value:index" strings, ~1 µs each) computed on the event loop; more
#: are computed in a worker thread. A client may ask for as many classes as an output has
#: values: 16 M of them (a 64 MiB FP32 request to an identity model) held the loop for ~18 s.
INLINE_CLASSIFY = 1 << 12


async def _classify_off_loop(model: ServedModel, name: str, array: np.ndarray, count: int) -> np.ndarray:
    """_classify, in a worker thread when it makes more than INLINE_CLASSIFY entries."""
    rows = array.shape[0] if model.spec.batching.batching and array.ndim else 1
    columns = array.size // rows if rows else 0
    if rows * min(count, columns) <= INLINE_CLASSIFY:
        return _classify(model, name, array, count)
    return await asyncio.get_running_loop().run_in_executor(None, _classify, model, name, array, count)


def _classify(model: ServedModel, name: str, array: np.ndarray, count: int) -> np.ndarray:
    """Triton's classification extension: per row, the top `count` entries as BYTES
    "value:index[:label]", highest first."""
    tensor = next(t for t in model.spec.outputs if t.name == name)
    if array.dtype.kind not in "fiub":
        raise InvalidInput(f"output '{tensor.name}' is {tensor.datatype}: classification needs a numeric output")
    batched = model.spec.batching.batching
    rows = array.reshape(array.shape[0], -1) if batched else array.reshape(1, -1)
    count = min(count, rows.shape[1])
    top = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :count]
    labels = tensor.labels
    out = np.empty(top.shape, dtype=np.object_)
    for r in range(top.shape[0]):
        for k, index in enumerate(top[r]):
            value = rows[r, index]
            text = f"{float(value):f}:{int(index)}" if array.dtype.kind == "f" else f"{int(value)}:{int(index)}"
            if labels is not None and index < len(labels):
                text += f":{labels[index]}"
            out[r, k] = text.encode()
    return out if batched else out.reshape(-1)


def _trace(trace: int, model: ServedModel, request_id: str, started: int, computed: int, delivery: Any) -> None:
    """Write a sampled request's trace: it started at `started` and its batch's answer came at
    `computed` (0: it never did), in monotonic nanoseconds."""
    durations = None
    if computed and delivery is not None:
        batch = delivery.batch
        durations = (delivery.queue_ns, batch.input_ns, batch.infer_ns, batch.output_ns)
    write_trace(trace, model.name, model.version, request_id, started, computed or None, durations)


def _crash(model: ServedModel, exc: BaseException) -> HubError:
    return ModelExecutionError(f"model '{model.name}' failed: {type(exc).__name__}")


def _bare(exc: HubError) -> HubError:
    """The error without the traceback and context that would keep the request's frames (and
    their arrays) alive until the cyclic garbage collector runs."""
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc
