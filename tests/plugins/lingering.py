"""Test plugin: a model whose preprocess sleeps as long as its request asks (INPUT0's first
value, in seconds, at most 30), in asyncio's default thread pool as every preprocess runs:
requests that stay in flight, and a pool with a queue, for the shutdown tests. Needs the
"numpy" target of identity.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl


def _linger(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    values = np.asarray(inputs["INPUT0"], np.float32)
    time.sleep(min(max(float(values.reshape(-1)[0]), 0.0), 30.0))
    return {"INPUT0": values}


def _double() -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"] * 2}

    return run


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="lingering",
            build=_double,
            inputs=[TensorSpec("INPUT0", "FP32", (-1, 1))],
            model_inputs=[TensorSpec("INPUT0", "FP32", (-1, 1))],
            preprocess=_linger,
            outputs=[TensorSpec("OUTPUT0", "FP32", (-1, 1))],
            example_inputs={"INPUT0": np.zeros((1, 1), np.float32)},
            target="numpy",
            batching=BatchPolicy(max_batch_size=64),
        )
    )
