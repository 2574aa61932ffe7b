"""One served model version: its state, its runtime and batcher, and the checks a request
must pass before it is queued."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hub.core.batching import Batcher, Delivery
from hub.core.stats import ModelStats
from hub.datatypes import NUMPY_DTYPES, datatype_of
from hub.errors import HubError, InvalidInput, ModelExecutionError, ModelUnavailable, name_list
from hub.metrics import ModelMetrics, NullModelMetrics
from hub.spec import ModelSpec, Runtime, Target, TensorSpec

log = logging.getLogger("modelhub.models")


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass(eq=False)
class ServedModel:
    spec: ModelSpec
    target: Target | None = None
    state: ModelState = ModelState.LOADING
    reason: str = ""
    runtime: Runtime | None = None
    batcher: Batcher | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    stats: ModelStats = field(default_factory=ModelStats)
    metrics: ModelMetrics | NullModelMetrics = field(default_factory=NullModelMetrics)
    load_seconds: float = 0.0
    device: str = ""  # where the runtime computes ("cpu", "cuda"), once loaded

    def set_state(self, state: ModelState, reason: str = "", *, announce: bool = True) -> None:
        """Change state; `announce=False` keeps it off the metrics (a replacement loading
        while the current version still serves)."""
        self.state = state
        self.reason = reason
        if announce:
            self.metrics.state(state.value)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.spec.version

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    def begin_request(self) -> None:
        self.metrics.request_started()

    def abandon_request(self) -> None:
        """A request left this process unanswered (it is counted where it is answered)."""
        self.metrics.request_abandoned()

    def end_request(self, code: str, seconds: float, delivery: Delivery | None) -> None:
        """Account one answered request: statistics (with its batch, from the batcher's
        delivery, when it succeeded) and Prometheus metrics."""
        ns = int(seconds * 1e9)
        if code == "OK" and delivery is not None:
            self.stats.request_succeeded(ns, delivery.inferences, delivery.queue_ns, delivery.batch)
        else:
            self.stats.request_failed(ns)
        self.metrics.request_done(code, seconds)

    async def infer(
        self, inputs: Mapping[str, np.ndarray], *, timeout: float | None = None, request_id: str = ""
    ) -> Delivery:
        """Check a request against the spec and run it through the batcher."""
        if self.batcher is None or self.state is not ModelState.READY:
            reason = self.reason if self.reason != self.state.value else ""  # not "is unloaded: unloaded"
            raise ModelUnavailable(
                f"model '{self.name}' version {self.version} is {self.state.value}" + (f": {reason}" if reason else "")
            )
        rows = check_inputs(self.spec, inputs)
        inputs, batcher = self.placement(inputs)
        if self.spec.preprocess is not None:
            inputs = await self._preprocess(inputs, rows)
        signature = batch_signature(self.spec, inputs)
        return await batcher.submit(inputs, rows=rows, signature=signature, timeout=timeout, request_id=request_id)

    def placement(self, inputs: Mapping[str, np.ndarray]) -> tuple[Mapping[str, np.ndarray], Any]:
        """The inputs as the batcher that computes them takes them, and that batcher. Inputs on
        the device (CUDA shared memory) come to the host for a runtime that takes numpy only,
        and for a spec's preprocess, which is given numpy arrays."""
        if not all_numpy(inputs) and (
            self.spec.preprocess is not None or not getattr(self.runtime, "takes_device_tensors", False)
        ):
            inputs = {name: on_host(array) for name, array in inputs.items()}
        return inputs, self.batcher

    async def _preprocess(self, inputs: Mapping[str, np.ndarray], rows: int) -> Mapping[str, np.ndarray]:
        """The spec's per-request preprocess, in a thread (tokenising a long text must not stall
        the event loop); its output is checked against `model_inputs`."""
        forward = await self._in_thread("preprocess", self.spec.to_forward, inputs)
        try:
            got = check_inputs(self.spec, forward, self.spec.model_inputs)
        except InvalidInput as exc:
            raise ModelExecutionError(f"model '{self.name}': preprocess returned bad model inputs: {exc}") from None
        if self.spec.batching.batching and got != rows:
            raise ModelExecutionError(f"model '{self.name}': preprocess turned {rows} rows into {got}")
        return forward

    async def postprocess(self, outputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """The spec's per-request postprocess of a delivery's outputs (the request's own `rows`),
        in a thread, outside the batched forward as `_preprocess` is; its result is checked
        against the served `outputs`. Called by whoever answers the request, after `infer`,
        so a failure here still has the delivery to account (and, with --workers N, to give
        its outputs' block back with)."""
        served = await self._in_thread("postprocess", self.spec.from_forward, outputs)
        problem = self.spec.output_problem(served, rows)
        if problem is not None:
            raise ModelExecutionError(f"model '{self.name}': postprocess returned bad outputs: {problem}")
        return served

    async def _in_thread(
        self, step: str, function: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]], arrays: Any
    ) -> dict[str, np.ndarray]:
        """A spec's per-request `step` (preprocess, postprocess) in a thread, its failures as the
        client sees them: a ValueError, the documented way for a step to refuse its request, is
        INVALID_ARGUMENT with its message; anything else INTERNAL naming the model and the
        error's type, the details going to the log."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, function, arrays)
        except HubError:
            raise
        except ValueError as exc:
            raise InvalidInput(f"model '{self.name}': {exc}") from None
        except Exception as exc:
            log.error("model '%s': %s failed", self.spec.key, step, exc_info=exc)
            raise ModelExecutionError(f"model '{self.name}': {step} failed: {type(exc).__name__}") from None


def all_numpy(inputs: Mapping[str, Any]) -> bool:
    """Whether every input is a numpy array: none lies in CUDA shared memory."""
    return all(isinstance(array, np.ndarray) for array in inputs.values())


def on_host(array: Any) -> np.ndarray:
    """An input as a numpy array: a tensor on the device (CUDA shared memory) copied to the
    host, for runtimes that take numpy only (ONNX Runtime, plugins' own)."""
    if isinstance(array, np.ndarray):
        return array
    import torch

    if array.dtype == torch.bfloat16:
        return array.view(torch.uint16).cpu().numpy().view(NUMPY_DTYPES["BF16"])
    return array.cpu().numpy()


def batch_signature(spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> tuple[object, ...]:
    """What requests must share to be concatenated into one batch: the non-batch shape of
    every model input, except the variable dims of inputs the batcher may pad."""
    if not spec.batching.batching:
        return ()
    signature: list[object] = []
    for tensor in spec.forward_inputs:
        shape = inputs[tensor.name].shape[1:]
        if tensor.padding is not None:
            shape = tuple(None if want == -1 else got for want, got in zip(tensor.shape[1:], shape, strict=True))
        signature.append(shape)
    return tuple(signature)


def check_inputs(
    spec: ModelSpec, inputs: Mapping[str, np.ndarray], expected: Sequence[TensorSpec] | None = None
) -> int:
    """Validate names, datatypes, shapes and the batch size against `expected` (the served
    inputs by default); return the number of rows."""
    expected = spec.inputs if expected is None else expected
    if len(inputs) != len(expected) or any(t.name not in inputs for t in expected):
        names = [t.name for t in expected]
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        problems = []
        if missing:
            problems.append(f"missing input(s) {name_list(missing)}")
        if extra:
            problems.append(f"unexpected input(s) {name_list(extra)}")
        raise InvalidInput(f"model '{spec.name}': {'; '.join(problems)}; expected inputs {name_list(names)}")
    policy = spec.batching
    rows: int | None = None
    for tensor in expected:
        array = inputs[tensor.name]
        datatype = datatype_of(array)
        if datatype != tensor.datatype:
            raise InvalidInput(f"input '{tensor.name}': expected datatype {tensor.datatype}, got {datatype}")
        if not tensor.matches(array.shape):
            raise InvalidInput(f"input '{tensor.name}': expected shape {list(tensor.shape)}, got {list(array.shape)}")
        if policy.batching:
            n = array.shape[0]
            if n < 1:
                raise InvalidInput(f"input '{tensor.name}': batch size must be at least 1, got {n}")
            if n > policy.max_batch_size:
                raise InvalidInput(
                    f"input '{tensor.name}': batch size {n} exceeds max_batch_size {policy.max_batch_size}"
                )
            if rows is None:
                rows = n
            elif n != rows:
                raise InvalidInput(f"input '{tensor.name}': batch size {n} differs from the other inputs' {rows}")
    return rows if rows is not None else 1
