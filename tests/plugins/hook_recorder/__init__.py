"""Test plugin package: implements every hook and records each call, so that
tests/test_hooks_documented.py can check that the server and the builder invoke every hook.
Its relative imports (`from .runtime import ...`) also show that a package plugin may use them.

Not linked into the shared test server (conftest links tests/plugins/*.py only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hub import BatchPolicy, ModelSpec, Runtime, Target, TensorSpec, Tolerance, hookimpl

from . import runtime as _runtime
from .runtime import RecordingRuntime

#: (hook name, a detail of the call), in the order the hooks were called.
CALLS: list[tuple[str, Any]] = []


@hookimpl
def register_targets(register: Callable[[Target], None]) -> None:
    CALLS.append(("register_targets", None))
    register(
        Target(
            name="recorded",
            build=_runtime.build,
            load=_runtime.load,
            check_parity=False,
            description="a numpy function, for the hook recorder",
        )
    )


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    CALLS.append(("register_models", None))
    register(
        ModelSpec(
            name="recorded",
            build=_runtime.doubler,
            inputs=[TensorSpec("IN", "FP32", (-1, 2))],
            outputs=[TensorSpec("OUT", "FP32", (-1, 2))],
            example_inputs={"IN": np.ones((1, 2), np.float32)},
            target="recorded",
            batching=BatchPolicy(max_batch_size=4),
        )
    )


@hookimpl
def validate_artifact(
    spec: ModelSpec,
    runtime: Runtime,
    examples: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    tolerance: Tolerance,
    labels: np.ndarray | None,
) -> dict[str, Any] | None:
    CALLS.append(("validate_artifact", (spec.key, isinstance(runtime, RecordingRuntime))))
    return None


@hookimpl
def server_started(server: Any) -> None:
    CALLS.append(("server_started", server.models()))


@hookimpl
def server_stopping(server: Any) -> None:
    CALLS.append(("server_stopping", server.grpc_port))
