"""Test plugin: models that misbehave on purpose (slow, failing), for batching and errors."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

POISON = -1.0  # a row holding this value makes "fragile" raise in its forward


def _sleepy() -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.05)
        return {"OUTPUT0": inputs["INPUT0"] * 2}

    return run


def _fragile() -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["INPUT0"] == POISON).any():
            raise ValueError("poisoned row")
        return {"OUTPUT0": inputs["INPUT0"] + 1}

    return run


def _spec(name: str, build: Callable[[], object], batching: BatchPolicy) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=build,
        inputs=[TensorSpec("INPUT0", "FP32", (-1, 1))],
        outputs=[TensorSpec("OUTPUT0", "FP32", (-1, 1))],
        example_inputs={"INPUT0": np.ones((1, 1), np.float32)},
        target="numpy",
        batching=batching,
    )


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    register(_spec("sleepy", _sleepy, BatchPolicy(max_batch_size=1, max_queue_size=4)))
    register(_spec("fragile", _fragile, BatchPolicy(max_batch_size=8, max_queue_delay=0.02)))


async def call_sleepy(client: object, value: float) -> float | str:
    """One request to "sleepy" with tritonclient's asyncio client: 2 * value, or the status code."""
    import tritonclient.grpc.aio as tc_aio
    from tritonclient.utils import InferenceServerException

    tensor = tc_aio.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), value, np.float32))
    try:
        result = await client.infer("sleepy", [tensor])  # type: ignore[attr-defined]
    except InferenceServerException as exc:
        return str(exc.status())
    return float(result.as_numpy("OUTPUT0")[0, 0])
