"""One served model version: its state, its runtime and batcher, and the checks a request
must pass before it is queued."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hub.core.batching import Arrays, Batcher
from hub.core.stats import ModelStats
from hub.datatypes import datatype_of
from hub.errors import InvalidInput, ModelUnavailable
from hub.metrics import ModelMetrics
from hub.spec import ModelSpec, Runtime, Target


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"

    @property
    def triton(self) -> str:
        """The state name Triton's RepositoryIndex uses."""
        return {"loading": "LOADING", "ready": "READY"}.get(self.value, "UNAVAILABLE")


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
    metrics: ModelMetrics | None = None
    load_seconds: float = 0.0

    def set_state(self, state: ModelState, reason: str = "", *, announce: bool = True) -> None:
        """Change state; `announce=False` keeps it off the metrics (a replacement loading
        while the current version still serves)."""
        self.state = state
        self.reason = reason
        if announce and self.metrics is not None:
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
        if self.metrics is not None:
            self.metrics.in_flight.inc()

    def end_request(self, code: str, seconds: float) -> None:
        """Account one finished request: Triton-style statistics and Prometheus metrics."""
        (self.stats.success if code == "OK" else self.stats.fail).add(int(seconds * 1e9))
        if self.metrics is not None:
            self.metrics.in_flight.dec()
            self.metrics.request_done(code, seconds)

    async def infer(
        self, inputs: Mapping[str, np.ndarray], *, timeout: float | None = None, request_id: str = ""
    ) -> Arrays:
        """Check a request against the spec and run it through the batcher."""
        if self.batcher is None or self.state is not ModelState.READY:
            raise ModelUnavailable(
                f"model '{self.name}' version {self.version} is {self.state.value}"
                + (f": {self.reason}" if self.reason else "")
            )
        rows, signature = check_inputs(self.spec, inputs)
        return await self.batcher.submit(inputs, rows=rows, signature=signature, timeout=timeout, request_id=request_id)


def check_inputs(spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> tuple[int, tuple[object, ...]]:
    """Validate names, datatypes, shapes and the batch size; return (rows, batch signature).

    The signature is the non-batch shape of every input: only requests with equal
    signatures are concatenated into one batch.
    """
    expected = spec.inputs
    if len(inputs) != len(expected) or any(t.name not in inputs for t in expected):
        names = [t.name for t in expected]
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if spec.input(n) is None]
        problems = []
        if missing:
            problems.append(f"missing input(s) {missing}")
        if extra:
            problems.append(f"unexpected input(s) {extra}")
        raise InvalidInput(f"model '{spec.name}': {'; '.join(problems)}; expected inputs {names}")
    policy = spec.batching
    rows: int | None = None
    signature: list[object] = []
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
            signature.append(array.shape[1:])
    return (rows if rows is not None else 1), tuple(signature)
