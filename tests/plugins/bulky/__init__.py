"""Test plugin: "bulky", whose answer is far larger than its request: INPUT0 holds a number of
KiB and OUTPUT0 is that many KiB of FP32 ones, for clients that never read their answers.
Each batch takes 50 ms (never computed inline on the event loop), so the requests a stream
sends meanwhile are read and wait in the queue.
Uses the "numpy" target of identity.py. A package, so the shared test servers (which take
every tests/plugins/*.py) do not serve it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl


def _bulky() -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        kib = int(np.clip(inputs["INPUT0"], 1, 64 << 10).max())
        time.sleep(0.05)
        return {"OUTPUT0": np.ones((len(inputs["INPUT0"]), kib * 256), np.float32)}

    return run


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="bulky",
            build=_bulky,
            inputs=[TensorSpec("INPUT0", "INT32", (-1, 1))],
            outputs=[TensorSpec("OUTPUT0", "FP32", (-1, -1))],
            example_inputs={"INPUT0": np.ones((1, 1), np.int32)},
            target="numpy",
            batching=BatchPolicy(max_batch_size=1),
        )
    )
